"""Numeric range checks of config dataclasses, declared on the fields as metadata.

    micro_batch_size: int = field(default=4, metadata={"min": 1})            # >= 1
    lr: float = field(default=2e-4, metadata={"gt": 0})                       # > 0
    dropout: float = field(default=0.0, metadata={"min": 0, "lt": 1})         # in [0, 1)
    min_lr_ratio: float = field(default=0.0, metadata={"range": (0, 1)})      # in [0, 1]

Metadata keys: min (>=), gt (>), max (<=), lt (<), range ((a, b): min a, max b); "integer": True
also refuses values that are not integers (the message then says "an integer"); "note": a short
reminder shown after the bound ("0 = off"). `check_ranges(self, "trainer")`, called first in
`__post_init__`, checks every field that declares a bound and raises one ValueError naming it:
"trainer.micro_batch_size: must be >= 1, got 0". Checks that are not a plain range stay as code in
`__post_init__`. Like all of kernels/, this imports nothing of the project, so every layer uses it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

KEYS = frozenset({"min", "gt", "max", "lt", "range", "integer", "note"})
_BOUND_KEYS = ("min", "gt", "max", "lt", "range")


def _bounds(meta) -> tuple[Any, bool, Any, bool]:
    """(lower, lower inclusive, upper, upper inclusive); None where there is no bound."""
    lo, lo_incl, hi, hi_incl = None, True, None, True
    if "range" in meta:
        lo, hi = meta["range"]
    if "min" in meta:
        lo, lo_incl = meta["min"], True
    if "gt" in meta:
        lo, lo_incl = meta["gt"], False
    if "max" in meta:
        hi, hi_incl = meta["max"], True
    if "lt" in meta:
        hi, hi_incl = meta["lt"], False
    return lo, lo_incl, hi, hi_incl


def rule(meta) -> str:
    """The accepted values in words: "must be >= 1", "must be in [0, 1)", "must be an integer >= 8"."""
    lo, lo_incl, hi, hi_incl = _bounds(meta)
    what = "an integer " if meta.get("integer") else ""
    if lo is not None and hi is not None:
        text = f"must be {what}in {'[' if lo_incl else '('}{lo}, {hi}{']' if hi_incl else ')'}"
    elif lo is not None:
        text = f"must be {what}{'>=' if lo_incl else '>'} {lo}"
    else:
        text = f"must be {what}{'<=' if hi_incl else '<'} {hi}"
    return text + (f" ({meta['note']})" if meta.get("note") else "")


def in_range(value, meta) -> bool:
    """Whether `value` satisfies the bounds of `meta` (NaN and non-numbers never do)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if meta.get("integer") and not isinstance(value, int):
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    lo, lo_incl, hi, hi_incl = _bounds(meta)
    if lo is not None and not (value >= lo if lo_incl else value > lo):
        return False
    return hi is None or (value <= hi if hi_incl else value < hi)


def ranged_fields(cls_or_obj) -> list[dataclasses.Field]:
    """The fields of a dataclass that declare a bound."""
    return [f for f in dataclasses.fields(cls_or_obj) if any(k in f.metadata for k in _BOUND_KEYS)]


def check_ranges(obj, section: str) -> None:
    """Raise ValueError("<section>.<field>: must be >= 1, got 0") for the first field of dataclass
    `obj` outside its declared bounds; section "" names top-level fields bare."""
    prefix = f"{section}." if section else ""
    for f in ranged_fields(obj):
        unknown = set(f.metadata) - KEYS
        if unknown:  # a typo would silently drop the check
            raise TypeError(f"{type(obj).__name__}.{f.name}: unknown range metadata {sorted(unknown)}; "
                            f"accepted: {', '.join(sorted(KEYS))}")
        value = getattr(obj, f.name)
        if not in_range(value, f.metadata):
            raise ValueError(f"{prefix}{f.name}: {rule(f.metadata)}, got {value!r}")
