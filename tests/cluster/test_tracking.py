"""cluster/tracking.py through RunFiles (as the jobs use it): report_to=[tensorboard, mlflow] leaves
TensorBoard events and an MLflow run with every metric and the config, read back here; resume
purges the interrupted steps; W&B offline writes its run under OUTPUT_DIR (when installed); bad
names and missing packages are config errors naming report_to."""
from __future__ import annotations

import glob
import time
import json
import math
import os

import pytest

from cluster.run_files import RunFiles, check_config_unchanged
from cluster.tracking import Tracker, check_report_to

CONFIG = {"output_dir": "runs/x", "max_steps": 5, "trainer": {"lr": 3e-3, "num_workers": 2},
          "model": {"lora": {"target_modules": "all-linear", "r": 16}}, "report_to": ["tensorboard", "mlflow"]}


def _rows(n=5):
    return [{"step": s, "epoch": 0, "loss": 3.0 / s, "lr": 1e-3, "grad_norm": math.nan if s == 2 else 0.5 * s,
             "reward/math_answer/mean": 0.1 * s, "reward/my.mod:fn[1]/mean": 1.0, "early_stopped": False,
             "phase": "train"} for s in range(1, n + 1)]


@pytest.fixture
def mlflow_env(monkeypatch):
    """No MLflow settings from the environment; what the tracker sets is undone after the test."""
    pytest.importorskip("mlflow")
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(k, "")  # recorded, so the teardown restores the variable as it was
        monkeypatch.delenv(k)


def _events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    return acc


def _mlflow_runs(out):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri="file://" + os.path.join(out, "mlruns"))
    exp = client.get_experiment_by_name("ray-posttrain")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def test_tensorboard_and_mlflow_read_back(tmp_path, mlflow_env, capsys):
    out = str(tmp_path / "run")
    files = RunFiles(out)
    files.start_tracking(["tensorboard", "mlflow"], config=CONFIG)
    for r in _rows():
        files.log_metrics(r)
    report = files.finish()
    assert report == os.path.join(out, "report.png") and os.path.getsize(report) > 10_000
    assert "grad_norm is nan; not sent to tensorboard, mlflow" in capsys.readouterr().out
    assert files.read_metrics()[1]["grad_norm"] == "nan"  # metrics.jsonl keeps it

    acc = _events(out)
    scalars = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "epoch", "reward/math_answer/mean", "early_stopped"} <= scalars
    assert not {"phase", "step", "time"} & scalars  # strings and axes are not series
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")] == [(s, round(3.0 / s, 6)) for s in range(1, 6)]
    assert [e.step for e in acc.Scalars("grad_norm")] == [1, 3, 4, 5]  # the NaN step left out
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "trainer:\n  lr: 0.003" in text  # the config as YAML text
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = acc.PluginTagToContent("hparams")
    hp = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert hp["trainer.lr"].number_value == pytest.approx(3e-3) and hp["model.lora.r"].number_value == 16
    assert hp["model.lora.target_modules"].string_value == "all-linear"

    client, runs = _mlflow_runs(out)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in hist] == [(s, round(3.0 / s, 6)) for s in range(1, 6)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/math_answer/mean")] == [1, 2, 3, 4, 5]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "grad_norm")] == [1, 3, 4, 5]
    # a name MLflow refuses ("[", "]") is logged under an accepted one
    assert len(client.get_metric_history(run.info.run_id, "reward/my.mod:fn_1_/mean")) == 5
    params = run.data.params
    assert params["trainer.lr"] == "0.003" and params["model.lora.r"] == "16"
    assert json.loads(params["report_to"]) == ["tensorboard", "mlflow"]


def test_resume_purges_tensorboard_and_opens_a_new_mlflow_run(tmp_path, mlflow_env):
    out = str(tmp_path / "run")
    files = RunFiles(out)
    files.start_tracking(["tensorboard", "mlflow"], config=CONFIG)
    for r in _rows(5):
        files.log_metrics(r)
    from cluster import tracking

    files.tracker.backends[0].writer.flush()
    tracking._OPEN.discard(files.tracker)  # killed: never closed (atexit would mark the MLflow run FAILED)
    files.tracker = None

    files = RunFiles(out)  # resumed from the checkpoint of step 3
    files.truncate_metrics_after(3)
    files.start_tracking(["tensorboard", "mlflow"], config=CONFIG, start_step=3)
    for r in _rows(6)[3:]:
        files.log_metrics({**r, "loss": 10.0 + r["step"]})
    files.finish(report=False)

    losses = [(e.step, e.value) for e in _events(out).Scalars("loss")]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]  # steps 4-5 of the first attempt purged
    assert [v for s, v in losses if s > 3] == [14.0, 15.0, 16.0]
    _, runs = _mlflow_runs(out)
    assert len(runs) == 2 and runs[1].data.tags["resumed_from_step"] == "3"
    assert runs[1].info.status == "FINISHED"

    files.truncate_metrics_after(0)  # a restart from scratch (no checkpoint): only its own steps show
    files.start_tracking(["tensorboard"], start_step=0)
    files.log_metrics({"step": 1, "loss": 7.0})
    files.finish(report=False)
    assert [(e.step, e.value) for e in _events(out).Scalars("loss")] == [(1, 7.0)]


def test_wandb_offline_run_under_output_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    out = str(tmp_path / "run")
    files = RunFiles(out)
    files.start_tracking(["wandb"], config=CONFIG)
    for r in _rows(3):
        files.log_metrics(r)
    files.finish(report=False)
    (run_file,) = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    # the records are protobuf: the metric names and config keys appear as they are. wandb's own
    # service process writes the file and may still be flushing when finish() returns (seen on a
    # loaded CI machine: the header only), so the file is read until the records are there.
    want = (b"loss", b"reward/math_answer/mean", b"num_workers")
    deadline = time.monotonic() + 60
    while True:
        data = open(run_file, "rb").read()
        if all(w in data for w in want) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(w in data for w in want), data[:200]


def test_a_failing_backend_is_turned_off_and_the_run_goes_on(tmp_path, capsys):
    out = str(tmp_path / "run")
    files = RunFiles(out)
    tracker = files.start_tracking(["tensorboard"])

    def broken(step, values, wall):
        raise OSError("disk full")

    tracker.backends[0].log = broken
    for r in _rows(3):
        files.log_metrics(r)
    assert "tensorboard: logging metrics failed at step 1 (OSError: disk full)" in capsys.readouterr().out
    assert tracker.names == [] and len(files.read_metrics()) == 3
    files.finish(report=False)


def test_no_report_to_no_tracker(tmp_path):
    files = RunFiles(str(tmp_path / "run"))
    assert files.start_tracking([], config=CONFIG) is None
    files.log_metrics({"step": 1, "loss": 1.0})
    assert files.finish(report=False) is None
    assert os.listdir(files.output_dir) == ["metrics.jsonl"]
    with Tracker([], files.output_dir) as t:  # a tracker of nothing does nothing
        t.log_metrics(1, {"loss": 1.0})


def test_unknown_or_missing_tracker_is_a_config_error(monkeypatch, capsys):
    from jobs.config import ConfigError, load
    from jobs.grpo_config import GRPOJobConfig
    from jobs.preflight import check_tracking, run
    from jobs.sft import SFTJobConfig

    with pytest.raises(ConfigError, match=r"report_to\[1\]: 'tensorbord' is not accepted.*did you mean 'tensorboard'"):
        load(SFTJobConfig, None, ["report_to=[mlflow, tensorbord]"])
    with pytest.raises(ConfigError, match="report_to: expected a list"):
        load(GRPOJobConfig, None, ["report_to=wandb"])
    assert load(GRPOJobConfig, None, ["report_to=[tensorboard, wandb]"]).report_to == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="report_to: 'neptune' is not a tracker; expected a list of tensorboard"):
        SFTJobConfig(report_to=["neptune"])

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ValueError, match=r"report_to: 'mlflow' needs the Python package 'mlflow-skinny', which is "
                                         r"not installed \(pip install mlflow-skinny"):
        check_report_to(["tensorboard", "mlflow"])
    assert run(check_tracking, ["tensorboard", "mlflow"]) == 2
    assert capsys.readouterr().err.startswith("preflight: report_to: 'mlflow' needs the Python package 'mlflow-skinny'")
    assert run(check_tracking, ["tensorboard"]) == 0


def test_report_to_may_change_on_resume():
    from jobs.grpo import RESUME_SAFE_KEYS as GRPO_SAFE
    from jobs.sft import RESUME_SAFE_KEYS as SFT_SAFE

    for safe in (SFT_SAFE, GRPO_SAFE):
        check_config_unchanged({**CONFIG, "report_to": []}, CONFIG, safe, output_dir="runs/x", force=False,
                               force_key="resume", tag="t")
