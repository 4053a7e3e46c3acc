"""Reward-model interface and the LLM-as-judge reward, with stand-in backends (no model)."""
import asyncio

import pytest

from rewards.combine import call_reward
from rewards.model_based import LLMJudge, llm_judge, parse_score, reward_model
from tests.rewards.sample_rewards import AsyncEchoJudge, EchoJudge


class LengthScorer:
    def score(self, prompts, completions):
        return [len(p) + len(c) for p, c in zip(prompts, completions)]


def test_reward_model_calls_the_scorer():
    assert call_reward(reward_model, ["ab", "c"], ["x", "yz"], kwargs={"scorer": LengthScorer()}) == [3.0, 3.0]
    with pytest.raises(ValueError, match="needs a scorer"):
        call_reward(reward_model, ["a"], ["b"])
    assert reward_model.needs_model_actor


@pytest.mark.parametrize("text, expected", [
    ("Score: 7", 7.0), ("score=3.5 because", 3.5), ("Score: 2 ... final Score: 9", 9.0), ("SCORE : -1", -1.0),
    ("I like it", None), ("", None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_judge_normalises_clamps_and_handles_unparsed():
    backend = EchoJudge()
    judge = LLMJudge(backend, template="Q:{prompt} A:{completion} gold={answer}", max_tokens=8)
    out = asyncio.run(judge(["q1", "q2", "q3", "q4"], ["S=10", "S=5", "S=42", "S=none"], answer=["a", "b", "c", "d"]))
    assert out == pytest.approx([1.0, 0.5, 1.0, 0.0])  # clamped to [0, 10], then / 10; no score -> 0
    assert backend.calls[0][0][0] == "Q:q1 A:S=10 gold=a"
    assert backend.calls[0][1:] == (1, 8, 0.0)  # n, max_tokens, temperature
    raw = LLMJudge(EchoJudge(), normalize=False, low=1, high=5, unparsed_score=-1.0)
    assert asyncio.run(raw(["q"] * 2, ["S=3", "nothing"])) == [3.0, -1.0]


def test_judge_reward_through_the_registry_with_async_backend_and_factory_path():
    out = call_reward(llm_judge, ["q", "q"], ["S=8", "S=2"], kwargs={"backend": AsyncEchoJudge(), "n": 3})
    assert out == pytest.approx([0.8, 0.2])
    out = call_reward(llm_judge, ["q"], ["S=6"], {"answer": ["12"]},
                      {"backend": "tests.rewards.sample_rewards:make_judge", "backend_kwargs": {"suffix": "0"},
                       "reference_column": "answer", "high": 100})
    assert out == pytest.approx([0.6])  # the factory's backend appends "0": "Score: 60" on 0..100
    with pytest.raises(ValueError, match="needs backend"):
        call_reward(llm_judge, ["q"], ["a"])
    with pytest.raises(ValueError, match="high must be > low"):
        LLMJudge(EchoJudge(), low=5, high=5)
