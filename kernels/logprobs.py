"""Log-probabilities of given tokens under a causal LM, without the [tokens, vocab] logits.

    lp, ent = packed_logprobs(model, packed)          # packed: actors.learner_batch.pack_micro_batch
    lp, ent = sequence_logprobs(model, input_ids, index, targets, mask)   # right-padded rows

`token_logprobs(model, hidden [N, H], targets [N])` is the head: on a patched model with a plain,
frozen lm_head it is the fused "linear -> log-softmax -> gather" op (kernels/ops/linear_logprobs.py:
chunks of rows, fp32 log-sum-exp, d hidden finished in the forward); otherwise (a trained head:
full fine-tuning or train_embeddings; an adapted head; an unpatched model or kernels.enabled=false)
the chunked reference below: each chunk of `chunk_size` rows under activation checkpointing, so at
most one chunk's [chunk, V] logits exist at a time.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _head_chunk(head, h: torch.Tensor, t: torch.Tensor, temperature: float, softcap: float | None):
    logits = head(h).float()                         # [c, H] -> [c, V], fp32 for the softmax
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    lse = torch.logsumexp(logits, -1)                 # [c]
    logp = logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():  # entropy is a metric: no graph kept for it
        p = torch.softmax(logits, -1)
        ent = lse - (p * logits).sum(-1)
    return logp, ent


def chunked_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, temperature: float = 1.0,
                     chunk_size: int = 1024, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], targets [N] -> (logprob of each target [N] fp32, entropy [N] fp32, detached).

    With grad enabled each chunk runs under activation checkpointing, so at most one chunk's
    [chunk, V] logits exist at any time, in forward and in backward.
    """
    out_lp, out_ent = [], []
    for s in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(_head_chunk, head, h, t, temperature, softcap, use_reentrant=False)
        else:
            lp, ent = _head_chunk(head, h, t, temperature, softcap)
        out_lp.append(lp)
        out_ent.append(ent)
    if not out_lp:
        z = hidden.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat(out_lp), torch.cat(out_ent)


def fused_head_reason(model, temperature: float = 1.0) -> str | None:
    """None when `token_logprobs` takes the fused op on this model, else why it does not."""
    from kernels.model import base_model
    from kernels.patch import kernels_config

    m = base_model(model)
    cfg = kernels_config(model)
    if cfg is None or not cfg.enabled:
        return "kernels off"
    head = m.lm_head
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"lm_head is a {type(head).__name__} (adapted or wrapped)"
    if head.weight.requires_grad:
        return "lm_head is trained"
    if getattr(m.config, "final_logit_softcapping", None) and temperature != 1.0:
        return "soft-capped head with temperature != 1"
    return None


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_size: int = 1024, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H] (the decoder's output at the predicting positions), targets [N] ->
    (logp [N] fp32, entropy [N] fp32 detached; zeros when entropy=False on the fused path)."""
    from kernels.model import base_model
    from kernels.ops.linear_logprobs import linear_logprobs
    from kernels.patch import kernels_config

    m = base_model(model)
    softcap = getattr(m.config, "final_logit_softcapping", None)
    if fused_head_reason(model, temperature) is None:
        lp, ent = linear_logprobs(hidden, m.lm_head.weight, targets, softcap=softcap, temperature=temperature,
                                  entropy=entropy, mode=kernels_config(model).mode)
        return lp, (ent if ent is not None else torch.zeros_like(lp))
    return chunked_logprobs(hidden, m.lm_head, targets, temperature, chunk_size, softcap)


def sequence_logprobs(model, input_ids: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
                      mask: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs and entropies [B, C] of completion tokens (0 where mask is 0): one sequence a row.

    input_ids [B, L] right padded; index/targets/mask [B, C] (actors.learner_batch.collate).
    """
    from kernels.model import base_model

    m = base_model(model)
    hidden = m.model(input_ids=input_ids, use_cache=False).last_hidden_state   # [B, L, H]
    sel = mask.bool()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(-1).expand_as(index)
    h = hidden[rows[sel], index[sel]]                                           # [N, H] completion only
    lp, ent = token_logprobs(model, h, targets[sel], temperature, chunk_size)
    return _scatter(lp, sel), _scatter(ent, sel)


def packed_logprobs(model, packed: dict[str, torch.Tensor], temperature: float = 1.0, chunk_size: int = 1024,
                    entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs and entropies [S, C] of the completion tokens of S sequences packed into rows.

    packed: input_ids / position_ids [R, L] (positions restart per sequence, so there is no
    attention across sequences), index [N] (flat positions in R*L predicting each completion
    token, sequence-major), targets [N], and valid [S, C] (1 at each completion token; falls back
    to mask [S, C] when absent): every completion token gets its logprob, loss-masked ones too.
    """
    from kernels.model import base_model

    m = base_model(model)
    hidden = m.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                     use_cache=False).last_hidden_state                           # [R, L, H]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed["index"])  # [R*L, H] -> [N, H]
    lp, ent = token_logprobs(model, h, packed["targets"], temperature, chunk_size, entropy)
    sel = packed.get("valid", packed["mask"]).bool()
    return _scatter(lp, sel), _scatter(ent, sel)


def _scatter(values: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """[N] sequence-major values -> [S, C] with zeros where sel is False."""
    out = torch.zeros(sel.shape, dtype=torch.float32, device=values.device)
    return out.masked_scatter(sel, values.float())
