"""Offloaded gradient checkpointing (kernels/offload.py): same gradients as plain checkpointing and
as no checkpointing (LoRA with frozen embeddings, full fine-tuning, fused LoRA, dropout's RNG), the
CPU copy path exercised, enable/disable restore the layers. GPU (`gpu`): bf16 gradients match and
the saved layer inputs leave GPU memory.
"""
from __future__ import annotations

import pytest
import torch

from kernels import offload as off
from kernels.model import LoraConfig, ModelConfig, add_lora, build_model

# (dtype, atol, rtol): fp32 on CPU. The recompute runs the same ops on the same inputs, so the
# gradients are bit-identical in practice; 1e-6 / 1e-5 only absorbs summation-order differences
# of the outer backward (reentrant: the layer's gradients are accumulated in another order).
TOL_FP32 = (torch.float32, 1e-6, 1e-5)

OVER = dict(hidden_size=64, intermediate_size=136, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=3, vocab_size=211)


def _model(finetune="lora", **over):
    cfg = ModelConfig(preset="tiny", dtype="float32", finetune=finetune, lora=LoraConfig(r=4, alpha=8),
                      config_overrides={**OVER, **over})
    model = add_lora(build_model(cfg, seed=0), cfg)
    if finetune != "full":
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.train()
    return model


def _grads(model, ids, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks (when enabled) come from here
    logits = model(input_ids=ids).logits
    loss = logits.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b):
    (la, ga), (lb, gb) = a, b
    dtype, atol, rtol = TOL_FP32
    torch.testing.assert_close(la, lb, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def _hf_checkpointing(model, on: bool):
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_disable()


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_offload_grads_equal_plain_checkpointing(finetune, monkeypatch):
    model = _model(finetune)
    ids = torch.randint(0, 211, (2, 19), generator=torch.Generator().manual_seed(0))
    plain = _grads(model, ids)
    _hf_checkpointing(model, True)
    ckpt = _grads(model, ids)
    _hf_checkpointing(model, False)
    _same(ckpt, plain)

    saved = []
    real_init = off._SavedInput.__init__

    def counting_init(self, t, prev):
        saved.append(t.shape)
        real_init(self, t, prev)

    monkeypatch.setattr(off._SavedInput, "__init__", counting_init)
    assert off.enable_offloaded_checkpointing(model) == 3
    offloaded = _grads(model, ids)
    assert len(saved) == 3 and all(s == (2, 19, 64) for s in saved)  # one saved input per layer
    _same(offloaded, plain)
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers.0." in n and p.requires_grad)


def test_offload_with_fused_lora():
    from kernels.fused_lora import apply_fused_lora

    model = _model()
    ids = torch.randint(0, 211, (2, 11))
    plain = _grads(model, ids)
    apply_fused_lora(model)
    off.enable_offloaded_checkpointing(model)
    _same(_grads(model, ids), plain)


def test_offload_restores_rng_for_dropout():
    model = _model(attention_dropout=0.3)
    ids = torch.randint(0, 211, (2, 11))
    plain = _grads(model, ids, seed=5)
    off.enable_offloaded_checkpointing(model)
    _same(_grads(model, ids, seed=5), plain)  # recompute must see the forward's dropout masks


def test_on_gpu_variant_and_no_grad_and_eval():
    model = _model()
    ids = torch.randint(0, 211, (1, 9))
    plain = _grads(model, ids)
    off.enable_offloaded_checkpointing(model, offload=False)  # same code, input kept in place
    _same(_grads(model, ids), plain)
    with torch.no_grad():
        a = model(input_ids=ids).logits
    model.eval()
    with torch.no_grad():
        b = model(input_ids=ids).logits
    torch.testing.assert_close(a, b)


def test_enable_disable_restores_layers():
    model = _model()
    layers = model.get_base_model().model.layers
    _hf_checkpointing(model, True)
    hf_funcs = [layer._gradient_checkpointing_func for layer in layers]
    assert off.enable_offloaded_checkpointing(model) == 3
    assert off.offloaded_checkpointing_enabled(model)
    assert off.disable_offloaded_checkpointing(model) == 3
    assert not off.offloaded_checkpointing_enabled(model)
    assert all(layer.gradient_checkpointing for layer in layers)  # HF's setting is back
    assert [layer._gradient_checkpointing_func for layer in layers] == hf_funcs
    _hf_checkpointing(model, False)
    off.enable_offloaded_checkpointing(model)
    off.disable_offloaded_checkpointing(model)
    assert not any(layer.gradient_checkpointing for layer in layers)
    with pytest.raises(ValueError, match="no Hugging Face decoder layers"):
        off.enable_offloaded_checkpointing(torch.nn.Linear(2, 2))


def test_second_backward_through_same_graph_is_refused():
    model = _model()
    off.enable_offloaded_checkpointing(model)
    out = model(input_ids=torch.randint(0, 211, (1, 5))).logits.sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran already"):
        out.backward()


# ---- GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_offload_matches_and_frees_memory():
    """llama-3.2-1b widths, 8 layers, seq 4096: bf16 gradients match plain checkpointing, and the
    peak drops by at least half of the (layers - 2) saved inputs that now live on the CPU."""
    from kernels.fused_lora import apply_fused_lora

    cfg = ModelConfig(preset="llama-3.2-1b", dtype="bfloat16", lora=LoraConfig(r=16, alpha=32),
                      config_overrides=dict(num_hidden_layers=8, vocab_size=2048))
    model = add_lora(build_model(cfg, device="cuda", seed=0), cfg)
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.02)
    apply_fused_lora(model)
    model.train()
    B, T, H = 2, 4096, model.config.hidden_size
    ids = torch.randint(0, 2048, (B, T), device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hidden = model.get_base_model().model(input_ids=ids).last_hidden_state
        hidden.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.cuda.max_memory_allocated() - base, grads

    _hf_checkpointing(model, True)
    run()
    peak_plain, g_plain = run()
    _hf_checkpointing(model, False)
    off.enable_offloaded_checkpointing(model)
    run()
    peak_off, g_off = run()
    layer_input = B * T * H * 2
    print(f"peak: plain checkpointing {peak_plain / 2**20:.0f} MiB, offloaded {peak_off / 2**20:.0f} MiB, "
          f"one layer input {layer_input / 2**20:.0f} MiB")
    assert peak_plain - peak_off > 0.5 * (8 - 2) * layer_input
    for k in g_plain:  # bf16 recompute of the same kernels: identical up to reduction order
        err = ((g_off[k] - g_plain[k]).norm() / g_plain[k].norm().clamp_min(1e-12)).item()
        assert err < 1e-2, (k, err)
