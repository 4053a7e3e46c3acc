"""Config loading: unknown keys, types, choices, overrides; every shipped YAML validates."""
from __future__ import annotations

import glob
import os

import pytest

from jobs.config import ConfigError, build, load, merge_overrides, parse_override
from jobs.sft import SFTJobConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.lrr'.*did you mean 'trainer.lr'"):
        build(SFTJobConfig, {"trainer": {"lrr": 1e-3}})


def test_unknown_top_level_key_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'max_step'.*'max_steps'"):
        build(SFTJobConfig, {"max_step": 3})


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"trainer.micro_batch_size: expected an integer, got 'four'"):
        build(SFTJobConfig, {"trainer": {"micro_batch_size": "four"}})


def test_literal_choice_lists_accepted_values():
    with pytest.raises(ConfigError, match=r"trainer.lr_schedule: 'cosin' is not accepted; expected one of "
                                          r"'cosine', 'linear', 'constant' \(did you mean 'cosine'\?\)"):
        build(SFTJobConfig, {"trainer": {"lr_schedule": "cosin"}})


def test_range_check_from_post_init():
    with pytest.raises(ConfigError, match=r"trainer.lr: must be > 0"):
        build(SFTJobConfig, {"trainer": {"lr": 0}})


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"model.preset: unknown preset 'llama-9'.*llama-3.2-1b"):
        build(SFTJobConfig, {"model": {"preset": "llama-9"}})


def test_section_given_a_scalar():
    with pytest.raises(ConfigError, match=r"trainer: expected a mapping"):
        build(SFTJobConfig, {"trainer": 3})


def test_qlora_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="qlora needs trainer.use_gpu=true"):
        build(SFTJobConfig, {"model": {"finetune": "qlora"}})


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_override("trainer.lr=1e-4") == (["trainer", "lr"], 1e-4)
    data = merge_overrides({"trainer": {"lr": 1.0}}, ["trainer.num_workers=2", "model.lora.r=8"])
    assert data == {"trainer": {"lr": 1.0, "num_workers": 2}, "model": {"lora": {"r": 8}}}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("trainer.lr")


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(SFTJobConfig, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(SFTJobConfig, str(bad))
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load(SFTJobConfig, str(top))


def _job_class(path: str):
    name = os.path.basename(path)
    if name.endswith(("-sft.yaml", "-lora.yaml", "-cpt.yaml", "-qlora.yaml", "-full.yaml")):
        return SFTJobConfig
    if name.endswith("-grpo.yaml"):
        from jobs.grpo import GRPOJobConfig
        return GRPOJobConfig
    if name.endswith("-serve.yaml"):
        from cluster.serve import ServeConfig
        return ServeConfig
    if name.endswith("-eval.yaml"):
        from cluster.evaluate import EvalConfig
        return EvalConfig
    raise AssertionError(f"{name}: no job kind known for this config name; add it to _job_class")


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "jobs", "configs", "*.yaml"))),
                         ids=os.path.basename)
def test_every_shipped_config_validates(path):
    load(_job_class(path), path)
