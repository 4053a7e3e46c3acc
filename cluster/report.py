"""Run reports: report.png and TensorBoard event files from a run's metrics.jsonl.

    write_report("runs/tiny-sft")      # -> runs/tiny-sft/report.png, runs/tiny-sft/tensorboard/
    tensorboard --logdir runs/tiny-sft/tensorboard

report.png has one panel per quantity that the run logged, in this order: loss (+ eval_loss),
learning rate, gradient norm, tokens/s, peak GPU memory; for GRPO: reward means (overall and
`reward/<fn>/mean` per function), their spread (std), reward failures and timeouts (counts), KL,
response length, accuracy. Absent keys give no panel.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from cluster.run_files import RunFiles

_X_KEYS = ("step", "time", "epoch")  # axes and bookkeeping, not plotted as series


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    keys: tuple[str, ...] = ()      # exact keys, plotted if present
    prefixes: tuple[str, ...] = ()  # every key starting with one of these (e.g. "reward/")
    suffixes: tuple[str, ...] = ()  # ... and, when given, ending with one of these
    log_y: bool = False


PANELS = (
    Panel("Loss", "loss (nats/token)", ("loss", "eval_loss")),
    Panel("Learning rate", "lr", ("lr", "learning_rate"), log_y=False),
    Panel("Gradient norm", "L2 norm (before clipping)", ("grad_norm",)),
    Panel("Throughput", "tokens / s", ("tokens_per_s",)),
    Panel("Peak GPU memory", "GiB", ("peak_mem_gib",)),
    Panel("Reward", "mean reward", ("reward_mean", "reward", "reward/mean", "reward/train_mean"),
          ("reward/", "rewards/"), ("/mean",)),
    Panel("Reward spread", "std of rewards", ("reward/std",), ("reward/",), ("/std",)),
    Panel("Reward failures", "samples per step", (), ("reward/",), ("/failures", "/timeouts")),
    Panel("KL to reference", "KL (per token)", ("kl", "kl_mean")),
    Panel("Response length", "tokens", ("response_length", "response_length_mean", "completion_length",
                                        "response_length/mean", "response_length/max")),
    Panel("Phase time", "seconds per step", ("time/step_s",), ("time/",), ("_s",)),
    Panel("Accuracy", "fraction correct", ("accuracy", "eval_accuracy", "train_accuracy")),
)


def _num(v) -> float | None:
    """A metric value as a float (NaN/inf strings as written by RunFiles), or None if not numeric."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(v)
    return None


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        y = _num(r.get(key))
        if y is None:
            continue
        x = _num(r.get("step"))
        xs.append(x if x is not None else float(i + 1))
        ys.append(y)
    return xs, ys


def _panel_keys(panel: Panel, keys: list[str]) -> list[str]:
    out = [k for k in panel.keys if k in keys]
    out += sorted(k for k in keys if any(k.startswith(p) for p in panel.prefixes) and k not in out
                  and (not panel.suffixes or k.endswith(panel.suffixes)))
    return out


def _smooth(ys: list[float], window: int) -> list[float]:
    """Centred moving mean over `window` points (shrinking at the ends, NaNs skipped): unlike an
    exponential average it does not lag behind a fast-falling loss."""
    half = max(1, window) // 2
    out = []
    for i in range(len(ys)):
        vals = [y for y in ys[max(0, i - half): i + half + 1] if math.isfinite(y)]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def plot_metrics(rows: list[dict], path: str, title: str = "") -> str | None:
    """Write the report figure for metric rows; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k, v in r.items() if k not in _X_KEYS and _num(v) is not None})
    panels = [(p, ks) for p in PANELS if (ks := _panel_keys(p, keys))]
    if not panels:
        return None
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (panel, ks) in zip(axes.flat, panels):
        for k in ks:
            xs, ys = _series(rows, k)
            sparse = len(xs) < max(2, len(rows) // 4)  # e.g. eval_loss every N steps: show the points
            if sparse:
                ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=k)
            elif len(xs) > 100 and k in ("loss", "reward_mean", "grad_norm", "kl"):
                # long noisy runs: the raw curve faint, a centred moving mean on top
                window = max(5, len(xs) // 25) | 1
                line, = ax.plot(xs, ys, linewidth=0.8, alpha=0.35, label=k)
                ax.plot(xs, _smooth(ys, window), linewidth=1.5, color=line.get_color(),
                        label=f"{k} (centred mean of {window})")
                ax.legend(fontsize=8)
            else:
                ax.plot(xs, ys, linewidth=1.2, label=k)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        if panel.log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if len(ks) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_tensorboard(rows: list[dict], log_dir: str) -> str:
    """One scalar per numeric metric per step, tagged with the metric name (earlier event files
    in log_dir are replaced, so rewriting a report does not duplicate points)."""
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(log_dir, exist_ok=True)
    for f in os.listdir(log_dir):
        if f.startswith("events.out.tfevents."):
            os.remove(os.path.join(log_dir, f))
    writer = SummaryWriter(log_dir=log_dir)
    try:
        for i, r in enumerate(rows):
            step = _num(r.get("step"))
            step = int(step) if step is not None else i + 1
            wall = _num(r.get("time"))
            for k, v in r.items():
                y = _num(v)
                if k in ("step", "time") or y is None:
                    continue
                writer.add_scalar(k, y, global_step=step, walltime=wall)
    finally:
        writer.close()
    return log_dir


def write_report(output_dir: str, tensorboard: bool = True) -> dict:
    """report.png (+ tensorboard/) for the run in output_dir; returns the paths written."""
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"report: {output_dir!r} is not a run folder")
    files = RunFiles(output_dir)
    if not os.path.exists(files.metrics_path):
        raise FileNotFoundError(f"report: {files.metrics_path} does not exist (has the run logged any step?)")
    rows = files.read_metrics()
    out: dict = {"png": None, "tensorboard": None, "steps": len(rows)}
    if not rows:
        return out
    out["png"] = plot_metrics(rows, files.path("report.png"), title=os.path.basename(files.output_dir))
    if tensorboard:
        out["tensorboard"] = write_tensorboard(rows, files.path("tensorboard"))
    return out
