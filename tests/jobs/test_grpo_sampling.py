"""Dynamic sampling by over-sampling (jobs/grpo_sampling.py): how many prompts a step generates
for, which groups it trains on, and that the count of trained groups stays prompts_per_step."""
from __future__ import annotations

import random

from actors.learner import GRPOConfig
from jobs.grpo_sampling import Oversampler, PromptStream


def _cfg(**kw):
    return GRPOConfig(prompts_per_step=16, **kw)


def test_no_dynamic_sampling_generates_exactly_prompts_per_step():
    over = Oversampler(_cfg(dynamic_sampling=False, oversample=3.0))
    over.observe(2, 16)
    assert over.factor(16) == 1.0 and over.prompts(16) == 16
    assert Oversampler.select([False] * 16, 16, dynamic=False) == list(range(16))


def test_fixed_factor_and_first_step():
    over = Oversampler(_cfg(oversample=1.5, adaptive_oversample=False))
    assert over.prompts(16) == 24
    over.observe(1, 24)  # not adaptive: the factor stays
    assert over.prompts(16) == 24
    assert Oversampler(_cfg()).prompts(16) == 16  # default: no over-sampling before a step is seen


def test_adaptive_factor_follows_the_kept_fraction_within_bounds():
    over = Oversampler(_cfg(max_oversample=4.0))
    over.observe(8, 16)                       # half the groups varied
    k = over.prompts(16)
    # k p - 1.28 sqrt(k p (1 - p)) >= 16 first holds at k = 41 (p = 0.5)
    assert k == 41 and 41 * 0.5 - 1.2816 * (41 * 0.25) ** 0.5 >= 16 > 40 * 0.5 - 1.2816 * (40 * 0.25) ** 0.5
    over.observe(0, 41)                       # nothing varied: the factor is capped
    assert over.factor(16) == 4.0 and over.prompts(16) == 64
    over2 = Oversampler(_cfg(oversample=2.0))
    over2.observe(16, 16)                     # everything varied: never below grpo.oversample
    assert over2.factor(16) == 2.0
    assert over.prompts(16, available=40) == 40  # never more than the prompt set holds


def test_select_keeps_the_first_groups_with_variance_up_to_the_count():
    keep = [False, True, True, False, True, True, True]
    assert Oversampler.select(keep, 3) == [1, 2, 4]
    assert Oversampler.select(keep, 10) == [1, 2, 4, 5, 6]  # short: trains on what it has


def test_over_sampling_keeps_the_group_count():
    """Simulated steps where each group varies with probability 0.3: once the factor has seen a
    step, every step generates enough groups in one call to train on exactly prompts_per_step."""
    P, p_var = 16, 0.3
    rng = random.Random(0)
    over = Oversampler(_cfg(max_oversample=8.0))
    counts = []
    for _ in range(200):
        generated = over.prompts(P)
        keep = [rng.random() < p_var for _ in range(generated)]
        over.observe(sum(keep), generated)
        counts.append(len(Oversampler.select(keep, P)))
    assert counts[0] < P                         # the first step does not know the fraction yet
    # then 9 steps in 10 are full by design (88 % over these 199 steps; the rest fall back to a refill)
    assert sum(c == P for c in counts[1:]) / len(counts[1:]) >= 0.85, counts


def test_prompt_stream_is_deterministic_and_resumable():
    rows = [{"i": i} for i in range(10)]
    a = PromptStream(rows, seed=3)
    first = a.take(7) + a.take(7)  # crosses an epoch
    b = PromptStream(rows, seed=3, position=7)
    assert b.take(7) == first[7:]
    assert sorted(r["i"] for r in first[:10]) == list(range(10))
