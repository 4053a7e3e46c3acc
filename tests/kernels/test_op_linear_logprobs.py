"""Fused linear -> log-softmax -> gather against the full-logits fp32 reference: values, entropy and
d hidden, on odd shapes, both paths (Triton through the interpreter on CPU, and torch)."""
from __future__ import annotations

import pytest
import torch

from kernels.ops.linear_logprobs import IGNORE_INDEX, linear_logprobs, linear_logprobs_reference

# (dtype, atol, rtol): fp32 on CPU agrees to round-off of the chunked log-sum-exp
TOL = (torch.float32, 2e-5, 2e-5)


def _case(n, h, v, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * 2
    weight = torch.randn(v, h, generator=g) / h ** 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore and n > 2:
        targets[1] = IGNORE_INDEX
    return hidden, weight, targets


@pytest.mark.parametrize("mode", ["triton", "reference"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 41, 17), (23, 16, 123)])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (1.0, 5.0)])
def test_values_entropy_and_grad_match_reference(mode, shape, temperature, softcap):
    _, atol, rtol = TOL
    hidden, weight, targets = _case(*shape)
    g_out = torch.randn(shape[0], generator=torch.Generator().manual_seed(9))
    h1 = hidden.clone().requires_grad_(True)
    want, want_ent = linear_logprobs_reference(h1, weight, targets, softcap=softcap, temperature=temperature)
    (want * g_out).sum().backward()
    h2 = hidden.clone().requires_grad_(True)
    got, ent = linear_logprobs(h2, weight, targets, softcap=softcap, temperature=temperature,
                               chunk_tokens=5, mode=mode)  # 23 = 4 x 5 + 3: a ragged last chunk
    (got * g_out).sum().backward()
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    torch.testing.assert_close(ent, want_ent, atol=atol, rtol=rtol)
    torch.testing.assert_close(h2.grad, h1.grad, atol=atol, rtol=rtol)
    if shape[0] > 2:  # an ignored row: 0 value, 0 entropy, no gradient
        assert got[1] == 0 and ent[1] == 0 and (h2.grad[1] == 0).all()


def test_no_grad_and_no_entropy():
    hidden, weight, targets = _case(7, 8, 30, ignore=False)
    with torch.no_grad():
        got, ent = linear_logprobs(hidden, weight, targets, entropy=False, mode="reference")
    assert ent is None
    torch.testing.assert_close(got, linear_logprobs_reference(hidden, weight, targets)[0])


def test_refuses_trained_head_and_softcap_with_temperature():
    hidden, weight, targets = _case(4, 8, 10)
    with pytest.raises(ValueError, match="requires grad"):
        linear_logprobs(hidden, weight.requires_grad_(True), targets)
    with pytest.raises(ValueError, match="soft-capped"):
        linear_logprobs(hidden, weight.detach(), targets, softcap=5.0, temperature=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,h,v", [(4099, 576, 49152), (2048, 2048, 128256)])
def test_bf16_real_sizes_on_gpu(n, h, v):
    """Real vocabularies in bf16 (SmolLM2 and Llama 3.2 heads); the reference runs in fp32 on the same
    bf16 inputs. Tolerances: bf16 logits carry ~3 significant digits, so log-probs of ~-10 differ by
    up to ~0.05 and d hidden by a few parts in 1e2 relative."""
    hidden, weight, targets = _case(n, h, v)
    hidden, weight = hidden.cuda().bfloat16(), weight.cuda().bfloat16()
    targets = targets.cuda()
    g_out = torch.randn(n, device="cuda")
    h1 = hidden.float().requires_grad_(True)
    want, want_ent = linear_logprobs_reference(h1, weight.float(), targets)
    (want * g_out).sum().backward()
    h2 = hidden.clone().requires_grad_(True)
    got, ent = linear_logprobs(h2, weight, targets, mode="triton")
    (got * g_out).sum().backward()
    torch.testing.assert_close(got, want, atol=5e-2, rtol=1e-2)
    torch.testing.assert_close(ent, want_ent, atol=5e-2, rtol=1e-2)
    torch.testing.assert_close(h2.grad.float(), h1.grad, atol=5e-2, rtol=5e-2)
