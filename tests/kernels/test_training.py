"""Training-step numerics: token-normalised gradient accumulation, collation, schedules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.training import LossForward, accumulate_step, collate, lr_lambda, target_tokens
from kernels.model import ModelConfig, add_lora, build_model


def _rows(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, vocab, size=n).astype(np.int32) for n in lengths]
    labels = []
    for x in ids:
        lab = x.copy()
        lab[: len(x) // 3] = -100  # a prompt part without loss
        labels.append(lab)
    pos = [np.arange(len(x), dtype=np.int32) for x in ids]
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _slice(rows, a, b):
    return {k: v[a:b] for k, v in rows.items()}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grad_accumulation_equals_one_big_batch_with_unequal_lengths():
    cfg = ModelConfig(preset="tiny", config_overrides={"num_hidden_layers": 2})
    model = add_lora(build_model(cfg, vocab_size=128, seed=0), cfg)
    # make LoRA B non-zero so every LoRA parameter gets a gradient
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    lm = LossForward(model)
    rows = _rows([5, 17, 9, 30, 3, 22, 11, 14], vocab=128)
    dev = torch.device("cpu")

    big = accumulate_step(lm, [collate(rows, 0)], device=dev)
    g_big = _grads(model)
    model.zero_grad(set_to_none=True)
    micro = [collate(_slice(rows, i, i + 2), 0) for i in range(0, 8, 2)]
    small = accumulate_step(lm, micro, device=dev)
    g_small = _grads(model)

    assert big["target_tokens"] == small["target_tokens"]
    # fp32 on CPU; differences are summation order only
    assert small["loss"] == pytest.approx(big["loss"], rel=1e-5)
    for n in g_big:
        torch.testing.assert_close(g_small[n], g_big[n], atol=1e-6, rtol=1e-4)

    # the naive alternative (mean per micro-batch, then averaged) gives a different gradient:
    model.zero_grad(set_to_none=True)
    for mb in micro:
        loss, n = lm(mb["input_ids"], mb["labels"], mb["position_ids"])
        (loss / n / len(micro)).backward()
    g_naive = _grads(model)
    assert any(not torch.allclose(g_naive[n], g_big[n], atol=1e-6, rtol=1e-4) for n in g_big)


def test_two_workers_token_normalisation_matches_single_worker():
    """Simulated 2-worker step: each worker's grad * (world/N) averaged = the global sum / N."""
    cfg = ModelConfig(preset="tiny", config_overrides={"num_hidden_layers": 1})
    model = add_lora(build_model(cfg, vocab_size=64, seed=1), cfg)
    lm = LossForward(model)
    rows = _rows([4, 12, 7, 19], vocab=64, seed=3)
    dev = torch.device("cpu")
    accumulate_step(lm, [collate(rows, 0)], device=dev)
    g_one = _grads(model)
    b0, b1 = collate(_slice(rows, 0, 2), 0), collate(_slice(rows, 2, 4), 0)
    total = float(target_tokens(b0) + target_tokens(b1))
    per_worker = []
    for b in (b0, b1):
        model.zero_grad(set_to_none=True)
        accumulate_step(lm, [b], device=dev, world_size=2, all_reduce_sum=lambda x, b=b: total
                        if x == float(target_tokens(b)) else x)
        per_worker.append(_grads(model))
    for n in g_one:
        avg = (per_worker[0][n] + per_worker[1][n]) / 2  # what DDP's all-reduce computes
        torch.testing.assert_close(avg, g_one[n], atol=1e-6, rtol=1e-4)


def test_collate_pads_right_with_ignored_labels():
    rows = _rows([3, 6], vocab=50)
    b = collate(rows, pad_id=0)
    assert b["input_ids"].shape == (2, 6)
    assert (b["labels"][0, 3:] == -100).all()
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2]


def test_no_target_tokens_is_a_clear_error():
    cfg = ModelConfig(preset="tiny", config_overrides={"num_hidden_layers": 1})
    lm = LossForward(add_lora(build_model(cfg, vocab_size=32), cfg))
    rows = _rows([4], vocab=32)
    rows["labels"] = [np.full(4, -100, dtype=np.int32)]
    with pytest.raises(ValueError, match="no target tokens"):
        accumulate_step(lm, [collate(rows, 0)], device=torch.device("cpu"))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedules_warmup_and_end(schedule):
    f = lr_lambda(schedule, warmup_steps=4, total_steps=20, min_ratio=0.1)
    assert f(0) == pytest.approx(0.25)
    assert f(3) == pytest.approx(1.0)
    end = f(20)
    assert end == pytest.approx(1.0 if schedule == "constant" else 0.1)
