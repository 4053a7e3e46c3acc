"""Names as users write them, through the jobs' command lines (issue 17): model.path / model.tokenizer
as hub ids of a test-built Hugging Face cache (offline), data.path as a dataset name with data.split /
data.subset, and a missing name: one line naming it and the field, exit code 2, before Ray starts.
The jobs' mains run in-process with their run_* replaced (tests/jobs/test_preflight.py does the same)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import jobs.grpo
import jobs.sft
from hub_cache import SMOLLM2_GGUF, cache_repo, go_offline, write_dataset_repo
from jobs import preflight
from sft_cli import stderr_line as _line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_SFT = os.path.join(ROOT, "jobs", "configs", "tiny-sft.yaml")
TINY_GRPO = os.path.join(ROOT, "jobs", "configs", "tiny-grpo.yaml")
SFT_ARGS = ["max_steps=2", "trainer.num_workers=1", "eval_accuracy.enabled=false"]
def _arith(subset: str, split: str) -> list[dict]:
    return [{"question": f"{subset} {split} {i}: {i} + 1 = ?", "answer": f"#### {i + 1}"} for i in range(3)]


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory, tiny_merged_dir):
    """A hub cache: Org/Tiny (a tiny model + tokenizer) and the dataset Org/Arith."""
    cache = str(tmp_path_factory.mktemp("hf-hub"))
    cache_repo(cache, "Org/Tiny", tiny_merged_dir(torch.float32))
    cache_repo(cache, "Org/Arith", write_dataset_repo(tmp_path_factory.mktemp("arith"), _arith), repo_type="dataset")
    return cache


@pytest.fixture
def offline(hub_dir, tmp_path, monkeypatch):
    return go_offline(monkeypatch, hub_dir, str(tmp_path / "datasets-cache"))


def sft(tmp_path, *overrides) -> int:
    return jobs.sft.main([TINY_SFT, f"output_dir={tmp_path / 'out'}", *SFT_ARGS, *overrides])


def test_sft_with_a_hub_model_and_a_dataset_name(offline, tmp_path, no_run):
    """`posttrain sft tiny-sft.yaml model.path=Org/Tiny data.path=Org/Arith data.subset=hard`: the
    preflight passes offline, the model and tokenizer load from the snapshot, the rows are the subset's."""
    assert sft(tmp_path, "model.path=Org/Tiny", "data.path=Org/Arith", "data.subset=hard") == 0
    (cfg,) = no_run
    assert cfg.model.path.startswith(os.path.join(offline, "models--Org--Tiny", "snapshots"))
    from cluster.readers import read_rows
    from kernels.model import build_model
    from kernels.tokenizer import load_tokenizer

    model, tok = build_model(cfg.model), load_tokenizer(cfg.model.path)
    ids = torch.tensor([tok("1 + 2 = 3")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    rows = read_rows(cfg.data.path, subset=cfg.data.subset, split=cfg.data.split)
    assert [r["question"][:10] for r in rows] == ["hard train"] * 3


def test_missing_model_id_is_one_line_before_ray(offline, tmp_path, no_run, capsys):
    assert sft(tmp_path, "model.path=Org/Missing") == 2 and not no_run
    assert _line(capsys) == (f"config error: model.path: 'Org/Missing' is not a local folder, a .gguf file, or a "
                             f"model in the Hugging Face cache (offline: HF_HUB_OFFLINE=1; cache: {offline})")
    with pytest.raises(preflight.PreflightError, match=r"^model.path: 'Org/Missing' is not a local folder"):
        preflight.model_config("model.path", "Org/Missing")  # what the preflight says of an unresolved id
    from jobs.eval import main as eval_main

    assert eval_main([str(tmp_path), "--base", "Org/Gone"]) == 2
    assert _line(capsys).startswith("preflight: --base: 'Org/Gone' is not a local folder, a .gguf file, or a model")


def test_missing_dataset_name_and_wrong_split_or_subset(offline, tmp_path, no_run, capsys):
    assert sft(tmp_path, "data.path=Org/NoData") == 2 and not no_run
    assert _line(capsys).startswith("preflight: data.path: 'Org/NoData' is not a local file or folder, nor a "
                                    "dataset in the Hugging Face cache (offline: HF_HUB_OFFLINE=1; hub cache: ")
    assert sft(tmp_path, "data.path=Org/Arith", "data.subset=hard", "data.split=dev") == 2
    assert _line(capsys).startswith("preflight: data.split: 'dev' is not a split of 'Org/Arith' (")
    assert sft(tmp_path, "data.path=Org/Arith", "data.subset=medium") == 2
    assert _line(capsys).startswith("preflight: data.subset: 'medium' is not a subset of 'Org/Arith' (")
    data = tmp_path / "a.jsonl"
    data.write_text(json.dumps({"question": "1 + 1 = ?", "answer": "#### 2"}) + "\n")
    assert sft(tmp_path, f"data.path={data}", "data.split=test") == 2
    assert _line(capsys) == (f"preflight: data.split: 'test' is for dataset names, dataset folders and saved "
                             f"datasets; data.path '{data}' names files only")
    assert sft(tmp_path, "data.split=''") == 2
    assert _line(capsys).startswith("config error: data.split: expected a split name of the dataset")


def test_grpo_prompts_from_a_dataset_name(offline, tmp_path, no_run):
    cfg = jobs.grpo.PromptDataConfig(path="Org/Arith", subset="easy", split="test")
    rows = jobs.grpo.read_prompts(cfg)
    assert [r["text"][:9] for r in rows] == ["easy test"] * 3 and rows[0]["columns"]["answer"] == "#### 1"
    assert jobs.grpo.main([TINY_GRPO, f"output_dir={tmp_path / 'g'}", "model.path=Org/Tiny",
                           "data.path=Org/Arith", "data.subset=easy", "eval.enabled=false"]) == 0
    with pytest.raises(ValueError, match=r"data.path: '/no/such.jsonl' does not exist"):
        jobs.grpo.PromptDataConfig(path="/no/such.jsonl")


@pytest.mark.e2e
@pytest.mark.skipif(not os.path.isfile(SMOLLM2_GGUF), reason=f"{SMOLLM2_GGUF} is not here")
def test_acceptance_smollm2_by_its_hub_id(tmp_path_factory, monkeypatch, no_run, tmp_path, smollm2_folder):
    """The issue's command, `posttrain sft jobs/configs/tiny-sft.yaml model.path=HuggingFaceTB/SmolLM2-135M-Instruct`,
    offline against a cache entry converted from the real model's GGUF (kernels.model.gguf_to_folder, ~20 s)."""
    from kernels.model import build_model
    from kernels.tokenizer import load_tokenizer

    folder = smollm2_folder  # the session's conversion (tests/conftest.py)
    cache = str(tmp_path_factory.mktemp("hf-hub-smollm2"))
    cache_repo(cache, "HuggingFaceTB/SmolLM2-135M-Instruct", folder)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sft(tmp_path, "model.path=HuggingFaceTB/SmolLM2-135M-Instruct", "model.config_overrides={}") == 0
    (cfg,) = no_run
    model = build_model(cfg.model)
    tok = load_tokenizer(cfg.model.path)
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():  # the real model answers ("2 + 3 = 5")
        out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "5" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
