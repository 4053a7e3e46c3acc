"""Config checks at load time: keys given twice in a YAML file, and the range metadata of every
config dataclass (kernels.config_fields) as a user meets it through jobs.config.load."""
from __future__ import annotations

import dataclasses
import os

import pytest

from jobs.config import ConfigError, load, load_yaml
from jobs.grpo import GRPOJobConfig
from jobs.sft import SFTJobConfig
from kernels.config_fields import KEYS, ranged_fields

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_SFT = os.path.join(ROOT, "jobs", "configs", "tiny-sft.yaml")
TINY_GRPO = os.path.join(ROOT, "jobs", "configs", "tiny-grpo.yaml")


def test_a_second_section_block_is_refused_naming_the_key_and_both_lines(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: runs/x\ntrainer:\n  lr: 1.0e-3\nmax_steps: 3\ntrainer:\n  num_workers: 2\n")
    with pytest.raises(ConfigError) as e:
        load(SFTJobConfig, str(path))
    assert str(e.value) == (f"{path}: duplicate key 'trainer' at line 5 (first at line 2); "
                            f"give each key once (YAML would keep only the last)")


def test_duplicate_keys_inside_a_section_and_flow_mappings_are_refused(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("trainer:\n  lr: 1.0\n  lr: 2.0\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' at line 3 \(first at line 2\)"):
        load_yaml(str(nested))
    flow = tmp_path / "flow.yaml"
    flow.write_text("model: {lora: {r: 8, r: 16}}\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'r' at line 1 \(first at line 1\)"):
        load_yaml(str(flow))


def test_same_key_in_different_sections_and_merge_keys_are_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("a: {lr: 1}\nb: {lr: 2}\nbase: &base {x: 1, y: 2}\nc:\n  <<: *base\n  x: 3\n")
    assert load_yaml(str(path)) == {"a": {"lr": 1}, "b": {"lr": 2}, "base": {"x": 1, "y": 2}, "c": {"x": 3, "y": 2}}


def _config_classes(cls, seen=None) -> list[type]:
    seen = seen if seen is not None else []
    if cls not in seen:
        seen.append(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                _config_classes(type(default), seen)
    return seen


def test_every_config_section_declares_its_ranges_with_known_keys():
    classes = _config_classes(SFTJobConfig) + _config_classes(GRPOJobConfig)
    names = {c.__name__ for c in classes}
    assert {"LoraConfig", "DataConfig", "TrainConfig", "DeepSpeedConfig", "GRPOConfig", "RolloutConfig",
            "RewardConfig", "AccuracyConfig"} <= names
    for cls in classes:
        for f in ranged_fields(cls):
            assert set(f.metadata) <= KEYS, f"{cls.__name__}.{f.name}: {dict(f.metadata)}"


@pytest.mark.parametrize("cls, override, message", [
    (SFTJobConfig, "trainer.micro_batch_size=0", "trainer.micro_batch_size: must be >= 1, got 0"),
    (SFTJobConfig, "trainer.min_lr_ratio=2", "trainer.min_lr_ratio: must be in [0, 1], got 2.0"),
    (SFTJobConfig, "trainer.deepspeed.stage3_param_persistence_threshold=-1",
     "trainer.deepspeed.stage3_param_persistence_threshold: must be >= 0, got -1"),
    (SFTJobConfig, "model.lora.dropout=1", "model.lora.dropout: must be in [0, 1), got 1.0"),
    (SFTJobConfig, "data.max_seq_len=4", "data.max_seq_len: must be an integer >= 8, got 4"),
    (SFTJobConfig, "max_steps=-1", "max_steps: must be >= 0 (0 = trainer.num_epochs passes), got -1"),
    (GRPOJobConfig, "reward.timeout_s=0", "reward.timeout_s: must be > 0, got 0.0"),
    (GRPOJobConfig, "rollout.top_p=0", "rollout.top_p: must be in (0, 1], got 0.0"),
    (GRPOJobConfig, "grpo.eps_low=1", "grpo.eps_low: must be in [0, 1), got 1.0"),
    (GRPOJobConfig, "grpo.max_refill_rounds=-1", "grpo.max_refill_rounds: must be >= 0, got -1"),
    (GRPOJobConfig, "keep_checkpoints=0", "keep_checkpoints: must be >= 1, got 0"),
])
def test_out_of_range_values_are_named_at_load(cls, override, message):
    with pytest.raises(ConfigError) as e:
        load(cls, TINY_SFT if cls is SFTJobConfig else TINY_GRPO, [override])
    assert str(e.value) == message
