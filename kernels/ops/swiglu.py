"""SwiGLU: silu(gate) * up, forward and backward, elementwise over [..., I].

Forward keeps gate and up (the backward needs them) and writes a new output. The backward
can write d(gate) and d(up) over gate's and up's own buffers (`inplace_backward=True`): at
the MLP's memory peak that saves two [tokens, intermediate] tensors. Only safe when nothing
else holds gate and up - true for the gate_proj/up_proj outputs inside the patched MLP, and
autograd's version counter raises if another node saved them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops.common import launchable, tile_elements, use_triton

GPU_BLOCK = 1024


def _block(t: torch.Tensor) -> int:
    return tile_elements(t.device, GPU_BLOCK)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dsilu = s * (1.0 + g * (1.0 - s))  # d/dg of g * sigmoid(g)
    tl.store(DG + offs, (dy * u * dsilu).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up contiguous, same shape and dtype -> silu(gate) * up."""
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = _block(gate)
        launchable(_swiglu_fwd_kernel, gate.device)[(triton.cdiv(n, block),)](
            gate, up, y, n, BLOCK=block)
    return y


def swiglu_backward(dy, gate, up, inplace: bool = False):
    """-> (d gate, d up); written over gate and up when `inplace`."""
    dg, du = (gate, up) if inplace else (torch.empty_like(gate), torch.empty_like(up))
    n = gate.numel()
    if n:
        block = _block(gate)
        launchable(_swiglu_bwd_kernel, gate.device)[(triton.cdiv(n, block),)](
            dy, gate, up, dg, du, n, BLOCK=block)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, inplace_backward):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.inplace = inplace_backward
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = swiglu_backward(dy.contiguous(), gate, up, inplace=ctx.inplace)
        return dg, du, None


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure PyTorch, as the Hugging Face MLP computes act_fn(gate_proj(x)) * up_proj(x)."""
    return torch.nn.functional.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False,
           mode: str | None = None) -> torch.Tensor:
    """silu(gate) * up for gate, up [..., I] of one shape and dtype."""
    if use_triton(mode, gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
        return SwiGLUFunction.apply(gate, up, bool(inplace_backward))
    return swiglu_reference(gate, up)
