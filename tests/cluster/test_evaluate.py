"""cluster/evaluate.py: exact-match scoring, self-consistency, confidence intervals, config checks."""
from __future__ import annotations

import json

import pytest

from cluster.evaluate import (EvalConfig, bootstrap_interval, evaluate, load_rows, majority_vote,
                              messages_for, question_and_gold, wilson_interval)
from hub_cache import go_offline


class FixedSampler:
    """A backend that answers from a table: question -> list of completions (cycled to n)."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.calls = []

    def sample(self, prompts, n, temperature, max_new_tokens, seed):
        self.calls.append(dict(prompts=prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens))
        out = []
        for msgs in prompts:
            texts = self.table[msgs[-1]["content"]]
            if temperature == 0:
                out.append([texts[0]] * n)
            else:
                out.append([texts[(i + 1) % len(texts)] for i in range(n)])
        return out


GSM = [
    {"question": "q1", "answer": "2 + 2 = 4\n#### 4"},
    {"question": "q2", "answer": "#### 1,000"},
    {"question": "q3", "answer": "#### 7"},
    {"question": "q4", "answer": "#### 10"},
]


def test_known_accuracy_gsm8k(tmp_path):
    sampler = FixedSampler({
        "q1": ["so the answer is #### 4"],             # right
        "q2": ["The total is 1000 dollars."],          # right (last number, thousands normalised)
        "q3": ["#### 8"],                              # wrong
        "q4": ["no idea"],                             # no answer
    })
    res = evaluate(sampler, None, GSM, EvalConfig(max_new_tokens=16), output_path=str(tmp_path))
    assert res["n"] == 4 and res["correct"] == 2 and res["accuracy"] == 0.5
    assert [p["correct"] for p in res["per_problem"]] == [True, True, False, False]
    assert res["per_problem"][3]["voted"] is None
    assert res["answered"] == 0.75
    assert sampler.calls[0]["temperature"] == 0.0 and sampler.calls[0]["n"] == 1
    assert sampler.calls[0]["max_new_tokens"] == 16
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["accuracy"] == 0.5 and len(saved["per_problem"]) == 4
    assert saved["per_problem"][0]["gold"] == "4"


def test_known_accuracy_math_and_max_problems(tmp_path):
    rows = [
        {"problem": "p1", "solution": r"We get $\boxed{\frac{3}{4}}$."},
        {"problem": "p2", "solution": r"so $\boxed{x+1}$", "level": "Level 2"},
        {"problem": "p3", "answer": "12"},
        {"problem": "p4", "answer": "5"},
    ]
    sampler = FixedSampler({"p1": [r"\boxed{0.75}"], "p2": [r"The answer is \boxed{x + 1}"],
                            "p3": ["#### 13"], "p4": ["#### 5"]})
    res = evaluate(sampler, None, rows, EvalConfig(format="math", max_problems=3),
                   output_path=str(tmp_path / "out" / "m.json"))
    assert res["n"] == 3 and res["correct"] == 2
    assert (tmp_path / "out" / "m.json").exists()
    # auto detection reads the same rows the same way
    assert evaluate(sampler, None, rows, EvalConfig())["correct"] == 3


def test_self_consistency_beats_greedy():
    # greedy (first text) is wrong; 3 of 4 samples say the right answer
    table = {q: ["#### 99", "#### 4", "#### 4.0", "the answer is 4"] for q in ("a", "b", "c")}
    rows = [{"question": q, "answer": "#### 4"} for q in table]
    greedy = evaluate(FixedSampler(table), None, rows, EvalConfig(k=1))
    sc = evaluate(FixedSampler(table), None, rows, EvalConfig(k=4))
    assert greedy["accuracy"] == 0.0
    assert sc["accuracy"] == 1.0
    assert sc["temperature"] == 0.7 and sc["k"] == 4
    p = sc["per_problem"][0]
    assert p["votes"] == 3 and len(p["predictions"]) == 4 and p["any_correct"]
    assert greedy["pass_at_k"] == 0.0 and sc["pass_at_k"] == 1.0


def test_majority_vote_pools_equal_answers_and_ties_first():
    assert majority_vote(["1,000", "1000", "7", "7"]) == ("1,000", 2)
    assert majority_vote(["3", None, "5", None, "5"]) == ("5", 2)
    assert majority_vote([None, None]) == (None, 0)
    assert majority_vote(["3/4", "0.75", r"\frac{3}{4}", "1"])[1] == 3


def test_wilson_interval_bounds():
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and 0.0 < hi < 0.1
    lo, hi = wilson_interval(50, 50)
    assert hi == 1.0 and 0.9 < lo < 1.0
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and abs((0.5 - lo) - (hi - 0.5)) < 1e-12  # symmetric at p = 0.5
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3  # textbook values for 50/100
    # more data, narrower interval
    assert (wilson_interval(500, 1000)[1] - wilson_interval(500, 1000)[0]) < hi - lo
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_interval():
    outcomes = [True] * 30 + [False] * 70
    lo, hi = bootstrap_interval(outcomes, samples=2000, seed=0)
    assert lo < 0.3 < hi
    w_lo, w_hi = wilson_interval(30, 100)
    assert abs(lo - w_lo) < 0.04 and abs(hi - w_hi) < 0.04
    assert bootstrap_interval(outcomes, 500, seed=1) == bootstrap_interval(outcomes, 500, seed=1)
    assert bootstrap_interval([True] * 10) == (1.0, 1.0)
    sampler = FixedSampler({"q1": ["#### 4"], "q2": ["#### 1"], "q3": ["#### 7"], "q4": ["#### 10"]})
    res = evaluate(sampler, None, GSM, EvalConfig(ci="bootstrap", bootstrap_samples=500))
    assert res["ci_method"] == "bootstrap" and res["ci95"][0] <= res["accuracy"] <= res["ci95"][1]


def test_prompt_is_the_sft_chat_rendering(tiny_tokenizer_dir):
    from kernels.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    msgs = messages_for("How many?", "Be brief.")
    assert msgs == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow many?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    sampler = FixedSampler({"q1": ["#### 4"]})
    evaluate(sampler, None, GSM[:1], EvalConfig(system_prompt="Be brief."))
    assert sampler.calls[0]["prompts"] == [[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "q1"}]]


def test_hf_backend_on_tiny_model(tiny_tokenizer_dir, tmp_path):
    from kernels.model import ModelConfig, build_model
    from kernels.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(ModelConfig(preset="tiny", dtype="float32"), vocab_size=len(tok))
    rows = load_rows("builtin")[:6]
    res = evaluate(model, tok, rows, EvalConfig(max_new_tokens=8, batch_size=4))
    assert res["n"] == 6 and 0.0 <= res["accuracy"] <= 1.0
    assert all(len(p["predictions"]) == 1 for p in res["per_problem"])
    res = evaluate(model, tok, rows[:2], EvalConfig(max_new_tokens=4, k=3, temperature=1.0))
    assert all(len(p["predictions"]) == 3 for p in res["per_problem"])


def test_vllm_backend_stops_on_every_stop_token_id(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """Against a stand-in `vllm` module: the prompts are the chat rendering and SamplingParams get
    kernels.generation.stop_token_ids (here the eos <|im_start|> and the template's <|im_end|>)."""
    import sys
    import types
    from types import SimpleNamespace as NS

    from kernels.tokenizer import load_tokenizer

    seen = {}

    class LLM:
        def __init__(self, **kw):
            seen["llm"] = kw

        def generate(self, texts, params, use_tqdm=False):
            seen["texts"], seen["params"] = texts, params.kw
            return [NS(outputs=[NS(text="#### 4") for _ in range(params.kw["n"])]) for _ in texts]

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    vllm.SamplingParams = lambda **kw: NS(kw=kw)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.eos_token = "<|im_start|>"
    res = evaluate(str(tmp_path), tok, GSM[:1], EvalConfig(backend="vllm", k=2, temperature=1.0))
    assert res["correct"] == 1 and seen["llm"]["model"] == str(tmp_path)
    assert seen["texts"][0].endswith("<|im_start|>assistant\n")
    assert seen["params"]["stop_token_ids"] == tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])


def test_data_loading(tmp_path):
    rows = load_rows("builtin")
    assert len(rows) == 200 and question_and_gold(rows[0], "auto")[1].lstrip("-").isdigit()
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in GSM) + "\n")
    assert load_rows(str(p)) == GSM
    j = tmp_path / "d.json"
    j.write_text(json.dumps(GSM))
    assert load_rows(str(j)) == GSM
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "d.csv").write_text("x")
        load_rows(str(tmp_path / "d.csv"))
    with pytest.raises(ValueError, match="cannot tell the data format"):
        question_and_gold({"text": "hi"}, "auto")
    with pytest.raises(ValueError, match="gsm8k row needs"):
        question_and_gold({"problem": "p", "solution": "s"}, "gsm8k")


@pytest.mark.parametrize("kw, field", [
    (dict(k=0), "eval.k"), (dict(format="csv"), "eval.format"), (dict(backend="tgi"), "eval.backend"),
    (dict(k=4, temperature=0.0), "eval.temperature"), (dict(temperature=-1.0), "eval.temperature"),
    (dict(max_new_tokens=0), "eval.max_new_tokens"), (dict(max_problems=-1), "eval.max_problems"),
    (dict(batch_size=0), "eval.batch_size"), (dict(top_p=0.0), "eval.top_p"), (dict(ci="exact"), "eval.ci"),
    (dict(data=""), "eval.data"),
])
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        EvalConfig(**kw)


def test_vllm_backend_needs_a_path():
    with pytest.raises((ValueError, RuntimeError), match="vllm|vLLM"):
        evaluate(object(), None, GSM, EvalConfig(backend="vllm"))


def test_eval_job_on_model_folder(tiny_tokenizer_dir, tmp_path, capsys):
    from jobs.eval import main
    from kernels.model import ModelConfig, build_model
    from kernels.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    folder = tmp_path / "model"
    build_model(ModelConfig(preset="tiny", dtype="float32"), vocab_size=len(tok)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    assert main([str(folder), "max_problems=3", "max_new_tokens=4", "--out", str(tmp_path / "res")]) == 0
    res = json.loads((tmp_path / "res" / "eval.json").read_text())
    assert res["n"] == 3 and res["config"]["max_new_tokens"] == 4
    assert "[eval] accuracy" in capsys.readouterr().out
    assert main([str(folder), "kk=3"]) == 2
    assert "unknown config key 'kk'" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_shipped_eval_config_loads():
    import os

    from jobs.config import load

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load(EvalConfig, os.path.join(root, "jobs", "configs", "tiny-eval.yaml"), ["k=4"])
    assert cfg.k == 4 and cfg.sampling_temperature == 0.7 and cfg.max_problems == 200


# ----------------------------------------------------------------------------- eval.data as data.path: datasets

def _gsm(tag: str, n: int) -> list[dict]:
    return [{"question": f"{tag} {i}", "answer": f"#### {i}"} for i in range(n)]


def _questions(rows: list[dict]) -> list[str]:
    return [r["question"] for r in rows]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache and datasets cache of this test, offline."""
    return go_offline(monkeypatch, str(tmp_path / "hub"), str(tmp_path / "datasets-cache"))


def test_eval_split_picks_a_split_of_a_parquet_folder(tmp_path, offline):
    """eval.split: a folder of train/test parquet files read as a dataset (datasets.load_dataset), its split
    chosen; evaluate(rows=None) reads cfg.data with cfg.split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "gsm"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(_gsm("train", 3)), str(folder / "train.parquet"))
    pq.write_table(pa.Table.from_pylist(_gsm("test", 2)), str(folder / "test.parquet"))
    assert _questions(load_rows(str(folder), split="test")) == ["test 0", "test 1"]
    sampler = FixedSampler({"test 0": ["#### 0"], "test 1": ["#### 5"]})
    res = evaluate(sampler, None, None, EvalConfig(data=str(folder), split="test"))
    assert res["n"] == 2 and res["correct"] == 1 and res["config"]["split"] == "test"
    with pytest.raises(ValueError, match=r"^eval\.split: 'dev' is not a split of "):
        load_rows(str(folder), split="dev")


def test_eval_data_saved_dataset_defaults_to_its_eval_split(tmp_path, offline):
    import datasets

    saved = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_gsm("tr", 3)),
                          "test": datasets.Dataset.from_list(_gsm("te", 2))}).save_to_disk(saved)
    assert _questions(load_rows(saved)) == ["te 0", "te 1"]  # held-out: its eval split, not train
    assert _questions(load_rows(saved, split="train")) == ["tr 0", "tr 1", "tr 2"]


def test_eval_data_dataset_repo_and_name_with_subset_and_split(tmp_path, offline):
    """A dataset repo folder and the same repo as a name in the (offline) hub cache, as tests/jobs/test_hub_names.py
    builds it; a name not there is one line naming eval.data."""
    from hub_cache import cache_repo, write_dataset_repo

    repo = write_dataset_repo(tmp_path / "arith", lambda subset, split: _gsm(f"{subset}-{split}", 2))
    assert _questions(load_rows(repo, subset="hard")) == ["hard-test 0", "hard-test 1"]  # split "": its test split
    assert _questions(load_rows(repo, subset="easy", split="train")) == ["easy-train 0", "easy-train 1"]
    cache_repo(offline, "Org/Arith", repo, repo_type="dataset")
    assert _questions(load_rows("Org/Arith", subset="easy", split="test")) == ["easy-test 0", "easy-test 1"]
    with pytest.raises(ValueError, match=r"^eval\.subset: 'medium' is not a subset of 'Org/Arith'"):
        load_rows("Org/Arith", subset="medium", split="test")
    with pytest.raises(FileNotFoundError) as e:
        load_rows("Org/Missing")
    assert str(e.value).startswith("eval.data: 'Org/Missing' is not a local file or folder, nor a dataset in the "
                                   "Hugging Face cache (offline: HF_HUB_OFFLINE=1; hub cache: ")


def test_eval_split_or_subset_where_no_dataset_takes_it(tmp_path):
    from jobs.grpo_config import HeldOutEvalConfig

    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in GSM) + "\n")
    with pytest.raises(ValueError, match=r"^eval\.split: 'test' is for dataset names, dataset folders and saved "
                                         r"datasets; eval\.data '.*d\.jsonl' names files only$"):
        load_rows(str(f), split="test")
    with pytest.raises(ValueError, match=r"^eval\.subset: 'main' is for dataset names and dataset repo folders; "
                                         r"eval\.data '.*d\.jsonl' names none"):
        load_rows(str(f), subset="main")
    assert load_rows(str(f), split="train") == GSM  # "train" of files: the files (as data.split)
    with pytest.raises(ValueError, match=r"^eval\.split: 'test' is for .*eval\.data is 'builtin'"):
        load_rows("builtin", split="test")
    for make in (EvalConfig, HeldOutEvalConfig):
        with pytest.raises(ValueError, match=r"^eval\.subset: 'main' is for .*eval\.data is 'builtin'"):
            make(subset="main")
        with pytest.raises(ValueError, match=r"^eval\.split: expected a split name"):
            make(data="Org/Name", split=3)
        cfg = make(data="Org/Name", subset="main", split="test")  # a name: checked when it is read
        assert (cfg.subset, cfg.split) == ("main", "test")


def test_preflight_checks_eval_data_as_load_rows_reads_it(tmp_path, offline):
    from hub_cache import write_dataset_repo
    from jobs import preflight

    repo = write_dataset_repo(tmp_path / "arith", lambda subset, split: _gsm(f"{subset}-{split}", 2))
    preflight.check_eval_data("eval.data", repo, "hard")  # passes: its test split
    with pytest.raises(preflight.PreflightError, match=r"^eval\.split: 'dev' is not a split of "):
        preflight.check_eval_data("eval.data", repo, "hard", "dev")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(GSM[0]) + "\n")
    with pytest.raises(preflight.PreflightError, match=r"^eval\.subset: 'main' is for dataset names"):
        preflight.check_eval_data("eval.data", str(f), "main")
    with pytest.raises(preflight.PreflightError, match=r"^eval\.data: 'Org/Missing' is not a local file or folder"):
        preflight.check_eval_data("eval.data", "Org/Missing")
