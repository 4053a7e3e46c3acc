"""posttrain bench sft on CPU (the plumbing; GPU numbers are in docs/benchmarks.md): every
contender runs in its own process on the same model and batch, and our losses match
transformers+PEFT's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.e2e
def test_bench_sft_on_cpu_runs_ours_and_hf_with_matching_losses(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "jobs.bench", "sft", "--device", "cpu", "--preset", "tiny", "--seq", "64",
           "--batch", "2", "--steps", "3", "--warmup", "1", "--peers", "hf",
           "--profile", "--keep", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    by_peer = report["results"]
    assert by_peer["ours"]["ok"] and by_peer["hf"]["ok"]
    assert len(by_peer["ours"]["losses"]) == 4  # warmup + timed steps
    assert by_peer["ours"]["losses"] == pytest.approx(by_peer["hf"]["losses"], rel=1e-3)
    assert "MATCH" in proc.stdout
    # --profile: each contender's top kernels, in the JSON and as text
    top = by_peer["ours"]["profile"]["top"]
    assert top and all(e["ms_per_step"] > 0 for e in top)
    assert "ms/step" in (tmp_path / "work" / "profile-ours.txt").read_text()


def test_bench_refuses_an_unknown_peer():
    proc = subprocess.run([sys.executable, "-m", "jobs.bench", "sft", "--device", "cpu", "--peers", "hf,nosuch"],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "--peers: unknown nosuch" in proc.stderr
