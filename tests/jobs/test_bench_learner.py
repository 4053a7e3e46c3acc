"""`posttrain bench learner` on the tiny preset, CPU: both contenders run and the ratio line agrees
with the JSON."""
from __future__ import annotations

import json
import re

import pytest

from jobs.bench import main as bench_main


def test_bench_learner_smoke(tmp_path, capsys):
    out = tmp_path / "bl.json"
    rc = bench_main(["learner", "--preset", "tiny", "--cpu", "--seq", "32", "--prompt", "12", "--samples", "8",
                     "--tokens", "128", "--steps", "1", "--warmup", "0", "--rank", "4", "--gc", "false",
                     "--contenders", "sft,learner", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    by = {r["contender"]: r for r in res["results"]}
    assert set(by) == {"sft", "learner"} and all(r["tokens_per_s"] > 0 for r in by.values())
    assert by["learner"]["tokens_per_step"] == 8 * 32
    m = re.search(r"grpo learner tokens/s ÷ sft tokens/s: ([0-9.]+)", text)
    assert m and float(m.group(1)) == pytest.approx(res["ratios"]["learner"], abs=0.006)


def test_bench_learner_rejects_bad_lengths():
    with pytest.raises(SystemExit):
        bench_main(["learner", "--preset", "tiny", "--seq", "16", "--prompt", "16"])
    with pytest.raises(SystemExit):
        bench_main(["learner", "--contenders", "sft,trl"])
