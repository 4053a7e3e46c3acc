"""cluster/report.py: report.png for SFT-like and GRPO-like runs, TensorBoard events, Ray gauges."""
from __future__ import annotations

import math
import os

import pytest

from cluster.report import PANELS, _panel_keys, plot_metrics, write_report
from cluster.run_files import RunFiles


def _sft_rows(n=60):
    rows = []
    for s in range(1, n + 1):
        r = {"step": s, "epoch": 0, "loss": 3.0 * math.exp(-s / 20) + 0.1, "lr": 1e-3 * min(1, s / 5),
             "grad_norm": 1.0 / s, "tokens_per_s": 900.0 + s, "target_tokens": 100}
        if s % 20 == 0:
            r["eval_loss"] = r["loss"] + 0.05
        rows.append(r)
    return rows


def _grpo_rows(n=12):
    return [{"step": s, "loss": 0.01 * s, "reward_mean": 0.1 * s, "reward/math_answer/mean": 0.05 * s,
             "reward/format/mean": 0.5, "kl": 0.001 * s, "response_length": 20 + s, "accuracy": 0.05 * s,
             "lr": 1e-6, "grad_norm": "nan" if s == 3 else 0.5, "phase": "train"} for s in range(1, n + 1)]


def _write(tmp_path, rows, name):
    d = tmp_path / name
    files = RunFiles(str(d))
    for r in rows:
        files.log_metrics(r)
    return str(d)


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return acc


def test_sft_report(tmp_path):
    d = _write(tmp_path, _sft_rows(), "sft")
    out = write_report(d)
    assert out["steps"] == 60
    png = os.path.join(d, "report.png")
    assert out["png"] == png and os.path.getsize(png) > 10_000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    acc = _scalars(out["tensorboard"])
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"} <= tags
    assert [e.step for e in acc.Scalars("eval_loss")] == [20, 40, 60]
    assert len(acc.Scalars("loss")) == 60
    # writing again replaces the events instead of doubling them
    write_report(d)
    assert len(_scalars(out["tensorboard"]).Scalars("loss")) == 60


def test_grpo_report_panels_and_tensorboard(tmp_path):
    rows = _grpo_rows()
    keys = sorted({k for r in rows for k in r})
    reward = next(p for p in PANELS if p.title == "Reward")
    assert _panel_keys(reward, keys) == ["reward_mean", "reward/format/mean", "reward/math_answer/mean"]
    d = _write(tmp_path, rows, "grpo")
    out = write_report(d)
    assert os.path.getsize(out["png"]) > 10_000
    tags = set(_scalars(out["tensorboard"]).Tags()["scalars"])
    assert {"reward/math_answer/mean", "reward/format/mean", "kl", "response_length", "accuracy"} <= tags
    assert "phase" not in tags  # strings are not metrics


def test_panels_skip_absent_keys(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    made = {}
    real = plt.subplots

    def spy(nrows, ncols, **kw):
        made["shape"] = (nrows, ncols)
        return real(nrows, ncols, **kw)

    monkeypatch.setattr(plt, "subplots", spy)
    assert plot_metrics([{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}], str(tmp_path / "a.png"))
    assert made["shape"] == (1, 1)
    assert plot_metrics(_sft_rows(10), str(tmp_path / "b.png"))
    assert made["shape"] == (2, 2)  # loss, lr, grad norm, tokens/s
    assert plot_metrics([{"step": 1, "note": "x"}], str(tmp_path / "c.png")) is None


def test_report_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        write_report(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        write_report(str(tmp_path / "empty"))
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert write_report(str(tmp_path / "empty"))["png"] is None


def test_smoothing_is_centred_and_does_not_lag():
    from cluster.report import _smooth

    ys = [100.0 - i for i in range(50)]  # a steadily falling loss
    sm = _smooth(ys, 9)
    assert sm[25] == pytest.approx(ys[25])  # a centred mean of a straight line is the line
    assert sm[0] == pytest.approx(sum(ys[:5]) / 5)  # ends use what is there
    assert _smooth([1.0, float("nan"), 3.0], 3)[1] == pytest.approx(2.0)


def test_grpo_reward_keys_are_split_by_kind():
    keys = ["reward/mean", "reward/std", "reward/train_mean", "reward/math_answer/mean", "reward/math_answer/std",
            "reward/math_answer/failures", "reward/math_answer/timeouts", "time/reward_s"]
    by_title = {p.title: _panel_keys(p, keys) for p in PANELS}
    assert by_title["Reward"] == ["reward/mean", "reward/train_mean", "reward/math_answer/mean"]
    assert by_title["Reward spread"] == ["reward/std", "reward/math_answer/std"]
    assert by_title["Reward failures"] == ["reward/math_answer/failures", "reward/math_answer/timeouts"]
