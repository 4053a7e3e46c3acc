"""The jobs as Python functions, for notebooks and scripts: the same configs, preflight checks and
run functions as the `posttrain` command line, with results returned and errors raised.

    from jobs import api

    s = api.sft("jobs/configs/tiny-sft.yaml", output_dir="runs/nb", max_steps=10, model__finetune="full")
    s["last_loss"], s["merged_dir"]                         # the run's summary.json, as a dict
    api.sft(trainer={"lr": 1e-4, "num_workers": 1})         # no YAML: the job's defaults; a section as a dict
    api.cpt("jobs/configs/tiny-cpt.yaml", overrides=["data.path=corpus/*.txt"])   # command-line strings
    api.grpo("jobs/configs/tiny-grpo.yaml", max_steps=2, report_to=["tensorboard"])
    api.eval("runs/nb", max_problems=50)                    # -> accuracy, ci95, per_problem, ...
    api.serve("runs/nb/merged", port=8001)                  # -> url; the app runs until Ray stops
    api.config("sft", "jobs/configs/tiny-sft.yaml", max_steps=10)   # the typed config; nothing runs

`config`: a YAML path, a mapping (nested like the YAML), a config object of the job, or None (the
job's defaults, as `posttrain sft` without a CONFIG.yaml). On top of it, in this order:
`overrides`, a list of command-line `key.sub=value` strings (values parse as YAML there), then the
keyword arguments: `key__sub=value` (or a dotted `**{"key.sub": value}`), or a section as a dict
(`trainer={"lr": 1e-4}` sets trainer.lr and keeps the section's other keys, like trainer.lr=1e-4
on the command line). Keyword values are Python values, taken as they are.

Errors: jobs.config.ConfigError for a bad key or value and for a failed preflight check (the
line the command line prints: "preflight: <field>: ..."); the job's own errors as raised.
Nothing calls sys.exit. Ctrl-C (KeyboardInterrupt) first tidies the checkpoints and says how to
resume, as the command line does, then propagates. A local Ray instance that sft/cpt/grpo start
is stopped when they return or raise (one connected before, with ray.init() or RAY_ADDRESS, is
left as it is); serve keeps Ray running.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
from typing import Any, Iterable

from jobs.config import ConfigError, build, load_yaml, merge_overrides, set_path, to_dict

__all__ = ["config", "sft", "cpt", "grpo", "eval", "serve", "export"]


def _job_class(job: str):
    if job in ("sft", "cpt"):
        from jobs.sft import SFTJobConfig

        return SFTJobConfig
    if job == "grpo":
        from jobs.grpo_config import GRPOJobConfig

        return GRPOJobConfig
    if job == "eval":
        from cluster.evaluate import EvalConfig

        return EvalConfig
    if job == "serve":
        from cluster.serve import ServeConfig

        return ServeConfig
    raise ConfigError(f"job {job!r}: expected one of sft, cpt, grpo, eval, serve")


def _leaves(parts: list[str], value) -> Iterable[tuple[list[str], Any]]:
    """(path, value) pairs of a keyword argument; a non-empty mapping (or config object) is a
    section whose keys are set one by one."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = to_dict(value)
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(parts + [str(k)], v)
    else:
        yield parts, value


def _mapping(source) -> dict:
    """The config mapping of a YAML path, a dict, a config object or None (a fresh copy)."""
    if source is None:
        return {}
    if isinstance(source, (str, os.PathLike)):
        return load_yaml(os.fspath(source))
    if dataclasses.is_dataclass(source) and not isinstance(source, type):
        return to_dict(source)
    if isinstance(source, dict):
        return copy.deepcopy(source)
    raise ConfigError(f"config: expected a YAML path, a mapping, a config object or None, got "
                      f"{type(source).__name__}")


def _build(cls, source, overrides, kwargs: dict):
    if isinstance(overrides, str):
        overrides = [overrides]
    # exactly jobs.config.load(cls, path, overrides) when there are no keyword arguments
    data = merge_overrides(_mapping(source), list(overrides or ()))
    for name, value in kwargs.items():
        parts = name.replace("__", ".").split(".")
        if not all(parts):
            raise ConfigError(f"override {name!r}: empty key")
        for path, leaf in _leaves(parts, value):
            set_path(data, path, leaf, ".".join(path))
    return build(cls, data)


def _config(job: str, source, overrides, kwargs: dict):
    cfg = _build(_job_class(job), source, overrides, kwargs)
    if job in ("sft", "cpt"):
        from jobs.sft import for_task  # as jobs.sft.main: cpt reads data.format auto as text

        cfg = for_task(cfg, job)
    return cfg


def config(job: str, config: Any = None, *, overrides: Iterable[str] = (), **kwargs):
    """The typed config `job` (sft | cpt | grpo | eval | serve) would run with; nothing runs."""
    return _config(job, config, overrides, kwargs)


def _preflight(preflight, *args) -> None:
    """The command line's own preflight (jobs.preflight.preflight_<job>), its one line raised as a
    ConfigError instead of printed with exit code 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        failed = preflight(*args)
    if failed:
        raise ConfigError(err.getvalue().strip() or "preflight: failed")


def _run_job(run, cfg, on_interrupt):
    """run(cfg) with a local Ray started here stopped after it, and trackers left open by a raise
    closed as FAILED."""
    import ray

    from cluster.ray_session import shutdown_ray
    from cluster.tracking import close_open_trackers

    started = not ray.is_initialized()
    try:
        return run(cfg)
    except KeyboardInterrupt as e:
        close_open_trackers("KILLED")
        on_interrupt(e, cfg)  # stops Ray, tidies the checkpoints, prints where to resume
        raise
    except BaseException:
        close_open_trackers("FAILED")
        raise
    finally:
        if started:
            shutdown_ray()


def _sft_like(task: str, source, overrides, kwargs) -> dict:
    from jobs.preflight import preflight_sft
    from jobs.sft import report_interrupt, run_sft

    cfg = _config(task, source, overrides, kwargs)
    _preflight(preflight_sft, cfg)  # as jobs.sft.main: before Ray starts or weights load
    return _run_job(lambda c: run_sft(c, task=task), cfg,
                    lambda e, c: report_interrupt(f"[{task}]", e, c))


def sft(config: Any = None, *, overrides: Iterable[str] = (), **kwargs) -> dict:
    """Supervised fine-tuning (jobs.sft.run_sft); returns the run's summary (summary.json)."""
    return _sft_like("sft", config, overrides, kwargs)


def cpt(config: Any = None, *, overrides: Iterable[str] = (), **kwargs) -> dict:
    """Continued pre-training (jobs.sft.run_sft, task cpt); returns the run's summary."""
    return _sft_like("cpt", config, overrides, kwargs)


def grpo(config: Any = None, *, overrides: Iterable[str] = (), **kwargs) -> dict:
    """GRPO (jobs.grpo.run_grpo); returns the run's summary (summary.json)."""
    from jobs.grpo import report_interrupt, run_grpo
    from jobs.preflight import preflight_grpo

    cfg = _config("grpo", config, overrides, kwargs)
    _preflight(preflight_grpo, cfg)  # as jobs.grpo.main
    return _run_job(run_grpo, cfg, report_interrupt)


def eval(target: str, config: Any = None, *, overrides: Iterable[str] = (), out: str = "",  # noqa: A001
         base: str | None = None, **kwargs) -> dict:
    """Exact-match evaluation of a run, an adapter or a model folder (as `posttrain eval TARGET`):
    returns the result (accuracy, ci95, pass_at_k, per_problem, ...) and writes eval.json into
    `out` (a folder or a .json path; default TARGET/). No Ray."""
    from cluster.evaluate import evaluate
    from jobs.eval import _vllm_model_dir
    from jobs.preflight import preflight_eval

    cfg = _config("eval", config, overrides, kwargs)
    _preflight(preflight_eval, cfg, target, out, base)
    if cfg.backend == "vllm":
        model, tok = _vllm_model_dir(target), None
    else:
        import torch

        from kernels.export import load_for_inference

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tok = load_for_inference(target, base=base, device=device,
                                        dtype=torch.bfloat16 if device == "cuda" else None)
    return evaluate(model, tok, None, cfg, output_path=out or target)


def serve(target: str, *, overrides: Iterable[str] = (), **kwargs) -> dict:
    """Deploy a model on Ray Serve behind the OpenAI-compatible API (as `posttrain serve TARGET
    --no-block`); returns {"url", "app_name", "model", "config"} once the app is healthy.
    TARGET: a serve YAML config or a model folder (then it is `path`). The app runs while Ray
    does; `ray.serve.delete(result["app_name"])` stops it."""
    from cluster.serve import deploy, resolve

    source = target if str(target).endswith((".yaml", ".yml")) else {"path": os.fspath(target)}
    cfg = _config("serve", source, overrides, kwargs)
    try:
        cfg = resolve(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    from jobs.preflight import preflight_serve

    _preflight(preflight_serve, cfg)  # as jobs.serve.main: e.g. engine=vllm where it cannot import
    url = deploy(cfg)
    return {"url": url, "app_name": cfg.app_name, "model": cfg.served_name(), "config": cfg}


def export(source: str, format: str, out: str = "", **kwargs) -> str:  # noqa: A002
    """Export a run, adapter or model folder as adapter | merged16 | merged4 | gguf (as `posttrain
    export`; keyword arguments: base, gguf_type, dtype, max_shard_size); returns the output path."""
    from kernels.export import export as run_export

    return run_export(source, format, out, **kwargs)
