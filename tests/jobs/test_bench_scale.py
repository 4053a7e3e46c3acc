"""posttrain bench-scale: run specs, the medians it reports and the scaling line."""
from __future__ import annotations

import pytest

from jobs.bench_scale import parse_runs, scaling_lines, summarize, table


def test_parse_runs_and_its_errors():
    assert parse_runs("ddp:lora:1, zero3:full:2") == [("ddp", "lora", 1), ("zero3", "full", 2)]
    for bad, msg in [("ddp:lora", "expected STRATEGY:FINETUNE:WORKERS"), ("fsdp:lora:2", "strategy 'fsdp'"),
                     ("ddp:prefix:2", "finetune 'prefix'"), ("ddp:lora:0", "workers must be a positive"),
                     ("", "no runs")]:
        with pytest.raises(ValueError, match=msg):
            parse_runs(bad)


def _metrics(rates):
    return [{"step": i + 1, "tokens_per_s": r, "step_time_s": 1.0 / r, "loss": 10.0 - i, "peak_mem_gib": 1.0 + i}
            for i, r in enumerate(rates)]


def test_summarize_leaves_out_warmup_steps():
    s = summarize(_metrics([1.0, 2.0, 100.0, 110.0, 120.0]), warmup=2)
    assert s["tokens_per_s"] == 110.0
    assert s["peak_mem_gib"] == 5.0 and s["first_loss"] == 10.0 and s["last_loss"] == 6.0


def test_scaling_line_compares_with_the_one_worker_run_of_the_same_mode():
    results = [{"strategy": "ddp", "finetune": "lora", "workers": 1, "ok": True, "tokens_per_s": 100.0},
               {"strategy": "ddp", "finetune": "lora", "workers": 2, "ok": True, "tokens_per_s": 196.0},
               {"strategy": "ddp", "finetune": "full", "workers": 2, "ok": True, "tokens_per_s": 150.0},
               {"strategy": "zero2", "finetune": "lora", "workers": 2, "ok": True, "tokens_per_s": 190.0}]
    assert scaling_lines(results) == ["ddp scaling 2 gpus: 1.96x (lora)"]
    assert results[1]["scaling"] == pytest.approx(1.96)
    failed = [{"strategy": "ddp", "finetune": "lora", "workers": 1, "ok": False, "error": "boom"}]
    assert "failed: boom" in table(failed)
