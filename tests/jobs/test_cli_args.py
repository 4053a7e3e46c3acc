"""The jobs' one command-line parser (jobs.config.parse_job_args): `[TARGET] [CONFIG.yaml] [key=value ...]`."""
from __future__ import annotations

import importlib
import os

import pytest

from jobs.config import ConfigError, UsageError, parse_job_args
from jobs.sft import SFTJobConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "jobs", "configs")

# job module -> the arguments that come before the overrides (eval and serve take a TARGET first)
JOBS = {"sft": [], "cpt": [], "grpo": [], "demo": [], "eval": ["TARGET_DIR"], "serve": ["TARGET_DIR"]}


def _main(name: str):
    return importlib.import_module(f"jobs.{name}").main


def _lead(name: str, tmp_path) -> list[str]:
    return [str(tmp_path) if a == "TARGET_DIR" else a for a in JOBS[name]]


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("name", list(JOBS))
def test_argument_without_equals_is_named_and_exits_2(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)           # no file called `foo` here
    assert _main(name)([*_lead(name, tmp_path), "foo"]) == 2
    assert "argument 'foo'" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["sft", "grpo", "eval"])
def test_argument_without_equals_after_config_is_named(name, tmp_path, capsys):
    config = os.path.join(CONFIGS, f"tiny-{name}.yaml")
    assert _main(name)([*_lead(name, tmp_path), config, "max_steps=2", "foo"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "argument 'foo': expected key.sub=value" in line


@pytest.mark.parametrize("name", list(JOBS))
def test_unknown_option_exits_2(name, tmp_path, capsys):
    assert _main(name)([*_lead(name, tmp_path), "--bogus"]) == 2
    assert "--bogus" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", list(JOBS))
def test_help_exits_0_and_shows_usage(name, capsys):
    with pytest.raises(SystemExit) as e:
        _main(name)(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: posttrain {name} ")
    assert "[key.sub=value ...]" in out.splitlines()[0] and "config keys:" in out


def test_help_lists_the_config_keys_and_sections(capsys):
    with pytest.raises(SystemExit):
        _main("sft")(["-h"])
    out = capsys.readouterr().out
    assert "usage: posttrain sft [CONFIG.yaml] [key.sub=value ...]" in out
    assert "max_steps" in out and "trainer.*" in out and "model.*" in out


def test_demo_rejects_an_unknown_key_naming_it_and_the_accepted_keys(capsys):
    from jobs.demo import main

    assert main(["output_dir=/tmp/x", "grpo_stepz=3"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "unknown config key 'grpo_stepz'" in line and "'grpo_steps'" in line   # named, and a suggestion
    assert "output_dir, grpo, grpo_steps" in line                                   # the accepted keys


def test_demo_keys_are_typed_and_checked(capsys):
    from jobs.demo import main

    assert main(["grpo_steps=0"]) == 2
    assert "grpo_steps: must be >= 1" in capsys.readouterr().err
    assert main(["grpo=maybe"]) == 2
    assert "grpo: expected true or false" in capsys.readouterr().err
    assert main(["tiny-sft.yaml"]) == 2                      # the demo takes no CONFIG.yaml
    assert "argument 'tiny-sft.yaml'" in capsys.readouterr().err


def test_demo_config_defaults_and_overrides():
    from jobs.config import load
    from jobs.demo import DemoConfig

    assert load(DemoConfig) == DemoConfig("runs/demo", True, 20)
    args = parse_job_args("posttrain demo", ["output_dir=out", "grpo=false", "grpo_steps=5"], DemoConfig,
                          config=False)
    assert load(DemoConfig, args.config, args.overrides) == DemoConfig("out", False, 5)


@pytest.mark.parametrize("name, cls_path", [("sft", "jobs.sft:SFTJobConfig"), ("grpo", "jobs.grpo:GRPOJobConfig")])
def test_sft_and_grpo_accept_config_then_overrides(name, cls_path, monkeypatch):
    module = importlib.import_module(f"jobs.{name}")
    seen = []
    monkeypatch.setattr(module, f"run_{name}", lambda cfg, **kw: seen.append(cfg) or {})
    monkeypatch.setattr(module, f"preflight_{name}", lambda cfg: 0)  # the defaults name no GRPO model
    config = os.path.join(CONFIGS, f"tiny-{name}.yaml")
    assert module.main([config, "max_steps=3", "seed=7", "output_dir=runs/x"]) == 0
    assert module.main(["max_steps=4"]) == 0                   # CONFIG.yaml is optional
    (cfg, cfg_defaults) = seen
    assert type(cfg).__name__ == cls_path.split(":")[1] and (cfg.max_steps, cfg.seed, cfg.output_dir) == (3, 7, "runs/x")
    assert cfg_defaults.max_steps == 4


def test_sft_unknown_key_is_named(capsys):
    from jobs.sft import main

    assert main([os.path.join(CONFIGS, "tiny-sft.yaml"), "trainer.lrr=1e-4"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("config error: unknown config key 'trainer.lrr'") and "'trainer.lr'" in line


def test_cpt_sets_text_format(monkeypatch):
    import jobs.sft

    seen = []
    monkeypatch.setattr(jobs.sft, "run_sft", lambda cfg, task: seen.append((cfg, task)) or {})
    assert _main("cpt")(["max_steps=2"]) == 0
    ((cfg, task),) = seen
    assert task == "cpt" and cfg.data.format == "text" and cfg.max_steps == 2


def test_eval_accepts_target_config_overrides_and_options(tmp_path, monkeypatch, capsys):
    import cluster.evaluate
    import kernels.export
    from jobs.eval import main

    seen = {}
    monkeypatch.setattr(kernels.export, "load_for_inference",
                        lambda target, base=None, **kw: seen.update(target=target, base=base) or ("m", "t"))

    def fake_evaluate(model, tok, rows, cfg, output_path=None):
        seen.update(cfg=cfg, output_path=output_path)
        return {"ci95": (0.0, 1.0), "accuracy": 0.5, "correct": 1, "n": 2, "ci_method": "wilson", "k": cfg.k,
                "temperature": cfg.temperature, "pass_at_k": 0.5}

    monkeypatch.setattr(cluster.evaluate, "evaluate", fake_evaluate)
    monkeypatch.setattr("jobs.preflight.preflight_eval", lambda *a: 0)  # base "B" is not a real folder
    out = str(tmp_path / "res")
    # options may come anywhere: before, between or after the positional arguments
    assert main(["--base", "B", str(tmp_path), os.path.join(CONFIGS, "tiny-eval.yaml"), "--out", out,
                 "max_problems=3", "k=2"]) == 0
    assert seen["target"] == str(tmp_path) and seen["base"] == "B" and seen["output_path"] == out
    assert seen["cfg"].max_problems == 3 and seen["cfg"].k == 2
    assert "[eval] accuracy 0.500" in capsys.readouterr().out


def test_eval_needs_a_target(capsys):
    from jobs.eval import main

    assert main([]) == 2
    assert "missing TARGET" in _one_line(capsys.readouterr().err)


def test_parse_job_args_splits_config_and_overrides(tmp_path):
    args = parse_job_args("p", ["c.yaml", "a.b=1", "data.path=x.yaml"], SFTJobConfig)
    assert (args.config, args.overrides, args.target) == ("c.yaml", ["a.b=1", "data.path=x.yaml"], None)
    # a value ending in .yaml is an override, not the config
    args = parse_job_args("p", ["data.path=x.yaml"], SFTJobConfig)
    assert (args.config, args.overrides) == (None, ["data.path=x.yaml"])
    # a config path holding `=` is still the config; so is an existing file without the suffix
    weird = tmp_path / "lr=1e-4"
    weird.mkdir()
    args = parse_job_args("p", [str(weird / "run.yaml"), "seed=1"], SFTJobConfig)
    assert args.config == str(weird / "run.yaml") and args.overrides == ["seed=1"]
    plain = tmp_path / "config"
    plain.write_text("seed: 1\n")
    assert parse_job_args("p", [str(plain)], SFTJobConfig).config == str(plain)
    with pytest.raises(UsageError, match=r"argument '=1'"):
        parse_job_args("p", ["c.yaml", "=1"], SFTJobConfig)
    with pytest.raises(UsageError, match=r"argument 'a\.\.b=1'"):
        parse_job_args("p", ["a..b=1"], SFTJobConfig)
    assert issubclass(UsageError, ConfigError)           # mains report both the same way, exit code 2
