"""The learner's batches: python lists in (cheap through the object store), tensors out.

A batch is a dict of per-sample lists: prompt_ids, completion_ids, rollout_logprobs, advantages
(and old_logprobs / ref_logprobs once computed), and - for multi-turn episodes only - loss_mask:
per completion token 1 where the engine sampled it, 0 on observation (tool) tokens, which are in
the sequence as context but never in the loss or its normalisers (`loss_mask_of`, `loss_tokens`).
Without the key every completion token is trained. Two tensor layouts:

- `collate`: one sequence per row, right padded [B, L] (the reference layout; tests use it);
- `pack_micro_batch`: padding-free, the learner's layout. Sequences (prompt + completion) are laid
  end to end in rows of at most `row_tokens` tokens (a longer sequence gets a row of its own; the
  default capacity is the longest sequence, so attention never spans more than that),
  position ids restart at 0 for each sequence, so transformers gives each sequence its own
  block-causal attention, exactly as in the SFT pipeline's packed rows. Only the completion
  positions are gathered for the head: `index` [N] is the flat position in [R * L] that predicts
  each completion token, in sequence-major order, matching `mask` [S, C] row by row.
"""
from __future__ import annotations

import torch


def make_batch(samples: list, advantages: list[float]) -> dict:
    """Samples (actors.rollout.Sample) + one advantage each -> the learner's batch dict."""
    if len(samples) != len(advantages):
        raise ValueError(f"make_batch: {len(samples)} samples but {len(advantages)} advantages")
    batch = {
        "prompt_ids": [list(s.prompt_token_ids) for s in samples],
        "completion_ids": [list(s.completion_token_ids) for s in samples],
        "rollout_logprobs": [list(s.logprobs) for s in samples],
        "advantages": [float(a) for a in advantages],
        "truncated": [s.finish_reason == "length" for s in samples],  # for grpo.mask_truncated_completions
    }
    if any(getattr(s, "loss_mask", None) is not None for s in samples):  # multi-turn: observations masked
        masks = []
        for i, s in enumerate(samples):
            m = getattr(s, "loss_mask", None)
            m = [1] * len(s.completion_token_ids) if m is None else [int(bool(x)) for x in m]
            if len(m) != len(s.completion_token_ids):
                raise ValueError(f"make_batch: sample {i} has {len(m)} loss-mask entries for "
                                 f"{len(s.completion_token_ids)} completion tokens")
            masks.append(m)
        batch["loss_mask"] = masks
    return batch


def loss_mask_of(batch: dict, i: int) -> list[int]:
    """Sample i's per-completion-token loss mask (all ones for single-turn samples)."""
    if "loss_mask" in batch:
        return batch["loss_mask"][i]
    return [1] * len(batch["completion_ids"][i])


def loss_tokens(batch: dict, idx: list[int] | None = None) -> int:
    """Completion tokens in the loss (sampled tokens; observations excluded) of samples `idx` (all)."""
    idx = range(batch_size(batch)) if idx is None else idx
    if "loss_mask" in batch:
        return sum(sum(batch["loss_mask"][i]) for i in idx)
    return sum(len(batch["completion_ids"][i]) for i in idx)


def batch_size(batch: dict) -> int:
    return len(batch["advantages"])


def select(batch: dict, idx: list[int]) -> dict:
    return {k: [v[i] for i in idx] for k, v in batch.items()}


def shard(batch: dict, rank: int, world_size: int) -> dict:
    """Rank `rank`'s share: every world_size-th sample (balances long and short completions)."""
    return select(batch, list(range(rank, batch_size(batch), world_size)))


def sequence_tokens(batch: dict, i: int) -> int:
    return len(batch["prompt_ids"][i]) + len(batch["completion_ids"][i])


def micro_batches(batch: dict, max_sequences: int, max_tokens: int = 0) -> list[list[int]]:
    """Consecutive index groups of at most `max_sequences` sequences and, when max_tokens > 0, at
    most `max_tokens` prompt + completion tokens (a longer sequence goes alone)."""
    groups, cur, tokens = [], [], 0
    for i in range(batch_size(batch)):
        n = sequence_tokens(batch, i)
        if cur and (len(cur) >= max_sequences or (max_tokens and tokens + n > max_tokens)):
            groups.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += n
    if cur:
        groups.append(cur)
    return groups


def _per_sequence(batch: dict) -> dict[str, torch.Tensor]:
    """[S, C] loss mask, completion positions (valid) and rollout logprobs, [S] advantages
    (C = longest completion). mask == valid except on multi-turn observation tokens (mask 0)."""
    C = [len(c) for c in batch["completion_ids"]]
    S, Cmax = len(C), max(max(C, default=0), 1)
    mask = torch.zeros(S, Cmax)
    valid = torch.zeros(S, Cmax)
    rollout_lp = torch.zeros(S, Cmax)
    for s, c in enumerate(batch["completion_ids"]):
        if c:
            valid[s, :len(c)] = 1.0
            mask[s, :len(c)] = torch.tensor(loss_mask_of(batch, s), dtype=torch.float32)
            rollout_lp[s, :len(c)] = torch.tensor(batch["rollout_logprobs"][s][:len(c)])
    return {"mask": mask, "valid": valid, "rollout_logprobs": rollout_lp,
            "advantages": torch.tensor(batch["advantages"], dtype=torch.float32)}


def collate(batch: dict, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded tensors. input_ids [B, L] = prompt + completion; targets of position t is
    input_ids[t + 1]. mask/old/rollout logprobs are [B, C] over completion positions (C = longest
    completion), aligned with `completion_index` [B, C] = the position in input_ids that *predicts*
    completion token c (prompt_len - 1 + c)."""
    P = [len(p) for p in batch["prompt_ids"]]
    C = [len(c) for c in batch["completion_ids"]]
    B, L, Cmax = len(P), max(p + c for p, c in zip(P, C)), max(max(C), 1)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    index = torch.zeros(B, Cmax, dtype=torch.long)
    targets = torch.full((B, Cmax), pad_id, dtype=torch.long)
    for b, (p, c) in enumerate(zip(batch["prompt_ids"], batch["completion_ids"])):
        input_ids[b, :len(p)] = torch.tensor(p)
        if c:
            input_ids[b, len(p):len(p) + len(c)] = torch.tensor(c)
            index[b, :len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            targets[b, :len(c)] = torch.tensor(c)
    return {"input_ids": input_ids, "index": index, "targets": targets, **_per_sequence(batch)}


def pack_micro_batch(batch: dict, pad_id: int = 0, row_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Padding-free rows (see the module docstring): input_ids / position_ids [R, L], index and
    targets [N], and the per-sequence mask / rollout_logprobs [S, C], advantages [S].

    row_tokens: a row's capacity; 0 = the longest sequence's length (short sequences share rows,
    the longest fill one each: no row is longer than needed)."""
    if row_tokens <= 0:
        row_tokens = max(len(p) + len(c) for p, c in zip(batch["prompt_ids"], batch["completion_ids"]))
    rows: list[list[int]] = []       # token ids of each row
    where: list[tuple[int, int]] = []  # (row, offset) of the position predicting each completion token
    for p, c in zip(batch["prompt_ids"], batch["completion_ids"]):
        if not rows or len(rows[-1]) + len(p) + len(c) > row_tokens:
            rows.append([])
        off = len(rows[-1])
        where += [(len(rows) - 1, off + len(p) - 1 + j) for j in range(len(c))]
        rows[-1] += list(p) + list(c)
    L = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    position_ids = torch.zeros(len(rows), L, dtype=torch.long)
    r, off = 0, 0
    for p, c in zip(batch["prompt_ids"], batch["completion_ids"]):  # the same walk: positions restart
        n = len(p) + len(c)
        if off + n > len(rows[r]):
            r, off = r + 1, 0
        position_ids[r, off:off + n] = torch.arange(n)
        off += n
    for i, ids in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        # the padding continues the row's last sequence: real tokens never attend to it (causal), and
        # a row holding one sequence stays unpacked for transformers (SDPA's causal kernel, no mask)
        last = int(position_ids[i, len(ids) - 1]) + 1
        position_ids[i, len(ids):] = torch.arange(last, last + L - len(ids))
    return {"input_ids": input_ids, "position_ids": position_ids,
            "index": torch.tensor([i * L + o for i, o in where], dtype=torch.long),
            "targets": torch.tensor([t for c in batch["completion_ids"] for t in c], dtype=torch.long),
            **_per_sequence(batch)}


def fixed_row_length(batch: dict, granularity: int = 256) -> int:
    """The row length of fixed-shape micro-batches: the longest sequence rounded up, so steps
    whose longest sequence falls in the same bucket share one shape (one CUDA graph)."""
    longest = max((sequence_tokens(batch, i) for i in range(batch_size(batch))), default=1)
    return -(-longest // granularity) * granularity


def pack_fixed(batch: dict, pad_id: int, rows: int, row_len: int, max_sequences: int = 0,
               loss_agg: str = "token-mean") -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Micro-batches of one fixed shape, for a replayed CUDA graph (actors/learner_graph.py).

    Sequences (prompt + completion, each at most `row_len` tokens) are laid end to end in `rows`
    rows of `row_len` tokens, positions restarting per sequence (as pack_micro_batch); unused rows
    and tails are padding. Everything the loss reads is per position of the flattened [rows *
    row_len] layout, so no tensor's shape depends on the sequences:
      targets   the completion token position t predicts (0 where t predicts none)
      mask      1.0 where t predicts a completion token in the loss (loss_mask: not an observation)
      adv       the sequence's advantage at those positions
      weight    the aggregation weight of the token: 1, or 1 / (its sequence's loss tokens) for
                seq-mean-token-mean (the normaliser itself is the caller's scale)
      rollout_logprobs, and old_logprobs / ref_logprobs when the batch has them.
    Returns [(sequence indices, tensors)], on the CPU.
    """
    if rows < 1 or row_len < 1:
        raise ValueError(f"pack_fixed: rows and row_len must be >= 1, got {rows}, {row_len}")
    extra = [k for k in ("old_logprobs", "ref_logprobs") if k in batch]
    out: list[tuple[list[int], dict[str, torch.Tensor]]] = []
    T = rows * row_len

    def new():
        return {"idx": [], "row": 0, "off": 0,
                "input_ids": torch.full((rows, row_len), pad_id, dtype=torch.long),
                "position_ids": torch.arange(row_len).repeat(rows, 1),
                "targets": torch.zeros(T, dtype=torch.long), "mask": torch.zeros(T),
                "adv": torch.zeros(T), "weight": torch.zeros(T), "rollout_logprobs": torch.zeros(T),
                **{k: torch.zeros(T) for k in extra}}

    def close(mb):
        if mb["idx"]:
            if mb["off"]:  # the last row's padding continues its last sequence's positions
                r, o = mb["row"], mb["off"]
                last = int(mb["position_ids"][r, o - 1]) + 1
                mb["position_ids"][r, o:] = torch.arange(last, last + row_len - o)
            out.append((mb.pop("idx"), {k: v for k, v in mb.items() if k not in ("row", "off")}))

    mb = new()
    for i in range(batch_size(batch)):
        p, c = batch["prompt_ids"][i], batch["completion_ids"][i]
        n = len(p) + len(c)
        if n > row_len:
            raise ValueError(f"pack_fixed: sequence {i} has {n} tokens, more than a row's {row_len}")
        if mb["off"] + n > row_len:  # next row (its predecessor's padding continues its positions)
            r, o = mb["row"], mb["off"]
            if o:
                last = int(mb["position_ids"][r, o - 1]) + 1
                mb["position_ids"][r, o:] = torch.arange(last, last + row_len - o)
            mb["row"], mb["off"] = mb["row"] + 1, 0
        if mb["row"] >= rows or (max_sequences and len(mb["idx"]) >= max_sequences):
            close(mb)
            mb = new()
        r, o = mb["row"], mb["off"]
        mb["input_ids"][r, o:o + n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        mb["position_ids"][r, o:o + n] = torch.arange(n)
        if c:
            at = r * row_len + o + len(p) - 1 + torch.arange(len(c))  # positions predicting the completion
            mb["targets"][at] = torch.tensor(c, dtype=torch.long)
            lm = torch.tensor(loss_mask_of(batch, i), dtype=torch.float32)
            mb["mask"][at] = lm
            mb["adv"][at] = float(batch["advantages"][i])
            mb["weight"][at] = 1.0 / max(float(lm.sum()), 1.0) if loss_agg == "seq-mean-token-mean" else 1.0
            mb["rollout_logprobs"][at] = torch.tensor(batch["rollout_logprobs"][i][:len(c)], dtype=torch.float32)
            for k in extra:
                mb[k][at] = torch.tensor(batch[k][i][:len(c)], dtype=torch.float32)
        mb["idx"].append(i)
        mb["off"] += n
    close(mb)
    return out
