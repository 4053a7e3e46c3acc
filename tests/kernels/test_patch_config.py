"""KernelsConfig validation, the POSTTRAIN_KERNELS override, and which path each mode runs."""
from __future__ import annotations

import sys

import pytest
import torch

from kernel_checks import DEVICE
from kernels.ops import common
from kernels.ops.rms_norm import rms_norm
from kernels.patch import KernelsConfig, kernels_config, patch_model, unpatch_model


def test_config_defaults_and_validation():
    cfg = KernelsConfig()
    assert cfg.enabled is True and cfg.mode == "auto"
    with pytest.raises(ValueError, match=r"kernels\.mode.*auto, triton, reference.*'fast'"):
        KernelsConfig(mode="fast")
    with pytest.raises(ValueError, match=r"kernels\.enabled"):
        KernelsConfig(enabled="yes")
    with pytest.raises(Exception):  # frozen
        cfg.mode = "triton"


def test_env_var_overrides_mode(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_KERNELS", "reference")
    assert KernelsConfig(mode="triton").resolved_mode == "reference"
    assert common.resolve_mode("triton") == "reference"
    monkeypatch.setenv("POSTTRAIN_KERNELS", "bogus")
    with pytest.raises(ValueError, match="POSTTRAIN_KERNELS.*auto, triton, reference"):
        KernelsConfig()
    monkeypatch.delenv("POSTTRAIN_KERNELS")
    assert KernelsConfig(mode="triton").resolved_mode == "triton"


def test_auto_mode_picks_triton_only_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv("POSTTRAIN_KERNELS", raising=False)
    cpu = torch.zeros(2)
    assert common.use_triton("auto", cpu) is False
    assert common.use_triton("triton", cpu) is True
    assert common.use_triton("reference", cpu) is False
    if torch.cuda.is_available():
        assert common.use_triton("auto", cpu.cuda()) is True


def test_reference_and_auto_on_cpu_never_launch_triton(monkeypatch):
    monkeypatch.delenv("POSTTRAIN_KERNELS", raising=False)

    def boom(*a, **k):
        raise AssertionError("a Triton kernel was launched")

    monkeypatch.setattr(sys.modules["kernels.ops.rms_norm"], "launchable", boom)
    x, w = torch.randn(3, 8), torch.ones(8)
    rms_norm(x, w, mode="reference")
    rms_norm(x, w, mode="auto")
    monkeypatch.setenv("POSTTRAIN_KERNELS", "reference")
    rms_norm(x, w, mode="triton")  # the environment wins


def test_reference_mode_patch_is_bit_identical_to_hf():
    """mode=reference swaps in the PyTorch references, written with HF's arithmetic: same bits."""
    from transformers import AutoModelForCausalLM

    from kernels.model import hf_config

    for preset in ("tiny", "gemma-2-2b"):
        config = hf_config(preset, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, vocab_size=29)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(DEVICE)
        ids = torch.randint(0, 29, (2, 7), device=DEVICE)
        with torch.no_grad():
            before = model(input_ids=ids).logits
            patch_model(model, KernelsConfig(mode="reference"))
            after = model(input_ids=ids).logits
        assert torch.equal(before, after), preset


def test_disabled_config_patches_nothing_and_is_recorded():
    from transformers import AutoModelForCausalLM

    from kernels.model import hf_config

    model = AutoModelForCausalLM.from_config(hf_config("tiny", num_hidden_layers=1, vocab_size=31))
    patch_model(model, KernelsConfig(enabled=False))
    assert kernels_config(model) == KernelsConfig(enabled=False)
    assert not any("forward" in m.__dict__ for m in model.modules())
    unpatch_model(model)
    assert kernels_config(model) is None


def test_unknown_family_warns_and_leaves_modules():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=31)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match="no patch for model family 'gpt2'"):
        patch_model(model)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_triton_mode_on_cpu_without_interpreter_says_how_to_fix():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch\nfrom kernels.ops.rms_norm import rms_norm\n"
            "try:\n    rms_norm(torch.ones(2, 4), torch.ones(4), mode='triton')\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr
