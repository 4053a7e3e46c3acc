"""Fixed-shape micro-batches (actors/learner_batch.pack_fixed) and the learner's graph loss
(actors/learner_graph.FixedShapeLoss, run eagerly on CPU): the same gradients and metrics as the
learner's own packed path, for each loss aggregation and with a KL term; CUDA graphs themselves
are tested under `gpu`."""
from __future__ import annotations

import pytest
import torch

from actors.learner import GRPOConfig, Learner
from actors.learner_batch import fixed_row_length, pack_fixed
from actors.learner_graph import FixedShapeLoss, unsupported
from kernels.model import LoraConfig, ModelConfig
from lora_helpers import random_grpo_batch, randomise_lora

VOCAB = 512
LORA = ModelConfig(preset="tiny", dtype="float32", finetune="lora", lora=LoraConfig(r=8, alpha=16))


def _batch(seed=0, n=6):
    # rollout logprobs around the tiny model's own (~ -6.2): some ratios pi_old / pi_rollout above a cap of 2
    return random_grpo_batch(VOCAB, seed, n, rollout_logprob=lambda i, j: -5.0 - 1.0 * ((i + j) % 4))


def test_pack_fixed_layout():
    batch = {"prompt_ids": [[1, 2], [3, 4, 5], [6]], "completion_ids": [[7, 8], [9], [10, 11, 12]],
             "rollout_logprobs": [[-0.5, -0.6], [-0.7], [-0.1, -0.2, -0.3]], "advantages": [1.0, -1.0, 0.5],
             "old_logprobs": [[-1.0, -2.0], [-3.0], [-4.0, -5.0, -6.0]]}
    parts = pack_fixed(batch, pad_id=0, rows=2, row_len=6, loss_agg="seq-mean-token-mean")
    assert len(parts) == 2  # rows: [seq0 | pad], [seq1 | pad] -> full; seq2 opens the next micro-batch
    (idx0, a), (idx1, b) = parts
    assert idx0 == [0, 1] and idx1 == [2]
    assert a["input_ids"].tolist() == [[1, 2, 7, 8, 0, 0], [3, 4, 5, 9, 0, 0]]
    # positions restart per sequence; the padding continues the row's last sequence
    assert a["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert b["input_ids"].tolist() == [[6, 10, 11, 12, 0, 0], [0] * 6]
    # position t predicts token t + 1: seq0's completion at flat positions 1, 2; seq1's at 8
    assert a["mask"].nonzero().flatten().tolist() == [1, 2, 8]
    assert a["targets"][[1, 2, 8]].tolist() == [7, 8, 9]
    assert a["adv"][[1, 2, 8]].tolist() == [1.0, 1.0, -1.0]
    assert a["weight"][[1, 2, 8]].tolist() == [0.5, 0.5, 1.0]  # 1 / completion length
    assert a["old_logprobs"][[1, 2, 8]].tolist() == [-1.0, -2.0, -3.0]
    assert b["rollout_logprobs"][[0, 1, 2]].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert all(v.shape[0] == 12 for k, v in a.items() if k not in ("input_ids", "position_ids"))
    # two sequences in one row
    (_, c), = pack_fixed(batch, pad_id=0, rows=1, row_len=12, loss_agg="token-mean")
    assert c["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert c["weight"].sum() == 6.0
    assert fixed_row_length(batch, 256) == 256 and fixed_row_length(batch, 3) == 6
    with pytest.raises(ValueError, match="sequence 0 has 4 tokens, more than a row.s 3"):
        pack_fixed(batch, 0, rows=4, row_len=3)


def _grads_and_metrics(fixed: bool, cfg: GRPOConfig, batch: dict):
    """One update's gradients (optimizer step skipped) and metrics, through the learner's own
    packed path or through FixedShapeLoss (eager)."""
    learner = Learner(LORA, cfg, vocab_size=VOCAB, seed=0)
    randomise_lora(learner.model, seed=3)
    assert learner.fixed is None  # CPU: no graphs
    if fixed:
        learner.fixed = FixedShapeLoss(learner, graphs=False)
    learner.opt.step = lambda *a, **k: None
    m = learner.update(batch)
    return {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.requires_grad}, m


@pytest.mark.parametrize("agg,kl,is_mode", [("token-mean", 0.0, "off"), ("seq-mean-token-mean", 0.1, "token_truncate"),
                                            ("seq-mean-token-sum-norm", 0.0, "token_mask")])
def test_fixed_shape_loss_matches_the_learner(agg, kl, is_mode):
    batch = _batch()
    cfg = GRPOConfig(prompts_per_step=3, loss_agg=agg, kl_coef=kl, log_kl=kl > 0, max_grad_norm=0.0,
                     micro_batch_size=4, micro_batch_tokens=40, is_correction=is_mode)
    g_ref, m_ref = _grads_and_metrics(False, cfg, batch)
    g_fix, m_fix = _grads_and_metrics(True, cfg, batch)
    assert set(g_ref) == set(g_fix) and len(g_ref) > 0
    for n in g_ref:
        torch.testing.assert_close(g_fix[n], g_ref[n], atol=2e-6, rtol=1e-4, msg=n)
    keys = ("loss", "clip_frac", "ratio_mean", "entropy", "mismatch_kl", "grad_norm") + (("kl",) if kl else ()) \
        + (("is_weight_mean", "is_clip_frac") if is_mode != "off" else ())
    if is_mode != "off":  # the batch's ratios straddle the cap: the correction does something here
        assert 0 < m_ref["is_clip_frac"] < 1
    for k in keys:
        assert m_fix[k] == pytest.approx(m_ref[k], rel=1e-4, abs=1e-6), k


def test_graphs_refused_where_they_cannot_run():
    cfg = GRPOConfig(prompts_per_step=2)
    assert unsupported(GRPOConfig(prompts_per_step=2, cuda_graphs=False), None, torch.device("cuda")) == \
        "grpo.cuda_graphs is false"
    assert unsupported(GRPOConfig(prompts_per_step=2, policy_loss="gspo"), None, torch.device("cuda")).startswith(
        "policy_loss 'gspo'")
    assert unsupported(cfg, None, torch.device("cuda"), "qlora").startswith("model.finetune qlora")
    learner = Learner(LORA, cfg, vocab_size=VOCAB, seed=0)
    assert learner.notes["learner_cuda_graphs"].startswith("off (device cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_learner_graph_replays_and_matches_eager_on_gpu():
    """bf16 LoRA on the GPU: the replayed graph gives the eager fixed-shape path's gradients."""
    batch = _batch(n=24)
    model = ModelConfig(preset="tiny", dtype="bfloat16", finetune="lora", lora=LoraConfig(r=8, alpha=16))
    cfg = GRPOConfig(prompts_per_step=3, max_grad_norm=0.0, micro_batch_size=8, micro_batch_tokens=64,
                     num_gpus=1)
    out = []
    for graphs in (False, True):
        learner = Learner(model, cfg, vocab_size=VOCAB, seed=0)
        randomise_lora(learner.model, seed=3)
        assert learner.notes["learner_cuda_graphs"] == "on"
        if not graphs:
            learner.fixed = FixedShapeLoss(learner, graphs=False)
        learner.opt.step = lambda *a, **k: None
        for _ in range(4):  # 2 eager warm-up calls per shape, then capture and replays
            m = learner.update(batch)
        out.append(({n: p.grad.float().clone() for n, p in learner.model.named_parameters() if p.requires_grad}, m))
        if graphs:
            assert learner.fixed.step.replays > 0
    (g0, m0), (g1, m1) = out
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-3, rtol=2e-2, msg=n)
    assert m1["loss"] == pytest.approx(m0["loss"], rel=2e-2, abs=1e-4)


def test_mask_truncated_completions_leaves_them_out_of_the_loss():
    """Masking the truncated samples = training on the batch without them (loss, normalisers, metrics)."""
    batch = dict(_batch(), truncated=[i % 3 == 0 for i in range(6)])
    kept = {k: [v[i] for i in range(6) if i % 3] for k, v in batch.items()}
    cfg = GRPOConfig(prompts_per_step=3, max_grad_norm=0.0, mask_truncated_completions=True)
    g_mask, m_mask = _grads_and_metrics(False, cfg, batch)
    g_kept, m_kept = _grads_and_metrics(False, cfg, kept)
    g_all, _ = _grads_and_metrics(False, GRPOConfig(prompts_per_step=3, max_grad_norm=0.0), batch)
    for n in g_mask:
        torch.testing.assert_close(g_mask[n], g_kept[n])
    assert any(not torch.allclose(g_mask[n], g_all[n]) for n in g_mask)
    assert m_mask["loss"] == pytest.approx(m_kept["loss"]) and m_mask["learner_tokens"] == m_kept["learner_tokens"]
