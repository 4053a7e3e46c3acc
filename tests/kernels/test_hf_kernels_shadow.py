"""Our top-level `kernels` package is not Hugging Face's `kernels` hub package.

transformers probes for an importable `kernels` with a version in its supported range before it
uses hub kernels; ours has no such version (and no distribution named `kernels`), so the probe
must say "not available" and models load and run with our package first on sys.path.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_transformers_does_not_take_our_kernels_for_the_hub_package():
    from transformers.utils.import_utils import is_kernels_available

    spec = importlib.util.find_spec("kernels")
    assert spec is not None and os.path.dirname(spec.origin) == os.path.join(ROOT, "kernels")
    assert is_kernels_available() is False


def test_fresh_process_with_our_kernels_first_on_path(tmp_path):
    """A new interpreter (repo root first on sys.path): the probe is False, the hub integration
    stays off, and a model saved and loaded back through from_pretrained runs."""
    code = f"""
import sys
sys.path.insert(0, {ROOT!r})
import torch, kernels
from transformers import AutoModelForCausalLM
from transformers.utils.import_utils import is_kernels_available
from transformers.integrations import hub_kernels
from kernels.model import hf_config
assert kernels.__file__.startswith({ROOT!r}), kernels.__file__
assert not is_kernels_available()
assert hub_kernels._kernels_enabled is False  # the stub branch: no hub kernels
model = AutoModelForCausalLM.from_config(hf_config("tiny", num_hidden_layers=1, vocab_size=37))
model.save_pretrained({str(tmp_path)!r})
loaded = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
ids = torch.arange(5)[None]
assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
print("OK")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_from_pretrained_in_process(tmp_path):
    from transformers import AutoModelForCausalLM

    from kernels.model import hf_config

    model = AutoModelForCausalLM.from_config(hf_config("tiny", num_hidden_layers=1, vocab_size=37))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(5)[None]
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
