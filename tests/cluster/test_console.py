"""The console (issue 17): progress bars on a terminal, ~10 plain lines per phase elsewhere, a line per
update with --verbose; metrics.jsonl followed from the driver; Ray's own output kept off the console
(the ray.init options chosen, the filter of forwarded worker lines, the driver's Ray loggers)."""
from __future__ import annotations

import io
import json
import logging
import os

import pytest

from cluster import console, ray_session


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class FakeFile(io.StringIO):
    def isatty(self):
        return False


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.fixture(autouse=True)
def quiet_console():
    """Every test starts with the default console (quiet, stdout) and leaves it so."""
    console.configure(verbose=False)
    yield
    console.close_all()
    console.configure(verbose=False)


def _lines(stream) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def test_off_a_terminal_a_phase_prints_a_line_per_tenth_with_eta():
    out, clock = FakeFile(), Clock()
    bar = console.Progress("[train] step", 120, stream=out, clock=clock)
    for step in range(1, 121):
        clock.t += 2.0
        bar.update(step, f"loss {1 / step:.3f}")
    bar.close()
    lines = _lines(out)
    assert len(lines) == 10                                          # 12, 24, ..., 120
    assert lines[0].startswith("[train] step 12/120  loss 0.083  [0:24 elapsed, ETA 3:36]")
    assert lines[-1].startswith("[train] step 120/120  loss 0.008  [4:00 elapsed]")  # no ETA at the end
    assert "\r" not in out.getvalue()


def test_off_a_terminal_a_long_silence_gets_a_line_and_an_early_stop_its_last_line():
    out, clock = FakeFile(), Clock()
    bar = console.Progress("[grpo] step", 1000, stream=out, clock=clock)
    bar.update(1)
    clock.t = console.MAX_SILENCE_S + 1
    bar.update(2, "slow")                                            # no tenth crossed, but 5 minutes passed
    bar.update(3)
    bar.close()                                                      # stopped at 3 (e.g. early stopping)
    assert [line.split("  [")[0] for line in _lines(out)] == ["[grpo] step 2/1000  slow", "[grpo] step 3/1000"]


def test_a_resumed_phase_counts_from_its_start_and_lines_false_prints_nothing():
    out = FakeFile()
    bar = console.Progress("[train] step", 100, initial=40, stream=out)
    for step in range(41, 101):
        bar.update(step)
    bar.close()
    assert [line.split()[2] for line in _lines(out)] == [f"{n}/100" for n in range(50, 101, 10)]
    quiet = FakeFile()
    stages = console.Progress("[sft] data", 5, unit="stage", lines=False, stream=quiet)
    for i in range(6):
        stages.update(i, "read")
    stages.close()
    assert quiet.getvalue() == ""


def test_verbose_prints_a_line_per_update():
    console.configure(verbose=True)
    out = FakeFile()
    bar = console.Progress("[grpo] step", 20, stream=out)
    for step in range(1, 21):
        bar.update(step, "reward 0.5")
    bar.close()
    assert len(_lines(out)) == 20


def test_on_a_terminal_one_bar_redrawn_in_place_with_its_fields(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    out = FakeTerminal()
    bar = console.Progress("[grpo] step", 20, stream=out)
    for step in range(1, 21):
        bar.update(step, "reward 0.500  kept 8/8")
    bar.close()
    text = out.getvalue()
    assert text.count("\n") <= 1 and "\r" in text                  # one line, redrawn with \r
    assert "20/20" in text and "reward 0.500  kept 8/8" in text
    console.configure(verbose=True)                                  # --verbose: lines, even on a terminal
    assert not console.bars_on(FakeTerminal())


def test_write_and_print_step_registry_reuse_one_bar():
    out = FakeFile()
    console.configure(stream=out)
    p = console.progress("grpo", "[grpo] step", 10, initial=4)
    assert console.progress("grpo", "[grpo] step", 10) is p          # the next step's call finds it
    p.update(10, "done")
    p.close()
    console.write("[train] resumed from step 4")
    assert _lines(out)[-1] == "[train] resumed from step 4" and "grpo" not in console._open


def test_grpo_print_step_off_a_terminal(monkeypatch):
    from jobs.grpo import print_step

    out = FakeFile()
    console.configure(stream=out)
    rec = {"reward/mean": 0.5, "accuracy": 0.5, "groups/kept": 8, "groups/total": 9, "response_length/mean": 12.0,
           "kl": 0.01, "clip_frac": 0.0, "time/rollout_s": 1.0, "time/reward_s": 0.1, "time/update_s": 1.2,
           "time/sync_s": 0.02, "time/other_s": 0.0}
    for step in range(1, 21):
        print_step({**rec, "step": step}, 20)
    lines = _lines(out)
    assert len(lines) == 10 and lines[-1].startswith("[grpo] step 20/20  reward 0.500  acc 0.500  kept 8/9")
    assert "| rollout 1.0s reward 0.1s update 1.2s sync 0.02s other 0.00s" in lines[-1]


def test_metrics_tail_reads_appends_waits_for_newlines_and_restarts_after_a_rewrite(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"step": 1}) + "\n")
    tail = console.MetricsTail(path)                                 # an earlier attempt's records: skipped
    assert tail.poll() == []
    with open(path, "a") as f:
        f.write(json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    assert tail.poll() == [{"step": 2}]
    with open(path, "a") as f:
        f.write('ss": 1.5}\nnot json\n')
    assert tail.poll() == [{"step": 3, "loss": 1.5}]
    tmp = path + ".tmp"                                              # a resume truncates with os.replace
    with open(tmp, "w") as f:
        f.write(json.dumps({"step": 1}) + "\n")
    os.replace(tmp, path)
    assert tail.poll() == [{"step": 1}]


def test_follow_metrics_moves_the_bar_from_the_file(tmp_path):
    from cluster.train import step_fields

    path = str(tmp_path / "metrics.jsonl")
    out = FakeFile()
    bar = console.Progress("[train] step", 4, stream=out)
    with console.follow_metrics(path, bar, step_fields, poll_s=0.01):
        with open(path, "a") as f:
            for step in range(1, 5):
                rec = {"step": step, "loss": 2.0 / step, "lr": 1e-3, "tokens_per_s": 1000.0}
                if step == 2:
                    rec["eval_loss"] = 1.25
                f.write(json.dumps(rec) + "\n")
    lines = _lines(out)
    assert lines and lines[-1].startswith("[train] step 4/4  loss 0.5000  eval_loss 1.2500  lr 1.00e-03  tok/s 1000")
    assert bar.closed


# ---------------------------------------------------------------------------------- Ray's output

def test_ray_init_options_quiet_and_verbose(monkeypatch):
    quiet = ray_session.ray_init_options(False, local=True, dashboard=True, filterable=True)
    assert quiet == {"log_to_driver": True, "configure_logging": False, "include_dashboard": True}
    # a Ray whose forwarded output cannot be filtered: none forwarded at all
    assert ray_session.ray_init_options(False, local=True, dashboard=False, filterable=False)["log_to_driver"] is False
    verbose = ray_session.ray_init_options(True, local=True, dashboard=False, filterable=False)
    assert verbose["log_to_driver"] is True and verbose["include_dashboard"] is False
    assert "include_dashboard" not in ray_session.ray_init_options(False, local=False, filterable=True)  # the cluster's
    monkeypatch.setenv("POSTTRAIN_DASHBOARD", "0")
    assert ray_session.dashboard_available() is False
    assert ray_session.ray_init_options(False, local=True, filterable=True)["include_dashboard"] is False
    monkeypatch.delenv("POSTTRAIN_DASHBOARD")
    assert ray_session.can_filter_worker_logs()                      # the pinned Ray's dispatcher is there


def test_forwarded_worker_output_keeps_only_the_projects_lines(monkeypatch):
    lines = ["[train] 2 worker(s) on cpu; 40 steps", "Reporting training result 3: TrainingReport(...)",
             "[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:2465: Actor with class name ...",
             "Exception in thread PlacementGroupCleanerMonitor:", "[tracking] tensorboard: logging metrics failed",
             "Starting execution of Dataset train_1_0. Full logs are in /tmp/ray/session/logs/ray-data",
             "[train] resumed from step 10 (/tmp/x)"]
    assert ray_session.forwarded_lines({"lines": lines}) == [lines[0], lines[4], lines[6]]

    from ray._private import ray_logging

    d = ray_logging.global_worker_stdstream_dispatcher
    monkeypatch.setattr(d, "handlers", list(d.handlers))            # the session's Ray keeps its own
    out = FakeFile()
    console.configure(stream=out)
    ray_session._forward_own_lines()
    assert [name for name, _ in d.handlers if name == ray_session._RAY_FORWARD_HANDLER] == []
    d.emit({"pid": 123, "ip": "127.0.0.1", "is_err": False, "lines": lines})
    assert _lines(out) == [lines[0], lines[4], lines[6]]


def test_quiet_ray_loggers_keep_errors_on_the_console_and_the_rest_in_files(tmp_path, monkeypatch):
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]:
        for h in logging.getLogger(name).handlers:                   # put back after the test
            monkeypatch.setattr(h, "level", h.level)
    ray_logger = logging.getLogger("ray")
    monkeypatch.setattr(ray_logger, "handlers", [])
    child = logging.getLogger("ray.posttrain_test")
    console_h, file_h = logging.StreamHandler(io.StringIO()), logging.FileHandler(str(tmp_path / "x.log"))
    monkeypatch.setattr(child, "handlers", [console_h, file_h])
    ray_session.quiet_ray_loggers()
    assert console_h.level == logging.ERROR and file_h.level == logging.NOTSET
    (added,) = ray_logger.handlers                                   # no last-resort printing of warnings
    assert added.level == logging.ERROR
    ray_session._driver_log_file(str(tmp_path / "driver.log"))
    ray_session._driver_log_file(str(tmp_path / "driver.log"))       # again (a second session): replaced
    assert len(ray_logger.handlers) == 2
    for h in ray_logger.handlers:
        h.close()
    file_h.close()


# ---------------------------------------------------------------------------------- --verbose

def test_verbose_flag_on_the_jobs_that_start_ray(monkeypatch, capsys):
    from jobs.config import UsageError, parse_job_args
    from jobs.demo import DemoConfig
    from jobs.sft import SFTJobConfig, parse_args

    assert parse_args(["--verbose", "max_steps=2"], "posttrain sft").verbose is True
    args = parse_args(["max_steps=2", "-v"], "posttrain sft")
    assert args.verbose is True and args.overrides == ["max_steps=2"] and not vars(args.options)
    assert parse_args(["max_steps=2"], "posttrain sft").verbose is False
    assert parse_job_args("posttrain demo", ["--verbose"], DemoConfig, config=False, verbose_option=True).verbose
    with pytest.raises(UsageError, match="--verbose"):               # a job that does not start Ray: no flag
        parse_job_args("posttrain eval", ["--verbose"], SFTJobConfig)

    import jobs.grpo
    import jobs.sft

    seen = []
    monkeypatch.setattr(jobs.sft, "preflight_sft", lambda cfg: 0)
    monkeypatch.setattr(jobs.sft, "run_sft", lambda cfg, task: seen.append(console.verbose()) or {})
    monkeypatch.setattr(jobs.sft, "stop_on_signals", lambda: None)
    assert jobs.sft.main(["max_steps=2", "--verbose"]) == 0 and jobs.sft.main(["max_steps=2"]) == 0
    monkeypatch.setattr(jobs.grpo, "preflight_grpo", lambda cfg: 0)
    monkeypatch.setattr(jobs.grpo, "run_grpo", lambda cfg: seen.append(console.verbose()) or {})
    import cluster.ray_session

    monkeypatch.setattr(cluster.ray_session, "stop_on_signals", lambda: None)
    assert jobs.grpo.main(["--verbose"]) == 0
    assert seen == [True, False, True]
    with pytest.raises(SystemExit):
        jobs.sft.main(["--help"])
    assert "--verbose" in capsys.readouterr().out
