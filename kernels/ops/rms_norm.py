"""RMSNorm, forward and backward (input and weight gradients), Llama and Gemma variants.

Llama:  y = w * (x * rstd).to(x.dtype)          (normalised value rounded to the input dtype first)
Gemma:  y = (x * rstd * (1 + w)).to(x.dtype)     (all in fp32, one rounding)
with rstd = 1 / sqrt(mean(x^2) + eps), computed in fp32. Triton programs normalise rows
in tiles of rows (one row per program for wide rows on GPU, many for q/k norms over head_dim);
the backward walks a strip of rows per program and writes one fp32 partial weight gradient
per program, summed on the host (no atomics, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops.common import launchable, next_power_of_2, num_programs_hint, rows_per_tile, use_triton

MAX_FUSED_COLS = 65536  # one row must fit one block


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_rows, n_cols, eps,
                         GEMMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: row * stride > 2**31
    cols = tl.arange(0, BLOCK)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # [BLOCK_R]
    xhat = x * rstd[:, None]
    if GEMMA:
        y = xhat * (1.0 + w)
    else:
        y = xhat.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx,
                         n_rows, n_cols, rows_per_program,
                         GEMMA: tl.constexpr, COMPUTE_DW: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if GEMMA:
        w = w + 1.0
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: row * stride may pass 2**31
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for tile in range(row_start, row_end, BLOCK_R):
        rows = tile + tl.arange(0, BLOCK_R)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)[:, None]
        xhat = x * rstd
        # d/dx of xhat: rstd * (g - xhat * mean(g * xhat)), with g the gradient reaching xhat
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if GEMMA:
                dw += tl.sum(dy * xhat, axis=0)
            else:  # Llama multiplies w by xhat already rounded to the input dtype
                dw += tl.sum(dy * xhat.to(X.dtype.element_ty).to(tl.float32), axis=0)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=cmask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [N, H] with unit stride along H (a view where possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool):
    """x [N, H] (unit stride along H), weight [H] -> (y [N, H], rstd [N] fp32)."""
    n_rows, n_cols = x.shape
    out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        block = next_power_of_2(n_cols)
        block_r = rows_per_tile(block, x.device, n_rows)
        launchable(_rms_norm_fwd_kernel, x.device)[(triton.cdiv(n_rows, block_r),)](
            x, weight, y, rstd, x.stride(0), y.stride(0), n_rows, n_cols, eps,
            GEMMA=gemma, BLOCK_R=block_r, BLOCK=block, num_warps=_num_warps(block * block_r))
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      gemma: bool, compute_dw: bool):
    """-> (dx [N, H] in x.dtype, dw [H] in weight.dtype or None)."""
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x)
    block = next_power_of_2(n_cols)
    block_r = rows_per_tile(block, x.device, n_rows)
    # a strip of rows per program; with dw, as many programs as fill the device (one fp32
    # partial dw each), without it one tile per program
    n_prog = triton.cdiv(max(n_rows, 1), block_r)
    if compute_dw:
        n_prog = min(n_prog, num_programs_hint(x.device))
    rows_per_program = triton.cdiv(triton.cdiv(max(n_rows, 1), n_prog), block_r) * block_r
    n_prog = triton.cdiv(max(n_rows, 1), rows_per_program)
    partial = torch.zeros((n_prog, n_cols) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    if n_rows:
        launchable(_rms_norm_bwd_kernel, x.device)[(n_prog,)](
            dy, x, weight, rstd, dx, partial, dy.stride(0), x.stride(0), dx.stride(0),
            n_rows, n_cols, rows_per_program,
            GEMMA=gemma, COMPUTE_DW=compute_dw, BLOCK_R=block_r, BLOCK=block,
            num_warps=_num_warps(block * block_r))
    dw = partial.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, gemma):
        shape = x.shape
        x2 = _rows(x)  # [..., H] -> [N, H]
        y, rstd = rms_norm_forward(x2, weight, eps, gemma)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.gemma = gemma
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        dx, dw = rms_norm_backward(dy2, x2, weight, rstd, ctx.gemma, compute_dw=ctx.needs_input_grad[1])
        return dx.view(ctx.shape), dw, None, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       gemma: bool = False) -> torch.Tensor:
    """Pure PyTorch, the same arithmetic as the Hugging Face Llama / Gemma RMSNorm modules."""
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xhat * (1.0 + weight.float())).to(x.dtype)
    return weight * xhat.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, gemma: bool = False,
             mode: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., H] with weight [H]; Gemma's (1 + w) when `gemma`."""
    if use_triton(mode, x) and x.shape[-1] <= MAX_FUSED_COLS:
        return RMSNormFunction.apply(x, weight, float(eps), bool(gemma))
    return rms_norm_reference(x, weight, eps, gemma)
