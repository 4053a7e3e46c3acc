"""Reading data files: one set of readers, shared by the Ray Data pipeline and plain Python.

    resolve_sources(path, field)                       files, folders, globs, URIs, dataset names -> [Source]
    read_jsonl / read_json / read_parquet / read_txt   a binary stream -> (1-based row, record | RowError)
    read_file(path[, data])                            a file or URI (optionally .gz) -> (file, row, record | RowError)
    read_dataset(source, part)                         a saved, named or folder dataset -> (name, row, record)
    iter_records(sources, part)                        every source, in the pipeline's order
    read_rows(path, limit, on_bad_row=...)             plain Python: good rows as dicts, bad rows counted
    read_sources(sources, part)                        Ray Data: one row per record (below)

The pieces live in (and every public name of them is importable from here):
    readers_sources.py    what a path names (Source, resolve_sources, URIs and their filesystems, dataset names)
    readers_formats.py    one reader per format, what a row number is, RowError for a record that cannot be read
    readers_datasets.py   Hugging Face datasets (save_to_disk folders, names, dataset repo folders; which split)
    this module           iter_records, columns_of, read_rows (plain Python) and read_sources (Ray Data)

A bad row (not UTF-8, not JSON, not an object) is named "file:row: field: what"; read_rows skips and counts
it (on_bad_row="skip") or raises bad_row_error (on_bad_row="fail").

In Ray Data every record is a row {"_src": file, "_row": row, "_json": the record as JSON text, "_err":
the RowError text or "", "_part"}. Keeping the record as JSON text (not as Arrow columns) means rows of
mixed or wrong types cannot break Ray Data's schema inference: each row is validated later, in the
tokenizer actors, where a bad row becomes a counted, named skip instead of a crash.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import numpy as np

from cluster.formats import RowError
from cluster.readers_datasets import EVAL_SPLITS, load_table, open_dataset, read_dataset
from cluster.readers_formats import (BOM, READERS, ROWS_PER_BLOCK, Record, read_file, read_json, read_jsonl,
                                     read_parquet, read_txt, records_of)
from cluster.readers_sources import (EXTENSIONS, Source, is_dataset_name, is_hf_saved, is_uri, read_uri,
                                     resolve_sources, uri_filesystem)

__all__ = [
    # readers_sources
    "EXTENSIONS", "Source", "is_dataset_name", "is_hf_saved", "is_uri", "read_uri", "resolve_sources",
    "uri_filesystem",
    # readers_formats
    "BOM", "READERS", "ROWS_PER_BLOCK", "Record", "read_file", "read_json", "read_jsonl", "read_parquet",
    "read_txt", "records_of",
    # readers_datasets
    "EVAL_SPLITS", "load_table", "open_dataset", "read_dataset",
    # here
    "MAX_BAD_REASONS", "bad_row_error", "columns_of", "concat_in_order", "hf_records_batch", "iter_records",
    "parse_files_batch", "read_rows", "read_sources",
]

logger = logging.getLogger("posttrain.data")

MAX_BAD_REASONS = 5


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
