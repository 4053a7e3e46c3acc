"""Small driver-side samples of a dataset: texts to train a tokenizer on, held-out problems for
exact-match accuracy. (The training data itself flows through the Ray Data pipeline in
cluster.data; these are a few thousand rows read directly, by the same readers: cluster.readers.)

Bad rows follow data.on_bad_row as in the pipeline: "skip" skips, counts and logs them as
"file:row: field: what" (counts in `stats` when given); "fail" raises ValueError naming the first.
"""
from __future__ import annotations

from cluster import builtin_task, readers


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def tokenizer_training_texts(cfg, seed: int = 0, limit: int = 5000, stats: dict | None = None) -> list[str]:
    """Texts to train a local tokenizer on: every string field of the first `limit` good rows."""
    if cfg.path == "builtin":
        from cluster.data import builtin_paths

        train = readers.read_rows(builtin_paths(cfg.builtin_train_size, cfg.builtin_eval_size)["train"], limit,
                                  stats=stats)
        return builtin_task.tokenizer_corpus(train)
    rows = readers.read_rows(cfg.path, limit, field="data.path", part=0, on_bad_row=cfg.on_bad_row, stats=stats,
                             subset=cfg.subset, split=cfg.split)
    texts = [s for row in rows for s in _strings(row)]
    texts.append("system user assistant")
    if cfg.system_prompt:
        texts.append(cfg.system_prompt)
    return texts


def held_out_rows(cfg, seed: int = 0, limit: int = 10000, stats: dict | None = None) -> list[dict]:
    """Held-out problems with GSM8K-style answers for exact-match accuracy."""
    if cfg.path == "builtin" and not cfg.eval_path:
        from cluster.data import builtin_paths

        return readers.read_rows(builtin_paths(cfg.builtin_train_size, cfg.builtin_eval_size)["eval"], limit,
                                 stats=stats)
    if not cfg.eval_path:
        return []
    rows = readers.read_rows(cfg.eval_path, limit, field="data.eval_path", part=1, on_bad_row=cfg.on_bad_row,
                             stats=stats)
    return [r for r in rows if "question" in r and "answer" in r]
