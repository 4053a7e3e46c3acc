"""SwiGLU and GeGLU (tanh and exact): Triton forward and backward against the fp32 reference."""
from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, assert_close, leaf
from kernels.ops.geglu import geglu, geglu_reference
from kernels.ops.swiglu import swiglu, swiglu_reference

TOLERANCES = [
    # (dtype, atol, rtol)
    # fp32: elementwise maths; tanh is written through exp in the kernel (~1e-7 absolute apart)
    (torch.float32, 1e-5, 1e-5),
    # bf16: one rounding of the output / of each gradient (2**-8 relative), where HF's own bf16
    # path rounds twice (activation, then product); compared with fp32 maths on the same inputs
    (torch.bfloat16, 1.6e-2, 1.6e-2),
]

OPS = {
    "swiglu": (lambda g, u, **kw: swiglu(g, u, **kw), swiglu_reference),
    "geglu_tanh": (lambda g, u, **kw: geglu(g, u, "tanh", **kw), lambda g, u: geglu_reference(g, u, "tanh")),
    "geglu_exact": (lambda g, u, **kw: geglu(g, u, "none", **kw), lambda g, u: geglu_reference(g, u, "none")),
}

CPU_SHAPES = [(1, 1), (3, 41), (5, 123, 341)]
GPU_SHAPES = [(8 * 2048, 14336), (8 * 2048, 8192), (8 * 2048, 9216)]  # llama-8b, llama-1b, gemma-2-2b MLPs


def _check(op, shape, dtype, atol, rtol, inplace_backward):
    fused, reference = OPS[op]
    torch.manual_seed(0)
    gate = torch.randn(shape, device=DEVICE, dtype=dtype) * 3
    up = torch.randn(shape, device=DEVICE, dtype=dtype)
    g1, u1 = leaf(gate), leaf(up)
    # as in the MLP: the op's inputs are intermediates (their buffers may take the gradients)
    y = fused(g1 * 1, u1 * 1, inplace_backward=inplace_backward, mode="triton")
    dy = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, (g1, u1), dy)

    g2, u2 = leaf(gate, torch.float32), leaf(up, torch.float32)
    y_ref = reference(g2, u2)
    dg_ref, du_ref = torch.autograd.grad(y_ref, (g2, u2), dy.float())
    assert y.dtype == dtype and y.shape == gate.shape
    assert_close(y, y_ref, atol, rtol, "y")
    assert_close(dg, dg_ref, atol, rtol, "d gate")
    assert_close(du, du_ref, atol, rtol, "d up")


@pytest.mark.parametrize("inplace_backward", [False, True], ids=["out_of_place", "inplace"])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(OPS))
def test_glu_matches_reference(op, shape, dtype, atol, rtol, inplace_backward):
    _check(op, shape, dtype, atol, rtol, inplace_backward)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", list(OPS))
def test_glu_matches_reference_gpu_bf16(op, shape):
    _check(op, shape, torch.bfloat16, 1.6e-2, 1.6e-2, inplace_backward=True)  # bf16: one rounding per value


def test_glu_inplace_backward_reuses_input_buffers():
    """With inplace_backward the gradients are written over gate's and up's storage."""
    torch.manual_seed(0)
    g1, u1 = leaf(torch.randn(4, 33, device=DEVICE)), leaf(torch.randn(4, 33, device=DEVICE))
    gate, up = g1 * 1, u1 * 1
    seen = {}
    gate.register_hook(lambda g: seen.update(gate=g.data_ptr()))
    up.register_hook(lambda g: seen.update(up=g.data_ptr()))
    ptrs = (gate.data_ptr(), up.data_ptr())
    swiglu(gate, up, inplace_backward=True, mode="triton").sum().backward()
    assert (seen["gate"], seen["up"]) == ptrs


def test_geglu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        geglu(torch.zeros(2), torch.zeros(2), approximate="erf")
