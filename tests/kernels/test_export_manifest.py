"""Export of run folders through OUTPUT_DIR/run.json (kernels.run_manifest), and of older run folders
that only have config.yaml (the legacy fallback)."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from kernels import export as ex
from kernels.model import LoraConfig, ModelConfig, add_lora, build_model, save_adapter
from kernels.run_manifest import MANIFEST_FILE, RunManifest
from kernels.tokenizer import load_tokenizer
from lora_helpers import randomise_lora

PROMPT = "A shop had 9 cards and sold 2. How many cards does the shop have now?"
# what a run of this file trained: a preset with overrides, a seed and a vocab size that no rule
# derives from the tokenizer (only the manifest knows them)
MODEL = ModelConfig(preset="tiny", dtype="float32", config_overrides={"num_hidden_layers": 2},
                    lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
SEED, VOCAB = 5, 1040


def _train(root, tok_dir: str, model_cfg: ModelConfig = MODEL):
    """A finished LoRA run's adapter in root/adapter; returns the PEFT model (eval)."""
    model = add_lora(build_model(model_cfg, vocab_size=VOCAB, seed=SEED), model_cfg)
    randomise_lora(model)
    save_adapter(model, str(root / "adapter"))
    return model.eval()


@pytest.fixture(scope="module")
def tok_dir(tiny_tokenizer_dir, tmp_path_factory):
    """The tokenizer a GRPO run names by path: outside the run folder."""
    d = tmp_path_factory.mktemp("shared") / "tokenizer"
    load_tokenizer(tiny_tokenizer_dir).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def manifest_run(tmp_path_factory, tok_dir):
    root = tmp_path_factory.mktemp("manifest-run")
    model = _train(root, tok_dir)
    RunManifest.for_run(str(root), "grpo", MODEL, seed=SEED, vocab_size=VOCAB, train_device="cpu",
                        tokenizer_dir=tok_dir).write(str(root))
    return str(root), model, load_tokenizer(tok_dir)


def _logits(model, tok):
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_export_run_with_manifest(manifest_run, tok_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    root, peft_model, tok = manifest_run
    assert not os.path.exists(os.path.join(root, "config.yaml"))  # nothing of the job's YAML is read
    src = ex.resolve_source(root)
    assert src.kind == "run" and src.manifest == RunManifest.read(root)
    assert src.adapter_dir == os.path.join(root, "adapter") and src.tokenizer_dir == tok_dir
    assert (src.seed, src.finetune, src.base_path) == (SEED, "lora", "")
    out = ex.export(root, "merged16", str(tmp_path / "m"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.config.vocab_size == VOCAB and merged.config.num_hidden_layers == 2
    # fp32 merge vs fp32 unmerged forward: only summation-order differences
    torch.testing.assert_close(_logits(merged, tok), _logits(peft_model, tok), atol=1e-4, rtol=1e-4)
    model, _ = ex.load_for_inference(root)
    torch.testing.assert_close(_logits(model, tok), _logits(peft_model, tok), atol=1e-5, rtol=1e-5)


def test_export_run_with_only_config_yaml(tiny_tokenizer_dir, tmp_path):
    """A run saved before run.json existed: config.yaml is read (legacy fallback), the preset's
    vocab size follows the SFT job's rule, max(preset vocab, len(tokenizer))."""
    from transformers import AutoModelForCausalLM

    root = tmp_path / "old-run"
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.save_pretrained(str(root / "tokenizer"))
    cfg = ModelConfig(preset="tiny", dtype="float32", lora=LoraConfig(target_modules=["q_proj", "o_proj"]))
    model = add_lora(build_model(cfg, vocab_size=1024, seed=3), cfg)  # the SFT rule: max(1024, 512)
    randomise_lora(model)
    save_adapter(model, str(root / "adapter"))
    (root / "config.yaml").write_text(yaml.safe_dump(
        {"seed": 3, "trainer": {"use_gpu": False},
         "model": {"preset": "tiny", "path": "", "finetune": "lora", "dtype": "float32",
                   "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "o_proj"]}}}))
    src = ex.resolve_source(str(root))
    assert src.kind == "run" and src.manifest.vocab_size is None and src.manifest.lora_targets == ("q_proj", "o_proj")
    assert (src.seed, src.train_on_gpu) == (3, False)
    out = ex.export(str(root), "merged16", str(tmp_path / "m"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(merged, tok), _logits(model.eval(), tok), atol=1e-4, rtol=1e-4)


def test_manifest_wins_over_config_yaml(manifest_run, tmp_path):
    import shutil

    root, peft_model, tok = manifest_run
    run = tmp_path / "both"
    shutil.copytree(root, run)
    # a config.yaml that would rebuild another base (seed, layers): ignored when run.json is there
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "model": {"preset": "tiny"}}))
    model, _ = ex.load_merged(ex.resolve_source(str(run)))
    torch.testing.assert_close(_logits(model, tok), _logits(peft_model, tok), atol=1e-4, rtol=1e-4)
    # the run folder moved: paths inside it were stored relative to it
    assert ex.resolve_source(str(run)).adapter_dir == str(run / "adapter")


def test_full_finetuning_run_with_manifest(tok_dir, tmp_path):
    root = tmp_path / "full"
    cfg = ModelConfig(preset="tiny", dtype="float32", finetune="full")
    model = build_model(cfg, vocab_size=VOCAB, seed=1)
    ex.write_merged16(model, load_tokenizer(tok_dir), str(root / "merged"), dtype=torch.float32)
    m = RunManifest.for_run(str(root), "sft", cfg, seed=1, vocab_size=VOCAB, train_device="cpu",
                            tokenizer_dir=tok_dir)
    assert m.adapter_dir == ""
    m.write(str(root))
    src = ex.resolve_source(str(root))
    assert src.kind == "model" and src.path == str(root / "merged") and src.manifest == m
    with pytest.raises(ValueError, match="has no adapter to export"):
        ex.export(str(root), "adapter")


def test_malformed_manifest_fails_naming_file_and_field(manifest_run, tmp_path, capsys):
    import shutil

    from jobs.export import main

    root, _, _ = manifest_run
    run = tmp_path / "bad"
    shutil.copytree(root, run)
    data = json.loads((run / MANIFEST_FILE).read_text())
    data["lora_r"] = "sixteen"
    (run / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{run / MANIFEST_FILE}: field 'lora_r': expected an integer >= 1"):
        ex.export(str(run), "merged16")
    assert main([str(run), "--format", "merged16"]) == 2
    assert f"export error: {run / MANIFEST_FILE}: field 'lora_r'" in capsys.readouterr().err
    data["lora_r"] = 4
    data["tokenizer_dir"] = "gone"
    (run / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match=f"tokenizer folder '{run / 'gone'}' named by {MANIFEST_FILE}"):
        ex.resolve_source(str(run))
