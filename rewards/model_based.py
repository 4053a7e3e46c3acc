"""Model-based rewards: a reward model, and an LLM as judge. Backend-agnostic: no model here.

reward_model
    Scores (prompt, completion) pairs with a sequence-classification model. The model runs
    elsewhere (actors/reward.py `RewardModelWorker`, one Ray actor per model); this side
    defines the interface, `Scorer.score(prompts, completions) -> list[float]` (sync or
    async), and the registry entry. The reward pool builds the scorer from the spec's
    kwargs (`path`, `tokenizer_path`, ...) and passes it as `scorer=`.

llm_judge
    Asks a rollout backend (anything with
    `generate(prompts, n, max_tokens, temperature) -> list[list[str]]`, sync or async) to
    grade each sample with a prompt template, and parses a score from the reply. The
    backend is given as an object (`backend=`), or, from YAML, as a 'module:attr' path to
    an object or to a factory called once per process with `backend_kwargs`.
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from .registry import register


@runtime_checkable
class Scorer(Protocol):
    """What `reward_model` calls: one float per (prompt, completion)."""

    def score(self, prompts: list[str], completions: list[str]) -> Any: ...


@runtime_checkable
class GenerateBackend(Protocol):
    """What `llm_judge` calls: n texts per prompt."""

    def generate(self, prompts: list[str], n: int, max_tokens: int, temperature: float) -> Any: ...


async def _maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


@register("reward_model")
async def reward_model(prompts, completions, *, scorer: Scorer | None = None, **_):
    """Scores from a reward model. `scorer` is injected by the reward pool (see module doc)."""
    if scorer is None:
        raise ValueError("reward_model needs a scorer: run it through actors.reward.RewardPool "
                         "(kwargs: path=<model folder>) or pass scorer=<object with .score(prompts, completions)>")
    out = await _maybe_await(scorer.score(list(prompts), list(completions)))
    return [float(x) for x in out]


# Marks the function for the pool: it must be served by a model actor, not called in a worker.
reward_model.needs_model_actor = True  # type: ignore[attr-defined]


DEFAULT_JUDGE_TEMPLATE = (
    "You are grading an answer. Question:\n{prompt}\n\nAnswer:\n{completion}\n\n"
    "{reference}Rate the answer's correctness and quality from {low} to {high}. "
    "Reply with one line: 'Score: <number>'."
)
DEFAULT_SCORE_PATTERN = r"(?i)score\s*[:=]\s*(-?\d+(?:\.\d+)?)"

_BACKENDS: dict[tuple[str, str], Any] = {}  # factory-built backends, one per (path, kwargs) per process


def load_backend(backend: Any, backend_kwargs: Mapping[str, Any] | None = None) -> Any:
    """An object with `.generate`: given directly, or built from a 'module:attr' path (cached)."""
    if not isinstance(backend, str):
        if not hasattr(backend, "generate"):
            raise ValueError(f"llm_judge: backend must have a .generate method, got {type(backend).__name__}")
        return backend
    key = (backend, repr(sorted((backend_kwargs or {}).items())))
    if key not in _BACKENDS:
        mod, _, attr = backend.partition(":")
        if not mod or not attr:
            raise ValueError(f"llm_judge: backend path {backend!r} must look like 'package.module:attr'")
        obj = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not hasattr(obj, "generate"):
            obj = obj(**(backend_kwargs or {}))  # a factory or class
        if not hasattr(obj, "generate"):
            raise ValueError(f"llm_judge: {backend!r} did not give an object with .generate")
        _BACKENDS[key] = obj
    return _BACKENDS[key]


def parse_score(text: str, pattern: str = DEFAULT_SCORE_PATTERN) -> float | None:
    """The last number captured by `pattern` in the judge's reply, or None."""
    found = re.findall(pattern, text or "")
    if not found:
        return None
    last = found[-1]
    try:
        return float(last if isinstance(last, str) else last[0])
    except ValueError:
        return None


class LLMJudge:
    """A judge as a reward function object: `LLMJudge(backend)(prompts, completions, **columns)`.

    Each sample's reply score is clamped to [low, high] and, with `normalize`, mapped to
    [0, 1]; with n > 1 the parsed scores are averaged. A reply with no score gives
    `unparsed_score` (already on the output scale). The template sees {prompt},
    {completion}, {low}, {high}, {reference} (filled from a `reference_column` such as
    `answer` when given) and every column of the sample by name.
    """

    def __init__(self, backend: Any, template: str = DEFAULT_JUDGE_TEMPLATE, *, low: float = 0.0,
                 high: float = 10.0, normalize: bool = True, n: int = 1, max_tokens: int = 64,
                 temperature: float = 0.0, score_pattern: str = DEFAULT_SCORE_PATTERN,
                 unparsed_score: float = 0.0, reference_column: str | None = None):
        if not high > low:
            raise ValueError(f"LLMJudge: high must be > low, got low={low}, high={high}")
        if n < 1:
            raise ValueError(f"LLMJudge: n must be >= 1, got {n}")
        self.backend, self.template = backend, template
        self.low, self.high, self.normalize = float(low), float(high), normalize
        self.n, self.max_tokens, self.temperature = n, max_tokens, temperature
        self.score_pattern, self.unparsed_score = score_pattern, float(unparsed_score)
        self.reference_column = reference_column

    def render(self, prompt: str, completion: str, row: Mapping[str, Any]) -> str:
        ref = ""
        if self.reference_column is not None:
            ref = f"Reference answer:\n{row[self.reference_column]}\n\n"
        fields = {**row, "prompt": prompt, "completion": completion, "low": self.low, "high": self.high,
                  "reference": ref}
        return self.template.format_map(fields)

    def _to_reward(self, replies: Sequence[str]) -> float:
        scores = [s for s in (parse_score(r, self.score_pattern) for r in replies) if s is not None]
        if not scores:
            return self.unparsed_score
        s = min(max(sum(scores) / len(scores), self.low), self.high)
        return (s - self.low) / (self.high - self.low) if self.normalize else s

    async def __call__(self, prompts, completions, **columns) -> list[float]:
        rows = [{k: v[i] for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) == len(prompts)}
                for i in range(len(prompts))]
        judge_prompts = [self.render(p, c, r) for p, c, r in zip(prompts, completions, rows)]
        replies = await _maybe_await(self.backend.generate(judge_prompts, self.n, self.max_tokens, self.temperature))
        if len(replies) != len(judge_prompts):
            raise ValueError(f"llm_judge: backend returned {len(replies)} reply lists for {len(judge_prompts)} prompts")
        return [self._to_reward(r) for r in replies]


_JUDGE_OPTIONS = ("template", "low", "high", "normalize", "n", "max_tokens", "temperature", "score_pattern",
                  "unparsed_score", "reference_column")


@register("llm_judge")
async def llm_judge(prompts, completions, *, backend=None, backend_kwargs=None, **kwargs):
    """LLM-as-judge reward; kwargs as `LLMJudge` (template, low, high, n, ...), plus `backend`."""
    if backend is None:
        raise ValueError("llm_judge needs backend=<object with .generate> or backend='module:attr'")
    options = {k: kwargs.pop(k) for k in _JUDGE_OPTIONS if k in kwargs}
    judge = LLMJudge(load_backend(backend, backend_kwargs), **options)
    return await judge(prompts, completions, **kwargs)
