"""RMSNorm (Llama and Gemma forms): Triton forward and backward against the fp32 reference."""
from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, assert_close, leaf
from kernels.ops.rms_norm import rms_norm, rms_norm_reference

TOLERANCES = [
    # (dtype, atol, rtol)
    # fp32: the same arithmetic in another summation order -> float rounding only
    (torch.float32, 1e-5, 1e-5),
    # bf16: output rounded to bf16 (2**-8 relative), plus the Llama form's extra rounding of
    # x * rstd before the weight multiply; compared with fp32 maths on the same bf16 inputs
    (torch.bfloat16, 2e-2, 2e-2),
]

CPU_SHAPES = [(1, 1), (3, 41), (5, 123, 341)]
GPU_SHAPES = [(8, 2048, 2048), (8, 2048, 4096), (8 * 2048 * 8, 128)]  # hidden 2048/4096; q/k norm rows


def _check(shape, dtype, atol, rtol, gemma, weight_grad=True):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 3
    w = (torch.randn(shape[-1], device=DEVICE) * 0.5 + (0.0 if gemma else 1.0)).to(dtype)
    x1, w1 = leaf(x), leaf(w).requires_grad_(weight_grad)
    y = rms_norm(x1, w1, eps=1e-6, gemma=gemma, mode="triton")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x1, w1) if weight_grad else (x1,), dy)

    x2, w2 = leaf(x, torch.float32), leaf(w, torch.float32)
    y_ref = rms_norm_reference(x2, w2, eps=1e-6, gemma=gemma)
    grads_ref = torch.autograd.grad(y_ref, (x2, w2), dy.float())

    assert y.dtype == (dtype if gemma else torch.promote_types(dtype, w.dtype)) and y.shape == x.shape
    assert_close(y, y_ref, atol, rtol, "y")
    assert_close(grads[0], grads_ref[0], atol, rtol, "dx")
    if weight_grad:
        assert grads[1].dtype == w.dtype
        assert_close(grads[1], grads_ref[1], atol, rtol, "dw")


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_reference(shape, dtype, atol, rtol, gemma):
    _check(shape, dtype, atol, rtol, gemma)


@pytest.mark.gpu
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_reference_gpu_bf16(shape, gemma):
    # bf16 at real sizes: same tolerance as the CPU bf16 case (per-element rounding does not grow with size;
    # dw sums 16k-131k rows in fp32 and is judged relative to its largest magnitude)
    _check(shape, torch.bfloat16, 2e-2, 2e-2, gemma)


def test_rms_norm_frozen_weight_and_strided_input():
    """LoRA: the norm weight is frozen (no dw work); Gemma 3's q_norm gets a transposed view."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 16, device=DEVICE).transpose(1, 2)  # [B, T, H, D] -> [B, H, T, D] view
    w = torch.randn(16, device=DEVICE)
    x1 = leaf(x)
    y = rms_norm(x1, w, eps=1e-6, gemma=True, mode="triton")
    (dx,) = torch.autograd.grad(y.square().sum(), x1)
    x2 = leaf(x)
    y_ref = rms_norm_reference(x2, w, eps=1e-6, gemma=True)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x2)
    assert_close(y, y_ref, 1e-5, 1e-5, "y")  # fp32: rounding only
    assert_close(dx, dx_ref, 1e-5, 1e-5, "dx")


def test_rms_norm_mixed_dtypes_follow_hf():
    """Llama form with an fp32 weight on bf16 activations: output fp32, like HF's weight * x.to(bf16)."""
    x = torch.randn(3, 41, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(41, device=DEVICE)
    y = rms_norm(x, w, eps=1e-5, mode="triton")
    y_ref = rms_norm_reference(x, w, eps=1e-5)
    assert y.dtype == y_ref.dtype == torch.float32
    # both round x * rstd to bf16 before the fp32 multiply: at most one bf16 step apart
    assert_close(y, y_ref, 1e-2, 1e-2, "y")
