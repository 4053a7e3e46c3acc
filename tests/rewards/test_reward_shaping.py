"""Format reward and the soft overlong penalty."""
import pytest

from rewards.format import format_reward, matches_format
from rewards.length import overlong_penalty, overlong_penalty_value


@pytest.mark.parametrize("text, ok", [
    ("<think>2+3=5</think><answer>5</answer>", True),
    ("  <think>a\nb</think>\n<answer>5</answer>\n", True),        # whitespace around and between
    ("<think></think><answer>5</answer>", True),                   # empty thinking is allowed
    ("<answer>5</answer>", False),                                 # no think block
    ("<think>x</think><answer> </answer>", False),                 # empty answer
    ("<think>x</think><answer>5</answer> trailing", False),        # text after the answer
    ("preamble <think>x</think><answer>5</answer>", False),
    ("<think>x<answer>5</answer>", False),
])
def test_think_answer_format(text, ok):
    assert matches_format(text) is ok
    assert format_reward(["p"], [text]) == [1.0 if ok else 0.0]


@pytest.mark.parametrize("text, ok", [
    ("2 + 3 = 5\n#### 5", True), ("So it is 1,000.\n#### 1,000", True), ("work\n#### -3.5\n", True),
    ("#### 5", False),                      # no working before it
    ("work\n#### five", False), ("work\n#### 5 apples", False), ("work, no marker 5", False),
])
def test_hash_format(text, ok):
    assert format_reward(["p"], [text], style="hash") == [1.0 if ok else 0.0]


def test_custom_pattern_partial_match_and_values():
    assert format_reward(["p"] * 2, ["Answer: 4", "4"], pattern=r"Answer: \d+") == [1.0, 0.0]
    assert format_reward(["p"], ["see Answer: 4 ok"], pattern=r"Answer: \d+", full_match=False) == [1.0]
    assert format_reward(["p"], ["nope"], miss_reward=-0.5) == [-0.5]
    with pytest.raises(ValueError, match="unknown style 'xml'"):
        format_reward(["p"], ["x"], style="xml")


@pytest.mark.parametrize("length, expected", [
    (0, 0.0), (80, 0.0),        # up to max_len - buffer: no penalty
    (81, -0.05), (90, -0.5), (100, -1.0),  # the linear ramp over the buffer
    (101, -1.0), (10_000, -1.0),           # beyond max_len: the full penalty
])
def test_overlong_penalty_boundaries(length, expected):
    assert overlong_penalty_value(length, max_len=100, buffer=20) == pytest.approx(expected)


def test_overlong_penalty_options():
    assert overlong_penalty_value(100, 100, 0) == 0.0 and overlong_penalty_value(101, 100, 0) == -1.0
    assert overlong_penalty_value(90, 100, 20, penalty=0.5) == pytest.approx(-0.25)
    assert overlong_penalty_value(50, 100, 100) == pytest.approx(-0.5)
    # characters by default, words on request, token counts from the rollout when given
    assert overlong_penalty(["p"] * 2, ["x" * 10, "x" * 15], max_len=15, buffer=5) == pytest.approx([0.0, -1.0])
    assert overlong_penalty(["p"], ["a b c d"], max_len=4, buffer=2, unit="words") == pytest.approx([-1.0])
    assert overlong_penalty(["p"] * 2, ["short", "short"], max_len=10, buffer=4,
                            completion_lengths=[6, 8]) == pytest.approx([0.0, -0.5])


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_len=0, buffer=0), "max_len must be a positive integer"),
    (dict(max_len=10, buffer=11), r"buffer must be an integer in \[0, max_len=10\]"),
    (dict(max_len=10, buffer=2, penalty=-1), "penalty must be >= 0"),
])
def test_overlong_penalty_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty_value(5, **kwargs)
    with pytest.raises(ValueError, match="unit must be one of"):
        overlong_penalty(["p"], ["x"], max_len=5, unit="tokens")
