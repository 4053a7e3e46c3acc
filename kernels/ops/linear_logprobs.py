"""Fused linear -> log-softmax -> gather: the log-probability of each sampled token, from hidden
states, without the [N, V] logits (the GRPO learner's policy, old and reference log-probs).

logp_i = z_i[target_i] - logsumexp(z_i),  z = cap(hidden @ weight.T) / temperature

It is the negative of the fused cross-entropy's per-row loss, so it reuses that op's row kernels
(`kernels/ops/linear_cross_entropy.py`): the tokens are walked in chunks of C rows, one matmul
gives a chunk's logits [C, V], a Triton program per row computes its log-sum-exp in fp32 and
overwrites the row with d logp / d logits, and one more matmul turns that into d logp / d hidden
[C, H]. Each row's gradient depends on that row only, so the backward is a row scaling of the
stored d hidden by the incoming per-token gradient (the GRPO loss's d loss / d logp): exact, with
one [C, V] chunk and d hidden [N, H] as the extra memory. The entropy of each row comes from the
same pass (a metric: no gradient).

The head's weight gets no gradient here (LoRA and QLoRA leave lm_head frozen); a caller whose head
is trained (full fine-tuning, train_embeddings) takes `linear_logprobs_reference` or its own
chunked path instead. Temperature is folded into the hidden states (z / T = (h / T) @ W.T); with
Gemma 2's soft-capping the cap comes before the temperature, so T != 1 with a softcap is refused.
"""
from __future__ import annotations

import torch

from kernels.ops.common import use_triton
from kernels.ops.linear_cross_entropy import (IGNORE_INDEX, _rows_loss_and_grad_torch, _rows_loss_and_grad_triton,
                                              default_chunk_tokens)

__all__ = ["IGNORE_INDEX", "LinearLogprobsFunction", "linear_logprobs", "linear_logprobs_reference"]


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_tokens, triton_rows, grad_hidden, want_entropy):
        n_tokens = hidden.shape[0]
        chunk = chunk_tokens or default_chunk_tokens(n_tokens, weight.shape[0])
        rows_fn = _rows_loss_and_grad_triton if triton_rows else _rows_loss_and_grad_torch
        losses = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device) if want_entropy else None
        d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden else None
        for start in range(0, n_tokens, chunk):
            end = min(start + chunk, n_tokens)
            logits = hidden[start:end] @ weight.t()  # [C, H] x [H, V] -> [C, V], weight dtype
            ent = entropy[start:end] if entropy is not None else None
            losses[start:end] = rows_fn(logits, targets[start:end], softcap, grad_hidden, ent)
            if grad_hidden:  # d loss / d logits [C, V] x [V, H] -> d loss / d hidden [C, H]
                torch.mm(logits, weight, out=d_hidden[start:end])
        ctx.d_hidden = d_hidden
        if entropy is None:
            entropy = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        ctx.mark_non_differentiable(entropy)
        return losses.neg_(), entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        if ctx.d_hidden is None:
            return None, None, None, None, None, None, None, None
        d_hidden, ctx.d_hidden = ctx.d_hidden, None
        # logp = -loss: d hidden_i = -g_i * d loss_i / d hidden_i   [N] -> [N, 1] row scaling
        d_hidden.mul_(grad_logp.neg().to(d_hidden.dtype)[:, None])
        return d_hidden, None, None, None, None, None, None, None


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              softcap: float | None = None, temperature: float = 1.0
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch with the full fp32 logits (what the tests compare to): (logp [N], entropy [N]);
    rows whose target is -100 give 0 for both."""
    z = (hidden @ weight.t()).float()  # [N, H] x [H, V] -> [N, V]
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logp_all = torch.log_softmax(z / temperature, -1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    logp = torch.where(valid, logp_all.gather(-1, safe[:, None])[:, 0], 0.0)
    with torch.no_grad():
        ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    return logp, ent


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    softcap: float | None = None, temperature: float = 1.0, entropy: bool = True,
                    chunk_tokens: int | None = None, mode: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [N, H], weight [V, H], targets [N] -> (logp [N] fp32, entropy [N] fp32 or None).

    Gradients flow to `hidden` only (the weight must not require grad). targets == -100 give 0.
    mode: auto | triton | reference (kernels.ops.common); the reference mode runs the same chunked
    scheme with torch ops.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprobs: expected hidden [N, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_logprobs: targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"linear_logprobs: temperature must be > 0, got {temperature}")
    if softcap and temperature != 1.0:
        raise ValueError("linear_logprobs: a soft-capped head with temperature != 1 is not fused "
                         "(the cap comes before the temperature); use linear_logprobs_reference")
    grad_on = torch.is_grad_enabled()
    if grad_on and weight.requires_grad:
        raise ValueError("linear_logprobs: the head's weight requires grad (full fine-tuning or trained "
                         "embeddings); the fused op gives gradients to the hidden states only")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # fp32 weights computed in bf16: cast once, here
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_logprobs(hidden.to(dtype), weight.to(dtype), targets, softcap=softcap,
                                   temperature=temperature, entropy=entropy, chunk_tokens=chunk_tokens, mode=mode)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_logprobs: hidden and weight dtypes differ ({hidden.dtype} vs {weight.dtype})")
    if temperature != 1.0:
        hidden = hidden / temperature  # z / T == (h / T) @ W.T; the division is differentiable
    logp, ent = LinearLogprobsFunction.apply(
        hidden, weight, targets.contiguous(), float(softcap) if softcap else None, chunk_tokens,
        use_triton(mode, hidden, weight), grad_on and hidden.requires_grad, entropy)
    return logp, (ent if entropy else None)
