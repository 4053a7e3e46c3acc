"""Small driver-side samples of a dataset: texts to train a tokenizer on, held-out problems for
exact-match accuracy. (The training data itself flows through the Ray Data pipeline in
cluster.data; these are a few thousand rows read directly.)"""
from __future__ import annotations

import glob
import json
import os

from cluster import builtin_task


def _files(path: str) -> list[str]:
    out = []
    for part in [p.strip() for p in path.split(",") if p.strip()]:
        if os.path.isdir(part):
            out += sorted(os.path.join(dp, f) for dp, _, fs in os.walk(part) for f in fs
                          if f.endswith((".jsonl", ".json", ".parquet", ".txt", ".arrow")))
        else:
            out += sorted(glob.glob(part)) or [part]
    return out


def read_rows(path: str, limit: int) -> list[dict]:
    """Up to `limit` rows (dicts) from jsonl/json/parquet/txt files or a saved HF dataset."""
    rows: list[dict] = []
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
        import datasets

        ds = datasets.load_from_disk(path)
        return [ds[i] for i in range(min(limit, len(ds)))]
    for f in _files(path):
        if not os.path.exists(f):
            raise FileNotFoundError(f"data: {f!r} does not exist")
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows += pq.read_table(f).slice(0, limit - len(rows)).to_pylist()
        elif f.endswith(".json"):
            with open(f) as fh:
                data = json.load(fh)
            rows += (data if isinstance(data, list) else [data])[: limit - len(rows)]
        elif f.endswith(".txt"):
            with open(f) as fh:
                rows.append({"text": fh.read()})
        elif f.endswith(".arrow"):
            continue
        else:
            with open(f) as fh:
                for line in fh:
                    if len(rows) >= limit:
                        break
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the pipeline reports bad rows; a sample just skips them
                    if isinstance(obj, dict):
                        rows.append(obj)
        if len(rows) >= limit:
            break
    return rows[:limit]


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def tokenizer_training_texts(cfg, seed: int = 0, limit: int = 5000) -> list[str]:
    """Texts to train a local tokenizer on: every string field of the first `limit` rows."""
    if cfg.path == "builtin":
        from cluster.data import builtin_paths

        train = read_rows(builtin_paths(cfg.builtin_train_size, cfg.builtin_eval_size)["train"], limit)
        return builtin_task.tokenizer_corpus(train)
    texts = [s for row in read_rows(cfg.path, limit) for s in _strings(row)]
    texts.append("system user assistant")
    if cfg.system_prompt:
        texts.append(cfg.system_prompt)
    return texts


def held_out_rows(cfg, seed: int = 0, limit: int = 10000) -> list[dict]:
    """Held-out problems with GSM8K-style answers for exact-match accuracy."""
    if cfg.path == "builtin" and not cfg.eval_path:
        from cluster.data import builtin_paths

        return read_rows(builtin_paths(cfg.builtin_train_size, cfg.builtin_eval_size)["eval"], limit)
    if not cfg.eval_path:
        return []
    return [r for r in read_rows(cfg.eval_path, limit) if "question" in r and "answer" in r]
