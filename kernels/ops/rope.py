"""Rotary position embedding applied to q and k in one kernel, forward and backward.

The rotation angles come in as cos/sin [B, T, D] (or [1, T, D]) as the model's own rotary
module computed them from `position_ids`: every rope-scaling variant (default, llama3, linear,
dynamic, yarn...) and packed rows whose positions restart per sequence are then right by
construction; this op only fuses their application. With x = [x1, x2] split in halves of D:

    out1 = x1 * cos1 - x2 * sin1        out2 = x2 * cos2 + x1 * sin2     (HF's rotate_half form)

The backward is the transposed rotation: the same kernel with sin1' = -sin2, sin2' = -sin1.
One program handles a tile of tokens (b, t): all their q heads and k heads.
cos/sin get no gradient (the model computes them under no_grad).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops.common import launchable, next_power_of_2, rows_per_tile, use_triton


@triton.jit
def _rotate_heads(X, O, COS, SIN, tok0, n_tokens, seq_len, n_heads,
                  sx_b, sx_h, sx_t, so_b, so_h, so_t, sc_b, sc_t, ss_b, ss_t,
                  HALF: tl.constexpr, BACKWARD: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate the [BLOCK_T tokens x BLOCK_H heads] rows of X from token tok0 on, into O."""
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    tok = tok0 + r // BLOCK_H  # flattened (b, t)
    h = (r % BLOCK_H)[:, None]
    b = (tok // seq_len)[:, None]
    t = (tok % seq_len)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (tok < n_tokens)[:, None] & (h < n_heads) & (d < HALF)
    c_ptr = COS + b * sc_b + t * sc_t + d
    s_ptr = SIN + b * ss_b + t * ss_t + d
    c1 = tl.load(c_ptr, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(c_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transposed rotation
        s1 = -tl.load(s_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        s2 = -tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
    else:
        s1 = tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(s_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    x_ptr = X + b * sx_b + t * sx_t + h * sx_h + d
    o_ptr = O + b * so_b + t * so_t + h * so_h + d
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr, (x1 * c1 - x2 * s1).to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptr + HALF, (x2 * c2 + x1 * s2).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_fwd_kernel(Q, K, COS, SIN, QO, KO, n_tokens, seq_len, n_qh, n_kh,
                     sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
                     sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t,
                     sc_b, sc_t, ss_b, ss_t,
                     HALF: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    tok0 = tl.program_id(0).to(tl.int64) * BLOCK_T  # int64: offsets may pass 2**31
    _rotate_heads(Q, QO, COS, SIN, tok0, n_tokens, seq_len, n_qh, sq_b, sq_h, sq_t, sqo_b, sqo_h, sqo_t,
                  sc_b, sc_t, ss_b, ss_t, HALF, BACKWARD, BLOCK_T, BLOCK_QH, BLOCK_D)
    _rotate_heads(K, KO, COS, SIN, tok0, n_tokens, seq_len, n_kh, sk_b, sk_h, sk_t, sko_b, sko_h, sko_t,
                  sc_b, sc_t, ss_b, ss_t, HALF, BACKWARD, BLOCK_T, BLOCK_KH, BLOCK_D)


def _bcast_strides(c: torch.Tensor) -> tuple[int, int]:
    """(batch, time) strides of cos/sin [B|1, T, D]; 0 along a broadcast batch."""
    return (c.stride(0) if c.shape[0] > 1 else 0), c.stride(1)


def _launch(q, k, cos, sin, qo, ko, backward: bool):
    bsz, n_qh, seq_len, dim = q.shape
    n_kh = k.shape[1]
    n_tokens = bsz * seq_len
    if n_tokens == 0:
        return
    half = dim // 2
    block_qh, block_kh, block_d = next_power_of_2(n_qh), next_power_of_2(n_kh), next_power_of_2(half)
    block_t = rows_per_tile(block_qh * block_d, q.device, n_tokens)  # tokens per program
    sc, ss = _bcast_strides(cos), _bcast_strides(sin)
    launchable(_rope_fwd_kernel, q.device)[(triton.cdiv(n_tokens, block_t),)](
        q, k, cos, sin, qo, ko, n_tokens, seq_len, n_qh, n_kh,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        sc[0], sc[1], ss[0], ss[1],
        HALF=half, BACKWARD=backward, BLOCK_T=block_t, BLOCK_QH=block_qh, BLOCK_KH=block_kh,
        BLOCK_D=block_d, num_warps=4)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_forward(q, k, cos, sin):
    """q [B, Hq, T, D], k [B, Hk, T, D] (any strides, unit along D), cos/sin [B|1, T, D]."""
    q, k, cos, sin = _unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin)
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # keeps q's (often transposed) layout
    _launch(q, k, cos, sin, qo, ko, backward=False)
    return qo, ko


def rope_backward(dq, dk, cos, sin):
    dq, dk, cos, sin = _unit_last(dq), _unit_last(dk), _unit_last(cos), _unit_last(sin)
    gq, gk = torch.empty_like(dq), torch.empty_like(dk)
    _launch(dq, dk, cos, sin, gq, gk, backward=True)
    return gq, gk


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        qo, ko = rope_forward(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors  # (autograd materialises a missing dq/dk as zeros)
        gq, gk = rope_backward(dq, dk, cos, sin)
        return gq, gk, None, None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Pure PyTorch, the same arithmetic as Hugging Face's apply_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope(q, k, cos, sin, unsqueeze_dim: int = 1, mode: str | None = None):
    """Rotate q and k; a drop-in for HF's `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`.

    q [B, Hq, T, D] and k [B, Hk, T, D] (or [B, T, H, D] with unsqueeze_dim=2); cos/sin [B|1, T, D].
    """
    if not (use_triton(mode, q, k) and unsqueeze_dim in (1, 2) and q.dim() == 4 and k.dim() == 4):
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    qh, kh = (q, k) if unsqueeze_dim == 1 else (q.transpose(1, 2), k.transpose(1, 2))  # -> [B, H, T, D]
    fusable = (
        cos.dim() == 3 and cos.shape == sin.shape and cos.shape[0] in (1, qh.shape[0])
        and cos.shape[1] == qh.shape[2] == kh.shape[2] and qh.shape[0] == kh.shape[0]
        and cos.shape[-1] == qh.shape[-1] == kh.shape[-1] and qh.shape[-1] % 2 == 0
        and not (cos.requires_grad or sin.requires_grad)
    )
    if not fusable:  # partial rotary, odd layouts, differentiable angles: the reference handles them
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    qo, ko = RoPEFunction.apply(qh, kh, cos, sin)
    return (qo, ko) if unsqueeze_dim == 1 else (qo.transpose(1, 2), ko.transpose(1, 2))
