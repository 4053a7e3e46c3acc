"""What a data path names: files, folders, globs, URIs and dataset names -> Sources (cluster.readers reads them).

    resolve_sources(path, field, subset=, split=)      a comma-separated path -> [Source] in a stable order
    Source(kind, path, subset, split, field)           "file", "hf" (save_to_disk) or "dataset" (load_dataset)
    is_uri / uri_filesystem / read_uri                 URIs through a pyarrow filesystem
    is_dataset_name / is_hf_saved                      what a name or a folder is

Paths (resolve_sources), comma-separated lists of:
    files, folders (searched recursively), globs     read by the format readers (readers_formats.py), chosen
                                                     by extension;
    URIs: s3://, gs://, hf://, file://, ...          the same, through a pyarrow filesystem (FileSystem.from_uri;
                                                     hf:// through huggingface_hub.HfFileSystem; other
                                                     schemes through fsspec): files, folders, globs;
    folders written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (local or URI);
    dataset names for `datasets.load_dataset` ("org/name", "org/name@revision": a path that does not
        exist here and has the shape of a hub id), and local folders laid out as a dataset repo (a README.md
        whose YAML header declares `configs:`, or any folder when a subset or a split other than "train" is
        asked for): read with load_dataset(name, subset, split=split) (readers_datasets.py). Offline
        (HF_HUB_OFFLINE=1) a name is looked for in the Hugging Face hub cache (a repo fetched with
        `hf download --repo-type dataset`), then in the datasets cache (a dataset loaded once before).
A subset, or a split other than "train", given for files only is an error naming data.subset / data.split.
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import os
import re
from dataclasses import dataclass

EXTENSIONS = (".jsonl", ".ndjson", ".json", ".parquet", ".txt")


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
