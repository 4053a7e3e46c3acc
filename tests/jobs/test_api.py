"""jobs/api.py: the same configs as the command line for the same overrides (keyword, nested and
command-line forms), the same preflight checks and run functions, errors raised (no exit codes)."""
from __future__ import annotations

import os

import pytest

from jobs import api
from jobs.config import ConfigError, load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "jobs", "configs")
TINY_SFT = os.path.join(CONFIGS, "tiny-sft.yaml")
TINY_GRPO = os.path.join(CONFIGS, "tiny-grpo.yaml")


def _cli_config(monkeypatch, module_name: str, argv: list[str], **main_kw):
    """The config the job's command line (`main(argv)`) hands its run function."""
    import importlib

    import cluster.ray_session

    module = importlib.import_module(f"jobs.{module_name}")
    job = "sft" if module_name in ("sft", "cpt") else module_name
    target = importlib.import_module(f"jobs.{job}")
    seen = []
    monkeypatch.setattr(target, f"run_{job}", lambda cfg, **kw: seen.append(cfg) or {})
    monkeypatch.setattr(target, f"preflight_{job}", lambda cfg: 0)
    monkeypatch.setattr(cluster.ray_session, "stop_on_signals", lambda: None)
    if hasattr(target, "stop_on_signals"):
        monkeypatch.setattr(target, "stop_on_signals", lambda: None)
    assert module.main(argv, **main_kw) == 0
    (cfg,) = seen
    return cfg


@pytest.mark.parametrize("job", ["sft", "cpt"])
def test_sft_cpt_config_equals_the_command_line(job, monkeypatch):
    cli = _cli_config(monkeypatch, job, [TINY_SFT, "max_steps=10", "model.finetune=full", "trainer.lr=1e-3",
                                         "model.config_overrides.num_hidden_layers=1", "report_to=[tensorboard,mlflow]"])
    kw = api.config(job, TINY_SFT, max_steps=10, model__finetune="full", trainer={"lr": 1e-3},
                    model={"config_overrides": {"num_hidden_layers": 1}}, report_to=["tensorboard", "mlflow"])
    strings = api.config(job, TINY_SFT, overrides=["max_steps=10", "model.finetune=full", "trainer.lr=1e-3",
                                                   "model.config_overrides.num_hidden_layers=1",
                                                   "report_to=[tensorboard,mlflow]"])
    dotted = api.config(job, TINY_SFT, **{"max_steps": 10, "model.finetune": "full", "trainer.lr": 1e-3,
                                          "model.config_overrides.num_hidden_layers": 1,
                                          "report_to": ["tensorboard", "mlflow"]})
    assert cli == kw == strings == dotted
    # a section given as a dict sets its keys and keeps the YAML's others (as on the command line)
    assert kw.trainer.num_workers == 2 and kw.model.config_overrides == {"tie_word_embeddings": False,
                                                                        "num_hidden_layers": 1}
    assert kw.data.format == ("text" if job == "cpt" else "auto")


def test_grpo_config_equals_the_command_line(monkeypatch):
    cli = _cli_config(monkeypatch, "grpo", [TINY_GRPO, "max_steps=2", "grpo.lr=1e-5", "rollout.n=4",
                                            "reward.functions=[math_answer]"])
    assert api.config("grpo", TINY_GRPO, max_steps=2, grpo__lr=1e-5, rollout={"n": 4},
                      reward__functions=["math_answer"]) == cli


def test_config_sources_and_errors():
    from jobs.config import load_yaml
    from jobs.sft import SFTJobConfig

    from_yaml = api.config("sft", TINY_SFT, seed=3)
    assert api.config("sft", load_yaml(TINY_SFT), seed=3) == from_yaml          # a mapping
    assert api.config("sft", from_yaml) == from_yaml                            # a config object
    assert api.config("sft") == load(SFTJobConfig) == SFTJobConfig()            # None: the defaults
    raw = load_yaml(TINY_SFT)
    api.config("sft", raw, trainer={"lr": 1.0})
    assert raw["trainer"]["lr"] == 3e-3                                          # the caller's dict untouched
    with pytest.raises(ConfigError, match="unknown config key 'trainer.lrr'.*'trainer.lr'"):
        api.config("sft", TINY_SFT, trainer__lrr=1e-4)
    with pytest.raises(ConfigError, match="unknown config key 'nonsense'"):
        api.config("grpo", nonsense=1)
    with pytest.raises(ConfigError, match="trainer.num_workers: must be >= 1"):
        api.config("sft", trainer={"num_workers": 0})
    with pytest.raises(ConfigError, match="seed.x: 'seed' is not a section"):
        api.config("sft", TINY_SFT, seed__x=1)
    with pytest.raises(ConfigError, match="job 'rl'"):
        api.config("rl")


def test_sft_runs_preflight_then_run_sft_and_returns_its_summary(monkeypatch, tmp_path):
    import jobs.preflight
    import jobs.sft

    calls = []
    monkeypatch.setattr(jobs.preflight, "check_sft", lambda cfg: calls.append(("preflight", cfg.output_dir)))
    monkeypatch.setattr(jobs.sft, "run_sft", lambda cfg, task: calls.append((task, cfg)) or {"last_loss": 0.5})
    out = str(tmp_path / "run")
    assert api.cpt(TINY_SFT, output_dir=out, max_steps=3) == {"last_loss": 0.5}
    assert calls[0] == ("preflight", out)
    task, cfg = calls[1]
    assert task == "cpt" and cfg.max_steps == 3 and cfg.data.format == "text"


def test_preflight_failure_is_a_config_error_not_an_exit(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"^preflight: output_dir: '.*a-file': expected a folder to write into"):
        api.sft(output_dir=str(blocker))


def test_a_run_that_raises_closes_its_trackers_as_failed(monkeypatch, tmp_path):
    import jobs.preflight
    import jobs.sft
    from cluster import tracking
    from cluster.run_files import RunFiles

    def run_sft(cfg, task):
        files = RunFiles(cfg.output_dir)
        files.start_tracking(cfg.report_to, config=cfg)
        files.log_metrics({"step": 1, "loss": 2.0})
        raise RuntimeError("worker died")

    monkeypatch.setattr(jobs.preflight, "check_sft", lambda cfg: None)
    monkeypatch.setattr(jobs.sft, "run_sft", run_sft)
    with pytest.raises(RuntimeError, match="worker died"):
        api.sft(output_dir=str(tmp_path / "run"), report_to=["tensorboard"])
    assert not tracking._OPEN
    assert os.listdir(tmp_path / "run" / "tensorboard")


def test_eval_and_serve_build_the_command_line_configs(monkeypatch, tmp_path):
    import cluster.evaluate
    import cluster.serve
    import jobs.preflight
    import kernels.export
    from jobs.serve import load_config

    seen = {}
    monkeypatch.setattr(jobs.preflight, "check_eval", lambda cfg, target, out, base: seen.update(pre=(target, out, base)))
    monkeypatch.setattr(kernels.export, "load_for_inference", lambda target, base=None, **kw: ("model", "tok"))
    monkeypatch.setattr(cluster.evaluate, "evaluate",
                        lambda m, t, rows, cfg, output_path=None: seen.update(cfg=cfg, out=output_path) or {"accuracy": 1.0})
    eval_yaml = os.path.join(CONFIGS, "tiny-eval.yaml")
    assert api.eval(str(tmp_path), eval_yaml, k=2, max_problems=3, base="B") == {"accuracy": 1.0}
    assert seen["pre"] == (str(tmp_path), "", "B") and seen["out"] == str(tmp_path)
    from cluster.evaluate import EvalConfig

    assert seen["cfg"] == load(EvalConfig, eval_yaml, ["k=2", "max_problems=3"])

    monkeypatch.setattr(cluster.serve, "resolve", lambda cfg: cfg)
    monkeypatch.setattr(cluster.serve, "deploy", lambda cfg: "http://127.0.0.1:8001/v1")
    res = api.serve(str(tmp_path), port=8001, autoscaling={"max_replicas": 3})
    assert res["url"] == "http://127.0.0.1:8001/v1"
    assert res["config"] == load_config(str(tmp_path), ["port=8001", "autoscaling.max_replicas=3"])
