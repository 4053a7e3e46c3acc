"""GeGLU: gelu(gate) * up with exact (erf) or tanh-approximated GELU, forward and backward.

Gemma uses the tanh form ("gelu_pytorch_tanh"). Same memory scheme as SwiGLU: the backward
can write d(gate), d(up) over the saved gate and up buffers (`inplace_backward=True`).
tanh is written with exp (common.tanh) so it needs nothing beyond the core triton.language
of Triton 3.6.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops.common import launchable, tanh, tile_elements, use_triton

GPU_BLOCK = 1024
APPROXIMATES = ("none", "tanh")


def _block(t: torch.Tensor) -> int:
    return tile_elements(t.device, GPU_BLOCK)


@triton.jit
def _gelu_and_grad(g, TANH: tl.constexpr):
    """(gelu(g), d gelu / d g) in fp32."""
    if TANH:
        k0 = 0.7978845608028654  # sqrt(2 / pi)
        inner = k0 * (g + 0.044715 * g * g * g)
        t = tanh(inner)
        gelu = 0.5 * g * (1.0 + t)
        dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k0 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))  # Phi(g)
        pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327  # phi(g) = e^(-g^2/2) / sqrt(2 pi)
        gelu = g * cdf
        dgelu = cdf + g * pdf
    return gelu, dgelu


@triton.jit
def _geglu_fwd_kernel(G, U, Y, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    gelu, _ = _gelu_and_grad(g, TANH)
    tl.store(Y + offs, (gelu * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DY, G, U, DG, DU, n, TANH: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    gelu, dgelu = _gelu_and_grad(g, TANH)
    tl.store(DG + offs, (dy * u * dgelu).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * gelu).to(DU.dtype.element_ty), mask=mask)


def geglu_forward(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    y = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = _block(gate)
        launchable(_geglu_fwd_kernel, gate.device)[(triton.cdiv(n, block),)](
            gate, up, y, n, TANH=approximate == "tanh", BLOCK=block)
    return y


def geglu_backward(dy, gate, up, approximate: str = "tanh", inplace: bool = False):
    dg, du = (gate, up) if inplace else (torch.empty_like(gate), torch.empty_like(up))
    n = gate.numel()
    if n:
        block = _block(gate)
        launchable(_geglu_bwd_kernel, gate.device)[(triton.cdiv(n, block),)](
            dy, gate, up, dg, du, n, TANH=approximate == "tanh", BLOCK=block)
    return dg, du


class GeGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, approximate, inplace_backward):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.approximate = approximate
        ctx.inplace = inplace_backward
        return geglu_forward(gate, up, approximate)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = geglu_backward(dy.contiguous(), gate, up, ctx.approximate, inplace=ctx.inplace)
        return dg, du, None, None


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """Pure PyTorch: F.gelu(gate, approximate) * up (what HF's GELU activations compute)."""
    return torch.nn.functional.gelu(gate, approximate=approximate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", inplace_backward: bool = False,
          mode: str | None = None) -> torch.Tensor:
    """gelu(gate) * up for gate, up [..., I]; approximate: "tanh" (Gemma) or "none" (exact erf)."""
    if approximate not in APPROXIMATES:
        raise ValueError(f"approximate: expected one of {', '.join(APPROXIMATES)}, got {approximate!r}")
    if use_triton(mode, gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
        return GeGLUFunction.apply(gate, up, approximate, bool(inplace_backward))
    return geglu_reference(gate, up, approximate)
