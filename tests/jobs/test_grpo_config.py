"""GRPO job config checks that depend on the algorithm registries."""
from __future__ import annotations

import pytest
import torch

from actors import grpo_math as gm
from jobs.config import ConfigError, load


def _load(*overrides):
    return load(__import__("jobs.grpo", fromlist=["GRPOJobConfig"]).GRPOJobConfig,
                "jobs/configs/tiny-grpo.yaml", list(overrides))


@pytest.fixture
def batch_baseline_estimator():
    """An estimator whose baseline is the batch mean (not the group): one sample per prompt is enough."""
    name = "test_batch_mean"
    if name not in gm.ADV_ESTIMATORS:
        @gm.register_adv_est(name, min_group_size=1)
        def _batch_mean(rewards, group_ids, eps=1e-6):
            return (rewards - rewards.mean()).to(torch.float32)
    return name


def test_group_estimators_need_two_samples_per_prompt():
    for est in ("grpo", "grpo_no_std", "rloo"):
        assert gm.min_group_size(est) == 2
        with pytest.raises((ConfigError, ValueError), match="rollout.n"):
            _load(f"grpo.adv_estimator={est}", "rollout.n=1")


def test_estimator_without_group_baseline_accepts_one_sample(batch_baseline_estimator):
    """Fails on the old check (it compared adv_estimator with the policy-loss name 'reinforce',
    so n=1 was refused for every estimator)."""
    cfg = _load(f"grpo.adv_estimator={batch_baseline_estimator}", "rollout.n=1", "grpo.dynamic_sampling=false")
    assert cfg.rollout.n == 1
    with pytest.raises((ConfigError, ValueError), match="grpo.dynamic_sampling"):
        _load(f"grpo.adv_estimator={batch_baseline_estimator}", "rollout.n=1", "grpo.dynamic_sampling=true")


def test_policy_loss_reinforce_does_not_lift_the_group_requirement():
    with pytest.raises((ConfigError, ValueError), match="rollout.n"):
        _load("grpo.policy_loss=reinforce", "rollout.n=1")


def test_kernels_section_reaches_the_config():
    assert _load("kernels.mode=reference").kernels.mode == "reference"


def test_importance_sampling_auto_follows_the_rollout_engine():
    from jobs.grpo import resolved_grpo

    assert resolved_grpo(_load()).is_correction == "off"  # hf engine: the learner's own model code
    vllm = _load("rollout.backend=vllm", "rollout.num_gpus=0.5", "grpo.num_gpus=0.5")
    assert resolved_grpo(vllm).is_correction == "token_truncate"
    assert resolved_grpo(_load("rollout.backend=vllm", "rollout.num_gpus=0.5",
                               "grpo.is_correction=sequence_mask")).is_correction == "sequence_mask"
    with pytest.raises((ConfigError, ValueError), match="grpo.is_cap"):
        _load("grpo.is_cap=1.0")
    # async samples come from older weights: corrected by default, also with the hf engine
    assert resolved_grpo(_load("grpo.async_mode=one_step")).is_correction == "token_truncate"


def test_async_modes_and_their_lag_bound():
    assert _load().grpo.weights_lag_bound == 0
    assert _load("grpo.async_mode=one_step").grpo.weights_lag_bound == 1
    assert _load("grpo.async_mode=bounded", "grpo.max_weights_lag=3").grpo.weights_lag_bound == 3
    with pytest.raises((ConfigError, ValueError), match="grpo.max_weights_lag"):
        _load("grpo.max_weights_lag=0")
    with pytest.raises((ConfigError, ValueError), match="rollout.placement=separate"):
        _load("grpo.async_mode=bounded", "rollout.backend=vllm", "rollout.num_gpus=0.5", "grpo.num_gpus=0.5")
    ok = _load("grpo.async_mode=bounded", "rollout.backend=vllm", "rollout.num_gpus=0.5", "grpo.num_gpus=0.5",
               "rollout.sleep_level=0")
    assert ok.grpo.async_mode == "bounded"


def test_env_section():
    cfg = _load("env.name=calculator", "env.kwargs={max_turns: 3}", "env.max_total_tokens=512")
    assert cfg.env.enabled and cfg.env.spec() == {"name": "calculator", "kwargs": {"max_turns": 3}}
    assert not _load().env.enabled
    with pytest.raises((ConfigError, ValueError), match="env.name: unknown environment 'calc'"):
        _load("env.name=calc")
    with pytest.raises((ConfigError, ValueError), match="env.max_total_tokens"):
        _load("env.name=calculator", "env.max_total_tokens=1")


def test_prompt_rows_for_episodes_keep_the_row(tmp_path):
    """With env.name set the environment builds the prompt from the row: any columns do."""
    import json

    from jobs.grpo import read_prompts, step_fields
    from jobs.grpo_config import PromptDataConfig

    f = tmp_path / "code.jsonl"
    f.write_text(json.dumps({"problem": "Write add(a, b).", "tests": ["assert add(1, 2) == 3"]}) + "\n")
    with pytest.raises(ValueError, match="needs a 'question' or 'prompt' column"):
        read_prompts(PromptDataConfig(path=str(f)))
    (row,) = read_prompts(PromptDataConfig(path=str(f)), episodes=True)
    assert row["row"] == {"problem": "Write add(a, b).", "tests": ["assert add(1, 2) == 3"]}
    r = {"reward/mean": 0.5, "groups/kept": 2, "groups/total": 3, "response_length/mean": 40.0,
         "env/turns_mean": 1.5, "env/tool_error_rate": 0.25, "time/rollout_s": 1.0, "time/reward_s": 0.0,
         "time/update_s": 1.0, "time/sync_s": 0.1}
    assert "turns 1.50  tool-err 0.25" in step_fields(r)
