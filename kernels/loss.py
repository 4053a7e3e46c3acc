"""Token losses of a causal LM without materialising logits when the fused path is on.

`causal_lm_loss_sum(model, input_ids, labels, position_ids)` returns (sum of token losses,
number of target tokens). Labels are already aligned with the *next* token convention used by
the data pipeline: labels[b, t] is the target for the prediction made at position t-1, i.e. the
same as `input_ids` with -100 where no loss is taken (HF convention: the shift happens here).
Summed, not averaged, so that gradient accumulation can normalise by the total number of target
tokens across micro-batches and workers.

The loss goes through `kernels.patch.linear_cross_entropy` (chunked, fp32 per chunk, never the
[B*T, V] logits), in the mode the model was patched with; a model patched with
KernelsConfig(enabled=False) gets the plain full-logits reference instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.ops.linear_cross_entropy import IGNORE_INDEX
from kernels.ops.linear_cross_entropy import linear_cross_entropy_reference as reference_linear_cross_entropy
from kernels.patch import kernels_config, linear_cross_entropy

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "causal_lm_loss_sum", "reference_linear_cross_entropy", "shift_labels"]


def _decoder_and_head(model):
    """(decoder returning hidden states, lm_head module, final logit softcap or None)."""
    from kernels.model import base_model

    m = base_model(model)
    softcap = getattr(m.config, "final_logit_softcapping", None)
    return m.model, m.lm_head, softcap


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T] targets for each position's prediction (last position ignored)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor,
                       position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    targets = shift_labels(labels)  # [B, T]
    # counted before the forward: the host waits for this one small reduction, not for the whole
    # forward pass to drain (which would leave the GPU idle while the backward is being queued)
    n_tokens = int((targets != IGNORE_INDEX).sum())
    return _loss_sum(model, input_ids, targets, position_ids), n_tokens


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of token losses only: nothing is read back to the host (CUDA graph capture;
    the caller counts target tokens on its CPU copy of the labels)."""
    return _loss_sum(model, input_ids, shift_labels(labels), position_ids)


def _loss_sum(model, input_ids, targets, position_ids) -> torch.Tensor:
    decoder, head, softcap = _decoder_and_head(model)
    out = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    hidden = out.last_hidden_state  # [B, T, H]
    h = hidden.reshape(-1, hidden.shape[-1])  # [B, T, H] -> [B*T, H]
    t = targets.reshape(-1)
    cfg = kernels_config(model)
    if cfg is not None and not cfg.enabled:
        return reference_linear_cross_entropy(h, head.weight, t, softcap=softcap, reduction="sum")
    return linear_cross_entropy(h, head.weight, t, softcap=softcap, reduction="sum",
                                mode=cfg.mode if cfg is not None else None)
