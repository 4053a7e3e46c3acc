"""kernels/run_manifest.py: OUTPUT_DIR/run.json round trip; malformed files fail naming the file and field."""
from __future__ import annotations

import json
import os

import pytest

from kernels.model import LoraConfig, ModelConfig
from kernels.run_manifest import FORMAT_VERSION, MANIFEST_FILE, RunManifest


def _manifest(run_dir: str, **model_kw) -> RunManifest:
    model = ModelConfig(preset="tiny", dtype="float32", lora=LoraConfig(r=8, alpha=16, target_modules=["q_proj"]),
                        config_overrides={"num_hidden_layers": 2}, **model_kw)
    return RunManifest.for_run(run_dir, "sft", model, seed=7, vocab_size=1030, train_device="cpu",
                               tokenizer_dir=os.path.join(run_dir, "tokenizer"))


def test_round_trip(tmp_path):
    m = _manifest(str(tmp_path))
    path = m.write(str(tmp_path))
    assert path == str(tmp_path / MANIFEST_FILE)
    back = RunManifest.read(str(tmp_path))
    assert back == m
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    # paths inside the run folder are stored relative to it, so the folder can move
    assert (data["adapter_dir"], data["merged_dir"], data["tokenizer_dir"]) == ("adapter", "merged", "tokenizer")
    assert data["format_version"] == FORMAT_VERSION and data["task"] == "sft" and data["vocab_size"] == 1030
    assert data["lora_targets"] == ["q_proj"] and back.lora_targets == ("q_proj",)
    assert back.path_of(str(tmp_path), back.adapter_dir) == str(tmp_path / "adapter")
    # the manifest rebuilds the ModelConfig training used (the fields that decide the weights)
    cfg = back.model_config()
    assert (cfg.preset, cfg.dtype, cfg.finetune, cfg.config_overrides) == ("tiny", "float32", "lora",
                                                                            {"num_hidden_layers": 2})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.modules()) == (8, 16, ["q_proj"])


def test_defaults_for_full_finetuning_presets_and_outside_paths(tmp_path):
    run, tok = tmp_path / "run", tmp_path / "elsewhere" / "tok"
    m = RunManifest.for_run(str(run), "grpo", ModelConfig(preset="tiny", finetune="full"), seed=0, vocab_size=None,
                            train_device="cuda:0", tokenizer_dir=str(tok))
    assert m.adapter_dir == "" and m.merged_dir == "merged" and m.train_device == "cuda"
    assert m.vocab_size == 1024  # a preset's own vocab size is recorded, not left to be guessed
    assert m.tokenizer_dir == str(tok)  # outside the run folder: absolute
    m.write(str(run))
    assert RunManifest.read(str(run)) == m
    assert m.path_of(str(run), m.tokenizer_dir) == str(tok) and m.path_of(str(run), m.adapter_dir) == ""


def _write(tmp_path, data) -> str:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("lora_r", 0, "field 'lora_r': expected an integer >= 1, got 0"),
    ("lora_r", "16", "field 'lora_r'"),
    ("task", "dpo", "field 'task': expected one of sft, cpt, grpo, got 'dpo'"),
    ("finetune", "dora", "field 'finetune': expected one of lora, qlora, full"),
    ("vocab_size", -1, "field 'vocab_size'"),
    ("seed", 1.5, "field 'seed': expected an integer"),
    ("lora_targets", [], "field 'lora_targets'"),
    ("config_overrides", [1], "field 'config_overrides'"),
    ("train_device", "tpu", "field 'train_device'"),
    ("tokenizer_dir", None, "field 'tokenizer_dir': expected a string"),
    ("format_version", 0, "field 'format_version'"),
])
def test_malformed_field_names_file_and_field(tmp_path, field, value, message):
    data = _manifest(str(tmp_path)).to_json()
    data[field] = value
    with pytest.raises(ValueError) as e:
        RunManifest.read(_write(tmp_path, data))
    assert str(e.value).startswith(str(tmp_path / MANIFEST_FILE) + ": ")
    assert message in str(e.value)


def test_missing_unknown_and_newer(tmp_path):
    path = str(tmp_path / MANIFEST_FILE)
    with pytest.raises(FileNotFoundError, match=f"{path}: no run manifest"):
        RunManifest.read(str(tmp_path))
    data = _manifest(str(tmp_path)).to_json()
    del data["seed"]
    with pytest.raises(ValueError, match=f"^{path}: missing field 'seed'$"):
        RunManifest.read(_write(tmp_path, data))
    data = _manifest(str(tmp_path)).to_json()
    data["sed"] = 3
    with pytest.raises(ValueError, match=f"^{path}: unknown field 'sed'; known fields: task, finetune"):
        RunManifest.read(_write(tmp_path, data))
    data = _manifest(str(tmp_path)).to_json()
    data.update(preset="", base_path="")
    with pytest.raises(ValueError, match="field 'preset' / 'base_path': one of them must name the base model"):
        RunManifest.read(_write(tmp_path, data))
    data = _manifest(str(tmp_path)).to_json()
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=f"field 'format_version' is {FORMAT_VERSION + 1}; this code reads format"):
        RunManifest.read(_write(tmp_path, data))
    with pytest.raises(ValueError, match=f"^{path}: not valid JSON .*line 1"):
        RunManifest.read(_write(tmp_path, '{"task": "sft",'))
    with pytest.raises(ValueError, match=f"^{path}: expected a JSON object, got list"):
        RunManifest.read(_write(tmp_path, "[1, 2]"))
