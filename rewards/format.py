"""Format rewards: does the completion follow the required layout?

`format` scores 1.0 when the completion matches a regular expression, else 0.0. Pick a
built-in layout with `style`, or give your own `pattern`:

    style="think"  <think>...</think> then <answer>...</answer>, nothing else around them
    style="hash"   some working, then a last line `#### <number>` (GSM8K layout)

The pattern must match the whole completion (surrounding whitespace allowed) unless
`full_match=False`, in which case finding it anywhere is enough.
"""
from __future__ import annotations

import re
from functools import lru_cache

from .registry import register

STYLES = {
    "think": r"<think>.*?</think>\s*<answer>.*?\S.*?</answer>",
    # DOTALL: `.` spans lines. Working first (some non-space text), the number last.
    "hash": r".*\S.*?####[ \t]*[-\u2212]?\$?[\d,]*\.?\d+(?:/\d+)?%?[ \t]*\.?",
}


@lru_cache(maxsize=64)
def _compile(pattern: str, full_match: bool, flags: int) -> re.Pattern:
    return re.compile(rf"\s*(?:{pattern})\s*" if full_match else pattern, flags)


def format_pattern(style: str = "think", pattern: str | None = None) -> str:
    """The regex `format` uses for a style (or the given pattern)."""
    if pattern is not None:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"format: pattern must be a non-empty regex string, got {pattern!r}")
        return pattern
    if style not in STYLES:
        raise ValueError(f"format: unknown style {style!r}; accepted: {sorted(STYLES)} (or give pattern=...)")
    return STYLES[style]


def matches_format(text: str, style: str = "think", pattern: str | None = None, full_match: bool = True) -> bool:
    rx = _compile(format_pattern(style, pattern), full_match, re.DOTALL)
    return bool(rx.fullmatch(text) if full_match else rx.search(text))


@register("format")
def format_reward(prompts, completions, *, style: str = "think", pattern: str | None = None,
                  full_match: bool = True, match_reward: float = 1.0, miss_reward: float = 0.0, **_):
    """`match_reward` when a completion follows the layout, else `miss_reward`."""
    format_pattern(style, pattern)  # validate once, with a helpful message
    return [float(match_reward if matches_format(c, style, pattern, full_match) else miss_reward)
            for c in completions]
