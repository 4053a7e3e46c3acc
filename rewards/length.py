"""Soft overlong penalty (the DAPO shaping): no penalty up to `max_len - buffer`, then a
linear ramp down to `-penalty` at `max_len`, and `-penalty` beyond.

    r(L) = 0                                     if L <= max_len - buffer
         = -penalty * (L - (max_len - buffer)) / buffer   if max_len - buffer < L <= max_len
         = -penalty                              if L > max_len

Lengths are token counts when the batch carries a `completion_lengths` column (the rollout
knows them), else characters (`unit="chars"`) or whitespace-separated words (`unit="words"`):
rewards/ is pure Python and owns no tokenizer.
"""
from __future__ import annotations

from .registry import register

UNITS = ("chars", "words")


def overlong_penalty_value(length: int, max_len: int, buffer: int, penalty: float = 1.0) -> float:
    """The penalty (<= 0) for one completion of `length` units."""
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len <= 0:
        raise ValueError(f"overlong_penalty: max_len must be a positive integer, got {max_len!r}")
    if not isinstance(buffer, int) or isinstance(buffer, bool) or not 0 <= buffer <= max_len:
        raise ValueError(f"overlong_penalty: buffer must be an integer in [0, max_len={max_len}], got {buffer!r}")
    if penalty < 0:
        raise ValueError(f"overlong_penalty: penalty must be >= 0 (it is subtracted), got {penalty!r}")
    start = max_len - buffer
    if length <= start:
        return 0.0
    if length > max_len:
        return -float(penalty)
    return -float(penalty) * (length - start) / buffer  # buffer > 0 here since start < length <= max_len


def measure(text: str, unit: str = "chars") -> int:
    if unit == "chars":
        return len(text)
    if unit == "words":
        return len(text.split())
    raise ValueError(f"overlong_penalty: unit must be one of {UNITS}, got {unit!r}")


@register("overlong_penalty")
def overlong_penalty(prompts, completions, *, max_len: int, buffer: int = 0, penalty: float = 1.0,
                     unit: str = "chars", completion_lengths=None, **_):
    """Per completion: 0, a linear ramp to `-penalty` over the last `buffer` units, or `-penalty`."""
    if completion_lengths is not None:
        if len(completion_lengths) != len(completions):
            raise ValueError(f"overlong_penalty: {len(completion_lengths)} completion_lengths "
                             f"for {len(completions)} completions")
        lengths = [int(n) for n in completion_lengths]
    else:
        lengths = [measure(c, unit) for c in completions]
    return [overlong_penalty_value(n, max_len, buffer, penalty) for n in lengths]
