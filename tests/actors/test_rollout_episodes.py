"""Multi-turn episodes through the rollout actor (RolloutWorker.episodes) into the learner: the
learner's batch holds exactly the ids the engine sampled plus the observation ids, and its own
logprobs of the sampled ids equal the engine's (re-tokenising a turn would break both)."""
from __future__ import annotations

import pytest

from actors.learner import GRPOConfig, Learner, logprob_mismatch, make_batch
from actors.rollout import RolloutConfig, RolloutWorker
from kernels.model import LoraConfig, ModelConfig

VOCAB = 512
MODEL = ModelConfig(preset="tiny", dtype="float32", finetune="lora", lora=LoraConfig(r=8, alpha=16))
ROWS = [{"question": "Ava has 3 apples. Ava gets 4 more. How many apples does Ava have now?", "answer": "#### 7"},
        {"question": "A shop had 12 pens and sold 5. How many pens does the shop have now?", "answer": "#### 7"}]
RELAY = {"name": "scripted_envs:Relay", "kwargs": {"max_turns": 3}}


@pytest.fixture(scope="module")
def worker(tiny_tokenizer_dir):
    return RolloutWorker(MODEL, RolloutConfig(n=2, max_tokens=8, batch_size=4), tiny_tokenizer_dir,
                         vocab_size=VOCAB, seed=0)


def test_episode_samples_are_token_exact_and_masked(worker):
    groups = worker.episodes(ROWS, RELAY, seed=5)
    assert [len(g) for g in groups] == [2, 2]
    samples = [s for g in groups for s in g]
    for s in samples:
        e = s.episode
        assert e["turns"] == 3 and e["tool_calls"] == 2 and e["finish"] == "done"
        assert len(s.loss_mask) == len(s.completion_token_ids) == len(s.logprobs)
        assert sum(s.loss_mask) == e["sampled_tokens"] and e["observation_tokens"] > 0
        assert len(s.completion_token_ids) == e["sampled_tokens"] + e["observation_tokens"]
        assert s.reward in (0.0, 1.0)
        # observation tokens carry no engine logprob; every sampled token does
        assert all(lp == 0.0 for lp, m in zip(s.logprobs, s.loss_mask) if not m)
        assert all(lp < 0.0 for lp, m in zip(s.logprobs, s.loss_mask) if m)
    # the learner, given the batch, scores the sampled tokens as the engine did (same weights, fp32)
    learner = Learner(MODEL, GRPOConfig(micro_batch_size=4), vocab_size=VOCAB, seed=0)
    batch = make_batch(samples, [0.0] * len(samples))
    lps = learner.compute_logprobs(batch)
    sampled = [[x for x, m in zip(lp, s.loss_mask) if m] for lp, s in zip(lps, samples)]
    engine = [[x for x, m in zip(s.logprobs, s.loss_mask) if m] for s in samples]
    mm = logprob_mismatch(sampled, engine)
    assert mm["tokens"] == sum(sum(s.loss_mask) for s in samples) and mm["max_abs"] < 1e-4, mm


def test_greedy_episodes_for_held_out_success(worker):
    a = worker.episodes(ROWS[:1], RELAY, n=1, temperature=0.0, seed=1)
    b = worker.episodes(ROWS[:1], RELAY, n=1, temperature=0.0, seed=2)
    assert a[0][0].completion_token_ids == b[0][0].completion_token_ids  # greedy: seeds do not matter


def test_max_total_tokens_ends_the_episode_as_truncated(worker):
    prompt_len = len(worker.episodes(ROWS[:1], RELAY, n=1, seed=0)[0][0].prompt_token_ids)
    (s,), = worker.episodes(ROWS[:1], RELAY, n=1, seed=0, max_total_tokens=prompt_len + 10)
    assert len(s.prompt_token_ids) + len(s.completion_token_ids) <= prompt_len + 10
    assert s.episode["finish"] == "max_total_tokens" and s.finish_reason == "length" and s.reward == 0.0
