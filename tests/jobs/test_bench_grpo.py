"""`posttrain bench grpo` (jobs/bench_grpo.py): the CPU smoke run of ours on the tiny model with the
hf engine, the settings ours runs with, and the summary and ratio lines."""
from __future__ import annotations

import json
import re

import pytest

from jobs.bench import main as bench_main
from jobs.bench_grpo import ratio_lines, summarize
from jobs.bench_grpo_worker import ours_config


@pytest.mark.e2e
def test_bench_grpo_smoke_on_cpu(tmp_path, capsys):
    out = tmp_path / "bg.json"
    rc = bench_main(["grpo", "--cpu", "--preset", "tiny", "--prompts-per-step", "2", "--n", "2", "--max-tokens", "6",
                     "--steps", "2", "--warmup", "1", "--rank", "4", "--contenders", "ours,vllm",
                     "--workdir", str(tmp_path / "work"), "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads(out.read_text())
    ours = res["results"]["ours"]
    assert ours["ok"] and len(ours["steps"]) == 3 and ours["summary"]["timed_steps"] == 2
    assert all(s["step_s"] > 0 and s["rollout_tokens_per_s"] > 0 and s["learner_tokens_per_s"] > 0 for s in ours["steps"])
    assert ours["settings"]["backend"] == "hf" and len(ours["reward_curve"]) == 3
    assert res["results"]["vllm"] == {"contender": "vllm", "ok": False, "error": "plain vLLM needs a GPU"}
    assert re.search(r"\| ours \| [0-9.]+ \|", text) and "plain vLLM needs a GPU" in text
    # the random preset's tokenizer covers the model's vocabulary (every sampled id decodes)
    cfg = json.loads((tmp_path / "work" / "model" / "config.json").read_text())
    from kernels.tokenizer import load_tokenizer

    assert len(load_tokenizer(str(tmp_path / "work" / "model"))) >= cfg["vocab_size"]


def test_ours_runs_the_shared_settings():
    from jobs.config import build
    from jobs.grpo import GRPOJobConfig

    spec = {"run_dir": "/tmp/x", "warmup": 2, "steps": 5, "seed": 0, "device": "cuda", "gpu_share": 0.5,
            "model_dir": "/tmp", "gradient_checkpointing": True, "rank": 32, "prompts": __file__, "system_prompt": "",
            "n": 8, "max_tokens": 256, "fixed_length": True, "sync": "merged", "gpu_memory_utilization": 0.3,
            "max_model_len": 1024, "prompts_per_step": 64, "lr": 1e-5}
    cfg = build(GRPOJobConfig, ours_config(spec))
    g, r = cfg.grpo, cfg.rollout
    assert (g.kl_coef, g.log_kl, g.loss_agg, g.ppo_epochs, g.num_minibatches, g.dynamic_sampling) == \
        (0.0, False, "token-mean", 1, 1, False)
    assert (g.eps_low, g.eps_high, g.prompts_per_step, g.lr) == (0.2, 0.28, 64, 1e-5)
    assert (r.backend, r.n, r.max_tokens, r.ignore_eos, r.enforce_eager, r.num_gpus + g.num_gpus) == \
        ("vllm", 8, 256, True, False, 1.0)
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.max_steps, cfg.eval.enabled) == (32, 64, 7, False)


def _res(step_s, rollout, n_warm=1):
    steps = [{"step_s": 99.0, "rollout_tokens_per_s": 1.0}] * n_warm + \
            [{"step_s": s, "rollout_tokens_per_s": t} for s, t in zip(step_s, rollout)]
    return summarize({"ok": True, "steps": steps}, n_warm)


def test_summary_medians_skip_the_warmup_and_ratios_read_them():
    ours, trl, plain = _res([2.0, 3.0, 4.0], [900, 1000, 1100]), _res([7.0, 8.0, 9.0], [500, 600, 700]), \
        _res([1.0, 1.0, 1.0], [1200, 1250, 1300])
    assert ours["summary"]["step_s"] == 3.0 and ours["summary"]["timed_steps"] == 3
    lines = ratio_lines({"ours": ours, "trl": trl, "vllm": plain})
    assert lines == ["ratio grpo step time trl/ours: 2.67", "rollout tokens/s ÷ plain vllm: 0.80",
                     "trl rollout tokens/s ÷ plain vllm: 0.48"]
    assert ratio_lines({"ours": ours, "trl": {"ok": False, "error": "x"}}) == []


def test_bench_grpo_rejects_bad_arguments():
    for bad in (["--n", "1"], ["--contenders", "ours,openrlhf"], ["--model", "/no/such/model"],
                ["--gpu-share", "1.0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            bench_main(["grpo", *bad])
