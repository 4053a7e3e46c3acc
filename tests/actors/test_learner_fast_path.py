"""The learner's fast path against the old learner's maths: packed rows + patched kernels + fused
LoRA + the fused logprob head must give the same logprobs, loss and gradients as one padded row per
sequence through the plain Hugging Face model with the chunked full-softmax head."""
from __future__ import annotations

import pytest
import torch

from actors import grpo_math as gm
from actors.learner import GRPOConfig, Learner, collate, pack_micro_batch, packed_logprobs
from actors.learner_batch import micro_batches
from kernels.logprobs import fused_head_reason, sequence_logprobs
from kernels.model import LoraConfig, ModelConfig, add_lora, build_model
from kernels.patch import KernelsConfig
from lora_helpers import random_grpo_batch, randomise_lora

VOCAB = 512
LORA = ModelConfig(preset="tiny", dtype="float32", finetune="lora", lora=LoraConfig(r=8, alpha=16))
# fp32 on CPU: the fused and reference paths differ only by summation order
ATOL, RTOL = 2e-5, 1e-4


def _batch(seed=0, n=7):
    return random_grpo_batch(VOCAB, seed, n)


def test_pack_layout_restarts_positions_and_indexes_completions():
    batch = {"prompt_ids": [[1, 2], [3, 4, 5], [6]], "completion_ids": [[7, 8], [9], [10, 11, 12]],
             "rollout_logprobs": [[0.0] * 2, [0.0], [0.0] * 3], "advantages": [1.0, -1.0, 0.5]}
    t = pack_micro_batch(batch, pad_id=0, row_tokens=8)  # 4 + 4 fill row 0; the third (4) opens row 1
    assert t["input_ids"].tolist() == [[1, 2, 7, 8, 3, 4, 5, 9], [6, 10, 11, 12, 0, 0, 0, 0]]
    # positions restart per sequence; the padding continues the row's last sequence
    assert t["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7]]
    # completion token j of a sequence is predicted at its prompt's last position + j
    assert t["index"].tolist() == [1, 2, 6, 8, 9, 10]
    assert t["targets"].tolist() == [7, 8, 9, 10, 11, 12]
    assert t["mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]


def test_micro_batches_respect_sequence_and_token_budgets():
    batch = _batch(n=7)
    lens = [len(p) + len(c) for p, c in zip(batch["prompt_ids"], batch["completion_ids"])]
    groups = micro_batches(batch, max_sequences=3, max_tokens=12)
    assert [i for g in groups for i in g] == list(range(7))
    for g in groups:
        assert len(g) <= 3 and (len(g) == 1 or sum(lens[i] for i in g) <= 12)


@pytest.mark.parametrize("row_tokens", [0, 8, 64])
def test_packed_logprobs_equal_one_row_per_sequence(row_tokens):
    """Several sequences in a row see nothing of each other (positions restart per sequence)."""
    model = build_model(ModelConfig(preset="tiny", dtype="float32"), vocab_size=VOCAB, seed=0)
    batch = _batch(1)
    t = collate(batch)
    want, want_ent = sequence_logprobs(model, t["input_ids"], t["index"], t["targets"], t["mask"])
    packed = pack_micro_batch(batch, row_tokens=row_tokens)
    if row_tokens == 64:
        assert packed["input_ids"].shape[0] == 1  # every sequence in one row
    got, ent = packed_logprobs(model, packed)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ent, want_ent, atol=ATOL, rtol=RTOL)


def _old_learner_step(batch, cfg: GRPOConfig, seed: int):
    """The learner before the fast path: unpatched model, padded rows, chunked head."""
    model = add_lora(build_model(LORA, vocab_size=VOCAB, seed=seed), LORA)
    randomise_lora(model, 0)
    t = collate(batch)
    lp, _ = sequence_logprobs(model, t["input_ids"], t["index"], t["targets"], t["mask"], chunk_size=5)
    n_tok = float(t["mask"].sum())
    loss, _ = gm.grpo_loss(lp, lp.detach(), t["advantages"], t["mask"], policy_loss=cfg.policy_loss,
                           params=gm.LossParams(eps_low=cfg.eps_low, eps_high=cfg.eps_high),
                           loss_agg=cfg.loss_agg, num_tokens=n_tok, num_seqs=float(len(batch["advantages"])),
                           max_len=64)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["auto", "triton"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_fast_learner_loss_and_grads_equal_the_old_learner(mode, agg):
    cfg = GRPOConfig(lr=1e-2, micro_batch_size=3, micro_batch_tokens=20, pack_tokens=12, loss_agg=agg,
                     max_grad_norm=0, log_kl=False)
    batch = _batch(2)
    want_loss, want_grads = _old_learner_step(batch, cfg, seed=0)
    learner = Learner(LORA, cfg, vocab_size=VOCAB, seed=0, kernels=KernelsConfig(mode=mode))
    assert learner.notes["kernels"] == "patched" and learner.notes["fused_lora_blocks"] > 0
    assert fused_head_reason(learner.model) is None  # the fused logprob head is what runs
    randomise_lora(learner.model, 0)
    m = learner.update(batch)
    assert m["loss"] == pytest.approx(want_loss, rel=RTOL, abs=ATOL)
    got = {n: p.grad for n, p in learner.model.named_parameters() if p.requires_grad}
    assert set(got) == set(want_grads)
    for n in want_grads:
        torch.testing.assert_close(got[n], want_grads[n], atol=ATOL, rtol=RTOL)
    assert m["learner_tokens"] == sum(len(p) + len(c) for p, c in zip(batch["prompt_ids"], batch["completion_ids"]))


def test_kernels_off_takes_the_reference_head():
    learner = Learner(LORA, GRPOConfig(log_kl=False), vocab_size=VOCAB, seed=0,
                      kernels=KernelsConfig(enabled=False))
    assert fused_head_reason(learner.model) == "kernels off"
    full = Learner(ModelConfig(preset="tiny", dtype="float32", finetune="full"), GRPOConfig(log_kl=False),
                   vocab_size=VOCAB, seed=0)
    assert fused_head_reason(full.model) == "lm_head is trained"


def test_qlora_learner_on_cpu_gives_the_clear_error():
    with pytest.raises((RuntimeError, ImportError), match="(?i)cuda|bitsandbytes|qlora"):
        Learner(ModelConfig(preset="tiny", finetune="qlora"), GRPOConfig(), vocab_size=VOCAB, seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_learner_holds_nf4_weights_and_learns():
    from kernels.nf4 import is_4bit_weight

    cfg = GRPOConfig(lr=5e-3, num_gpus=1, log_kl=False, max_grad_norm=0)
    learner = Learner(ModelConfig(preset="tiny", finetune="qlora", lora=LoraConfig(r=8, alpha=16)), cfg,
                      vocab_size=VOCAB, seed=0)
    weights = [m.weight for n, m in learner.model.named_modules() if n.endswith("q_proj.base_layer")]
    assert weights and all(is_4bit_weight(w) for w in weights)
    batch = _batch(3)
    before = learner.compute_logprobs(batch)
    for _ in range(3):
        learner.update(batch)
    after = learner.compute_logprobs(batch)
    moved = [(sum(a) - sum(b)) * adv for adv, a, b in zip(batch["advantages"], after, before) if abs(adv) > 0.3]
    assert moved and all(x > 0 for x in moved)
