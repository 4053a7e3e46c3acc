"""The SFT / CPT data pipeline on Ray Data: files -> token rows ready for the trainer.

    detect each file's format from its columns   cluster/formats.py (first rows, via cluster/readers.py)
    read (Ray Data; records keep file + row)      cluster/readers.py
      -> convert each row with its file's format   cluster/formats.py
      -> messages -> chat template -> tokens + loss mask, in an actor pool
         (one tokenizer per actor)               cluster/templates.py
      -> materialize: count rows, bad rows, tokens
      -> pack into rows of max_seq_len (padding-free) or group by length   cluster/packing.py
      -> shuffle (re-seeded every epoch)

Each output row has `input_ids`, `labels`, `position_ids`: int32 1-D arrays. Packed rows are exactly
max_seq_len long; unpacked rows have their natural length (the trainer pads). Labels are input_ids
with -100 where no loss is taken (the shift happens in kernels/loss.py).

SFT trains on assistant turns (or every token with train_on="all"); CPT (task="cpt", or text data)
tokenizes raw text, appends EOS, cuts long documents into max_seq_len chunks and trains on every token.

Files of different formats may be mixed in one path (e.g. alpaca parquet + messages jsonl): each
file's format is detected on its own before any reading in Ray starts, and a file whose format cannot
be detected is an error naming it and the columns seen (data.format other than auto applies to all).

Bad rows (not UTF-8, invalid JSON, missing field, wrong type, unknown role, empty assistant turn, ...) are
skipped and counted, the first few named "file:row: field: what" in the log and in stats; with
on_bad_row="fail" the first one raises. Example:

    bundle = build_datasets(DataConfig(path="data/train.jsonl", max_seq_len=1024), "runs/tok")
    bundle.train.iter_torch_batches(batch_size=8)   # or ray.train get_dataset_shard
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cluster import packing, readers
from cluster.formats import FORMATS, RowError, detect_format, to_messages, to_text, with_system_prompt
from cluster.templates import BUILTIN_TEMPLATES, ChatEncoder, resolve_template
from kernels.config_fields import check_ranges

logger = logging.getLogger("posttrain.data")

IGNORE_INDEX = -100
TOKENIZE_BATCH = 256
PACK_WINDOW = 2048          # sequences packed together (first-fit within a window)
LENGTH_GROUP = 16           # rows of similar length kept together when packing is off
LENGTH_WINDOW = 64 * LENGTH_GROUP
MAX_BAD_REASONS = 5
OK, BAD, DROPPED = 0, 1, 2  # per-sequence status from the tokenizer actors


def _choice(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ValueError(f"data.{name}: expected one of {', '.join(map(str, accepted))}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it becomes token rows (see the module docstring).

    path: file, folder, glob, datasets.save_to_disk folder, comma-separated list, or "builtin"
      (the built-in arithmetic task, written by cluster.builtin_task into a cache folder); a dataset
      name for datasets.load_dataset (`org/name`, from the Hugging Face cache when HF_HUB_OFFLINE=1);
      a URI read through a pyarrow/fsspec filesystem (`s3://`, `gs://`, `hf://`, `file://`, ...).
      cluster/readers.py reads every form.
    split / subset: the split of a dataset name, a dataset folder or a saved DatasetDict (default
      "train"), and its subset (load_dataset's config name; "" = the dataset's only/default one).
      Files have neither: setting a split other than "train", or a subset, with files only is an error.
    eval_path: held-out file(s) or dataset (its validation/test/eval/valid split; data.subset applies);
      else eval_fraction of path is split off ("builtin": its own split).
    chat_template: auto = the tokenizer's own if it has one, else chatml.
    truncation: what happens to a sequence longer than max_seq_len (CPT documents are chunked instead).
    """

    path: str = "builtin"
    split: str = "train"
    subset: str = ""
    eval_path: str = ""
    eval_fraction: float = field(default=0.0, metadata={"min": 0, "lt": 1})
    format: Literal["auto", "alpaca", "sharegpt", "messages", "gsm8k", "prompt_completion", "text"] = "auto"
    chat_template: Literal["auto", "tokenizer", "chatml", "llama-3", "alpaca"] = "auto"
    system_prompt: str = ""
    train_on: Literal["assistant", "all"] = "assistant"
    max_seq_len: int = field(default=512, metadata={"min": 8, "integer": True})
    packing: bool = True
    truncation: Literal["truncate", "drop"] = "truncate"
    on_bad_row: Literal["skip", "fail"] = "skip"
    max_rows: int = field(default=0, metadata={"min": 0, "integer": True})
    num_tokenizer_actors: int = field(default=1, metadata={"min": 1, "integer": True})
    shuffle: bool = True
    group_by_length: bool = True
    builtin_train_size: int = field(default=2000, metadata={"min": 1, "integer": True})
    builtin_eval_size: int = field(default=200, metadata={"min": 1, "integer": True})

    def __post_init__(self):
        check_ranges(self, "data")
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"data.path: must be a non-empty path or 'builtin', got {self.path!r}")
        if not isinstance(self.split, str) or not self.split.strip():
            raise ValueError(f"data.split: expected a split name of the dataset (e.g. train, test), got {self.split!r}")
        if not isinstance(self.subset, str):
            raise ValueError(f"data.subset: expected a subset (config) name of the dataset or '', got {self.subset!r}")
        if not isinstance(self.eval_path, str):
            raise ValueError(f"data.eval_path: must be a string, got {self.eval_path!r}")
        if self.eval_path and self.eval_fraction:
            raise ValueError("data.eval_fraction: set data.eval_path or data.eval_fraction, not both "
                             f"(got eval_path={self.eval_path!r}, eval_fraction={self.eval_fraction})")
        _choice("format", self.format, ("auto", *FORMATS))
        _choice("chat_template", self.chat_template, ("auto", "tokenizer", *BUILTIN_TEMPLATES))
        _choice("train_on", self.train_on, ("assistant", "all"))
        _choice("truncation", self.truncation, ("truncate", "drop"))
        _choice("on_bad_row", self.on_bad_row, ("skip", "fail"))
        if not isinstance(self.system_prompt, str):
            raise ValueError(f"data.system_prompt: must be a string, got {self.system_prompt!r}")
        for name in ("packing", "shuffle", "group_by_length"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"data.{name}: must be true or false, got {getattr(self, name)!r}")


@dataclass
class DataBundle:
    """What build_datasets returns: the train rows, the eval rows (None without an eval split), and
    the stats of the run (rows_read, rows_ok, rows_bad, bad_reasons, sequences, truncated, tokens,
    target_tokens, packed_rows, format, template, seconds, tokens_per_s, and a few more)."""

    train: "ray.data.Dataset"  # noqa: F821 (ray is imported lazily)
    eval: "ray.data.Dataset | None"  # noqa: F821
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- tokenizer actors

def _unit_hash(src: str, row: int, seed: int) -> float:
    """A per-record number in [0, 1), stable across runs: which records go to the eval split."""
    h = hashlib.blake2b(f"{seed}\0{src}\0{row}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


class TokenizeRows:
    """Ray Data actor (callable class): records -> sequences. The tokenizer is loaded once per actor.

    Emits one output row per sequence (a CPT document may give several chunks) and one row per bad or
    dropped record, with bookkeeping columns: _status (OK/BAD/DROPPED), _error, _rec (1 on a record's
    first output row), _trunc, _chunked, _ntok, _ntgt, _u (eval-split hash), _src, _row, _part.
    """

    def __init__(self, tokenizer_dir: str, spec: dict):
        from kernels.tokenizer import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.spec = spec
        self.encoder = ChatEncoder(self.tok, spec["template"], spec["train_on"]) if spec["template"] else None
        self.eos = self.tok.eos_token_id

    def __call__(self, batch: dict) -> dict:
        s = self.spec
        out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "_src", "_row", "_part", "_status", "_error",
                                               "_rec", "_trunc", "_chunked", "_ntok", "_ntgt", "_u")}
        empty = np.zeros(0, dtype=np.int32)

        def emit(src, row, part, status, ids=empty, labels=empty, error="", rec=1, trunc=0, chunked=0):
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["_src"].append(src)
            out["_row"].append(row)
            out["_part"].append(part)
            out["_status"].append(status)
            out["_error"].append(error)
            out["_rec"].append(rec)
            out["_trunc"].append(trunc)
            out["_chunked"].append(chunked)
            out["_ntok"].append(len(ids))
            out["_ntgt"].append(int((labels != IGNORE_INDEX).sum()))
            out["_u"].append(_unit_hash(src, row, s["seed"]))

        def bad(src, row, part, e: RowError | str):
            emit(src, row, part, BAD, error=f"{src}:{row}: {e}")

        chats, texts = [], []  # (src, row, part, payload)
        for src, row, js, err, part in zip(batch["_src"], batch["_row"], batch["_json"], batch["_err"],
                                           batch["_part"]):
            src, row, part = str(src), int(row), int(part)
            if err:
                bad(src, row, part, err)
                continue
            try:
                record = json.loads(js)
            except json.JSONDecodeError as e:
                bad(src, row, part, f"json: invalid JSON ({e.msg} at column {e.colno})")
                continue
            fmt = s["formats"][part][src]
            try:
                if fmt == "text":
                    texts.append((src, row, part, to_text(record)))
                else:
                    msgs = with_system_prompt(to_messages(record, fmt), s["system_prompt"])
                    if s["cpt"]:
                        texts.append((src, row, part, self.encoder.render(msgs)))
                    else:
                        chats.append((src, row, part, msgs))
            except RowError as e:
                bad(src, row, part, e)
            except Exception as e:  # the chat template raised while rendering CPT text
                bad(src, row, part, RowError("messages", f"chat template failed: {type(e).__name__}: {e}"))

        L = s["max_seq_len"]
        for (src, row, part, _), res in zip(chats, self.encoder.encode([c[3] for c in chats]) if chats else []):
            if isinstance(res, RowError):
                bad(src, row, part, res)
                continue
            ids, labels = res
            trunc = int(len(ids) > L)
            fitted = packing.fit_length(ids, labels, L, s["truncation"])
            if fitted is None:
                emit(src, row, part, DROPPED, trunc=trunc)
            elif not (fitted[1] != IGNORE_INDEX).any():  # truncation removed every target
                emit(src, row, part, DROPPED, trunc=trunc)
            else:
                emit(src, row, part, OK, *fitted, trunc=trunc)

        if texts:
            encoded = self.tok([t[3] for t in texts], add_special_tokens=True)["input_ids"]
            for (src, row, part, _), ids in zip(texts, encoded):
                ids = np.asarray(list(ids) + ([self.eos] if self.eos is not None else []), dtype=np.int32)
                pieces = [p for p in packing.chunk(ids, L) if len(p) > 1]  # a 1-token piece has no target
                if not pieces:
                    emit(src, row, part, DROPPED)
                for k, piece in enumerate(pieces):
                    labels = piece.copy()
                    labels[0] = IGNORE_INDEX
                    emit(src, row, part, OK, piece, labels, rec=int(k == 0), chunked=int(len(pieces) > 1))

        cols = {"input_ids": packing.object_column(out["input_ids"]),
                "labels": packing.object_column(out["labels"]),
                "_src": np.array(out["_src"], dtype=object), "_error": np.array(out["_error"], dtype=object)}
        for k, dt in (("_row", np.int64), ("_part", np.int8), ("_status", np.int8), ("_rec", np.int8),
                      ("_trunc", np.int8), ("_chunked", np.int8), ("_ntok", np.int32), ("_ntgt", np.int32),
                      ("_u", np.float64)):
            cols[k] = np.array(out[k], dtype=dt)
        return cols


def _add_position_ids(batch: dict) -> dict:
    ids = packing.as_sequence_list(batch["input_ids"])
    return {"input_ids": packing.object_column(ids),
            "labels": packing.object_column(packing.as_sequence_list(batch["labels"])),
            "position_ids": packing.object_column([packing.position_ids_for(len(x)) for x in ids])}


# --------------------------------------------------------------------------- driver helpers

def builtin_paths(n_train: int, n_eval: int) -> dict[str, str]:
    """Write the built-in task once into a cache folder (POSTTRAIN_CACHE_DIR or ~/.cache/ray-posttrain)."""
    from cluster.builtin_task import write_task

    root = os.environ.get("POSTTRAIN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ray-posttrain")
    out = os.path.join(root, f"builtin-{n_train}-{n_eval}")
    paths = {"train": os.path.join(out, "train.jsonl"), "eval": os.path.join(out, "eval.jsonl")}
    if not all(os.path.isfile(p) for p in paths.values()):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=".builtin-")
        write_task(tmp, n_train, n_eval, seed=0)  # a fixed seed: the held-out split is the same in every run
        try:
            os.replace(tmp, out)
        except OSError:  # another process wrote it first
            pass
    return paths


def detect_formats(sources: list[readers.Source], cfg: DataConfig, field: str = "data.path",
                   part: int = 0) -> dict[str, str]:
    """{source path: format}: data.format, or each file's own, detected from the columns of its first
    rows (read in the driver: no Ray). An empty file has no rows to convert and gets no format."""
    out: dict[str, str] = {}
    for src in sources:
        if cfg.format != "auto":
            out[src.path] = cfg.format
            continue
        columns, seen, problem = readers.columns_of(src, part)
        if not seen:
            continue
        fmt = detect_format(columns)
        if fmt is None:
            found = ", ".join(sorted(columns)) if columns else (
                "none: no row is a JSON object" + (f"; first problem: {problem}" if problem else ""))
            raise ValueError(
                f"data.format: cannot detect the format of {src.path!r} (in {field}) from its columns ({found}); "
                f"expected messages, conversations, instruction+output, question+answer, prompt+completion or "
                f"text — or set data.format to one of {', '.join(FORMATS)}")
        out[src.path] = fmt
    return out


def _format_name(formats: dict[str, str]) -> str:
    """One name for the formats of a split: "alpaca", or "alpaca+messages" when files differ."""
    return "+".join(dict.fromkeys(formats.values())) or "none"


def _bookkeeping(ds) -> tuple[dict[str, np.ndarray], list[str], dict[str, list[str]]]:
    """The small per-sequence columns of the tokenized dataset, in the driver (one pass), the
    first bad-row reasons in order, and the first dropped and truncated rows as file:row."""
    cols = ["_part", "_status", "_rec", "_trunc", "_chunked", "_ntok", "_ntgt", "_u"]
    parts: dict[str, list] = {k: [] for k in cols}
    reasons: list[str] = []
    where: dict[str, list[str]] = {"dropped": [], "truncated": []}
    for b in ds.select_columns(cols + ["_error", "_src", "_row"]).iter_batches(batch_size=None, batch_format="numpy"):
        for k in cols:
            parts[k].append(b[k])
        if len(reasons) < MAX_BAD_REASONS:
            reasons += [str(e) for e in b["_error"][b["_status"] == BAD][: MAX_BAD_REASONS - len(reasons)]]
        for key, sel in (("dropped", b["_status"] == DROPPED), ("truncated", (b["_status"] == OK) & (b["_trunc"] > 0))):
            if len(where[key]) < MAX_BAD_REASONS:
                where[key] += [f"{src}:{row}" for src, row in zip(b["_src"][sel], b["_row"][sel])][
                    : MAX_BAD_REASONS - len(where[key])]
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}, reasons, where


def _eval_threshold(b: dict[str, np.ndarray], fraction: float) -> float:
    """The hash threshold below which data.path records go to eval: exactly round(fraction * records)."""
    if fraction <= 0:
        return -1.0
    u = b["_u"][(b["_part"] == 0) & (b["_rec"] == 1) & (b["_status"] == OK)]
    if len(u) < 2:
        return -1.0
    k = min(max(1, round(fraction * len(u))), len(u) - 1)
    return float(np.nextafter(np.partition(u, k - 1)[k - 1], 2.0))  # the k smallest hashes go to eval


def _count(b: dict[str, np.ndarray], thr: float) -> dict[str, dict[str, int]]:
    """Record counts (rows_*) per source part (data.path -> "train", data.eval_path -> "eval"); sequence
    counts per split (eval: eval_path records plus the data.path records whose hash is under `thr`)."""
    st, rec = b["_status"], b["_rec"].astype(bool)
    is_eval = (b["_part"] == 1) | ((b["_part"] == 0) & (b["_u"] < thr))
    c: dict[str, dict[str, int]] = {}
    for name, part, sel in (("train", b["_part"] == 0, ~is_eval), ("eval", b["_part"] == 1, is_eval)):
        r, ok = rec & part, sel & (st == OK)
        c[name] = {
            "rows_read": int(r.sum()), "rows_bad": int((r & (st == BAD)).sum()),
            "rows_dropped": int((r & (st == DROPPED)).sum()),
            "chunked_documents": int((r & b["_chunked"].astype(bool)).sum()),
            "sequences": int(ok.sum()), "truncated": int(b["_trunc"][sel].sum()),
            "dropped": int((sel & (st == DROPPED)).sum()),
            "tokens": int(b["_ntok"][ok].sum()), "target_tokens": int(b["_ntgt"][ok].sum()),
        }
    return c


def _finish(seqs, cfg: DataConfig, pad_id: int, seed: int, *, train: bool):
    """OK sequences -> packed rows (materialized, then lazily re-shuffled each epoch) or grouped rows."""
    from ray.data import RandomSeedConfig

    seqs = seqs.select_columns(["input_ids", "labels"])
    shuffle = train and cfg.shuffle
    if cfg.packing:
        if shuffle:  # which sequences share a row: random but reproducible
            seqs = seqs.random_shuffle(seed=seed)
        rows = seqs.map_batches(packing.pack_batch, batch_size=PACK_WINDOW, batch_format="numpy",
                                fn_kwargs={"max_seq_len": cfg.max_seq_len, "pad_id": pad_id,
                                           "truncation": cfg.truncation}).materialize()
        n = rows.count()
        if shuffle:
            rows = rows.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
        return rows, n
    rows = seqs.map_batches(_add_position_ids, batch_format="numpy")
    if shuffle:
        rows = rows.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    if cfg.group_by_length:
        rows = rows.map_batches(packing.group_by_length, batch_size=LENGTH_WINDOW, batch_format="numpy",
                                fn_kwargs={"group_size": LENGTH_GROUP, "seed": seed})
    return rows, None


def build_datasets(cfg: DataConfig, tokenizer_dir: str, *, seed: int = 0,
                   task: Literal["sft", "cpt"] = "sft", on_stage=None) -> DataBundle:
    """Read, tokenize and pack `cfg.path` (and the eval split); see the module docstring.
    on_stage: called with "read", "tokenize", "pack" as each stage starts (a progress bar's hook)."""
    stage = on_stage or (lambda name: None)
    import ray
    from ray.data.expressions import col

    from kernels.tokenizer import load_tokenizer

    if task not in ("sft", "cpt"):
        raise ValueError(f"task: expected 'sft' or 'cpt', got {task!r}")
    t0 = time.perf_counter()
    if cfg.path.strip() == "builtin":
        paths = builtin_paths(cfg.builtin_train_size, cfg.builtin_eval_size)
        train_path, eval_path = paths["train"], cfg.eval_path or paths["eval"]
    else:
        train_path, eval_path = cfg.path, cfg.eval_path
    train_sources = readers.resolve_sources(train_path, "data.path", subset=cfg.subset, split=cfg.split)
    eval_sources = readers.resolve_sources(eval_path, "data.eval_path", subset=cfg.subset) if eval_path else []
    formats = {0: detect_formats(train_sources, cfg, "data.path", 0),  # fails here, before any Ray work
               1: detect_formats(eval_sources, cfg, "data.eval_path", 1)}
    tok = load_tokenizer(tokenizer_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    logger.info("reading %d source(s) from %s%s", len(train_sources), train_path,
                f" and {len(eval_sources)} eval source(s) from {eval_path}" if eval_sources else "")

    stage("read")
    raw_train = readers.read_sources(train_sources, part=0, max_rows=cfg.max_rows)
    if raw_train.count() == 0:
        raise ValueError(f"data.path: no rows in {train_path!r} (empty file?)")
    raws = [raw_train]
    if eval_sources:
        raw_eval = readers.read_sources(eval_sources, part=1)
        if raw_eval.count() == 0:
            raise ValueError(f"data.eval_path: no rows in {eval_path!r} (empty file?)")
        raws.append(raw_eval)

    cpt = task == "cpt" or all(f == "text" for f in formats[0].values())
    chat = any(f != "text" for part in formats.values() for f in part.values())
    template_name, template = resolve_template(cfg.chat_template, tok, where=tokenizer_dir) if chat else ("none", "")
    encoder = ChatEncoder(tok, template, "all" if cpt else cfg.train_on) if chat else None
    logger.info("format %s, template %s, mask %s, task %s", _format_name(formats[0]), template_name,
                encoder.mask_method if encoder else "all-tokens", "cpt" if cpt else "sft")

    spec = {"formats": formats, "template": template, "train_on": cfg.train_on, "system_prompt": cfg.system_prompt,
            "max_seq_len": cfg.max_seq_len, "truncation": cfg.truncation, "cpt": cpt, "seed": seed}
    raw = readers.concat_in_order(raws) if len(raws) > 1 else raws[0]
    t_tok = time.perf_counter()
    stage("tokenize")
    tokenized = raw.map_batches(
        TokenizeRows, fn_constructor_kwargs={"tokenizer_dir": os.path.abspath(tokenizer_dir), "spec": spec},
        batch_size=TOKENIZE_BATCH, batch_format="numpy", num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_tokenizer_actors),
    ).materialize()
    tok_seconds = time.perf_counter() - t_tok

    book, reasons, where = _bookkeeping(tokenized)
    thr = _eval_threshold(book, cfg.eval_fraction) if not eval_sources else -1.0
    counts = _count(book, thr)
    tr = counts["train"]
    # never in silence: how many rows were cut or dropped, why, and where the first ones are
    n_dropped = tr["rows_dropped"] + counts["eval"]["rows_dropped"]
    if n_dropped:
        logger.warning("dropped %d row(s) longer than data.max_seq_len=%d (data.truncation=%s) or with no target "
                       "token left; first: %s", n_dropped, cfg.max_seq_len, cfg.truncation, ", ".join(where["dropped"]))
    n_cut = tr["truncated"] + counts["eval"]["truncated"]
    if n_cut:
        logger.warning("truncated %d sequence(s) to data.max_seq_len=%d (data.truncation=truncate); first: %s",
                       n_cut, cfg.max_seq_len, ", ".join(where["truncated"]))
    for r in reasons:
        logger.warning("bad row: %s", r)
    n_bad = tr["rows_bad"] + counts["eval"]["rows_bad"]
    if n_bad:
        logger.warning("skipped %d bad row(s) of %d read", n_bad, tr["rows_read"] + counts["eval"]["rows_read"])
    if reasons and cfg.on_bad_row == "fail":
        raise readers.bad_row_error(reasons[0], "data.on_bad_row")
    if tr["sequences"] == 0:
        why = f"; first problems: {'; '.join(reasons)}" if reasons else ""
        raise ValueError(f"data.path: no usable rows in {train_path!r}: {tr['rows_bad']} bad and "
                         f"{tr['rows_dropped']} dropped (longer than data.max_seq_len={cfg.max_seq_len} or no "
                         f"target left) of {tr['rows_read']} rows read{why}")
    logger.info("tokenized %d rows -> %d sequences, %d tokens (%d targets) in %.1fs",
                tr["rows_read"], tr["sequences"], tr["tokens"], tr["target_tokens"], tok_seconds)

    stage("pack")
    ok = col("_status") == OK
    is_train = (col("_part") == 0) & (col("_u") >= thr)
    train, packed_rows = _finish(tokenized.filter(expr=ok & is_train), cfg, pad_id, seed, train=True)
    ev, ev_rows = None, None
    if counts["eval"]["sequences"]:
        is_eval = (col("_part") == 1) | ((col("_part") == 0) & (col("_u") < thr))
        ev, ev_rows = _finish(tokenized.filter(expr=ok & is_eval), cfg, pad_id, seed, train=False)

    seconds = time.perf_counter() - t0
    all_tokens = tr["tokens"] + counts["eval"]["tokens"]
    stats = {
        "rows_read": tr["rows_read"], "rows_ok": tr["rows_read"] - tr["rows_bad"] - tr["rows_dropped"],
        "rows_bad": tr["rows_bad"], "bad_reasons": reasons, "sequences": tr["sequences"],
        "truncated": tr["truncated"], "tokens": tr["tokens"], "target_tokens": tr["target_tokens"],
        "packed_rows": packed_rows or 0, "format": _format_name(formats[0]), "template": template_name,
        "seconds": round(seconds, 3), "tokens_per_s": round(all_tokens / max(seconds, 1e-9), 1),
        # beyond the required keys
        "formats": dict(formats[0]), "eval_formats": dict(formats[1]),
        "rows_dropped": tr["rows_dropped"], "dropped": tr["dropped"], "chunked_documents": tr["chunked_documents"],
        "task": "cpt" if cpt else "sft", "mask": encoder.mask_method if encoder and not cpt else "all-tokens",
        "max_seq_len": cfg.max_seq_len, "packing": cfg.packing,
        "packing_efficiency": round(tr["tokens"] / (packed_rows * cfg.max_seq_len), 4) if packed_rows else None,
        "tokenize_seconds": round(tok_seconds, 3), "num_tokenizer_actors": cfg.num_tokenizer_actors,
        "eval_rows_read": counts["eval"]["rows_read"], "eval_rows_bad": counts["eval"]["rows_bad"],
        "eval_sequences": counts["eval"]["sequences"], "eval_tokens": counts["eval"]["tokens"],
        "eval_packed_rows": ev_rows or 0,
    }
    logger.info("data ready in %.1fs: %d train sequences%s, %d eval sequences, %.0f tokens/s", seconds,
                tr["sequences"], f" in {packed_rows} packed rows" if packed_rows else "",
                counts["eval"]["sequences"], stats["tokens_per_s"])
    return DataBundle(train=train, eval=ev, stats=stats)
