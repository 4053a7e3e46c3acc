"""trainer.strategy=deepspeed: config checks, and ZeRO-2/3 steps equal plain PyTorch steps.

The step comparison runs the tiny LoRA model with our fused kernels (fused LoRA MLP, Q/K/V and O,
fused cross-entropy reading lm_head) in a subprocess per strategy. Under ZeRO-3 every weight is
sharded, so a kernel reading a weight DeepSpeed did not gather fails or computes with an empty
tensor: equal losses, gradient norms and updated weights show the gathering is right.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.deepspeed_strategy import DeepSpeedConfig, ds_config
from jobs.config import ConfigError, load
from jobs.sft import SFTJobConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "jobs", "configs", "tiny-sft.yaml")


def test_config_sections_parse_and_reach_the_deepspeed_json():
    cfg = load(SFTJobConfig, TINY, ["trainer.strategy=deepspeed", "trainer.deepspeed.zero_stage=3",
                                    "trainer.deepspeed.offload_optimizer=true", "trainer.grad_accum=4"])
    ds = cfg.trainer.deepspeed
    assert ds.zero_stage == 3 and ds.offload_optimizer
    out = ds_config(ds, micro_batch_size=cfg.trainer.micro_batch_size, grad_accum=cfg.trainer.grad_accum,
                    world_size=2, max_grad_norm=0.5, bf16=True)
    assert out["train_batch_size"] == cfg.trainer.micro_batch_size * 4 * 2
    assert out["gradient_accumulation_steps"] == 4
    assert out["gradient_clipping"] == 0.5 and out["bf16"] == {"enabled": True}
    assert out["zero_optimization"]["stage"] == 3
    assert out["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in out["zero_optimization"]
    two = ds_config(DeepSpeedConfig(zero_stage=2), micro_batch_size=1, grad_accum=1, world_size=1,
                    max_grad_norm=1.0, bf16=False)
    assert "stage3_prefetch_bucket_size" not in two["zero_optimization"]


@pytest.mark.parametrize("overrides, message", [
    (["trainer.deepspeed.zero_stage=1"], "trainer.deepspeed.zero_stage: 1 is not accepted"),
    (["trainer.deepspeed.offload_params=true"], "offload_params: needs zero_stage 3"),
    (["trainer.deepspeed.reduce_bucket_size=0"], "reduce_bucket_size: must be >= 1"),
    (["trainer.deepspeed.zero_stages=3"], "did you mean 'trainer.deepspeed.zero_stage'"),
    (["trainer.strategy=deepspeed", "model.gradient_checkpointing=offload"], "offload is for DDP"),
    (["trainer.strategy=deepspeed", "trainer.deepspeed.zero_stage=3", "trainer.optimizer=adamw_8bit"],
     "adamw_8bit does not run with ZeRO-3"),
    (["trainer.strategy=zero"], "trainer.strategy: 'zero' is not accepted"),
])
def test_bad_deepspeed_settings_are_refused_with_the_key(overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        load(SFTJobConfig, TINY, overrides)


def test_qlora_under_deepspeed_is_refused():
    with pytest.raises((ConfigError, ValueError), match="qlora does not run under trainer.strategy=deepspeed"):
        load(SFTJobConfig, TINY, ["trainer.strategy=deepspeed", "model.finetune=qlora", "trainer.use_gpu=true"])


def _steps(strategy: str, port: int, grad_accum: int = 2, overrides: str = "") -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, DS_STEPS_OVERRIDES=overrides)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cluster", "deepspeed_steps.py"),
                           strategy, str(port), str(grad_accum)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain():
    pytest.importorskip("deepspeed")
    return _steps("plain", 29611)


@pytest.mark.parametrize("stage, port, overrides", [
    ("zero2", 29612, ""), ("zero3", 29613, ""),
    # optimizer state and fp32 master weights (and ZeRO-3 weight shards) in CPU memory
    ("zero2", 29614, "trainer.deepspeed.offload_optimizer=true"),
    ("zero3", 29615, "trainer.deepspeed.offload_optimizer=true trainer.deepspeed.offload_params=true"),
])
def test_zero_steps_equal_plain_pytorch(plain, stage, port, overrides):
    got = _steps(stage, port, overrides=overrides)
    assert got["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert got["grad_norms"] == pytest.approx(plain["grad_norms"], rel=1e-4)
    assert got["losses"][-1] < got["losses"][0]  # it trains
    assert set(got["trainable"]) == set(plain["trainable"])
    for name, value in plain["trainable"].items():
        assert got["trainable"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
