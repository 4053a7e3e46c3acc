"""Which prompts a GRPO step generates for, and which groups it trains on (no Ray, no torch).

    stream = PromptStream(rows, seed)                 # deterministic epochs; position checkpointed
    over = Oversampler(grpo_cfg)                      # DAPO dynamic sampling without serial rounds
    prompts = stream.take(over.prompts(P))            # P x factor prompts, one generate call
    kept = over.select(keep_flags, P)                 # at most P groups with reward variance
    over.observe(kept_with_signal, generated)         # the factor follows the kept fraction

Dynamic sampling (DAPO) drops groups whose n rewards are all equal: they carry no gradient. Instead
of generating P prompts and then refilling in extra serial rounds, the step over-samples: it
generates ceil(P x factor) prompts in the same call (vLLM runs them in one batch, so the extra
prompts cost little more time than P) and trains on the first P groups that vary. With
`grpo.adaptive_oversample` the factor follows the fraction of groups kept in the steps so far
(a moving average): enough prompts that a step finds P varying groups 9 times in 10, between
`grpo.oversample` and `grpo.max_oversample` times P; refill rounds
(`grpo.max_refill_rounds`) remain a fallback for a step that still falls short.
"""
from __future__ import annotations

import math
import random

# the adaptive count is large enough that a step finds P varying groups with this probability,
# if each group varies independently with the estimated kept fraction (normal approximation)
Z_FULL = 1.2816  # 90 %
EMA = 0.5  # weight of the newest step in the kept-fraction average


class PromptStream:
    """Deterministic epochs over the prompt rows; its position is saved with each checkpoint."""

    def __init__(self, rows: list[dict], seed: int, position: int = 0):
        self.rows, self.seed, self.position = rows, seed, position

    def take(self, k: int) -> list[dict]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.position, len(self.rows))
            order = list(range(len(self.rows)))
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
            out.append(self.rows[order[i]])
            self.position += 1
        return out


class Oversampler:
    """How many prompts a step generates for, given how many groups it trains on.

    cfg: the learner's GRPOConfig (dynamic_sampling, oversample, adaptive_oversample, max_oversample).
    keep_fraction: the running estimate of the fraction of groups with reward variance (None until
    the first step is observed; saved in the controller's checkpoint so a resume continues it)."""

    def __init__(self, cfg, keep_fraction: float | None = None):
        self.cfg = cfg
        self.keep_fraction = keep_fraction

    def factor(self, groups: int) -> float:
        """Prompts generated per trained group for a step that trains on `groups` groups."""
        c = self.cfg
        if not c.dynamic_sampling:
            return 1.0
        f = c.oversample
        p = self.keep_fraction
        if c.adaptive_oversample and p is not None and groups > 0:
            p = max(p, 1e-6)
            # smallest k with k p - Z sqrt(k p (1 - p)) >= groups, solved for sqrt(k)
            b = Z_FULL * math.sqrt(p * (1 - p))
            root_k = (b + math.sqrt(b * b + 4 * p * groups)) / (2 * p)
            f = max(f, root_k * root_k / groups)
        return min(max(f, 1.0), max(c.max_oversample, c.oversample, 1.0))

    def prompts(self, groups: int, available: int | None = None) -> int:
        """Prompts to generate for a step that trains on `groups` groups (never more than
        `available`, the size of the prompt set, so one step does not repeat a prompt)."""
        k = max(groups, math.ceil(groups * self.factor(groups) - 1e-9))
        return min(k, available) if available else k

    @staticmethod
    def select(keep: list[bool], groups: int, dynamic: bool = True) -> list[int]:
        """Indices of the groups trained on: the first `groups` with reward variance (dynamic
        sampling), else the first `groups` generated."""
        idx = [i for i, k in enumerate(keep) if k] if dynamic else list(range(len(keep)))
        return idx[:groups]

    def observe(self, with_signal: int, generated: int) -> None:
        """Feed one step's count of groups with reward variance out of the groups generated."""
        if generated <= 0:
            return
        frac = with_signal / generated
        self.keep_fraction = frac if self.keep_fraction is None else EMA * frac + (1 - EMA) * self.keep_fraction
