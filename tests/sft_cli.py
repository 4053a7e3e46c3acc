"""`posttrain sft` of the tiny config in a subprocess on local Ray, for the e2e tests (tests/ is on
sys.path: its conftest.py lives there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SFT = os.path.join(ROOT, "jobs", "configs", "tiny-sft.yaml")


def sft_env() -> dict:
    """The environment of a CLI run: the repo importable, Ray Train v2, a fresh local Ray."""
    env = dict(os.environ, RAY_TRAIN_V2_ENABLED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RAY_ADDRESS", None)
    return env


def sft_command(out_dir: str, args=()) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "sft", TINY_SFT, f"output_dir={out_dir}", *args]


def read_metrics(out_dir: str) -> list[dict]:
    """The rows of OUT/metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_sft(out_dir: str, args=(), timeout: float = 900) -> tuple[list[dict], str]:
    """Run `python -m jobs.cli sft tiny-sft.yaml output_dir=OUT *args`; assert it succeeds.
    Returns (the rows of OUT/metrics.jsonl, its stdout + stderr)."""
    proc = subprocess.run(sft_command(out_dir, args), cwd=ROOT, env=sft_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_metrics(out_dir), proc.stdout + proc.stderr


def stderr_line(capsys) -> str:
    """The one line a job's main wrote on stderr (a config or preflight error), no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
