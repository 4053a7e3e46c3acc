"""CUDA-graphed training micro-batches (kernels/cuda_graph.py).

CPU: the host-side decisions (packed rows, what cannot be captured, the masks transformers builds
under capture, uncached adapter casts, checkpointing without RNG stashing). GPU (`gpu`): a graphed
run equals the eager run of the same model step by step (losses and accumulated gradients), with
packed and unpacked micro-batches, set_to_none zeroing, autocast, LoRA and QLoRA.
"""
from __future__ import annotations

import sys

import pytest
import torch

from kernels.cuda_graph import GraphedStep, _host_decided_masks, is_packed, unsupported_reason
from kernels.model import LoraConfig, ModelConfig, add_lora, build_model, enable_gradient_checkpointing, has_dropout

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=2, vocab_size=128)


def _tiny(preset="tiny", dropout=0.0, **over):
    cfg = ModelConfig(preset=preset, dtype="float32", lora=LoraConfig(r=4, alpha=8, dropout=dropout),
                      config_overrides={**TINY, **over})
    return add_lora(build_model(cfg, seed=0), cfg)


def test_is_packed_reads_restarting_positions():
    assert not is_packed(None)
    assert not is_packed(torch.arange(8).unsqueeze(0))
    assert not is_packed(torch.arange(3, 11).repeat(2, 1))  # an offset start is one sequence
    assert is_packed(torch.tensor([[0, 1, 2, 0, 1, 2]]))
    assert is_packed(torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]]))  # any row
    assert not is_packed(torch.zeros(2, 1, dtype=torch.long))


def test_unsupported_reasons():
    llama = _tiny()
    assert "CUDA" in unsupported_reason(llama, torch.device("cpu"))
    assert unsupported_reason(llama, torch.device("cuda")) is None  # reads only the model, no GPU needed
    mistral = _tiny("mistral-7b", sliding_window=32)
    assert "sliding" in unsupported_reason(mistral, torch.device("cuda"))
    from kernels.offload import disable_offloaded_checkpointing, enable_offloaded_checkpointing

    enable_offloaded_checkpointing(llama, offload=False)
    assert "offload" in unsupported_reason(llama, torch.device("cuda"))
    disable_offloaded_checkpointing(llama)
    assert unsupported_reason(llama, torch.device("cuda")) is None
    llama.get_input_embeddings().weight.requires_grad_(True)
    assert "embeddings" in unsupported_reason(llama, torch.device("cuda"))


def test_host_decided_masks_give_the_eager_result_and_restore():
    """Unpacked rows: the mask builders return None inside the context (SDPA's causal flag), which
    is what eager transformers decides for such rows; they are restored afterwards."""
    model = _tiny()
    model.eval()
    mod = sys.modules[type(model.get_base_model().model).__module__]
    before = mod.create_causal_mask
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with _host_decided_masks(model, packed=False):
            assert mod.create_causal_mask is not before
            assert mod.create_causal_mask() is None
            got = model(input_ids=ids).logits
        with _host_decided_masks(model, packed=True):
            assert mod.create_causal_mask is before  # packed rows keep transformers' block mask
    assert mod.create_causal_mask is before
    torch.testing.assert_close(got, ref)


def test_uncached_adapter_casts_neither_read_nor_fill_the_cache():
    from kernels.fused_lora import _CAST, adapter_in, uncached_adapter_casts

    p = torch.nn.Parameter(torch.randn(4, 8))
    cached = adapter_in(p, torch.bfloat16)
    assert adapter_in(p, torch.bfloat16) is cached
    with uncached_adapter_casts():
        fresh = adapter_in(p, torch.bfloat16)
        assert fresh is not cached and torch.equal(fresh, cached)
        with torch.no_grad():
            p.mul_(2)
        assert p.__dict__[_CAST][1] is cached  # not refilled inside
    assert torch.equal(adapter_in(p, torch.bfloat16), (p.detach() * 1).bfloat16())


def test_checkpointing_stashes_rng_only_with_dropout():
    plain, dropped = _tiny(), _tiny(dropout=0.1)
    assert not has_dropout(plain) and has_dropout(dropped)
    assert has_dropout(_tiny(attention_dropout=0.1))
    for model, want in ((plain, False), (dropped, True)):
        enable_gradient_checkpointing(model)
        layer = model.get_base_model().model.layers[0]
        assert layer._gradient_checkpointing_func.keywords["preserve_rng_state"] is want


def test_graphed_step_validates_warmup():
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(lambda **k: None, [torch.nn.Parameter(torch.zeros(1))], warmup=0, device="cpu")


# ---------------------------------------------------------------------------------------------
# GPU: graphed == eager
# ---------------------------------------------------------------------------------------------

def _gpu_model(finetune: str):
    from kernels.fused_lora import apply_fused_lora
    from kernels.patch import KernelsConfig, patch_model

    cfg = ModelConfig(preset="llama-3.2-1b", dtype="bfloat16", finetune=finetune, lora=LoraConfig(r=16, alpha=32),
                      config_overrides=dict(num_hidden_layers=2, vocab_size=1024))
    if finetune == "qlora":
        from kernels.qlora import build_qlora_model

        base = build_qlora_model(cfg, device="cuda", seed=0)
    else:
        base = build_model(cfg, device="cuda", seed=0)
    model = add_lora(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
    patch_model(model, KernelsConfig(enabled=True, mode="auto"))
    assert apply_fused_lora(model) > 0
    enable_gradient_checkpointing(model)
    model.train()
    return model


def _micro_batches(step: int, B=2, T=512, V=1024):
    """Two micro-batches: one row-per-sequence, one packed (positions restart), some labels -100."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for packed in (False, True):
        ids = torch.randint(0, V, (B, T), generator=g)
        labels = ids.clone()
        labels[:, :17] = -100
        pos = torch.arange(T).repeat(B, 1)
        if packed:
            pos[:, 200:] -= 200
            pos[1, 350:] = torch.arange(T - 350)
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


def _run(finetune: str, graphed: bool, autocast, steps=5):
    from kernels.loss import causal_lm_loss, shift_labels

    model = _gpu_model(finetune)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def loss_fn(input_ids, labels, position_ids):
        return causal_lm_loss(model, input_ids, labels, position_ids)

    step = GraphedStep(loss_fn, params, model=model, autocast_dtype=autocast) if graphed else None
    losses, grads = [], []
    for s in range(steps):
        micro = _micro_batches(s)
        n = sum(int((shift_labels(mb["labels"]) != -100).sum()) for mb in micro)
        for mb in micro:
            if graphed:
                losses.append(float(step(mb, 1.0 / n)))
            else:
                dev = {k: v.cuda() for k, v in mb.items()}
                with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
                    loss = loss_fn(**dev)
                (loss / n).backward()
                losses.append(float(loss))
        grads.append(torch.cat([p.grad.float().flatten() for p in params]).cpu())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads, step


@pytest.mark.gpu
@pytest.mark.parametrize("finetune,autocast", [("lora", None), ("lora", torch.bfloat16), ("qlora", None)])
def test_gpu_graphed_steps_equal_eager(finetune, autocast):
    if finetune == "qlora":
        pytest.importorskip("bitsandbytes")
    ref_losses, ref_grads, _ = _run(finetune, False, autocast)
    losses, grads, step = _run(finetune, True, autocast)
    assert step.captured == 2  # the unpacked and the packed signature
    assert step.replays == 2 * 5 - 2 * step.warmup  # every call after the warm-up ones replays
    # the same kernels in the same order: equal up to bf16 reduction-order noise (atomics)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-3, atol=0)
    for s, (g, r) in enumerate(zip(grads, ref_grads)):
        err = ((g - r).norm() / r.norm()).item()
        assert err < 2e-2, f"step {s}: gradient relative error {err:.3g}"
