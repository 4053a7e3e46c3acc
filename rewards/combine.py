"""Calling reward functions and combining several with weights.

`call_reward` is the one place that runs a reward function: it calls it with keywords only
(prompts=, completions=, every batch column by name, the spec's kwargs; see rewards/registry.py),
awaits async functions, and checks the result (one finite float per sample). `WeightedSum` is
the in-process combinator; actors/reward.py runs the same terms in a pool of Ray actors with
timeouts and failure isolation.
"""
from __future__ import annotations

import asyncio
import inspect
import math
from typing import Any, Mapping, Sequence

from .registry import CALL_KEYWORDS, RewardFn, RewardSpec, check_signature, resolve


def merge_kwargs(name: str, columns: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Columns plus spec kwargs; a name in both, or one of prompts / completions, is a config
    error (which one was meant?)."""
    clash = sorted(set(columns) & set(kwargs))
    if clash:
        raise ValueError(f"reward {name!r}: kwargs {clash} clash with dataset columns of the same name")
    reserved = sorted(set(CALL_KEYWORDS) & (set(columns) | set(kwargs)))
    if reserved:
        raise ValueError(f"reward {name!r}: a dataset column or kwarg named {reserved[0]!r} clashes with the "
                         f"{reserved[0]} every reward function is given")
    return {**columns, **kwargs}


def check_scores(name: str, scores: Any, n: int) -> list[float]:
    """`scores` as a list of n finite floats, or a ValueError saying what is wrong."""
    if inspect.isawaitable(scores):
        raise TypeError(f"reward {name!r} returned an awaitable; call it through acall_reward")
    try:
        out = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward {name!r} must return a list of numbers ({e})") from None
    if len(out) != n:
        raise ValueError(f"reward {name!r} returned {len(out)} scores for {n} samples")
    bad = [i for i, s in enumerate(out) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"reward {name!r} returned non-finite scores at samples {bad[:5]}")
    return out


async def acall_reward(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
                       columns: Mapping[str, Any] | None = None, kwargs: Mapping[str, Any] | None = None,
                       name: str | None = None) -> list[float]:
    """Run one reward function (sync or async) on a batch and check its scores."""
    name = name or getattr(fn, "__name__", repr(fn))
    if len(prompts) != len(completions):
        raise ValueError(f"reward {name!r}: {len(prompts)} prompts for {len(completions)} completions")
    merged = merge_kwargs(name, columns or {}, kwargs or {})
    check_signature(fn, name, kwargs or {}, columns or {})
    out = fn(prompts=list(prompts), completions=list(completions), **merged)
    if inspect.isawaitable(out):
        out = await out
    return check_scores(name, out, len(completions))


def call_reward(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
                columns: Mapping[str, Any] | None = None, kwargs: Mapping[str, Any] | None = None,
                name: str | None = None) -> list[float]:
    """Synchronous `acall_reward`: async functions run on a fresh event loop.

    Must not be called from inside a running event loop (use `acall_reward` there).
    """
    return asyncio.run(acall_reward(fn, prompts, completions, columns, kwargs, name))


class WeightedSum:
    """Several reward terms as one reward function: total = sum(weight_i * fn_i).

    Itself a reward function (`ws(prompts, completions, **columns)`); `detailed` also returns
    each term's scores, keyed by `RewardSpec.key`.
    """

    def __init__(self, specs: Sequence[RewardSpec | str | Mapping[str, Any]]):
        self.specs = [RewardSpec.from_config(s) for s in specs]
        if not self.specs:
            raise ValueError("WeightedSum needs at least one RewardSpec")
        keys = [s.key for s in self.specs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"reward terms {dup} appear twice; give each a distinct RewardSpec.label")
        self.fns = [resolve(s.name_or_path) for s in self.specs]
        for spec, fn in zip(self.specs, self.fns):
            check_signature(fn, spec.key, spec.kwargs)      # before any batch: what is known now

    async def adetailed(self, prompts, completions, **columns) -> tuple[dict[str, list[float]], list[float]]:
        per = {}
        for spec, fn in zip(self.specs, self.fns):
            per[spec.key] = await acall_reward(fn, prompts, completions, columns, spec.kwargs, spec.key)
        total = [sum(s.weight * per[s.key][i] for s in self.specs) for i in range(len(completions))]
        return per, total

    def detailed(self, prompts, completions, **columns) -> tuple[dict[str, list[float]], list[float]]:
        return asyncio.run(self.adetailed(prompts, completions, **columns))

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return self.detailed(prompts, completions, **columns)[1]


def combine(specs: Sequence[RewardSpec | str | Mapping[str, Any]]) -> WeightedSum:
    """`combine([RewardSpec("math_answer"), RewardSpec("format", 0.2)])` -> one reward function."""
    return WeightedSum(specs)
