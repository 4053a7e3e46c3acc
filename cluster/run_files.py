"""The files every run writes into its output_dir: config.yaml, metrics.jsonl, summary.json.

metrics.jsonl holds one JSON object per optimizer step. On resume from step S the lines after S
are dropped first, so a resumed run has no repeated or lost steps.

config.yaml is the config the run's checkpoints were trained with: before a resume the job compares
it with the new one (`config_changes`) and refuses a change of a training-relevant key.

`start_tracking(report_to, config)` sends each metrics record, as it is written, to TensorBoard /
MLflow / W&B as well (cluster.tracking); `finish()` closes them and draws report.png (cluster.report).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Iterable

import yaml


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, current: dict, allowed: Iterable[str] = ()) -> list[str]:
    """'key: old -> new' for each dotted key whose value differs between two configs (as written to
    config.yaml), leaving out the keys in `allowed` and everything under an allowed section
    ("eval" allows "eval.max_problems"). A key only one side has (a field added since) is no change."""
    allowed = tuple(allowed)
    # through YAML, so both sides compare as config.yaml holds them (tuples as lists, ...)
    old = _flatten(yaml.safe_load(yaml.safe_dump(saved)) or {})
    new = _flatten(yaml.safe_load(yaml.safe_dump(current)) or {})
    out = []
    for key in sorted(old.keys() & new.keys()):
        if any(key == a or key.startswith(a + ".") for a in allowed):
            continue
        if old[key] != new[key]:
            out.append(f"{key}: {old[key]!r} -> {new[key]!r}")
    return out


class RunFiles:
    def __init__(self, output_dir: str):
        self.output_dir = os.path.abspath(output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        self.metrics_path = os.path.join(self.output_dir, "metrics.jsonl")
        self.summary_path = os.path.join(self.output_dir, "summary.json")
        self.tracker = None  # cluster.tracking.Tracker, from start_tracking on

    def path(self, *parts: str) -> str:
        return os.path.join(self.output_dir, *parts)

    def log_metrics(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        record.setdefault("time", time.time())
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:  # live: the same record, as it is written
            self.tracker.log_metrics(record.get("step"), record)

    def start_tracking(self, report_to, config=None, start_step: int = 0):
        """From now on every log_metrics record also goes to the trackers named in `report_to`
        (tensorboard | mlflow | wandb; cluster.tracking), and `config` (a dict or a config dataclass)
        is logged once now. start_step: the step a resumed run continues from. Nothing when empty."""
        self.finish_tracking()
        if not report_to:
            return None
        from cluster.tracking import Tracker

        self.tracker = Tracker(report_to, self.output_dir, start_step=start_step)
        if config is not None:
            self.tracker.log_config(config)
        return self.tracker

    def finish_tracking(self, status: str = "FINISHED") -> None:
        """Flush and close the trackers, if any (status FINISHED | FAILED | KILLED)."""
        if self.tracker is not None:
            self.tracker.close(status)
            self.tracker = None

    def finish(self, report: bool = True) -> str | None:
        """The end of a run: the trackers closed, then (report=True) OUTPUT_DIR/report.png drawn from
        metrics.jsonl (cluster.report); returns its path (None: no report). A report that cannot be
        drawn is one warning line, not a failed run."""
        self.finish_tracking()
        if not report or not os.path.exists(self.metrics_path):
            return None
        from cluster.report import write_report

        try:
            # tensorboard=False: OUTPUT_DIR/tensorboard belongs to the live tracker (report_to)
            return write_report(self.output_dir, tensorboard=False)["png"]
        except Exception as e:  # noqa: BLE001 - the run's results are already on disk
            print(f"[report] warning: report.png not written ({type(e).__name__}: {e})", flush=True)
            return None

    def read_metrics(self) -> list[dict]:
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_metrics_after(self, step: int) -> None:
        """Keep only records with step <= `step` (resume point)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.metrics_path)

    def read_config(self) -> dict | None:
        """The run's config.yaml as a dict, or None when there is none (or it does not parse)."""
        path = self.path("config.yaml")
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None

    def write_summary(self, summary: dict) -> None:
        existing = self.read_summary()
        existing.update({k: _clean(v) for k, v in summary.items()})
        tmp = self.summary_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(existing, f, indent=2, default=str)
        os.replace(tmp, self.summary_path)

    def read_summary(self) -> dict:
        if not os.path.exists(self.summary_path):
            return {}
        with open(self.summary_path) as f:
            return json.load(f)


def check_config_unchanged(saved: dict | None, current: dict, allowed: Iterable[str], *, output_dir: str,
                           force: bool, force_key: str, tag: str) -> None:
    """Resuming: refuse (ValueError, one line listing 'key: old -> new') when the config the
    checkpoints were trained with (`saved`, config.yaml) differs from `current` outside `allowed`;
    with `force` say so and go on. `force_key` is the setting that forces (named in the message)."""
    changes = config_changes(saved, current, allowed) if saved is not None else []
    if not changes:
        return
    if force:
        print(f"[{tag}] {force_key}=force: resuming with a changed config ({'; '.join(changes)})", flush=True)
        return
    raise ValueError(f"output_dir {output_dir}: its checkpoints were trained with another config "
                     f"({'; '.join(changes)}); re-run with the same values, choose a new output_dir, "
                     f"or add {force_key}=force to resume with the new ones")
