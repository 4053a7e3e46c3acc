"""Reading data files: one reader per format, shared by the Ray Data pipeline and plain Python.

    read_jsonl / read_json / read_parquet / read_txt   a binary stream -> (1-based row, record | RowError)
    read_file(path[, data])                            a file or URI (optionally .gz) -> (file, row, record | RowError)
    read_dataset(source, part)                         a saved, named or folder dataset -> (name, row, record)
    iter_records(sources, part)                        every source, in the pipeline's order
    read_rows(path, limit, on_bad_row=...)             plain Python: good rows as dicts, bad rows counted
    read_sources(sources, part)                        Ray Data: one row per record (below)

What a row number is, per format:
    .jsonl/.ndjson  the line number (blank lines count, are not records).
    .json           one JSON document: a list of records -> row = index in the list (1-based); an object
                    with exactly ONE key whose value is a list (e.g. {"data": [...]}, {"train": [...]})
                    is a wrapper and that list is the records — unless the key is a column a record
                    itself holds as a list (formats.LIST_COLUMNS: messages, conversations, prompt,
                    completion), then the object is one record; any other value is one record.
                    A .json file that is not one document but JSON lines is read as .jsonl.
    .parquet        the row index (1-based).
    .txt            continued pre-training: documents separated by blank lines, each {"text": ...};
                    row = the document's first line.
    datasets        the row index in the split (data.split for data.path, default "train"; an eval path:
                    its first split of validation/test/eval/valid).

A record that cannot be read is not an exception but a RowError in place of the record, named later as
"file:row: field: what": a line that is not valid UTF-8 ("line: not valid UTF-8 at byte N (...)", N
counted from 1 within the line; in .json "<field>: ... at byte N of this string"; in .txt "text: ...
at byte N of line L"), a line that is not JSON ("json: invalid JSON (...)"), a lone surrogate. A .json
document that does not parse is one bad row (at the line of the error). A file that cannot be read
at all (corrupt gzip or parquet) raises ValueError naming the file.

In Ray Data every record is a row {"_src": file, "_row": row, "_json": the record as JSON text, "_err":
the RowError text or "", "_part"}. Keeping the record as JSON text (not as Arrow columns) means rows of
mixed or wrong types cannot break Ray Data's schema inference: each row is validated later, in the
tokenizer actors, where a bad row becomes a counted, named skip instead of a crash.

Paths (resolve_sources), comma-separated lists of:
    files, folders (searched recursively), globs     read by the readers above, chosen by extension;
    URIs: s3://, gs://, hf://, file://, ...          the same, through a pyarrow filesystem (FileSystem.from_uri;
                                                     hf:// through huggingface_hub.HfFileSystem; other
                                                     schemes through fsspec): files, folders, globs;
    folders written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (local or URI);
    dataset names for `datasets.load_dataset` ("org/name", "org/name@revision": a path that does not
        exist here and has the shape of a hub id), and local folders laid out as a dataset repo (a README.md
        whose YAML header declares `configs:`, or any folder when a subset or a split other than "train" is
        asked for): read with load_dataset(name, subset, split=split). Offline (HF_HUB_OFFLINE=1) a name is
        looked for in the Hugging Face hub cache (a repo fetched with `hf download --repo-type dataset`),
        then in the datasets cache (a dataset loaded once before).
A subset, or a split other than "train", given for files only is an error naming data.subset / data.split.
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from cluster.formats import LIST_COLUMNS, RowError

logger = logging.getLogger("posttrain.data")

EXTENSIONS = (".jsonl", ".ndjson", ".json", ".parquet", ".txt")
ROWS_PER_BLOCK = 256  # blocks this small let several tokenizer actors share one big file
EVAL_SPLITS = ("validation", "test", "eval", "valid")
MAX_BAD_REASONS = 5
BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape that may decode to a lone surrogate

Record = object  # a decoded JSON value (a dict when the row is well formed)


@dataclass(frozen=True)
class Source:
    """One thing to read. kind: "file" (a local path or a URI), "hf" (a save_to_disk folder) or "dataset"
    (datasets.load_dataset: a name or a dataset folder). split "": "train" for data.path (part 0), the
    first eval split for an eval path (part 1). Only datasets use subset and split."""

    kind: str
    path: str
    subset: str = ""
    split: str = ""
    field: str = "data.path"  # the setting that named it, for messages


def _kind_of(path: str) -> str | None:
    p = path.lower()
    if p.endswith(".gz"):
        p = p[:-3]
    return next((e for e in EXTENSIONS if p.endswith(e)), None)


def is_hf_saved(folder: str) -> bool:
    return (os.path.isfile(os.path.join(folder, "dataset_dict.json"))
            or (os.path.isfile(os.path.join(folder, "state.json"))
                and os.path.isfile(os.path.join(folder, "dataset_info.json"))))


def _folder_files(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and _kind_of(f)]
    return found


def _dataset_repo(folder: str) -> bool:
    """A folder laid out as a Hugging Face dataset repo: a README.md whose YAML header declares `configs:`."""
    try:
        with open(os.path.join(folder, "README.md"), encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 16)
    except OSError:
        return False
    return text.startswith("---") and re.search(r"^configs:", text[3:].split("\n---", 1)[0], re.M) is not None


def is_dataset_name(part: str) -> bool:
    """Whether a path that does not exist here is read as a dataset name (`org/name`, `name`, `@revision`)."""
    from kernels.hub import is_hub_id

    return not glob.has_magic(part) and _kind_of(part) is None and is_hub_id(part)


def resolve_sources(path: str, field: str = "data.path", *, subset: str = "", split: str = "") -> list[Source]:
    """Expand a comma-separated list of files, folders, globs, URIs and dataset names into sources (in a
    stable order). `subset`/`split` go to the datasets among them (split "": see Source); given for
    files only (a subset, or a split other than "train") they are an error naming the setting."""
    parts = [p.strip() for p in str(path).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{field}: empty path")
    # an eval path (split ""): data.subset applies to dataset names and dataset repo folders only
    asked = bool(split) and bool(subset or split != "train")
    sources: list[Source] = []
    for part in parts:
        if is_uri(part):
            sources += _resolve_uri(part, field, subset, split)
            continue
        part = os.path.expanduser(part)
        if not glob.has_magic(part) and not os.path.exists(part) and is_dataset_name(part):
            sources.append(Source("dataset", part, subset, split, field))
            continue
        if glob.has_magic(part):
            matches = sorted(glob.glob(part, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{field}: no file matches {part!r}")
        else:
            if not os.path.exists(part):
                raise FileNotFoundError(f"{field}: {part!r} does not exist")
            matches = [part]
        for m in matches:
            if os.path.isdir(m):
                if is_hf_saved(m):
                    sources.append(Source("hf", m, subset if split else "", split, field))
                    continue
                if _dataset_repo(m) or asked:
                    sources.append(Source("dataset", m, subset, split, field))
                    continue
                files = _folder_files(m)
                if not files and glob.has_magic(part):
                    continue
                if not files:
                    raise FileNotFoundError(
                        f"{field}: folder {m!r} holds no {'/'.join(EXTENSIONS)} files (nor a saved HF dataset)")
                sources += [Source("file", f, field=field) for f in files]
            elif _kind_of(m):
                sources.append(Source("file", m, field=field))
            elif not glob.has_magic(part):
                raise ValueError(f"{field}: {m!r}: unknown file type; accepted: {', '.join(EXTENSIONS)} "
                                 f"(optionally .gz), folders, or a datasets.save_to_disk folder")
    if not sources:
        raise FileNotFoundError(f"{field}: no data files found in {path!r}")
    files = [s.path for s in sources if s.kind == "file"]
    if asked and len(files) == len(sources):
        setting, value = (f"{_section(field)}.subset", subset) if subset else (f"{_section(field)}.split", split)
        raise ValueError(f"{setting}: {value!r} is for dataset names, dataset folders and saved datasets; "
                         f"{field} {path!r} names files only")
    if (files and len(files) == len(sources) and not any(is_uri(f) for f in files)
            and all(os.path.getsize(f) == 0 for f in files)):
        raise ValueError(f"{field}: {path!r}: empty file{'s' if len(files) > 1 else ''}, no rows to read")
    return sources


def _section(field: str) -> str:
    return field.rsplit(".", 1)[0] if "." in field else field


# ---------------------------------------------------------------- URIs (pyarrow / fsspec filesystems)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str) -> bool:
    return bool(_URI.match(str(path)))


@functools.lru_cache(maxsize=16)
def _bucket_filesystem(scheme: str, bucket: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]  # S3 asks for the bucket's region once


def uri_filesystem(uri: str):
    """(pyarrow filesystem, path in it, prefix) of a URI, where prefix + path is a URI of that
    filesystem again: s3:// and gs:// through pyarrow (one filesystem per bucket), hf:// through
    huggingface_hub.HfFileSystem, other schemes pyarrow knows (file://, hdfs://, ...) through
    FileSystem.from_uri, the rest through fsspec. ValueError when no filesystem takes the scheme."""
    import pyarrow.fs as pafs

    uri = uri.rstrip("/") if not uri.endswith(":///") else uri
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme in ("s3", "gs", "gcs"):
        return _bucket_filesystem(scheme, rest.split("/", 1)[0]), rest, f"{scheme}://"
    if scheme == "hf":
        from huggingface_hub import HfFileSystem

        return pafs.PyFileSystem(pafs.FSSpecHandler(HfFileSystem())), rest, "hf://"
    try:
        fs, inner = pafs.FileSystem.from_uri(uri)
    except (ValueError, NotImplementedError) as e:  # pyarrow.ArrowInvalid is a ValueError
        try:
            import fsspec

            ffs, inner = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as e2:
            raise ValueError(f"no filesystem reads {scheme}:// URIs (pyarrow: {e}; fsspec: {e2})") from None
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(ffs))
    prefix = uri[: len(uri) - len(inner)] if inner and uri.endswith(inner) else f"{scheme}://"
    return fs, inner, prefix


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") for p in rel.split("/") if p)


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Glob semantics per path segment: * and ? stay within a segment, ** spans any number of them."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(pattern[1:], parts[k:]) for k in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(pattern[1:], parts[1:])


def _resolve_uri(uri: str, field: str, subset: str, split: str) -> list[Source]:
    """A URI's sources: one file, a folder's files (recursively; a saved dataset), or a glob's matches."""
    import pyarrow.fs as pafs

    try:
        fs, inner, prefix = uri_filesystem(uri)
    except ValueError as e:
        raise ValueError(f"{field}: {uri!r}: {e}") from None
    try:
        if glob.has_magic(inner):
            segments = inner.split("/")
            k = next(i for i, seg in enumerate(segments) if glob.has_magic(seg))
            base = "/".join(segments[:k]) or "/"
            listing = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            files = [i.path for i in listing if i.type == pafs.FileType.File and _kind_of(i.path)
                     and _glob_match(segments, i.path.split("/")) and not _hidden(i.path[len(base):])]
            if not files:
                raise FileNotFoundError(f"{field}: no file matches {uri!r}")
            files.sort()
        else:
            info = fs.get_file_info(inner)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{field}: {uri!r} does not exist")
            if info.type == pafs.FileType.Directory:
                listing = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                names = {i.path[len(inner):].strip("/") for i in listing}
                if "dataset_dict.json" in names or {"state.json", "dataset_info.json"} <= names:
                    return [Source("hf", uri, subset if split else "", split, field)]
                files = sorted((i.path for i in listing if i.type == pafs.FileType.File and _kind_of(i.path)
                                and not _hidden(i.path[len(inner):])), key=_walk_order)
                if not files:
                    raise FileNotFoundError(f"{field}: folder {uri!r} holds no {'/'.join(EXTENSIONS)} files "
                                            f"(nor a saved HF dataset)")
            elif not _kind_of(inner):
                raise ValueError(f"{field}: {uri!r}: unknown file type; accepted: {', '.join(EXTENSIONS)} "
                                 f"(optionally .gz), folders, or a datasets.save_to_disk folder")
            else:
                files = [inner]
    except FileNotFoundError:
        raise
    except OSError as e:  # credentials, permissions, network: pyarrow says which
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OSError(f"{field}: {uri!r}: cannot be listed ({reason})") from None
    return [Source("file", prefix + f, field=field) for f in files]


def _walk_order(path: str) -> tuple:
    """A folder's files in the order _folder_files gives (os.walk): a folder's own files, then its subfolders."""
    *dirs, name = path.split("/")
    return tuple((1, d) for d in dirs) + ((0, name),)


def read_uri(uri: str, limit: int = -1) -> bytes:
    """The bytes of one file at a URI (the first `limit` bytes when limit >= 0), not decompressed."""
    fs, inner, _ = uri_filesystem(uri)
    with fs.open_input_stream(inner, compression=None) as f:
        return f.read(limit) if limit >= 0 else f.readall()


# ---------------------------------------------------------------- text checks shared by the readers

def _decode(raw: bytes, field: str, where: str = "") -> str | RowError:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return RowError(field, f"not valid UTF-8 at byte {e.start + 1}{where} ({e.reason})")


def _loads(text: str) -> Record | RowError:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RowError("json", f"invalid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return RowError("json", "nested too deeply")


def _unicode_problem(value, field: str, escaped_bytes: bool) -> RowError | None:
    """The first string (key or value) of a record holding a surrogate: with escaped_bytes, surrogates
    U+DC80..U+DCFF are bytes that were not UTF-8 (decoded with surrogateescape); else a lone surrogate
    came from a JSON \\u escape and is not valid Unicode either."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        if m is None:
            return None
        if escaped_bytes and "\udc80" <= m.group() <= "\udcff":
            try:
                value.encode("utf-8", "surrogateescape").decode("utf-8")
            except UnicodeEncodeError:
                pass
            except UnicodeDecodeError as e:
                return RowError(field, f"not valid UTF-8 at byte {e.start + 1} of this string")
        return RowError(field, f"not valid Unicode: lone surrogate \\u{ord(m.group()):04x} at character "
                               f"{m.start() + 1}")
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{field}.{k}" if field != "row" else str(k)
            problem = _unicode_problem(k, sub, escaped_bytes) or _unicode_problem(v, sub, escaped_bytes)
            if problem:
                return problem
    elif isinstance(value, list):
        for i, v in enumerate(value):
            problem = _unicode_problem(v, f"{field}[{i}]", escaped_bytes)
            if problem:
                return problem
    return None


def records_of(document) -> list:
    """The records of one JSON document (the .json rule in the module docstring)."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict) and len(document) == 1:
        (key, value), = document.items()
        if isinstance(value, list) and key not in LIST_COLUMNS:
            return value
    return [document]


# ---------------------------------------------------------------- one reader per format

def read_jsonl(fh: IO[bytes]) -> Iterator[tuple[int, Record | RowError]]:
    """JSON lines: row = line number; blank lines are skipped (but counted)."""
    for i, raw in enumerate(fh, start=1):
        if i == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        if not raw.strip():
            continue
        text = _decode(raw, "line")
        if isinstance(text, RowError):
            yield i, text
            continue
        text = text.strip()
        rec = _loads(text)
        if not isinstance(rec, RowError) and _SURROGATE_ESCAPE.search(text):
            rec = _unicode_problem(rec, "row", False) or rec
        yield i, rec


def read_json(fh: IO[bytes]) -> Iterator[tuple[int, Record | RowError]]:
    """One JSON document (a list of records, a wrapper of one list, or one record), or JSON lines."""
    data = fh.read()
    if data.startswith(BOM):
        data = data[len(BOM):]
    try:
        text, bad_bytes = data.decode("utf-8"), False
    except UnicodeDecodeError:  # keep reading: the bad bytes become bad rows of the records holding them
        text, bad_bytes = data.decode("utf-8", "surrogateescape"), True
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        heads = [ln for ln in text.split("\n", 64)[:64] if ln.strip()][:2]
        if all(isinstance(_loads(ln.encode("utf-8", "surrogateescape").decode("utf-8", "replace")), RowError)
               for ln in heads):
            # neither of the first two lines is a JSON value by itself: one (broken) document, not JSON lines
            yield e.lineno, RowError("json", f"invalid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                                             f"the file is one JSON document, so none of its records is read")
            return
        yield from read_jsonl(io.BytesIO(data))
        return
    check = bad_bytes or _SURROGATE_ESCAPE.search(text) is not None
    for i, rec in enumerate(records_of(document), start=1):
        yield i, (_unicode_problem(rec, "row", bad_bytes) or rec) if check else rec


def read_parquet(fh: IO[bytes]) -> Iterator[tuple[int, Record | RowError]]:
    """Parquet: row = row index, read a batch at a time."""
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(fh).iter_batches(batch_size=ROWS_PER_BLOCK * 4):
        for rec in batch.to_pylist():
            i += 1
            yield i, rec


def read_txt(fh: IO[bytes]) -> Iterator[tuple[int, Record | RowError]]:
    """Plain text: documents separated by blank lines -> {"text": document}; row = its first line."""
    doc: list[str] = []
    start, problem = 0, None
    for i, raw in enumerate(fh, start=1):
        if i == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        if raw.strip():
            if not doc:
                start, problem = i, None
            line = _decode(raw.rstrip(b"\r\n"), "text", f" of line {i}")
            if isinstance(line, RowError):
                problem = problem or line
                line = ""
            doc.append(line)
        elif doc:
            yield start, problem or {"text": "\n".join(doc)}
            doc = []
    if doc:
        yield start, problem or {"text": "\n".join(doc)}


READERS = {".jsonl": read_jsonl, ".ndjson": read_jsonl, ".json": read_json, ".parquet": read_parquet,
           ".txt": read_txt}


def _open(path: str, data: bytes | None) -> IO[bytes]:
    gz = path.lower().endswith(".gz")
    if data is None and is_uri(path):
        data = read_uri(path)
    if data is not None:
        return io.BytesIO(gzip.decompress(data) if gz else data)
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_file(path: str, data: bytes | None = None) -> Iterator[tuple[str, int, Record | RowError]]:
    """(path, row, record | RowError) for each record of one file; `data`: its bytes, if already read."""
    kind = _kind_of(path)
    if kind is None:  # resolve_sources admits only known kinds
        raise ValueError(f"unknown file type: {path!r}")
    try:
        with _open(path, data) as fh:
            for row, rec in READERS[kind](fh):
                yield path, row, rec
    except (OSError, EOFError, zlib.error, ValueError) as e:  # corrupt gzip / parquet, unreadable file
        raise ValueError(f"{path}: cannot read this {kind} file: {type(e).__name__}: {e}") from e


def _pick_split(ds, source: Source, part: int):
    """One split of a DatasetDict: source.split, else "train" (part 0) or the first eval split (part 1);
    the only split when "train" (the default) is asked for and the dict has one split of another name."""
    names, field = list(ds.keys()), source.field
    if source.split:
        if source.split in ds:
            return ds[source.split]
        if source.split == "train" and len(names) == 1:
            return ds[names[0]]
        raise ValueError(f"{_section(field)}.split: {source.split!r} is not a split of {source.path!r} "
                         f"(its splits: {', '.join(names)})")
    wanted = ("train",) if part == 0 else EVAL_SPLITS
    pick = next((n for n in wanted if n in ds), names[0] if len(names) == 1 else None)
    if pick is None:
        raise ValueError(f"{field}: {source.path!r} is a DatasetDict with splits {names}; expected a "
                         f"{' or '.join(wanted)} split")
    return ds[pick]


@functools.lru_cache(maxsize=16)
def _load_dataset_cached(path: str, subset: str, split: str, offline: bool, hub_cache: str, cache_dir: str):
    import datasets

    from kernels.hub import snapshot, split_revision

    kw = dict(name=subset or None, split=split or None, cache_dir=cache_dir)
    if os.path.isdir(path):
        return datasets.load_dataset(path, **kw)
    if offline:  # a dataset repo in the hub cache (hf download --repo-type dataset), read as a folder
        try:
            folder = snapshot(path, "dataset")
        except Exception:  # noqa: BLE001 - not there: the datasets cache is looked at next
            folder = None
        if folder:
            return datasets.load_dataset(folder, **kw)
    name, revision = split_revision(path)
    return datasets.load_dataset(name, revision=revision, **kw)


def _load_dataset(source: Source):
    """datasets.load_dataset(name or folder, subset, split=...) (one load per process and source); the
    errors in one line naming the setting: a name not found, a split or a subset the dataset lacks."""
    from kernels import hub

    try:
        return _load_dataset_cached(source.path, source.subset, source.split, hub.is_offline(), hub.hub_cache_dir(),
                                    hub.datasets_cache_dir())
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each becomes one line
        text = str(e).strip()
        first = " ".join(text.split())[:300] or type(e).__name__
        field = source.field
        section = _section(field)
        if "split" in text.lower() and isinstance(e, (ValueError, KeyError)) and source.split:
            raise ValueError(f"{section}.split: {source.split!r} is not a split of {source.path!r} ({first})") from None
        if "config" in text.lower() and isinstance(e, ValueError):
            what = (f"{source.subset!r} is not a subset of" if source.subset
                    else "'' (none given) does not name a subset of")
            raise ValueError(f"{section}.subset: {what} {source.path!r} ({first})") from None
        if not os.path.isdir(source.path) and isinstance(e, (FileNotFoundError, ConnectionError)):
            where = ("in the Hugging Face cache (offline: HF_HUB_OFFLINE=1; hub cache: "
                     f"{hub.hub_cache_dir()}, datasets cache: {hub.datasets_cache_dir()})") if hub.is_offline() else (
                     f"on the Hugging Face Hub or in its caches ({type(e).__name__}: {first})")
            raise FileNotFoundError(f"{field}: {source.path!r} is not a local file or folder, nor a dataset "
                                    f"{where}") from None
        raise ValueError(f"{field}: {source.path!r}: datasets.load_dataset failed "
                         f"({type(e).__name__}: {first})") from None


def open_dataset(source: Source, part: int = 0):
    """A "hf" (save_to_disk) or "dataset" (load_dataset) source -> its datasets.Dataset (one split)."""
    import datasets

    if source.kind == "dataset":
        ds = _load_dataset(source)
    else:
        if source.subset:
            raise ValueError(f"{_section(source.field)}.subset: {source.subset!r}: {source.path!r} is a datasets."
                             f"save_to_disk folder, which has no subsets")
        ds = datasets.load_from_disk(source.path)
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, source, part)
    return ds


def load_table(source: Source, part: int):
    """A dataset source -> its Arrow table (+ a "_row" column)."""
    import pyarrow as pa

    table = open_dataset(source, part).with_format("arrow")[:]
    return table.append_column("_row", pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64)))


def read_dataset(source: Source, part: int = 0) -> Iterator[tuple[str, int, Record]]:
    """(name, row, record) for each row of a saved, named or folder dataset."""
    ds = open_dataset(source, part).with_format("arrow")
    for start in range(0, len(ds), ROWS_PER_BLOCK * 4):
        for k, rec in enumerate(ds[start:start + ROWS_PER_BLOCK * 4].to_pylist()):
            yield source.path, start + k + 1, rec


def iter_records(sources: list[Source], part: int = 0) -> Iterator[tuple[str, int, Record | RowError]]:
    """Every record of every source, in the pipeline's order: files as given, then the datasets."""
    for s in sources:
        if s.kind == "file":
            yield from read_file(s.path)
    for s in sources:
        if s.kind != "file":
            yield from read_dataset(s, part)


def columns_of(source: Source, part: int = 0, n: int = 64) -> tuple[set[str], int, str]:
    """The columns seen in the first `n` records of one source, how many records were looked at, and
    the first read problem among them ("" if none) — what format detection needs."""
    if source.kind != "file":
        ds = open_dataset(source, part)
        return set(ds.column_names), min(len(ds), n), ""
    columns: set[str] = set()
    seen, problem = 0, ""
    records = read_file(source.path)
    try:
        for _, row, rec in records:
            seen += 1
            if isinstance(rec, dict):
                columns |= set(rec)
            elif isinstance(rec, RowError) and not problem:
                problem = f"{source.path}:{row}: {rec}"
            if seen >= n:
                break
    finally:
        records.close()
    return columns, seen, problem


def bad_row_error(reason: str, setting: str = "data.on_bad_row") -> ValueError:
    """The error of a bad row under on_bad_row="fail" (the pipeline and read_rows raise the same)."""
    section = setting.split(".")[0]
    return ValueError(f"{section}: bad row {reason} ({setting}='fail'; set 'skip' to drop and count bad rows)")


def read_rows(path: str, limit: int = 0, *, field: str = "data.path", part: int = 0, on_bad_row: str = "skip",
              setting: str = "data.on_bad_row", stats: dict | None = None, subset: str = "",
              split: str = "") -> list[dict]:
    """Plain Python: up to `limit` (0: all) good records (dicts) of `path`, in the pipeline's order.

    `field` names the path setting in errors; `part` 0 reads a dataset's train split (or `split`; a
    `subset` picks a dataset's config), 1 an eval split. A bad row (not UTF-8, not JSON, not an object)
    is named "file:row: field: what": with on_bad_row="skip" it is skipped, counted and logged; with
    "fail" it raises ValueError naming the `setting` that chose this. `stats`, if given, receives
    rows_read, rows_ok, rows_bad and bad_reasons (the first few)."""
    if on_bad_row not in ("skip", "fail"):
        raise ValueError(f"on_bad_row: expected one of skip, fail, got {on_bad_row!r}")
    rows: list[dict] = []
    n_read, bad = 0, []
    records = iter_records(resolve_sources(path, field, subset=subset, split=split), part)
    try:
        for src, row, rec in records:
            if limit and len(rows) >= limit:
                break
            n_read += 1
            if not isinstance(rec, (dict, RowError)):
                rec = RowError("row", f"expected a JSON object, got {'null' if rec is None else type(rec).__name__}")
            if isinstance(rec, RowError):
                reason = f"{src}:{row}: {rec}"
                if on_bad_row == "fail":
                    raise bad_row_error(reason, setting)
                if len(bad) < MAX_BAD_REASONS:
                    logger.warning("bad row: %s", reason)
                bad.append(reason)
                continue
            rows.append(rec)
    finally:
        records.close()
    if bad:
        logger.warning("skipped %d bad row(s) of %d read from %s", len(bad), n_read, path)
    if stats is not None:
        stats.update(rows_read=n_read, rows_ok=len(rows), rows_bad=len(bad), bad_reasons=bad[:MAX_BAD_REASONS])
    return rows


# ---------------------------------------------------------------- Ray Data

def _json_default(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    return str(v)


def _dumps(record) -> str:
    return json.dumps(record, ensure_ascii=False, default=_json_default)


def _records_batch(rows: list[tuple[str, int, str, str]], part: int) -> dict:
    return {
        "_src": np.array([r[0] for r in rows], dtype=object),
        "_row": np.array([r[1] for r in rows], dtype=np.int64),
        "_json": np.array([r[2] for r in rows], dtype=object),
        "_err": np.array([r[3] for r in rows], dtype=object),
        "_part": np.full(len(rows), part, dtype=np.int8),
    }


def parse_files_batch(batch: dict, part: int, display: dict) -> dict:
    """Ray Data map_batches: {"path", "bytes"} (one row per file) -> one row per record."""
    rows = []
    for path, data in zip(batch["path"], batch["bytes"]):
        for src, r, rec in read_file(display.get(path, path), data):
            rows.append((src, r, "", str(rec)) if isinstance(rec, RowError) else (src, r, _dumps(rec), ""))
    return _records_batch(rows, part)


def hf_records_batch(batch, src: str, part: int) -> dict:
    """Ray Data map_batches (pyarrow): rows of a dataset (+ "_row") -> records."""
    rows = batch.to_pylist()
    return _records_batch([(src, r.pop("_row"), _dumps(r), "") for r in rows], part)


def concat_in_order(datasets):
    """Materialized datasets -> one dataset holding their blocks in the given order (`union` may
    interleave blocks of its inputs)."""
    import ray

    refs = [ref for d in datasets for ref in d.to_arrow_refs()]
    ds = ray.data.from_arrow_refs(refs)
    ds.context.execution_options.preserve_order = True
    return ds


def _file_groups(files: list[str]) -> list[tuple[object, list[str], dict]]:
    """Files -> runs of consecutive files on one filesystem: (pyarrow filesystem or None for local
    paths, paths as Ray reads them, {path Ray reports: the name the user gave})."""
    groups: list[tuple[object, list[str], dict]] = []
    key = None
    for f in files:
        if is_uri(f):  # one filesystem per scheme (per bucket for s3/gs)
            fs, path, prefix = uri_filesystem(f)
            k = (prefix, path.split("/", 1)[0] if prefix in ("s3://", "gs://", "gcs://") else "")
        else:
            fs, k, path = None, "local", os.path.abspath(f)  # Ray reports absolute paths
        if not groups or k != key:
            groups.append((fs, [], {}))
            key = k
        groups[-1][1].append(path)
        groups[-1][2].update({path: f, path.lstrip("/"): f})
    return groups


def read_sources(sources: list[Source], part: int, max_rows: int = 0):
    """Sources -> a materialized Ray Dataset of records in a stable order: file sources in the order
    given (then row order), then the datasets (the order of iter_records). Files are read by Ray
    (URIs through their filesystem); a dataset is loaded here, in the driver, and handed over as Arrow."""
    import ray

    pieces = []
    for fs, paths, display in _file_groups([s.path for s in sources if s.kind == "file"]):
        ds = ray.data.read_binary_files(paths, include_paths=True, **({"filesystem": fs} if fs is not None else {}))
        ds.context.execution_options.preserve_order = True
        pieces.append(ds.map_batches(parse_files_batch, batch_size=1,
                                     fn_kwargs={"part": part, "display": display}))
    for s in sources:
        if s.kind != "file":
            ds = ray.data.from_arrow(load_table(s, part))
            ds.context.execution_options.preserve_order = True
            pieces.append(ds.map_batches(hf_records_batch, batch_format="pyarrow", batch_size=ROWS_PER_BLOCK,
                                         fn_kwargs={"src": s.path, "part": part}))
    done = []
    for ds in pieces:
        if max_rows:
            ds = ds.limit(max_rows)
        done.append(ds.repartition(target_num_rows_per_block=ROWS_PER_BLOCK).materialize())
    ds = concat_in_order(done)
    if max_rows and len(done) > 1:
        ds = ds.limit(max_rows).materialize()
    return ds
