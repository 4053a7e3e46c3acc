"""Answer extraction and number normalisation on tricky strings (the eval job uses these too)."""
import pytest

from rewards.math import answers_equal, extract_answer, extract_gold, is_correct, math_answer, normalize_number


@pytest.mark.parametrize("text, expected", [
    ("Tom has 3 apples.\n#### 1,000", "1,000"),
    ("#### 5\nlater... #### 7", "7"),                       # several ####: the last one
    ("#### 12\n####   \n", "12"),                           # an empty trailing #### is skipped
    ("#### 72 eggs", "72 eggs"),
    (r"so the answer is $\boxed{\frac{3}{4}}$.", r"\frac{3}{4}"),
    (r"\boxed{\dfrac{\sqrt{3}}{2}} and more", r"\dfrac{\sqrt{3}}{2}"),   # nested braces
    (r"first \boxed{1} then \boxed{{2}}", "{2}"),            # the last boxed
    ("The answer is 18.", "18"),
    ("x = -5 then 7 apples", "7"),                           # last number
    ("It costs $1,234.50.", "$1,234.50"),
    ("Temperature is \u22125", "\u22125"),                   # unicode minus
    ("5-3=2", "2"),
    ("so 3/4 of them", "3/4"),
    ("<think>3 + 4</think><answer>The total is 42</answer>", "42"),
    ("no number here", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("s, expected", [
    ("1,000", "1000"), ("1,234,567.0", "1234567"), ("3.50", "3.5"), ("3.", "3"), (".5", "0.5"),
    ("$5", "5"), (r"\$5", "5"), ("50%", "50"), (r"50\%", "50"), ("3/4", "0.75"), (r"\frac{3}{4}", "0.75"),
    (r"\dfrac34", "0.75"), (r"-\frac{1}{2}", "-0.5"), ("1/3", "1/3"), ("-7", "-7"), ("(-7)", "-7"),
    ("\u22127", "-7"), ("-0", "0"), ("1 1/2", "1.5"), ("x = 5", "5"), ("5 dollars", "5"),
    (r"\text{5 dollars}", "5"), ("007", "7"), ("-0.050", "-0.05"),
    ("3,5", None), ("1/0", None), ("abc", None), ("", None), (None, None), ("x+1", None),
])
def test_normalize_number(s, expected):
    assert normalize_number(s) == expected


@pytest.mark.parametrize("pred, gold, equal", [
    ("3/4", "0.75", True), (r"\frac{3}{4}", "3/4", True), ("3.50", "3.5", True), ("$1,000", "1000", True),
    ("50%", "50", True), ("-5", "(-5)", True), ("1/3", "0.333", False), ("5", "-5", False),
    ("x+1", "x + 1", True), ("x+1", "x+2", False), ("5", "x+1", False), (None, "5", False), ("5", None, False),
    ("", "", False),
])
def test_answers_equal(pred, gold, equal):
    assert answers_equal(pred, gold) is equal


def test_extract_gold_keeps_symbolic_answers_whole():
    assert extract_gold(r"\frac{3}{4}") == r"\frac{3}{4}"
    assert extract_gold("Working: 2 + 3 = 5\n#### 5") == "5"
    assert extract_gold(r"so \boxed{x^2+1}") == "x^2+1"
    assert is_correct(r"... so $\boxed{0.75}$", r"\frac{3}{4}")


def test_math_answer_reward_on_gsm8k_rows():
    golds = ["2 + 3 = 5\n#### 5", "#### 1,000", "#### -3", "#### 0.5"]
    comps = ["2+3=5\n#### 5", "That is one thousand: 1000 in total", "#### 3", r"\boxed{\frac{1}{2}}"]
    assert math_answer(["q"] * 4, comps, answer=golds) == [1.0, 1.0, 0.0, 1.0]
    assert math_answer(["q"], ["#### 4"], answer=["#### 5"], correct=2.0, incorrect=-1.0) == [-1.0]


def test_math_answer_needs_the_answer_column():
    with pytest.raises(ValueError, match="answer"):
        math_answer(["q"], ["1"])
    with pytest.raises(ValueError, match="2 answers for 1 completions"):
        math_answer(["q"], ["1"], answer=["1", "2"])
