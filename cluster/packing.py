"""Padding-free packing of token sequences into fixed-length rows. Pure numpy: no Ray, no torch.

A packed row is the concatenation of whole sequences followed by padding:

    input_ids     a0 a1 a2 b0 b1 p  p  p
    labels        -  x  x  -  x  -  -  -      (- is IGNORE_INDEX; a sequence's first label is always -)
    position_ids  0  1  2  0  1  0  1  2      (restart per sequence; the padding is its own segment)

transformers derives a block-diagonal causal mask from the position-id resets when no attention mask
is given (`masking_utils.find_packed_sequence_indices`), so no token attends across sequences, and
because every sequence's first label is ignored the last token of one sequence is never trained to
predict the first token of the next: the loss of a packed row is the sum of its sequences' losses.

Rows come out in the same order as the sequences that open them; placement is first-fit in order
(each sequence goes into the first row that still has room), so a row never holds a sequence split
in two unless that sequence alone is longer than the row (then it is truncated or dropped).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100


def as_sequence_list(column) -> list[np.ndarray]:
    """A batch column of token sequences (object array of 1-D arrays, or a 2-D array) -> list of int32 arrays."""
    return [np.asarray(x, dtype=np.int32).reshape(-1) for x in column]


def object_column(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding 1-D arrays (numpy would otherwise stack equal-length arrays into 2-D)."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def position_ids_for(length: int) -> np.ndarray:
    return np.arange(length, dtype=np.int32)


def segments(position_ids: np.ndarray) -> list[tuple[int, int]]:
    """[(start, end), ...] of the sequences in one packed row, found from the position-id resets
    (the same rule transformers uses). The trailing padding, if any, is the last segment."""
    pos = np.asarray(position_ids).reshape(-1)
    if pos.size == 0:
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(pos) != 1) + 1])
    ends = np.append(starts[1:], pos.size)
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of sequences per row: each sequence, in order, goes into the first row with room.
    Every length must be <= capacity."""
    free = np.empty(max(len(lengths), 1), dtype=np.int64)  # room left per open row
    rows: list[list[int]] = []
    for i, n in enumerate(lengths):
        fits = np.flatnonzero(free[: len(rows)] >= n)
        if fits.size:
            r = int(fits[0])
            rows[r].append(i)
            free[r] -= n
        else:
            rows.append([i])
            free[len(rows) - 1] = capacity - n
    return rows


def fit_length(ids: np.ndarray, labels: np.ndarray, max_len: int, truncation: str
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """Cut a sequence to max_len ("truncate") or reject it (None, "drop"); shorter ones pass through."""
    if len(ids) <= max_len:
        return ids, labels
    if truncation == "drop":
        return None
    return ids[:max_len], labels[:max_len]


def pack_sequences(input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], max_seq_len: int,
                   pad_id: int, truncation: str = "truncate") -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Pack sequences into rows of exactly max_seq_len.

    Returns ({"input_ids", "labels", "position_ids"} each int32 [R, max_seq_len],
             {"sequences", "truncated", "dropped", "tokens", "rows"}).
    """
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation: expected 'truncate' or 'drop', got {truncation!r}")
    seqs: list[tuple[np.ndarray, np.ndarray]] = []
    truncated = dropped = 0
    for ids, lab in zip(input_ids, labels):
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        lab = np.asarray(lab, dtype=np.int32).reshape(-1)
        if len(ids) != len(lab):
            raise ValueError(f"pack_sequences: input_ids and labels differ in length ({len(ids)} vs {len(lab)})")
        if len(ids) == 0:
            continue
        if len(ids) > max_seq_len:
            truncated += 1
        fitted = fit_length(ids, lab, max_seq_len, truncation)
        if fitted is None:
            dropped += 1
            continue
        ids, lab = fitted
        lab = lab.copy()
        lab[0] = IGNORE_INDEX  # never predict a sequence's first token from the previous sequence
        seqs.append((ids, lab))

    rows = first_fit([len(s[0]) for s in seqs], max_seq_len)
    n = len(rows)
    out_ids = np.full((n, max_seq_len), pad_id, dtype=np.int32)  # [R, L]
    out_lab = np.full((n, max_seq_len), IGNORE_INDEX, dtype=np.int32)
    out_pos = np.zeros((n, max_seq_len), dtype=np.int32)
    tokens = 0
    for r, members in enumerate(rows):
        t = 0
        for i in members:
            ids, lab = seqs[i]
            k = len(ids)
            out_ids[r, t:t + k] = ids
            out_lab[r, t:t + k] = lab
            out_pos[r, t:t + k] = np.arange(k, dtype=np.int32)
            t += k
        tokens += t
        out_pos[r, t:] = np.arange(max_seq_len - t, dtype=np.int32)  # padding: its own segment from 0
    stats = {"sequences": len(seqs), "truncated": truncated, "dropped": dropped, "tokens": tokens, "rows": n}
    return {"input_ids": out_ids, "labels": out_lab, "position_ids": out_pos}, stats


def pack_batch(batch: dict, max_seq_len: int, pad_id: int, truncation: str = "truncate") -> dict:
    """Ray Data `map_batches` function: a numpy batch of sequences -> a batch of packed rows."""
    rows, _ = pack_sequences(as_sequence_list(batch["input_ids"]), as_sequence_list(batch["labels"]),
                             max_seq_len, pad_id, truncation)
    return rows


def chunk(ids: np.ndarray, size: int) -> list[np.ndarray]:
    """Split one long token sequence into consecutive pieces of at most `size` (CPT documents)."""
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def group_by_length(batch: dict, group_size: int, seed: int = 0) -> dict:
    """Ray Data `map_batches` function (packing off): sort a window of sequences by length, cut the
    sorted window into groups of `group_size` and shuffle the groups, so that consecutive rows (a
    trainer's batch) have similar lengths without a short-to-long sweep over the epoch."""
    ids = as_sequence_list(batch["input_ids"])
    n = len(ids)
    if n == 0:
        return batch
    order = np.argsort(np.fromiter((len(x) for x in ids), dtype=np.int64, count=n), kind="stable")
    groups = [order[i:i + group_size] for i in range(0, n, group_size)]
    # seeded by the window's content so re-executions of the same window give the same order
    rng = np.random.default_rng([seed, n, int(sum(len(x) for x in ids))])
    perm = np.concatenate([groups[g] for g in rng.permutation(len(groups))])
    out = {}
    for key, col in batch.items():
        if key in ("input_ids", "labels", "position_ids"):
            seqs = as_sequence_list(col)
            out[key] = object_column([seqs[i] for i in perm])
        else:
            out[key] = np.asarray(col)[perm]
    return out
