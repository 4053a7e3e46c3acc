"""kernels/merge.py: merged_lora_state (the one LoRA merge) equals PEFT's merge_and_unload, leaves the
model as it was; merged_copy / merge_adapter built on it."""
from __future__ import annotations

import copy

import pytest
import torch

from kernels.merge import merge_adapter, merged_copy, merged_lora_state
from kernels.model import LORA_ALL_LINEAR, LoraConfig, ModelConfig, add_lora, build_model, save_adapter
from lora_helpers import quantize_nf4_on_cpu, randomise_lora


def _peft_model(targets="all-linear", train_embeddings=False):
    cfg = ModelConfig(preset="tiny", dtype="float32", train_embeddings=train_embeddings,
                      lora=LoraConfig(r=4, alpha=8, target_modules=targets))
    model = add_lora(build_model(cfg, vocab_size=300, seed=0), cfg)
    randomise_lora(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:  # trained embeddings / head: make them differ from the base
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return model.eval()


@pytest.mark.parametrize("targets,train_embeddings", [("all-linear", False), (["q_proj", "v_proj"], False),
                                                      (["q_proj", "down_proj"], True)])
def test_merged_lora_state_equals_peft_merge_and_unload(targets, train_embeddings):
    pm = _peft_model(targets, train_embeddings)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    ref = copy.deepcopy(pm).merge_and_unload().state_dict()

    full = merged_lora_state(pm, only_changed=False)
    assert set(full) == set(ref)  # plain HF names, every tensor
    for k, v in ref.items():
        # the same float32 sum W + scale * B @ A as PEFT's merge: bit for bit
        assert torch.equal(full[k], v), k

    changed = merged_lora_state(pm)
    modules = LORA_ALL_LINEAR if targets == "all-linear" else targets
    want = {k for k in ref if k.endswith(".weight") and k.split(".")[-2] in modules}
    if train_embeddings:
        want |= {"model.embed_tokens.weight", "lm_head.weight"}  # modules_to_save changed too
    assert set(changed) == want
    for k in want:
        assert torch.equal(changed[k], ref[k]), k

    half = merged_lora_state(pm, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in half.values())
    # summed in float32, rounded once
    assert all(torch.equal(half[k], ref[k].to(torch.bfloat16)) for k in half)
    after = pm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is not modified


def test_merged_lora_state_of_plain_model_is_its_state():
    model = build_model(ModelConfig(preset="tiny", dtype="float32"), vocab_size=300, seed=0)
    state = merged_lora_state(model)  # no adapters: every tensor, whatever only_changed says
    assert set(state) == set(model.state_dict())


def test_merged_lora_state_skips_adapters_already_merged():
    pm = _peft_model(["q_proj"])
    ref = merged_lora_state(pm)
    pm.merge_adapter()  # W now holds the delta: it must not be added twice
    got = merged_lora_state(pm)  # (tensors with nothing to add are views of the live weights)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0)


def test_merged_copy_and_merge_adapter_agree_with_peft(tmp_path):
    pm = _peft_model(["q_proj", "up_proj"], train_embeddings=True)
    ref = copy.deepcopy(pm).merge_and_unload().state_dict()
    merged = merged_copy(pm)
    assert not hasattr(merged, "peft_config") or type(merged).__name__ != "PeftModel"
    for k, v in merged.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert merged.config.tie_word_embeddings is False  # trained embeddings and head are two tensors now
    save_adapter(pm, str(tmp_path / "adapter"))
    base = build_model(ModelConfig(preset="tiny", dtype="float32"), vocab_size=300, seed=0)
    from_folder = merge_adapter(base, str(tmp_path / "adapter"))
    for k, v in from_folder.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=1e-6, rtol=0)  # the adapter as saved (same fp32 values)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, pm(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_merged_lora_state_on_nf4_base_gpu():
    """A QLoRA model (kernels.qlora NF4 base on CUDA): each adapted weight is bitsandbytes'
    dequant(W) + scale * B @ A, the untargeted NF4 layers come dequantised (no quant-state tensors
    under their names), and merged_copy holds the same weights."""
    import bitsandbytes.functional as F

    from kernels.qlora import build_qlora_model

    cfg = ModelConfig(preset="tiny", finetune="qlora", lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    pm = add_lora(build_qlora_model(cfg, vocab_size=320, device="cuda", seed=0), cfg)
    randomise_lora(pm)
    changed = merged_lora_state(pm, dtype=torch.float32)
    assert set(changed) == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)}
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight
    want = F.dequantize_4bit(w.data, w.quant_state).float() + layer.get_delta_weight("default").float()
    torch.testing.assert_close(changed["model.layers.0.self_attn.q_proj.weight"], want, atol=1e-6, rtol=0)
    full = merged_lora_state(pm, dtype=torch.float32, only_changed=False)
    plain = merged_copy(pm)
    ref = plain.state_dict()
    assert set(full) == set(ref)  # plain HF names only: no absmax / quant_map / quant_state entries
    for k, v in ref.items():
        torch.testing.assert_close(full[k].float(), v.float(), atol=1e-6, rtol=0, msg=k)
    up = pm.base_model.model.model.layers[1].mlp.up_proj.weight  # not adapted, still NF4
    torch.testing.assert_close(full["model.layers.1.mlp.up_proj.weight"],
                               F.dequantize_4bit(up.data, up.quant_state).float())


def test_merged_lora_state_on_nf4_base_cpu():
    """The same on bitsandbytes' CPU backend (0.46+), where it can quantise NF4."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        probe = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, blocksize=64, quant_type="nf4",
                                  compress_statistics=True, quant_storage=torch.uint8)._quantize("cpu")
        assert probe.quant_state is not None
    except Exception:
        pytest.skip("bitsandbytes cannot quantise NF4 on this CPU")
    cfg = ModelConfig(preset="tiny", dtype="float32", lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    model = build_model(cfg, vocab_size=320, seed=0)
    quantize_nf4_on_cpu(model)  # what kernels.qlora.quantize_linears_nf4 does, on the CPU
    pm = add_lora(model, cfg)
    randomise_lora(pm)
    layer = pm.base_model.model.model.layers[2].self_attn.q_proj
    w = layer.base_layer.weight
    want = F.dequantize_4bit(w.data, w.quant_state).float() + layer.get_delta_weight("default").float()
    changed = merged_lora_state(pm)
    assert len(changed) == 4 and torch.equal(changed["model.layers.2.self_attn.q_proj.weight"], want)
    full = merged_lora_state(pm, only_changed=False)
    ref = merged_copy(pm).state_dict()
    assert set(full) == set(ref)  # plain HF names only: no absmax / quant_map / quant_state entries
    assert all(torch.equal(full[k], ref[k]) for k in ref)
