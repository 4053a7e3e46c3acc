"""NF4 dequantisation (kernels/nf4.py) and the QLoRA builder/optimizers (kernels/qlora.py).

CPU: the Triton kernel (interpreter) against the PyTorch reference on quant states built by hand
(our reference quantiser, plain and double-quantised absmax), the NF4 table, bitsandbytes' CPU
packing; QLoRA's clear error without a GPU; make_optimizer. GPU (`gpu`): the kernel against
bitsandbytes' own dequantize_4bit, and a QLoRA model built, adapted and stepped.
"""
from __future__ import annotations

import gc

import pytest
import torch

from kernels.model import LoraConfig, ModelConfig
from kernels.nf4 import (NF4_VALUES, NF4State, dequantize_bnb_weight, nf4_dequantize, nf4_dequantize_reference,
                         nf4_dequantize_triton, nf4_quantize_reference)
from kernels.ops.common import triton_interpreted

# (dtype, atol, rtol):
# fp32 output: kernel and reference compute the same fp32 product code * absmax -> exact.
TOL_FP32 = (torch.float32, 0.0, 0.0)
# bf16/fp16 output: one rounding of the same fp32 value, but the interpreter (and FMA contraction
# of code2 * scale + offset on GPU) may land one ulp away: 1 ulp is < 2**-7 relative in bf16.
TOL_BF16 = (torch.bfloat16, 0.0, 2.0 ** -7)
TOL_FP16 = (torch.float16, 0.0, 2.0 ** -10)

SHAPES = [(1, 1), (3, 41), (5, 123), (96, 160), (64, 300)]

needs_triton = pytest.mark.skipif(
    not (triton_interpreted() or torch.cuda.is_available()),
    reason="Triton on CPU needs TRITON_INTERPRET=1 before triton is imported")


def _close(a, b, tol, what=""):
    dtype, atol, rtol = tol
    assert a.dtype == b.dtype == dtype, (a.dtype, b.dtype, dtype)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def test_nf4_table():
    v = torch.tensor(NF4_VALUES)
    assert v.numel() == 16 and v[0] == -1.0 and v[-1] == 1.0 and (v == 0).sum() == 1
    assert torch.all(v[1:] > v[:-1])  # sorted: index order = value order


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_reference_roundtrip(shape, double_quant, blocksize):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = nf4_quantize_reference(w, blocksize=blocksize, double_quant=double_quant)
    assert packed.dtype == torch.uint8 and packed.numel() == (w.numel() + 1) // 2
    assert state.nested == double_quant
    deq = nf4_dequantize_reference(packed, state, torch.float32)
    assert deq.shape == w.shape
    # nearest NF4 level: error <= half the widest gap (-1.0 -> -0.6962) times the block's absmax,
    # plus the 8-bit absmax error when double-quantised
    flat = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % blocksize)).view(-1, blocksize)
    absmax = flat.abs().amax(1).repeat_interleave(blocksize)[: w.numel()].view(shape)
    slack = 0.02 * absmax.max() if double_quant else 0.0
    assert torch.all((deq - w).abs() <= 0.1520 * absmax + 1e-7 + slack)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
def test_triton_matches_reference(shape, double_quant, blocksize):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05
    packed, state = nf4_quantize_reference(w, blocksize=blocksize, double_quant=double_quant)
    _close(nf4_dequantize_triton(packed, state, torch.float32), nf4_dequantize_reference(packed, state, torch.float32),
           TOL_FP32, "fp32")
    _close(nf4_dequantize_triton(packed, state, torch.bfloat16),
           nf4_dequantize_reference(packed, state, torch.bfloat16), TOL_BF16, "bf16")


def test_dispatch_and_errors():
    w = torch.randn(8, 64)
    packed, state = nf4_quantize_reference(w)
    out = nf4_dequantize(packed, state, mode="reference")
    assert out.dtype == torch.float32 and out.shape == (8, 64)
    with pytest.raises(ValueError, match="cannot hold"):
        nf4_dequantize_reference(packed[:3], state)
    bad = NF4State(shape=(8, 64), dtype=torch.float32, blocksize=48, absmax=state.absmax)
    with pytest.raises(ValueError, match="power of two"):
        nf4_dequantize_reference(packed, bad)


def test_bitsandbytes_state_and_packing_cpu():
    """bitsandbytes' CPU quantiser packs exactly like ours; its QuantState converts without copies."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 192, generator=torch.Generator().manual_seed(2))
    q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours, _ = nf4_quantize_reference(w, blocksize=64, double_quant=False)
    assert torch.equal(q.view(-1), ours.view(-1))
    st = NF4State.from_bnb(qs)
    assert st.nested and st.absmax is qs.absmax and st.nested_absmax is qs.state2.absmax
    assert torch.allclose(qs.code.float(), torch.tensor(NF4_VALUES))
    # row length a multiple of the blocksize: bitsandbytes' CPU dequantiser agrees with ours
    _close(nf4_dequantize_reference(q, st, torch.float32), bnbf.dequantize_4bit(q, qs).float(), TOL_FP32, "bnb cpu")


@needs_triton
def test_bnb_weight_kernel_args_are_prepared_once_and_follow_changes():
    """dequantize_bnb_weight's Triton path keeps the kernel arguments on the weight: the same
    result every call, rebuilt when the packed storage or the quant state is replaced."""
    from types import SimpleNamespace

    from kernels.nf4 import _ARGS_ATTR

    def quantised(seed):
        w = torch.randn(48, 96, generator=torch.Generator().manual_seed(seed)) * 0.05
        packed, st = nf4_quantize_reference(w, blocksize=64, double_quant=True)
        qs = SimpleNamespace(quant_type="nf4", shape=st.shape, dtype=torch.bfloat16, blocksize=st.blocksize,
                             absmax=st.absmax, code=st.code, nested=True, offset=st.offset,
                             state2=SimpleNamespace(code=st.nested_code, absmax=st.nested_absmax,
                                                    blocksize=st.nested_blocksize))
        return packed, st, qs

    packed, st, qs = quantised(0)
    weight = torch.nn.Parameter(packed, requires_grad=False)  # duck-typed Params4bit
    weight.quant_state = qs
    want = nf4_dequantize_reference(packed, st, torch.bfloat16)
    first = dequantize_bnb_weight(weight, torch.bfloat16, impl="triton", mode="triton")
    _close(first, want, TOL_BF16, "first call")
    args = weight.__dict__[_ARGS_ATTR][1]
    _close(dequantize_bnb_weight(weight, torch.bfloat16, impl="triton", mode="triton"), want, TOL_BF16, "cached")
    assert weight.__dict__[_ARGS_ATTR][1] is args
    packed2, st2, qs2 = quantised(1)
    weight.quant_state = qs2  # re-quantised: new state object ...
    weight.data = packed2  # ... and new packed storage
    _close(dequantize_bnb_weight(weight, torch.bfloat16, impl="triton", mode="triton"),
           nf4_dequantize_reference(packed2, st2, torch.bfloat16), TOL_BF16, "after re-quantisation")
    assert weight.__dict__[_ARGS_ATTR][1] is not args


# ---- QLoRA / optimizers ----------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_on_cpu_gives_clear_error():
    from kernels.qlora import build_qlora_model

    with pytest.raises(RuntimeError, match=r"model.finetune=qlora needs a CUDA GPU and bitsandbytes"):
        build_qlora_model(ModelConfig(preset="tiny", finetune="qlora"), device="cpu")
    with pytest.raises(RuntimeError, match=r"model.finetune=qlora needs a CUDA GPU"):
        build_qlora_model(ModelConfig(preset="tiny", finetune="qlora"))  # default device cuda, none here


def test_make_optimizer():
    from kernels.qlora import make_optimizer

    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = make_optimizer([p], lr=1e-2, kind="adamw", weight_decay=0.0)
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(ValueError, match="trainer.optimizer"):
        make_optimizer([p], lr=1e-2, kind="sgd")
    with pytest.raises(ValueError, match="no parameters"):
        make_optimizer([], lr=1e-2)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        with pytest.raises(RuntimeError, match="adamw_8bit needs bitsandbytes"):
            make_optimizer([p], lr=1e-2, kind="adamw_8bit")
        return
    opt8 = make_optimizer([{"params": [p], "lr": 1e-2}], lr=1e-3, kind="adamw_8bit")
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt8.step()
    assert opt8.state[p]["state1"].dtype == torch.uint8  # 8-bit moments
    assert (p.detach() - before).abs().max() > 0


# ---- GPU ----------------------------------------------------------------------------------------

GPU_SHAPES = [(3, 41), (96, 160), (2048, 2048), (8192, 2048), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_triton_matches_bitsandbytes(shape, double_quant, dtype):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(shape, device="cuda") * 0.02).to(dtype)
    q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    theirs = bnbf.dequantize_4bit(q, qs)
    ours = nf4_dequantize_triton(q, NF4State.from_bnb(qs))
    tol = {torch.bfloat16: TOL_BF16, torch.float16: TOL_FP16, torch.float32: (torch.float32, 0.0, 1e-6)}[dtype]
    _close(ours, theirs, tol, f"{shape} nested={double_quant}")
    if dtype != torch.float32:  # a 1-ulp fp32 absmax difference (FMA) almost never survives 16-bit rounding
        exact = (ours == theirs).float().mean().item()
        assert exact > 0.999, f"only {exact:.4%} bit-identical"
    ref = nf4_dequantize_reference(q, NF4State.from_bnb(qs))
    _close(ref, theirs, tol, "reference vs bitsandbytes")


@pytest.mark.gpu
def test_gpu_dequantize_bnb_weight_impls_agree():
    bnb = pytest.importorskip("bitsandbytes")
    lin = bnb.nn.Linear4bit(2048, 8192, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(8192, 2048, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                                   compress_statistics=True, quant_type="nf4", module=lin)
    lin = lin.cuda()
    a = dequantize_bnb_weight(lin.weight, torch.bfloat16, impl="triton")
    b = dequantize_bnb_weight(lin.weight, torch.bfloat16, impl="bnb")
    _close(a, b, TOL_BF16, "impls")


def _live_tensor_bytes(model) -> int:
    """Bytes of the distinct storages a model holds: parameters, buffers, and the NF4 quant states
    (absmax, nested absmax, code tables) that bitsandbytes keeps beside the packed weights."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if t is None:
            return
        s = t.untyped_storage()
        key = (s.device, s.data_ptr())
        if key not in seen:
            seen.add(key)
            total += s.nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)
        while qs is not None:
            add(qs.absmax)
            add(qs.code)
            qs = getattr(qs, "state2", None)
    return total


def test_live_tensor_bytes():
    lin = torch.nn.Linear(8, 4)
    assert _live_tensor_bytes(lin) == (8 * 4 + 4) * 4
    tied = torch.nn.Sequential(lin, torch.nn.Linear(8, 4))
    tied[1].weight = lin.weight  # shared storage counted once
    assert _live_tensor_bytes(tied) == (8 * 4 + 4 + 4) * 4


@pytest.mark.gpu
def test_gpu_qlora_model_builds_adapts_and_steps():
    pytest.importorskip("bitsandbytes")
    from kernels.fused_lora import apply_fused_lora
    from kernels.loss import causal_lm_loss_sum
    from kernels.model import add_lora, build_model, count_parameters
    from kernels.qlora import build_qlora_model, make_optimizer

    cfg = ModelConfig(preset="llama-3.2-1b", finetune="qlora", lora=LoraConfig(r=16, alpha=32),
                      config_overrides=dict(num_hidden_layers=4))
    # Measure deltas from a baseline: memory_allocated() is process-wide, and earlier tests in the
    # same pytest process may still hold CUDA tensors (or cyclic garbage: Params4bit <-> Linear4bit).
    # The H100 run counted 1,724,573,696 B = 1 GiB held before the build + 650.8 MB, which is what
    # 4 NF4 layers + bf16 embeddings take.
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    model = build_qlora_model(cfg, device="cuda")
    gc.collect()
    nf4_bytes = torch.cuda.memory_allocated() - base
    nf4_live = _live_tensor_bytes(model)
    dense = build_model(ModelConfig(preset="llama-3.2-1b", dtype="bfloat16", config_overrides=dict(num_hidden_layers=4)),
                        device="cuda")
    dense_bytes = torch.cuda.memory_allocated() - base - nf4_bytes
    dense_live = _live_tensor_bytes(dense)
    del dense
    # 4 layers of NF4 (0.5 B/weight + absmax) + bf16 embeddings vs all bf16: ~0.64 of the dense bytes
    assert nf4_live < 0.75 * dense_live, (nf4_live, dense_live)
    # nothing else (a dense copy of the linears: 486 MB here; of the embeddings: 525 MB)
    # stays allocated beside the model's own tensors; the slack covers allocator rounding (512 B a
    # tensor) and one-time library buffers (e.g. a cuBLAS workspace, 32 MiB on sm90)
    assert nf4_bytes < nf4_live + 64 * 2**20, (nf4_bytes, nf4_live)
    assert nf4_bytes < 0.75 * dense_bytes, (nf4_bytes, dense_bytes)
    model = add_lora(model, cfg)
    assert count_parameters(model)["trainable"] > 0
    assert apply_fused_lora(model) == 4 * 3
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3, kind="adamw_8bit")
    ids = torch.randint(0, model.config.vocab_size, (2, 256), device="cuda")
    losses = []
    for _ in range(5):
        loss_sum, n = causal_lm_loss_sum(model, ids, ids)
        loss = loss_sum / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the same batch five times: it must be learning it
