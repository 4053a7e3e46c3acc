"""Hub ids in model.path / model.tokenizer (kernels/hub.py): resolved once to the snapshot folder of a
test-built Hugging Face cache, offline (HF_HUB_OFFLINE=1); a missing id is one line naming it and the field."""
from __future__ import annotations

import os

import pytest
import torch

from hub_cache import cache_repo
from kernels import hub
from kernels.model import ModelConfig, build_model
from kernels.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory, tiny_merged_dir):
    """A hub cache holding Org/Tiny (the tiny merged model + tokenizer) and Org/TokOnly (its tokenizer)."""
    cache = str(tmp_path_factory.mktemp("hf-hub"))
    merged = tiny_merged_dir(torch.float32)
    cache_repo(cache, "Org/Tiny", merged)
    tok_only = tmp_path_factory.mktemp("tok-only")
    for name in os.listdir(merged):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.symlink(os.path.join(merged, name), tok_only / name)
    cache_repo(cache, "Org/TokOnly", str(tok_only))
    return cache


@pytest.fixture
def offline_hub(hub_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", hub_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_dir


def test_hub_id_resolves_once_to_the_snapshot_and_loads(offline_hub, tiny_merged_dir):
    cfg = ModelConfig(path="Org/Tiny", tokenizer="Org/Tiny")
    snap = os.path.join(offline_hub, "models--Org--Tiny", "snapshots")
    assert os.path.dirname(cfg.path) == snap and cfg.tokenizer == cfg.path  # a local folder from here on
    model = build_model(cfg)
    ref = build_model(ModelConfig(path=tiny_merged_dir(torch.float32)))
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    tok = load_tokenizer("Org/Tiny")  # the tokenizer loader takes the id too
    assert tok.pad_token is not None and tok("1 + 2 = 3")["input_ids"]


def test_revision_and_tokenizer_only_repo(offline_hub):
    assert os.path.isdir(hub.resolve_model("Org/Tiny@main"))
    assert ModelConfig(preset="tiny", tokenizer="Org/TokOnly").tokenizer.startswith(offline_hub)
    with pytest.raises(ValueError) as e:  # a repo without weights is not a model
        ModelConfig(path="Org/TokOnly")
    assert str(e.value).startswith("model.path: 'Org/TokOnly': its snapshot ")
    assert str(e.value).endswith("holds no config.json (expected a transformers model repo)")


def test_missing_id_is_one_line_naming_the_id_and_the_field(offline_hub):
    with pytest.raises(ValueError) as e:
        ModelConfig(path="Org/Missing")
    assert str(e.value) == (f"model.path: 'Org/Missing' is not a local folder, a .gguf file, or a model in the "
                            f"Hugging Face cache (offline: HF_HUB_OFFLINE=1; cache: {offline_hub})")
    with pytest.raises(ValueError, match=r"^model.tokenizer: 'Org/Nope' is not a local folder, a .gguf file, or a "
                                         r"tokenizer in the Hugging Face cache \(offline"):
        ModelConfig(preset="tiny", tokenizer="Org/Nope")
    with pytest.raises(ValueError, match=r"^tokenizer: 'Org/Nope' is not"):
        load_tokenizer("Org/Nope")
    with pytest.raises(ValueError, match=r"^model.path: 'no/such/folder' is not a local folder .*a Hugging Face "
                                         r"model id \(org/name\)$"):
        ModelConfig(path="no/such/folder")


def test_a_local_folder_wins_over_a_hub_id(offline_hub, tmp_path, monkeypatch, tiny_merged_dir):
    local = tmp_path / "Org" / "Tiny"
    local.parent.mkdir()
    os.symlink(tiny_merged_dir(torch.float32), local)
    monkeypatch.chdir(tmp_path)
    assert ModelConfig(path="Org/Tiny").path == "Org/Tiny"


def test_ids_shapes():
    assert all(hub.is_hub_id(s) for s in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "org/name@v1.0"))
    assert not any(hub.is_hub_id(s) for s in ("/abs/path", "a/b/c", "org/na me", "../x", "org/name.", "s3://b/k"))
