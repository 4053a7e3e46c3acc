"""patch_model / unpatch_model on a tiny random model of every family: patched (Triton) vs
unpatched logits and PEFT LoRA gradients, exact restore, idempotence, gradient checkpointing."""
from __future__ import annotations

import copy

import pytest
import torch

from kernel_checks import DEVICE, assert_close
from kernels.loss import IGNORE_INDEX, causal_lm_loss_sum
from kernels.patch import FAMILIES, KernelsConfig, is_patched, kernels_config, patch_model, unpatch_model

SMALL = dict(hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=101, max_position_embeddings=256, tie_word_embeddings=False)
# the families with their preset's peculiarities kept: llama3 rope scaling, qwen2 q/k/v biases,
# qwen3 and gemma3 q/k norms, gemma2 logit soft-capping and sliding windows, Gemma's 1 + w norms
FAMILY_PRESETS = {
    "llama": ("llama-3.2-1b", {}),
    "mistral": ("mistral-7b", {}),
    "qwen2": ("qwen2.5-0.5b", {}),
    "qwen3": ("qwen3-0.6b", {}),
    "gemma2": ("gemma-2-2b", dict(query_pre_attn_scalar=16, sliding_window=8)),
    "gemma3_text": (None, dict(query_pre_attn_scalar=16, sliding_window=8, rms_norm_eps=1e-6)),
}

TOLERANCES = {
    # (dtype, atol, rtol)
    # fp32 on CPU: each op is exact to rounding; through 2 layers and the loss the logits move ~1e-6
    # and the LoRA gradients ~1e-6 of their largest magnitude
    "fp32": (torch.float32, 1e-4, 1e-4),
}


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    from kernels.model import hf_config

    preset, extra = FAMILY_PRESETS[family]
    kw = dict(SMALL, **extra, **overrides)
    return hf_config(preset, **kw) if preset else AutoConfig.for_model(family, **kw)


def tiny_lora_model(family: str, dtype=torch.float32, seed=0, **overrides):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation="eager",
                                             dtype=dtype).to(DEVICE)
    # init_lora_weights=False: B is random too, so every LoRA matrix gets a non-zero gradient
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    model.train()
    return model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 13), generator=g).to(DEVICE)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    # a packed row: two sequences, positions restart
    pos = torch.cat([torch.arange(6), torch.arange(7)]).repeat(2, 1).to(DEVICE)
    return ids, labels, pos


def run(model, ids, labels, pos):
    """(logits, summed loss, {name: grad}) of the trainable (LoRA) parameters."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos).logits.float()
    loss, _ = causal_lm_loss_sum(model, ids, labels, pos)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits, loss.detach().float(), grads


def instance_forwards(model):
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def test_families_table_is_exposed():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"} <= set(FAMILIES)
    for spec in FAMILIES.values():
        assert spec.norms and spec.mlps and spec.attentions


@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_patched_family_matches_unpatched(family):
    dtype, atol, rtol = TOLERANCES["fp32"]
    model = tiny_lora_model(family, dtype)
    data = batch()
    before = instance_forwards(model)
    logits0, loss0, grads0 = run(model, *data)

    patch_model(model, KernelsConfig(mode="triton"))
    assert is_patched(model) and kernels_config(model).mode == "triton"
    n_patched = sum(1 for name, m in model.named_modules() if "forward" in m.__dict__)
    n_layers = SMALL["num_hidden_layers"]
    extra_norms = 2 if family in ("qwen3", "gemma3_text") else 0  # q_norm, k_norm
    extra_norms += 2 if family.startswith("gemma") else 0  # pre/post feed-forward norms
    assert n_patched == n_layers * (2 + extra_norms + 2) + 1  # norms, mlp, attention per layer; final norm
    logits1, loss1, grads1 = run(model, *data)
    assert_close(logits1, logits0, atol, rtol, f"{family} logits")
    assert_close(loss1, loss0, atol, rtol, f"{family} loss")
    assert grads1.keys() == grads0.keys() and len(grads0) == n_layers * 7 * 2
    for name in grads0:
        assert_close(grads1[name], grads0[name], atol, rtol, f"{family} {name}")

    unpatch_model(model)
    assert not is_patched(model) and kernels_config(model) is None
    assert instance_forwards(model) == before
    logits2, loss2, grads2 = run(model, *data)
    assert torch.equal(logits2, logits0) and torch.equal(loss2, loss0)
    assert all(torch.equal(grads2[n], grads0[n]) for n in grads0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_patch_under_gradient_checkpointing(family, use_reentrant):
    model = tiny_lora_model(family)
    data = batch()
    _, loss0, grads0 = run(model, *data)
    patch_model(model, KernelsConfig(mode="triton"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    _, loss1, grads1 = run(model, *data)
    assert_close(loss1, loss0, 1e-4, 1e-4, "loss")  # fp32: as in the family test
    for name in grads0:
        assert_close(grads1[name], grads0[name], 1e-4, 1e-4, name)


def test_patch_is_idempotent_and_unpatch_restores_exactly():
    model = tiny_lora_model("llama")
    hf = model.get_base_model()
    norm = hf.model.norm
    custom = norm.forward  # an instance forward that was there before patching must come back
    norm.forward = custom
    before = instance_forwards(model)

    patch_model(model, KernelsConfig(mode="triton"))
    first = instance_forwards(model)
    patch_model(model, KernelsConfig(mode="triton"))  # same config: nothing changes
    assert instance_forwards(model) == first
    patch_model(model, KernelsConfig(mode="reference"))  # another config: re-patched
    assert kernels_config(model).mode == "reference"
    unpatch_model(model)
    assert instance_forwards(model) == before and norm.__dict__["forward"] is custom
    for name, m in model.named_modules():
        if m is not norm:
            assert "forward" not in m.__dict__, name
    unpatch_model(model)  # a second unpatch is a no-op


def test_patch_before_peft_wrapping_and_deepcopy():
    """Patch the bare HF model, then wrap it with LoRA: the patched forwards call the LoRA layers.
    A deep copy (save_merged merges a copy) carries forwards bound to the copy's modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("qwen3"), attn_implementation="eager").to(DEVICE)
    patch_model(base, KernelsConfig(mode="reference"))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "gate_proj"]))
    assert is_patched(model)
    data = batch()
    logits, _, grads = run(model, *data)
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    clone = copy.deepcopy(model)
    mlp = clone.get_base_model().model.layers[0].mlp
    assert mlp.__dict__["forward"].__self__ is mlp
    with torch.no_grad():
        assert torch.equal(clone(input_ids=data[0], position_ids=data[2]).logits.float(), logits)
    merged = clone.merge_and_unload()
    with torch.no_grad():
        assert_close(merged(input_ids=data[0], position_ids=data[2]).logits, logits, 1e-4, 1e-4, "merged")  # fp32


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILY_PRESETS))
def test_patched_family_matches_unpatched_gpu_bf16(family):
    """bf16 on the GPU: the patched model's error against an fp32 run of the same weights is no
    worse than the unpatched bf16 model's own error (2x + a small floor), for logits and LoRA grads."""
    data = batch()
    model32 = tiny_lora_model(family, torch.float32, hidden_size=256, intermediate_size=688, num_attention_heads=8,
                              num_key_value_heads=2, head_dim=32)
    logits32, loss32, grads32 = run(model32, *data)
    model = copy.deepcopy(model32).to(torch.bfloat16)
    logits_hf, loss_hf, grads_hf = run(model, *data)
    patch_model(model, KernelsConfig(mode="triton"))
    logits_k, loss_k, grads_k = run(model, *data)

    def err(a, b):
        return (a - b).abs().max().item()

    floor = 1e-2  # bf16: 2**-7 of slack where the HF bf16 error happens to be tiny
    assert err(logits_k, logits32) <= 2 * err(logits_hf, logits32) + floor * logits32.abs().max().item()
    assert err(loss_k, loss32) <= 2 * err(loss_hf, loss32) + floor * loss32.abs().item()
    for name in grads32:
        scale = grads32[name].abs().max().item()
        assert err(grads_k[name], grads32[name]) <= 2 * err(grads_hf[name], grads32[name]) + floor * scale, name
