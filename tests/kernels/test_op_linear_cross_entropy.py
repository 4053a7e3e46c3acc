"""Fused linear + cross-entropy: loss and gradients against the full-logits fp32 reference,
ignore_index, soft-capping, reductions, fp32 per chunk, and (GPU) peak memory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import DEVICE, assert_close, leaf
from kernels.loss import IGNORE_INDEX, reference_linear_cross_entropy
from kernels.ops.linear_cross_entropy import linear_cross_entropy
from kernels.patch import linear_cross_entropy as exported

TOLERANCES = [
    # (dtype, atol, rtol)
    # fp32: same maths, chunked and in another order (online log-sum-exp) -> rounding only
    (torch.float32, 1e-5, 1e-5),
    # bf16: the logits come out of the matmul in bf16 (2**-8 relative each) where the reference
    # keeps them fp32; the gradient is stored in bf16 before its two matmuls
    (torch.bfloat16, 2e-2, 2e-2),
]

# (tokens, hidden, vocab)
CPU_SHAPES = [(1, 1, 1), (3, 41, 7), (5 * 123, 24, 341)]
GPU_SHAPES = [(8 * 2048, 2048, 128256), (8 * 2048, 4096, 128256)]


def _inputs(n, h, v, dtype, ignore_every=3, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(n, h, device=DEVICE, dtype=dtype)
    weight = (torch.randn(v, h, device=DEVICE) / h ** 0.5 * 2).to(dtype)
    targets = torch.randint(0, v, (n,), device=DEVICE)
    targets[ignore_every - 1::ignore_every] = IGNORE_INDEX  # keeps row 0: a 1-token case still has a target
    return hidden, weight, targets


def _check(shape, dtype, atol, rtol, softcap, reduction, mode, chunk_tokens=None, weight_grad=True):
    hidden, weight, targets = _inputs(*shape, dtype)
    h1, w1 = leaf(hidden), leaf(weight).requires_grad_(weight_grad)
    loss = linear_cross_entropy(h1, w1, targets, softcap=softcap, reduction=reduction, chunk_tokens=chunk_tokens,
                                mode=mode)
    grads = torch.autograd.grad(loss * 3.0, (h1, w1) if weight_grad else (h1,))  # a non-unit upstream gradient

    h2, w2 = leaf(hidden, torch.float32), leaf(weight, torch.float32)
    loss_ref = reference_linear_cross_entropy(h2, w2, targets, softcap=softcap, reduction=reduction)
    grads_ref = torch.autograd.grad(loss_ref * 3.0, (h2, w2))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, loss_ref, atol, rtol, "loss")
    assert_close(grads[0], grads_ref[0], atol, rtol, "d hidden")
    assert grads[0].dtype == dtype
    if weight_grad:
        assert grads[1].dtype == dtype
        assert_close(grads[1], grads_ref[1], atol, rtol, "d weight")


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("softcap,reduction", [(None, "sum"), (3.0, "mean")], ids=["plain-sum", "softcap-mean"])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_cross_entropy_matches_reference(shape, dtype, atol, rtol, softcap, reduction, mode):
    _check(shape, dtype, atol, rtol, softcap, reduction, mode)


@pytest.mark.parametrize("softcap,reduction", [(None, "mean"), (3.0, "sum")], ids=["plain-mean", "softcap-sum"])
def test_linear_cross_entropy_chunks_and_frozen_weight(softcap, reduction):
    """Many chunks with a ragged last one (37 = 2 x 16 + 5); a frozen lm_head (LoRA) gets no grad."""
    _check((37, 16, 203), torch.float32, 1e-5, 1e-5, softcap, reduction, "triton", chunk_tokens=16,
           weight_grad=False)  # fp32: rounding only


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap30"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_cross_entropy_matches_reference_gpu_bf16(shape, softcap):
    # bf16 at real sizes: bf16 logits (2**-8 relative) feed a mean over 16k tokens; judged against the
    # fp32 full-logits reference with the same tolerance as on CPU
    _check(shape, torch.bfloat16, 2e-2, 2e-2, softcap, "mean", "triton")


@pytest.mark.parametrize("mode", ["triton", "reference"])
def test_all_targets_ignored_gives_zero(mode):
    hidden, weight, targets = _inputs(6, 8, 11, torch.float32, ignore_every=1)
    h = leaf(hidden)
    for reduction in ("sum", "mean"):  # mean: 0, not F.cross_entropy's nan
        loss = linear_cross_entropy(h, weight, targets, reduction=reduction, mode=mode)
        (dh,) = torch.autograd.grad(loss, h)
        assert loss.item() == 0.0 and torch.count_nonzero(dh) == 0


def test_ignored_rows_do_not_change_loss_or_other_rows_grads():
    hidden, weight, targets = _inputs(9, 8, 13, torch.float32, ignore_every=100)
    keep = torch.tensor([0, 2, 3, 7], device=DEVICE)
    masked = torch.full_like(targets, IGNORE_INDEX)
    masked[keep] = targets[keep]
    h_all = leaf(hidden)
    loss_all = linear_cross_entropy(h_all, weight, masked, mode="triton")
    (dh_all,) = torch.autograd.grad(loss_all, h_all)
    h_sub = leaf(hidden[keep])
    loss_sub = linear_cross_entropy(h_sub, weight, targets[keep], mode="triton")
    (dh_sub,) = torch.autograd.grad(loss_sub, h_sub)
    assert_close(loss_all, loss_sub, 1e-6, 1e-6, "loss")  # fp32: rounding only
    assert_close(dh_all[keep], dh_sub, 1e-6, 1e-6, "d hidden")
    others = torch.ones(9, dtype=torch.bool, device=DEVICE)
    others[keep] = False
    assert torch.count_nonzero(dh_all[others]) == 0


def test_fp32_accumulation_per_chunk_with_bf16_inputs():
    """bf16 hidden/weight: the per-row log-sum-exp and the sum over tokens are fp32, so the loss
    equals fp32 cross-entropy of the same (bf16-rounded) logits to fp32 precision - far tighter
    than a bf16 computation of the same loss gets."""
    hidden, weight, targets = _inputs(5 * 123, 24, 341, torch.bfloat16)
    hidden = hidden * 4  # large logits: where bf16 arithmetic loses most
    logits = hidden @ weight.t()  # bf16 [N, V], exactly the logits the fused path computes per chunk
    exact = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    bf16_math = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none").sum(dtype=torch.bfloat16)
    for mode in ("triton", "reference"):
        for chunk in (16, None):
            fused = linear_cross_entropy(hidden, weight, targets, mode=mode, chunk_tokens=chunk)
            err = (fused - exact).abs().item()
            assert err <= 1e-5 * exact.abs().item(), (mode, chunk, err)
            assert err * 100 < (bf16_math.float() - exact).abs().item()


def test_chunk_size_does_not_change_the_result():
    hidden, weight, targets = _inputs(50, 12, 97, torch.float32)
    losses = [linear_cross_entropy(hidden, weight, targets, chunk_tokens=c, mode="triton") for c in (1, 7, 50)]
    for loss in losses[1:]:
        assert_close(loss, losses[0], 1e-6, 1e-6, "loss")  # fp32: a different summation order only


def test_no_grad_and_validation():
    hidden, weight, targets = _inputs(4, 8, 11, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(leaf(hidden), weight, targets, mode="triton")
    assert not loss.requires_grad
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="none")
    with pytest.raises(ValueError, match="dtypes differ"):
        linear_cross_entropy(hidden.double(), weight, targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:2])
    assert exported is linear_cross_entropy


def test_causal_lm_loss_sum_equals_hf_loss():
    """kernels/loss.py on a tiny Gemma 2 (final logit soft-capping): sum / n equals HF's own mean loss."""
    from transformers import AutoModelForCausalLM

    from kernels.loss import causal_lm_loss_sum
    from kernels.model import hf_config

    config = hf_config("gemma-2-2b", hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=53,
                       query_pre_attn_scalar=16, final_logit_softcapping=5.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(DEVICE)
    ids = torch.randint(0, 53, (2, 9), device=DEVICE)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # a prompt without loss
    loss_sum, n = causal_lm_loss_sum(model, ids, labels)
    hf_mean = model(input_ids=ids, labels=labels).loss
    assert n == 2 * 6  # labels at positions 3..8, predicted from positions 2..7
    assert_close(loss_sum / n, hf_mean, 1e-5, 1e-5, "loss")  # fp32: rounding only


@pytest.mark.gpu
def test_fused_cross_entropy_peak_memory_gpu():
    """8 x 2048 tokens, hidden 2048, vocab 128256, bf16: peak memory of loss + backward, fused vs
    logits-then-F.cross_entropy, beyond the inputs. Frozen lm_head (LoRA) and trained lm_head."""
    n, h, v = 8 * 2048, 2048, 128256
    hidden, weight, targets = _inputs(n, h, v, torch.bfloat16)

    def peak(fn, weight_grad):
        hl, wl = leaf(hidden), leaf(weight).requires_grad_(weight_grad)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(hl, wl)
        loss.backward()
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - base
        del loss, hl, wl
        return used

    def unfused(hl, wl):
        logits = hl @ wl.t()  # [N, V] bf16
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")

    def fused(hl, wl):
        return linear_cross_entropy(hl, wl, targets, reduction="sum", mode="triton")

    gib = 2 ** 30
    for weight_grad in (False, True):
        m_unfused = peak(unfused, weight_grad)
        m_fused = peak(fused, weight_grad)
        print(f"\nfused CE peak memory (8x2048 tokens, H=2048, V=128256, bf16, lm_head "
              f"{'trained' if weight_grad else 'frozen'}): fused {m_fused / gib:.2f} GiB, "
              f"unfused {m_unfused / gib:.2f} GiB, ratio {m_fused / m_unfused:.3f}")
        assert m_fused < m_unfused / 4


@pytest.mark.parametrize("mode", ["reference", "triton"])
def test_fp32_weights_under_bf16_autocast_match_the_reference(mode):
    """Mixed precision (full fine-tuning: fp32 weights, bf16 autocast): the fused loss runs in
    autocast's dtype and its gradients reach the fp32 leaves in fp32. It used to fail here:
    `torch.mm(..., out=)` got bf16 logits and an fp32 output buffer."""
    hidden, weight, targets = _inputs(5 * 123, 24, 341, torch.float32)
    h1, w1 = leaf(hidden), leaf(weight)
    h2, w2 = leaf(hidden), leaf(weight)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(h1, w1, targets, reduction="sum", mode=mode)
        ref = reference_linear_cross_entropy(h2, w2, targets, reduction="sum")
    loss.backward()
    ref.backward()
    assert h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
    assert_close(loss, ref, 2e-2, 2e-2)
    assert_close(h1.grad, h2.grad, 2e-2, 2e-2)
    assert_close(w1.grad, w2.grad, 2e-2, 2e-2)
