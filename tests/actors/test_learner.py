"""Learner: chunked logprobs, reference with adapters disabled, update maths, DDP, sync state, checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch

from actors.learner import (GRPOConfig, Learner, chunked_logprobs, collate, make_batch,
                            sequence_logprobs)
from actors.rollout import Sample
from kernels.model import LoraConfig, ModelConfig, build_model
from kernels.tokenizer import load_tokenizer
from lora_helpers import randomise_lora

VOCAB = 512
LORA = ModelConfig(preset="tiny", dtype="float32", finetune="lora", lora=LoraConfig(r=8, alpha=16))
FULL = ModelConfig(preset="tiny", dtype="float32", finetune="full")


def _samples(seed=0, n=6, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(4, vocab, (3 + i % 4,), generator=g).tolist()
        c = torch.randint(4, vocab, (1 + (i * 3) % 7,), generator=g).tolist()
        out.append(Sample(p, c, [-1.0] * len(c), "", "stop"))
    return out


def _batch(seed=0, n=6):
    s = _samples(seed, n)
    adv = torch.linspace(-1, 1, n).tolist()
    return make_batch(s, adv)


def test_chunked_logprobs_equal_full_logits_values_and_grads():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=False)
    h = torch.randn(23, 16, requires_grad=True)
    t = torch.randint(0, 37, (23,))
    for temp in (1.0, 0.7):
        full = torch.log_softmax(head(h).float() / temp, -1)
        want = full.gather(-1, t[:, None]).squeeze(-1)
        want_ent = -(full.exp() * full).sum(-1)
        (gh_want, gw_want) = torch.autograd.grad(want.sum(), (h, head.weight))
        got, ent = chunked_logprobs(h, head, t, temperature=temp, chunk_size=5)  # 23 = 4 x 5 + 3
        (gh, gw) = torch.autograd.grad(got.sum(), (h, head.weight))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh, gh_want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gw, gw_want, atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_softcap():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 11, bias=False)
    h, t = torch.randn(7, 8) * 5, torch.randint(0, 11, (7,))
    logits = head(h)
    want = torch.log_softmax(30.0 * torch.tanh(logits / 30.0), -1).gather(-1, t[:, None]).squeeze(-1)
    got, _ = chunked_logprobs(h, head, t, chunk_size=3, softcap=30.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_equal_hf_forward():
    model = build_model(ModelConfig(preset="tiny", dtype="float32"), vocab_size=VOCAB, seed=0)
    batch = _batch()
    t = collate(batch)
    got, _ = sequence_logprobs(model, t["input_ids"], t["index"], t["targets"], t["mask"], chunk_size=7)
    for b, (p, c) in enumerate(zip(batch["prompt_ids"], batch["completion_ids"])):
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]  # [L, V]
        want = torch.stack([logp[len(p) - 1 + i, tok] for i, tok in enumerate(c)])
        torch.testing.assert_close(got[b, :len(c)], want, atol=1e-5, rtol=1e-5)
        assert (got[b, len(c):] == 0).all()


def test_reference_with_adapters_disabled_equals_base_model():
    cfg = GRPOConfig(micro_batch_size=4)
    learner = Learner(LORA, cfg, vocab_size=VOCAB, seed=3)
    randomise_lora(learner.model, 0)
    base = build_model(LORA, vocab_size=VOCAB, seed=3)  # same seed: the same base weights
    batch = _batch(1)
    ref = learner.compute_logprobs(batch, "reference")
    pol = learner.compute_logprobs(batch, "policy")
    t = collate(batch)
    with torch.no_grad():
        want, _ = sequence_logprobs(base, t["input_ids"], t["index"], t["targets"], t["mask"])
    for b, row in enumerate(ref):
        torch.testing.assert_close(torch.tensor(row), want[b, :len(row)], atol=1e-5, rtol=1e-5)
    diff = max(abs(a - b) for r1, r2 in zip(ref, pol) for a, b in zip(r1, r2))
    assert diff > 1e-3, "the adapter must change the policy (else this test proves nothing)"


def test_full_finetune_reference_is_a_frozen_copy():
    learner = Learner(FULL, GRPOConfig(lr=1e-2, micro_batch_size=8), vocab_size=VOCAB, seed=0)
    batch = _batch(2)
    ref0 = learner.compute_logprobs(batch, "reference")
    learner.update(batch)
    assert learner.compute_logprobs(batch, "reference") == ref0
    assert learner.compute_logprobs(batch, "policy") != ref0


def test_update_raises_logprob_of_positive_advantage_samples():
    learner = Learner(LORA, GRPOConfig(lr=5e-3, micro_batch_size=8, max_grad_norm=0), vocab_size=VOCAB, seed=0)
    batch = _batch(3)
    before = learner.compute_logprobs(batch)
    for _ in range(3):
        m = learner.update(batch)
    after = learner.compute_logprobs(batch)
    for adv, b, a in zip(batch["advantages"], before, after):
        if abs(adv) > 0.3:
            assert (sum(a) - sum(b)) * adv > 0
    for k in ("loss", "kl", "clip_frac", "entropy", "grad_norm", "mismatch_kl"):
        assert k in m and m[k] == m[k]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batching_equals_one_big_batch(agg):
    """Global normalisers: gradient accumulation over micro-batches == one forward of the batch."""
    results = []
    for mbs in (2, 6):
        cfg = GRPOConfig(lr=1e-2, micro_batch_size=mbs, loss_agg=agg, max_grad_norm=0, log_kl=False)
        learner = Learner(LORA, cfg, vocab_size=VOCAB, seed=0)
        learner.update(_batch(4))
        # gradients, not parameters: Adam's first step is ~lr * sign(g), which turns round-off in
        # near-zero gradients into lr-sized differences
        results.append({n: p.grad.clone() for n, p in learner.model.named_parameters() if p.requires_grad})
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], atol=1e-7, rtol=1e-4)


def test_ppo_epochs_and_minibatches_step_counts_and_clip():
    cfg = GRPOConfig(lr=5e-2, micro_batch_size=4, ppo_epochs=2, num_minibatches=2, eps_low=0.01, eps_high=0.01)
    learner = Learner(LORA, cfg, vocab_size=VOCAB, seed=0)
    m = learner.update(_batch(5, n=8))
    assert m["optimizer_steps"] == 4
    assert m["clip_frac"] > 0  # later steps move the policy past the tiny clip range


def test_merged_state_equals_peft_merge():
    learner = Learner(LORA, GRPOConfig(), vocab_size=VOCAB, seed=0)
    randomise_lora(learner.model, 1)
    merged = copy.deepcopy(learner.model).merge_and_unload().state_dict()
    state = learner.state_for_sync("merged")
    assert state and all(".lora_" not in k and "base_layer" not in k for k in state)
    assert len(state) == 4 * 7  # 4 layers x 7 adapted projections: only what LoRA changes
    for k, v in state.items():
        torch.testing.assert_close(v, merged[k], atol=1e-6, rtol=1e-6)
    full = learner.state_for_sync("merged", full=True)
    assert set(full) >= set(merged) - {"lm_head.weight"}


def test_save_load_roundtrip(tmp_path):
    cfg = GRPOConfig(lr=1e-2, micro_batch_size=8)
    a = Learner(LORA, cfg, vocab_size=VOCAB, seed=0)
    a.update(_batch(6))
    a.save(str(tmp_path / "ck"))
    b = Learner(LORA, cfg, vocab_size=VOCAB, seed=0)
    assert b.load(str(tmp_path / "ck")) == 1
    batch = _batch(7)
    assert a.compute_logprobs(batch) == b.compute_logprobs(batch)
    ma, mb = a.update(batch), b.update(batch)  # optimizer state restored too: the next step agrees
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)
    assert a.compute_logprobs(batch) == b.compute_logprobs(batch)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="grpo.policy_loss"):
        GRPOConfig(policy_loss="ppo2")
    with pytest.raises(ValueError, match="grpo.loss_agg"):
        GRPOConfig(loss_agg="mean")
    with pytest.raises(ValueError, match="num_minibatches"):
        GRPOConfig(prompts_per_step=2, num_minibatches=4)


@pytest.mark.e2e
def test_two_learners_gloo_equal_one_learner(ray_local):
    """Data parallel (2 Ray actors, gloo all-reduce) == one learner on the whole batch."""
    from cluster.grpo_group import LearnerGroup

    cfg1 = GRPOConfig(lr=1e-2, micro_batch_size=3, max_grad_norm=1.0, num_cpus=0.5)
    cfg2 = GRPOConfig(lr=1e-2, micro_batch_size=3, max_grad_norm=1.0, num_learners=2, num_cpus=0.5)
    batch = _batch(8, n=8)
    one = Learner(LORA, cfg1, vocab_size=VOCAB, seed=0)
    group = LearnerGroup(LORA, cfg2, vocab_size=VOCAB, seed=0, num_threads=1)
    try:
        m1 = one.update(batch)
        m2 = group.update(batch)
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-7)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
        probe = _batch(9)
        got = group.compute_logprobs(probe)
        want = one.compute_logprobs(probe)
        for g, w in zip(got, want):
            torch.testing.assert_close(torch.tensor(g), torch.tensor(w), atol=1e-5, rtol=1e-5)
        # rank 1 holds the same weights as rank 0
        import ray

        r1 = ray.get(group.actors[1].compute_logprobs.remote(probe))
        assert r1 == got
    finally:
        group.shutdown()


def test_tokenizer_fixture_vocab(tiny_tokenizer_dir):
    assert len(load_tokenizer(tiny_tokenizer_dir)) <= VOCAB
