"""Live experiment tracking: each metrics.jsonl record also goes, as it is written, to the trackers
a job names in `report_to` (tensorboard | mlflow | wandb), with its step; the config goes once.

    tracker = Tracker(["tensorboard", "mlflow"], "runs/sft")
    tracker.log_config(cfg)                 # a dict or a config dataclass
    tracker.log_metrics(12, {"loss": 1.3, "lr": 2e-4, "time": 1.7e9})
    tracker.close()

Jobs do not call this directly: `RunFiles.start_tracking(report_to, config, start_step)` makes one
and `RunFiles.log_metrics` feeds it (rank 0 of Ray Train for SFT/CPT, the GRPO driver).

Where each backend writes:
  tensorboard  OUTPUT_DIR/tensorboard (SummaryWriter; the config as text and as hparams). An attempt
               that resumes from step S (0: starts again) purges earlier attempts' events after S
               (purge_step), as metrics.jsonl drops its lines after S: each step shows once.
  mlflow       MLFLOW_TRACKING_URI when set, else a file store OUTPUT_DIR/mlruns (MLflow 3 keeps the
               file store behind MLFLOW_ALLOW_FILE_STORE, which is set here for that store only when
               unset); experiment MLFLOW_EXPERIMENT_NAME or "ray-posttrain"; run name = the output
               folder's name; the config as params (dotted keys) and as the artifact config.json.
  wandb        WANDB_MODE, WANDB_PROJECT (default "ray-posttrain") and WANDB_DIR (default OUTPUT_DIR)
               honoured; the run under OUTPUT_DIR/wandb; the config as the run's config.
A resumed run is a new MLflow / W&B run (tag / config `resumed_from_step`): their step axes cannot
go back, and the interrupted attempt's steps after the checkpoint stay visible there as they were.

Values: numbers (bools as 0/1) are logged; strings are not. A non-finite value (NaN, inf; written
to metrics.jsonl as a string) is not sent - the first time per key a line says so. A backend that
fails mid-run is turned off with one line naming it (metrics.jsonl keeps every step); one that
cannot start raises. The packages are imported only when their backend is used.
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import json
import math
import os
import re
import time

# name -> (module imported, package to install)
BACKENDS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
_NOT_METRICS = ("step", "time")  # the axes of a record, not series


def check_report_to(report_to, field: str = "report_to", installed: bool = True) -> None:
    """ValueError naming `field` for an unknown tracker name and (installed=True) for a tracker whose
    package is not installed here. Cheap: nothing is imported."""
    if isinstance(report_to, str):
        raise ValueError(f"{field}: expected a list (e.g. [tensorboard, mlflow]), got {report_to!r}")
    for name in report_to:
        if name not in BACKENDS:
            raise ValueError(f"{field}: {name!r} is not a tracker; expected a list of "
                             f"{', '.join(BACKENDS)}")
        module, package = BACKENDS[name]
        if installed and importlib.util.find_spec(module) is None:
            raise ValueError(f"{field}: {name!r} needs the Python package {package!r}, which is not installed "
                             f"(pip install {package}, or remove {name} from {field})")


def _scalar(v) -> float | None:
    """A metric value as a float (bools as 0/1; "nan"/"inf" strings as written by RunFiles), or None."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (TypeError, ValueError):
            return None
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(v)
    return None


def _config_dict(config) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return dict(config or {})


def _flat_params(config: dict) -> dict[str, object]:
    """Dotted keys -> int/float/bool/str values (lists and None as their JSON text)."""
    from cluster.run_files import _flatten

    out = {}
    for k, v in _flatten(config).items():
        out[k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
    return out


# ------------------------------------------------------------------------------------ backends

class _TensorBoard:
    name = "tensorboard"

    def __init__(self, output_dir: str, run_name: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.path.join(output_dir, "tensorboard")
        # an attempt that continues from step S (0: a restart from scratch) hides the events of
        # earlier attempts from S+1 on (purged), as metrics.jsonl drops its lines after S
        self.writer = SummaryWriter(log_dir=self.log_dir, flush_secs=10, purge_step=start_step + 1)
        self._hparams = False

    def log_config(self, config: dict, flat: dict) -> None:
        import yaml
        from torch.utils.tensorboard.summary import hparams

        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "```\n" + text + "```")  # markdown: keep the YAML's layout
        exp, ssi, _ = hparams(flat, {})
        self.writer.file_writer.add_summary(exp)
        self.writer.file_writer.add_summary(ssi)
        self._hparams = True
        self.writer.flush()

    def log(self, step: int, values: dict[str, float], wall: float) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step, walltime=wall)

    def close(self, status: str) -> None:
        if self._hparams and status == "FINISHED":  # the hparams view's run status: success
            from torch.utils.tensorboard.summary import hparams

            self.writer.file_writer.add_summary(hparams({}, {})[2])
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, output_dir: str, run_name: str, start_step: int):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or _file_uri(os.path.join(output_dir, "mlruns"))
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless this is set ("maintenance mode"); it still works
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "ray-posttrain"
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        tags = {"output_dir": output_dir}
        if start_step:
            tags["resumed_from_step"] = str(start_step)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        # a remote server answers each call over the network: queue the step's batch, do not wait
        # (set_terminated flushes the queue); a local file store is written as it comes
        self.sync = uri.startswith("file:") or "://" not in uri

    def log_config(self, config: dict, flat: dict) -> None:
        from mlflow.entities import Param

        params = [Param(_mlflow_key(k)[:250], str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, step: int, values: dict[str, float], wall: float) -> None:
        from mlflow.entities import Metric

        ms = int(wall * 1000)
        metrics = [Metric(_mlflow_key(k), v, ms, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=self.sync)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _mlflow_key(key: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . / : and spaces; no empty, "." or ".." part):
    other characters become "_" (a reward label may hold anything)."""
    key = re.sub(r"[^/\w.\- :]", "_", key)
    return "/".join(p for p in key.split("/") if p not in ("", ".", "..")) or "_"


def _file_uri(path: str) -> str:
    import pathlib

    return pathlib.Path(os.path.abspath(path)).as_uri()


class _WandB:
    name = "wandb"

    def __init__(self, output_dir: str, run_name: str, start_step: int):
        import wandb

        wdir = os.environ.get("WANDB_DIR") or output_dir
        os.makedirs(wdir, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "ray-posttrain", name=run_name,
                              dir=wdir, reinit="create_new",
                              config={"resumed_from_step": start_step} if start_step else None)

    def log_config(self, config: dict, flat: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, step: int, values: dict[str, float], wall: float) -> None:
        self.run.log(values, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}
_OPEN: "set[Tracker]" = set()  # not closed yet (held here, so that atexit still finds them)


def close_open_trackers(status: str = "FAILED") -> None:
    """Close every tracker of this process still open (a run that raised; at exit: FAILED)."""
    for t in list(_OPEN):
        t.close(status)


atexit.register(close_open_trackers)


# ------------------------------------------------------------------------------------ the tracker

class Tracker:
    """The trackers of one run. report_to: names (see BACKENDS); output_dir: the run's folder;
    run_name: default the folder's name; start_step: the step a resumed run continues from."""

    def __init__(self, report_to, output_dir: str, run_name: str | None = None, start_step: int = 0):
        check_report_to(report_to)
        self.output_dir = os.path.abspath(output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        run_name = run_name or os.path.basename(self.output_dir.rstrip(os.sep))
        self.backends = []
        self._warned: set[str] = set()
        self._count = 0
        try:
            for name in dict.fromkeys(report_to):  # each once, in the given order
                self.backends.append(_CLASSES[name](self.output_dir, run_name, start_step))
        except BaseException:
            self.close("FAILED")
            raise
        self.closed = not self.backends
        if self.backends:
            _OPEN.add(self)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def _call(self, what: str, step, fn) -> None:
        for b in list(self.backends):
            try:
                fn(b)
            except Exception as e:  # noqa: BLE001 - a tracker must not end a training run
                self.backends.remove(b)
                print(f"[tracking] {b.name}: {what} failed at step {step} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); {b.name} is off for the rest of this "
                      f"run (metrics.jsonl keeps every step)", flush=True)
                try:
                    b.close("FAILED")
                except Exception:  # noqa: BLE001 - already reported as failed
                    pass

    def log_config(self, config) -> None:
        """The run's config (a dict or a config dataclass), once at the start."""
        if self.closed:
            return
        nested = json.loads(json.dumps(_config_dict(config), default=str))  # plain types only
        flat = _flat_params(nested)
        self._call("logging the config", 0, lambda b: b.log_config(nested, flat))

    def log_metrics(self, step: int | None, metrics: dict) -> None:
        """Every numeric value of a metrics.jsonl record at `step` (None: count the calls); the
        record's `time` is the wall time."""
        if self.closed:
            return
        self._count += 1
        step = int(step) if step is not None else self._count
        wall = _scalar(metrics.get("time"))
        wall = wall if wall is not None and math.isfinite(wall) else time.time()
        values = {}
        for k, v in metrics.items():
            x = _scalar(v)
            if k in _NOT_METRICS or x is None:
                continue
            if not math.isfinite(x):
                if k not in self._warned:
                    self._warned.add(k)
                    print(f"[tracking] step {step}: {k} is {x}; not sent to {', '.join(self.names)} "
                          f"(metrics.jsonl keeps it; later ones of {k} are skipped without a line)",
                          flush=True)
                continue
            values[k] = x
        if values:
            self._call("logging metrics", step, lambda b: b.log(step, values, wall))

    def close(self, status: str = "FINISHED") -> None:
        """Flush and end every backend (status FINISHED | FAILED | KILLED); idempotent."""
        if getattr(self, "closed", False):
            return
        self.closed = True
        _OPEN.discard(self)
        for b in self.backends:
            try:
                b.close(status)
            except Exception as e:  # noqa: BLE001 - closing the others matters more
                print(f"[tracking] {b.name}: closing failed ({type(e).__name__}: {e})", flush=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close("FINISHED" if exc_type is None else "FAILED")
