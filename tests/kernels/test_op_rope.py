"""RoPE on q and k: Triton forward and backward against the fp32 reference and HF's own function."""
from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, assert_close, leaf
from kernels.ops.rope import rope, rope_reference

TOLERANCES = [
    # (dtype, atol, rtol)
    # fp32: two products and a sum per element, same order as the reference -> rounding only
    (torch.float32, 1e-6, 1e-5),
    # bf16: one rounding of the output (2**-8 relative) vs fp32 maths on the same bf16 inputs
    (torch.bfloat16, 1e-2, 1e-2),
]

# (batch, seq, q heads, kv heads, head_dim)
CPU_SHAPES = [(1, 1, 1, 1, 2), (3, 41, 3, 1, 6), (2, 123, 5, 1, 34)]
GPU_SHAPES = [(8, 2048, 32, 8, 128), (8, 2048, 32, 8, 64), (8, 2048, 8, 4, 256)]  # llama-8b/-1b, gemma-2


def _angles(bsz, seq, dim, device, positions=None):
    """cos/sin [B, T, D] like HF rotary modules: the half-angle table repeated twice."""
    pos = torch.arange(seq, device=device).expand(bsz, seq) if positions is None else positions
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    freqs = pos[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _check(shape, dtype, atol, rtol, unsqueeze_dim=1):
    bsz, seq, n_qh, n_kh, dim = shape
    torch.manual_seed(0)
    # q/k as HF makes them: a [B, T, H, D] projection viewed as [B, H, T, D] (not contiguous)
    q = torch.randn(bsz, seq, n_qh, dim, device=DEVICE, dtype=dtype)
    k = torch.randn(bsz, seq, n_kh, dim, device=DEVICE, dtype=dtype)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = _angles(bsz, seq, dim, DEVICE)
    q1, k1 = leaf(q), leaf(k)
    qo, ko = rope(q1, k1, cos.to(dtype), sin.to(dtype), unsqueeze_dim=unsqueeze_dim, mode="triton")
    dq_out, dk_out = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = torch.autograd.grad((qo, ko), (q1, k1), (dq_out, dk_out))

    q2, k2 = leaf(q, torch.float32), leaf(k, torch.float32)
    qr, kr = rope_reference(q2, k2, cos.to(dtype).float(), sin.to(dtype).float(), unsqueeze_dim=unsqueeze_dim)
    dqr, dkr = torch.autograd.grad((qr, kr), (q2, k2), (dq_out.float(), dk_out.float()))
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    for name, a, b in (("q", qo, qr), ("k", ko, kr), ("dq", dq, dqr), ("dk", dk, dkr)):
        assert_close(a, b, atol, rtol, name)


@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rope_matches_reference(shape, dtype, atol, rtol):
    _check(shape, dtype, atol, rtol)


def test_rope_unsqueeze_dim_2_layout():
    """q/k as [B, T, H, D] with unsqueeze_dim=2 (HF's other documented layout)."""
    _check((2, 9, 3, 1, 8), torch.float32, 1e-6, 1e-5, unsqueeze_dim=2)  # fp32: rounding only


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rope_matches_reference_gpu_bf16(shape):
    _check(shape, torch.bfloat16, 1e-2, 1e-2)  # bf16: one output rounding, independent of size


def test_rope_equals_hf_apply_rotary_pos_emb_with_llama3_scaling_and_packed_positions():
    """cos/sin from HF's rotary module (llama3 scaling) with positions restarting per packed
    sequence: the fused op equals HF's apply_rotary_pos_emb, and a packed row's second sequence
    is rotated exactly as that sequence alone."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from kernels.model import hf_config

    config = hf_config("llama-3.2-1b", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=32768)
    rotary = LlamaRotaryEmbedding(config).to(DEVICE)
    torch.manual_seed(0)
    lengths = (11, 6)
    seq = sum(lengths)
    q = torch.randn(1, 4, seq, 16, device=DEVICE) * 100  # large positions/values: scaling matters
    k = torch.randn(1, 2, seq, 16, device=DEVICE)
    packed_pos = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None] + 5000
    cos, sin = rotary(q, packed_pos)
    qo, ko = rope(q, k, cos, sin, mode="triton")
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    assert_close(qo, q_hf, 1e-6, 1e-5, "q vs HF")  # fp32: rounding only
    assert_close(ko, k_hf, 1e-6, 1e-5, "k vs HF")

    # the second sequence alone, positions 5000.. as a row of its own
    alone_pos = torch.arange(lengths[1], device=DEVICE)[None] + 5000
    cos2, sin2 = rotary(q, alone_pos)
    qa, ka = rope(q[:, :, lengths[0]:], k[:, :, lengths[0]:], cos2, sin2, mode="triton")
    assert_close(qo[:, :, lengths[0]:], qa, 1e-6, 1e-5, "packed q vs alone")
    assert_close(ko[:, :, lengths[0]:], ka, 1e-6, 1e-5, "packed k vs alone")


def test_rope_broadcast_batch_angles():
    """cos/sin [1, T, D] (one position row for the whole batch) broadcast over B."""
    torch.manual_seed(0)
    q, k = torch.randn(3, 2, 5, 8, device=DEVICE), torch.randn(3, 1, 5, 8, device=DEVICE)
    cos, sin = _angles(1, 5, 8, DEVICE)
    qo, ko = rope(q, k, cos, sin, mode="triton")
    qr, kr = rope_reference(q, k, cos, sin)
    assert_close(qo, qr, 1e-6, 1e-5, "q")  # fp32: rounding only
    assert_close(ko, kr, 1e-6, 1e-5, "k")
