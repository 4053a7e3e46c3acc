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


def test_gpu_busy_is_the_union_of_kernel_intervals():
    """--profile's host-bound measure: overlapping kernels count once, gaps are counted, CPU events ignored."""
    from types import SimpleNamespace

    import torch

    from jobs.bench_worker import _gpu_busy

    def ev(start, end, dev=torch.autograd.DeviceType.CUDA):
        return SimpleNamespace(device_type=dev, time_range=SimpleNamespace(start=start, end=end))

    prof = SimpleNamespace(events=lambda: [ev(0, 1000), ev(500, 1500), ev(3000, 4000),
                                           ev(1500, 9000, torch.autograd.DeviceType.CPU), ev(4000, 5000)])
    got = _gpu_busy(prof, steps=1)
    assert got == {"gpu_busy_ms_per_step": 3.5, "gpu_span_ms_per_step": 5.0, "gpu_idle_gaps_per_step": 1}
    assert _gpu_busy(SimpleNamespace(events=lambda: []), steps=2) == {}
