"""One reader per data format: a binary stream -> (1-based row, record | RowError) (cluster.readers uses them).

    read_jsonl / read_json / read_parquet / read_txt   a binary stream -> (1-based row, record | RowError)
    read_file(path[, data])                            a file or URI (optionally .gz) -> (file, row, record | RowError)
    records_of(document)                               the records of one JSON document (the .json rule below)

What a row number is, per format (datasets: readers_datasets.py):
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

A record that cannot be read is not an exception but a RowError in place of the record, named later as
"file:row: field: what": a line that is not valid UTF-8 ("line: not valid UTF-8 at byte N (...)", N
counted from 1 within the line; in .json "<field>: ... at byte N of this string"; in .txt "text: ...
at byte N of line L"), a line that is not JSON ("json: invalid JSON (...)"), a lone surrogate. A .json
document that does not parse is one bad row (at the line of the error). A file that cannot be read
at all (corrupt gzip or parquet) raises ValueError naming the file.
"""
from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from typing import IO

from cluster.formats import LIST_COLUMNS, RowError
from cluster.readers_sources import _kind_of, is_uri, read_uri

ROWS_PER_BLOCK = 256  # blocks this small let several tokenizer actors share one big file
BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape that may decode to a lone surrogate

Record = object  # a decoded JSON value (a dict when the row is well formed)


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
