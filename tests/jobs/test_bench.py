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
    ratio = by_peer["ours"]["tokens_per_s"] / by_peer["hf"]["tokens_per_s"]
    assert f"ratio tokens/s ours/hf: {ratio:.2f}" in proc.stdout
    assert report["ratios"]["hf"]["ratio"] == pytest.approx(ratio)
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


def test_rounds_give_the_median_the_largest_peak_and_per_round_ratios():
    """--rounds: tokens/s the median of the rounds, memory the worst, ratios of the medians and round by
    round; a failed round makes the contender not ok and says how many failed."""
    from types import SimpleNamespace

    from jobs.bench import _combine_rounds, _ratio_lines, _ratios, _table

    def run(tps, peak, loss=1.0):
        return {"ok": True, "tokens_per_s": tps, "peak_gib": peak, "final_loss": loss, "losses": [loss]}

    ours = _combine_rounds([run(100.0, 3.0), run(120.0, 3.5), run(90.0, 3.2)])
    peer = _combine_rounds([run(80.0, 4.0), run(60.0, 4.0), run(100.0, 4.1)])
    assert ours["ok"] and ours["tokens_per_s"] == 100.0 and ours["peak_gib"] == 3.5
    assert [r["tokens_per_s"] for r in ours["rounds"]] == [100.0, 120.0, 90.0]
    assert _combine_rounds([run(1.0, 1.0), run(3.0, 1.0)])["tokens_per_s"] == 2.0  # even count: the middle two

    q = _ratios({"ours": ours, "unsloth": peer})["unsloth"]
    assert q["ratio"] == pytest.approx(100.0 / 80.0)
    assert q["per_round"] == pytest.approx([100 / 80, 120 / 60, 90 / 100])

    broken = _combine_rounds([run(80.0, 4.0), {"ok": False, "error": "exit code 1: CUDA error"}])
    assert not broken["ok"] and broken["error"].startswith("1 of 2 rounds failed: exit code 1")
    assert broken["tokens_per_s"] == 80.0  # the rounds that finished are still shown
    assert _ratios({"ours": ours, "x": broken})["x"]["per_round"] == pytest.approx([100 / 80])
    assert not _combine_rounds([{"ok": False, "error": "not installed"}])["ok"]
    results = {"ours": ours, "unsloth": peer, "x": broken}
    assert _ratio_lines(_ratios(results), results, 3) == [
        "ratio tokens/s ours/unsloth: 1.25 (per round: 1.25, 2.00, 0.90)",
        "ratio tokens/s ours/x: 1.25 (per round: 1.25) (not every round finished)"]

    table = _table({"ours": ours, "unsloth": peer, "x": broken}, SimpleNamespace(rounds=3, warmup=1, steps=2))
    assert "| ours | 100 | 100 / 120 / 90 | 1.00× |" in table
    assert "| unsloth | 80 | 80 / 60 / 100 | 1.25× |" in table
    assert "| x | 80 | 80 / failed | - |" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())


def test_bench_refuses_rounds_below_one_and_with_max_seq():
    for extra, msg in ((["--rounds", "0"], "--rounds 0: expected 1 or more"),
                       (["--rounds", "2", "--max-seq"], "--rounds applies to the timed runs")):
        proc = subprocess.run([sys.executable, "-m", "jobs.bench", "sft", "--device", "cpu", *extra], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and msg in proc.stderr
