"""Fixtures of the jobs' tests that run a job's main in-process."""
from __future__ import annotations

import pytest

import jobs.grpo
import jobs.sft


@pytest.fixture
def no_run(monkeypatch):
    """The jobs' work, replaced: a test that reaches it records the config (or fails, see
    sft_cli.stderr_line)."""
    ran = []
    monkeypatch.setattr(jobs.sft, "run_sft", lambda cfg, task="sft": ran.append(cfg) or {})
    monkeypatch.setattr(jobs.grpo, "run_grpo", lambda cfg: ran.append(cfg) or {})
    import cluster.ray_session  # a passing main would install its SIGINT/SIGTERM handlers in pytest

    monkeypatch.setattr(cluster.ray_session, "stop_on_signals", lambda: None, raising=False)
    monkeypatch.setattr(jobs.sft, "stop_on_signals", lambda: None, raising=False)
    return ran
