"""Multi-turn samples: observation tokens are context for the model but out of the loss. The
learner (packed eager path and the fixed-shape graph path) must equal a hand-masked reference:
the padded one-row-per-sequence maths with the mask written out here, not by the code under test."""
from __future__ import annotations

import pytest
import torch

from actors import grpo_math as gm
from actors.learner import GRPOConfig, Learner, collate
from actors.learner_batch import loss_tokens, make_batch, pack_fixed
from actors.learner_graph import FixedShapeLoss
from actors.rollout import Sample
from kernels.logprobs import sequence_logprobs
from kernels.model import LoraConfig, ModelConfig, add_lora, build_model
from lora_helpers import random_grpo_batch, randomise_lora

VOCAB = 512
LORA = ModelConfig(preset="tiny", dtype="float32", finetune="lora", lora=LoraConfig(r=8, alpha=16))


def _masked_batch(seed=0, n=6):
    """Random sequences whose completions hold an 'observation' span (mask 0) in the middle."""
    batch = random_grpo_batch(VOCAB, seed, n, rollout_logprob=lambda i, j: -1.0 - 0.05 * j)
    masks = []
    for c in batch["completion_ids"]:
        m = [1] * len(c)
        for j in range(1, len(c) - 1):  # every completion of 3+ tokens: inner tokens are observations
            if j % 2:
                m[j] = 0
        masks.append(m)
    batch["loss_mask"] = masks
    assert 0 < loss_tokens(batch) < sum(len(c) for c in batch["completion_ids"])
    return batch


def _reference(batch, cfg: GRPOConfig):
    """Loss and gradients with the mask built by hand from batch["loss_mask"]."""
    model = add_lora(build_model(LORA, vocab_size=VOCAB, seed=0), LORA)
    randomise_lora(model, 3)
    t = collate({k: v for k, v in batch.items() if k != "loss_mask"})  # the unmasked layout
    mask = torch.zeros_like(t["mask"])
    for s, m in enumerate(batch["loss_mask"]):
        mask[s, :len(m)] = torch.tensor(m, dtype=torch.float32)
    lp, _ = sequence_logprobs(model, t["input_ids"], t["index"], t["targets"], t["mask"])
    loss, _ = gm.grpo_loss(lp, lp.detach(), t["advantages"], mask, params=gm.LossParams(),
                           loss_agg=cfg.loss_agg, num_tokens=float(mask.sum()),
                           num_seqs=float(len(batch["advantages"])), max_len=64)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _learner(batch, cfg: GRPOConfig, fixed: bool):
    learner = Learner(LORA, cfg, vocab_size=VOCAB, seed=0, max_len_norm=64)
    randomise_lora(learner.model, seed=3)
    if fixed:
        learner.fixed = FixedShapeLoss(learner, graphs=False)
    learner.opt.step = lambda *a, **k: None
    m = learner.update(batch)
    return m, {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_observation_tokens_are_out_of_the_loss(agg, fixed):
    batch = _masked_batch()
    cfg = GRPOConfig(prompts_per_step=3, loss_agg=agg, max_grad_norm=0.0, log_kl=False, micro_batch_size=4,
                     micro_batch_tokens=40, is_correction="off")
    want_loss, want = _reference(batch, cfg)
    m, got = _learner(batch, cfg, fixed)
    assert m["loss"] == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=2e-5, rtol=1e-4)
    # the mask matters: the same batch trained on every completion token gives other gradients
    _, unmasked = _learner({k: v for k, v in batch.items() if k != "loss_mask"}, cfg, fixed)
    assert any(not torch.allclose(unmasked[n], got[n], atol=1e-6) for n in got)


def test_pack_fixed_writes_the_loss_mask_and_per_sequence_weights():
    batch = {"prompt_ids": [[1, 2]], "completion_ids": [[3, 4, 5, 6]], "rollout_logprobs": [[-1.0] * 4],
             "advantages": [1.0], "loss_mask": [[1, 0, 0, 1]]}
    ((idx, t),) = pack_fixed(batch, pad_id=0, rows=1, row_len=8, loss_agg="seq-mean-token-mean")
    # position p predicts token p + 1: completion tokens are predicted at positions 1..4
    assert t["mask"].tolist() == [0, 1, 0, 0, 1, 0, 0, 0]
    assert t["targets"].tolist()[1:5] == [3, 4, 5, 6]  # observation tokens are still in the sequence
    assert t["weight"].tolist()[1] == pytest.approx(0.5)  # 1 / its 2 loss tokens


def test_make_batch_carries_episode_masks():
    single = Sample([1, 2], [3, 4], [-1.0, -1.0], "a", "stop")
    multi = Sample([1, 2], [3, 9, 9, 4], [-1.0, 0.0, 0.0, -1.0], "b", "stop", loss_mask=[1, 0, 0, 1], reward=1.0)
    b = make_batch([single, multi], [0.5, -0.5])
    assert b["loss_mask"] == [[1, 1], [1, 0, 0, 1]] and loss_tokens(b) == 4
    assert "loss_mask" not in make_batch([single], [1.0])  # single-turn batches are unchanged
    bad = Sample([1], [3, 4], [-1.0, -1.0], "c", "stop", loss_mask=[1])
    with pytest.raises(ValueError, match="sample 0 has 1 loss-mask entries for 2 completion tokens"):
        make_batch([bad], [1.0])
