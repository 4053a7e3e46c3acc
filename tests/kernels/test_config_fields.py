"""Range checks declared as field metadata (kernels/config_fields.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from kernels.config_fields import KEYS, check_ranges, in_range, ranged_fields, rule


@dataclass(frozen=True)
class Section:
    count: int = field(default=1, metadata={"min": 1})
    lr: float = field(default=0.1, metadata={"gt": 0})
    ratio: float = field(default=0.0, metadata={"range": (0, 1)})
    dropout: float = field(default=0.0, metadata={"min": 0, "lt": 1})
    top_p: float = field(default=1.0, metadata={"gt": 0, "max": 1})
    cap: float = field(default=0.0, metadata={"max": 10})
    rows: int = field(default=8, metadata={"min": 8, "integer": True})
    every: int = field(default=0, metadata={"min": 0, "note": "0 = off"})
    name: str = "x"

    def __post_init__(self):
        check_ranges(self, "sec")


@pytest.mark.parametrize("kw, message", [
    (dict(count=0), "sec.count: must be >= 1, got 0"),
    (dict(lr=0.0), "sec.lr: must be > 0, got 0.0"),
    (dict(ratio=1.5), "sec.ratio: must be in [0, 1], got 1.5"),
    (dict(dropout=1.0), "sec.dropout: must be in [0, 1), got 1.0"),
    (dict(top_p=0.0), "sec.top_p: must be in (0, 1], got 0.0"),
    (dict(cap=11), "sec.cap: must be <= 10, got 11"),
    (dict(rows=4), "sec.rows: must be an integer >= 8, got 4"),
    (dict(rows=8.0), "sec.rows: must be an integer >= 8, got 8.0"),
    (dict(every=-1), "sec.every: must be >= 0 (0 = off), got -1"),
    (dict(lr=math.nan), "sec.lr: must be > 0, got nan"),
    (dict(count=True), "sec.count: must be >= 1, got True"),          # a bool is not a number here
    (dict(count="3"), "sec.count: must be >= 1, got '3'"),
])
def test_out_of_range_names_section_field_rule_and_value(kw, message):
    with pytest.raises(ValueError) as e:
        Section(**kw)
    assert str(e.value) == message


def test_bounds_are_inclusive_or_not_as_declared():
    Section(count=1, lr=1e-9, ratio=1, dropout=0, top_p=1, cap=10, rows=8, every=0)
    assert in_range(0.999, {"min": 0, "lt": 1}) and not in_range(1, {"min": 0, "lt": 1})
    assert [f.name for f in ranged_fields(Section)] == ["count", "lr", "ratio", "dropout", "top_p", "cap",
                                                        "rows", "every"]
    assert rule({"gt": 0, "max": 1}) == "must be in (0, 1]"


def test_top_level_fields_have_no_section_prefix():
    @dataclass(frozen=True)
    class Job:
        max_steps: int = field(default=1, metadata={"min": 1})

        def __post_init__(self):
            check_ranges(self, "")

    with pytest.raises(ValueError, match=r"^max_steps: must be >= 1, got 0$"):
        Job(max_steps=0)


def test_unknown_metadata_key_is_a_programming_error():
    @dataclass
    class Typo:
        n: int = field(default=1, metadata={"min": 1, "mxa": 3})

    with pytest.raises(TypeError, match=r"Typo.n: unknown range metadata \['mxa'\]"):
        check_ranges(Typo(), "t")
    assert "mxa" not in KEYS
