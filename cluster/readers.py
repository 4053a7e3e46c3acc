"""Reading data files into Ray Data as raw records that remember where they came from.

Every record is a row {"_src": file, "_row": 1-based row number, "_json": the record as JSON text,
"_err": a read error or ""}. Keeping the record as JSON text (not as Arrow columns) means rows of
mixed or wrong types cannot break Ray Data's schema inference: each row is parsed and validated
later, in the tokenizer actors, where a bad row becomes a counted, named skip instead of a crash.

Sources: .jsonl/.ndjson (row = line number), .json (a list of records, or JSON lines), .parquet,
.txt (continued pre-training: documents separated by blank lines; row = the document's first
line), each optionally .gz; folders (searched recursively), globs, comma-separated lists, and
folders written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass

import numpy as np

EXTENSIONS = (".jsonl", ".ndjson", ".json", ".parquet", ".txt")
ROWS_PER_BLOCK = 256  # blocks this small let several tokenizer actors share one big file
EVAL_SPLITS = ("validation", "test", "eval", "valid")


@dataclass(frozen=True)
class Source:
    kind: str  # "file" | "hf"
    path: str


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


def resolve_sources(path: str, field: str = "data.path") -> list[Source]:
    """Expand a comma-separated list of files, folders and globs into sources (in a stable order)."""
    parts = [p.strip() for p in str(path).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{field}: empty path")
    sources: list[Source] = []
    for part in parts:
        part = os.path.expanduser(part)
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
                    sources.append(Source("hf", m))
                    continue
                files = _folder_files(m)
                if not files and glob.has_magic(part):
                    continue
                if not files:
                    raise FileNotFoundError(
                        f"{field}: folder {m!r} holds no {'/'.join(EXTENSIONS)} files (nor a saved HF dataset)")
                sources += [Source("file", f) for f in files]
            elif _kind_of(m):
                sources.append(Source("file", m))
            elif not glob.has_magic(part):
                raise ValueError(f"{field}: {m!r}: unsupported file type; accepted: {', '.join(EXTENSIONS)} "
                                 f"(optionally .gz), folders, or a datasets.save_to_disk folder")
    if not sources:
        raise FileNotFoundError(f"{field}: no data files found in {path!r}")
    files = [s.path for s in sources if s.kind == "file"]
    if files and len(files) == len(sources) and all(os.path.getsize(f) == 0 for f in files):
        raise ValueError(f"{field}: {path!r}: empty file{'s' if len(files) > 1 else ''}, no rows to read")
    return sources


# ---------------------------------------------------------------- parsing file bytes into records

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


def _lines(data: bytes):
    """(1-based line number, text or None if not UTF-8) for each non-blank line."""
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield i, raw.decode("utf-8").strip(), ""
        except UnicodeDecodeError as e:
            yield i, "", f"line: not valid UTF-8 ({e.reason} at byte {e.start})"


def parse_file(path: str, data: bytes):
    """Yield (row, json_text, error) for each record of one file's bytes."""
    if path.lower().endswith(".gz"):
        data = gzip.decompress(data)
    kind = _kind_of(path)
    if kind in (".jsonl", ".ndjson"):
        yield from _lines(data)
    elif kind == ".json":
        try:
            whole = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            yield from _lines(data)  # JSON lines under a .json name; bad lines are reported per line
            return
        if isinstance(whole, dict):  # {"data": [...]}-style wrapper around a single list of records
            lists = [v for v in whole.values() if isinstance(v, list)]
            whole = lists[0] if len(lists) == 1 and len(whole) == 1 else [whole]
        if not isinstance(whole, list):
            whole = [whole]
        for i, rec in enumerate(whole, start=1):
            yield i, _dumps(rec), ""
    elif kind == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), start=1):
            yield i, _dumps(rec), ""
    elif kind == ".txt":
        text = data.decode("utf-8", errors="replace")
        doc: list[str] = []
        start = 0
        for i, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                if not doc:
                    start = i
                doc.append(line)
            elif doc:
                yield start, _dumps({"text": "\n".join(doc)}), ""
                doc = []
        if doc:
            yield start, _dumps({"text": "\n".join(doc)}), ""
    else:  # resolve_sources admits only known kinds
        raise ValueError(f"unsupported file type: {path!r}")


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
        name = display.get(path, path)
        rows += [(name, r, j, e) for r, j, e in parse_file(name, data)]
    return _records_batch(rows, part)


def hf_records_batch(batch, src: str, part: int) -> dict:
    """Ray Data map_batches (pyarrow): rows of a saved HF dataset (+ "_row") -> records."""
    rows = batch.to_pylist()
    return _records_batch([(src, r.pop("_row"), _dumps(r), "") for r in rows], part)


def load_hf(folder: str, part: int):
    """A datasets.save_to_disk folder -> its Arrow table (a DatasetDict: the train or eval split)."""
    import datasets

    ds = datasets.load_from_disk(folder)
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        wanted = ("train",) if part == 0 else EVAL_SPLITS
        pick = next((n for n in wanted if n in ds), names[0] if len(names) == 1 else None)
        if pick is None:
            raise ValueError(f"data.path: {folder!r} is a DatasetDict with splits {names}; expected a "
                             f"{' or '.join(wanted)} split")
        ds = ds[pick]
    table = ds.with_format("arrow")[:]
    import pyarrow as pa

    return table.append_column("_row", pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64)))


def concat_in_order(datasets):
    """Materialized datasets -> one dataset holding their blocks in the given order (`union` may
    interleave blocks of its inputs)."""
    import ray

    refs = [ref for d in datasets for ref in d.to_arrow_refs()]
    ds = ray.data.from_arrow_refs(refs)
    ds.context.execution_options.preserve_order = True
    return ds


def read_sources(sources: list[Source], part: int, max_rows: int = 0):
    """Sources -> a materialized Ray Dataset of records in a stable order: file sources in the order
    given (then row order), then saved HF datasets."""
    import ray

    pieces = []
    files = [s.path for s in sources if s.kind == "file"]
    if files:
        # Ray reports absolute paths; keep the names the user gave for messages
        display = {os.path.abspath(f): f for f in files}
        ds = ray.data.read_binary_files([os.path.abspath(f) for f in files], include_paths=True)
        ds.context.execution_options.preserve_order = True
        pieces.append(ds.map_batches(parse_files_batch, batch_size=1,
                                     fn_kwargs={"part": part, "display": display}))
    for s in sources:
        if s.kind == "hf":
            ds = ray.data.from_arrow(load_hf(s.path, part))
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
