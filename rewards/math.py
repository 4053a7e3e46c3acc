"""Math answer matching: extract a final answer from text, normalise numbers, compare.

Reusable helpers (the eval job imports these):

    extract_answer("... #### 1,000")        -> "1,000"
    extract_answer(r"so \\boxed{\\frac{3}{4}}") -> "\\frac{3}{4}"
    normalize_number("$1,000.50")           -> "1000.5"
    answers_equal("3/4", "0.75")            -> True

Where the answer is taken from, first that applies:
  1. the text after the LAST `####` (GSM8K style; empty trailing `####` are skipped),
  2. the LAST `\\boxed{...}` / `\\fbox{...}` (nested braces matched),
  3. the content of the last `<answer>...</answer>` tag,
  4. the last number in the text (predictions only; `extract_gold` stops at 3 and returns
     the whole text instead, so a symbolic gold like `\\frac{3}{4}` is not cut to `4`).

Number normalisation is exact (fractions.Fraction): thousands separators (`1,000`),
trailing zeros (`3.50` == `3.5`), currency (`$5`, `\\$5`), a percent sign is dropped
(`50%` == `50`, the GSM8K convention; it is NOT turned into 0.5), fractions (`3/4`,
`\\frac{3}{4}`, `\\dfrac34`), mixed numbers (`1 1/2`), negatives (`-5`, unicode minus),
surrounding units or a variable (`5 dollars`, `x = 5`). The canonical form is an integer,
a terminating decimal, or `p/q` for the rest (`1/3`); `0.333` != `1/3`.
"""
from __future__ import annotations

import re
from fractions import Fraction

from .registry import register

# -- number syntax ---------------------------------------------------------------------------

_MINUS = "-\u2212"  # ASCII hyphen-minus and the unicode minus sign
# Thousands groups only when well-formed (1,000 / 12,345,678); "3,5" is not a number here.
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_DEC = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
# A sign is a sign only when not glued to a previous word or number ("5-3", "2023-01-05").
_SIGN = rf"(?:(?<![\w)\]}}])[{_MINUS}])"
_PLAIN_NUM = rf"{_SIGN}?\\?\$?\s?{_DEC}(?:\s*/\s*{_DEC})?\s?(?:\\?%)?"
_LATEX_FRAC = rf"{_SIGN}?\\[dt]?frac\s*(?:\{{[^{{}}]*\}}|\d)\s*(?:\{{[^{{}}]*\}}|\d)"
_NUMBER_RE = re.compile(rf"{_LATEX_FRAC}|{_PLAIN_NUM}")

_FULL_NUM_RE = re.compile(rf"^(?P<sign>[{_MINUS}+])?(?P<num>{_DEC})$")
_FULL_FRAC_RE = re.compile(rf"^(?P<sign>[{_MINUS}+])?(?P<num>{_DEC})/(?P<den>{_DEC})$")
_MIXED_RE = re.compile(rf"^(?P<sign>[{_MINUS}+])?(?P<whole>\d+) (?P<num>\d+)/(?P<den>\d+)$")
_LATEX_FRAC_FULL_RE = re.compile(
    rf"^(?P<sign>[{_MINUS}+])?\\[dt]?frac(?:\{{(?P<a>[^{{}}]*)\}}|(?P<a1>\d))(?:\{{(?P<b>[^{{}}]*)\}}|(?P<b1>\d))$"
)


def _to_fraction(dec: str) -> Fraction:
    return Fraction(dec.replace(",", ""))


def _clean(s: str) -> str:
    """Strip LaTeX/markup noise around a number; keep the characters that carry value."""
    s = s.strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right)\b", "", s)
    s = re.sub(r"\\[,;:! ]", "", s)  # LaTeX spacing commands
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)  # degrees
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("\u2212", "-").replace("\u00a0", " ")
    s = s.strip().rstrip(".").strip()
    # One pair of outer parentheses/braces around the whole value: "(-5)", "{5}".
    while len(s) >= 2 and (s[0], s[-1]) in (("(", ")"), ("{", "}")) and _balanced(s[1:-1]):
        s = s[1:-1].strip()
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += ch in "({"
        depth -= ch in ")}"
        if depth < 0:
            return False
    return depth == 0


def _parse_value(s: str) -> Fraction | None:
    s = re.sub(r"\s*/\s*", "/", s)
    if m := _FULL_NUM_RE.match(s):
        v = _to_fraction(m["num"])
    elif m := _FULL_FRAC_RE.match(s):
        den = _to_fraction(m["den"])
        if den == 0:
            return None
        v = _to_fraction(m["num"]) / den
    elif m := _MIXED_RE.match(s):
        v = int(m["whole"]) + Fraction(int(m["num"]), int(m["den"])) if int(m["den"]) else None
        if v is None:
            return None
    elif m := _LATEX_FRAC_FULL_RE.match(s.replace(" ", "")):
        a = _parse_value(_clean(m["a"] if m["a"] is not None else m["a1"]))
        b = _parse_value(_clean(m["b"] if m["b"] is not None else m["b1"]))
        if a is None or b is None or b == 0:
            return None
        v = a / b
    else:
        return None
    return -v if m["sign"] in ("-", "\u2212") else v


def _canonical(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    den, k = v.denominator, 0
    # A terminating decimal iff the denominator has no prime factors other than 2 and 5.
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:
        return f"{v.numerator}/{v.denominator}"
    while (v * 10**k).denominator != 1:
        k += 1
    scaled = abs((v * 10**k).numerator)
    digits = str(scaled).rjust(k + 1, "0")
    sign = "-" if v < 0 else ""
    return f"{sign}{digits[:-k]}.{digits[-k:]}"


def parse_number(s: str | None) -> Fraction | None:
    """The exact value of a number-like string, or None (see module doc for what is accepted)."""
    if s is None:
        return None
    c = _clean(str(s))
    if not c:
        return None
    v = _parse_value(c)
    if v is not None:
        return v
    # "x = 5", "a) 5": drop a short leading label; "5 dollars", "18 eggs.": drop trailing words.
    c2 = re.sub(r"^[A-Za-z]\w{0,9}\s*[=:)]\s*", "", c)
    c2 = re.sub(r"(?:\s+[A-Za-z][A-Za-z ]*)$", "", c2).strip()
    if c2 != c and c2:
        return _parse_value(c2)
    return None


def normalize_number(s: str | None) -> str | None:
    """Canonical string of a number (`"1,000.50"` -> `"1000.5"`, `"3/4"` -> `"0.75"`), or None."""
    v = parse_number(s)
    return None if v is None else _canonical(v)


# -- answer extraction -----------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces matched), or of `\\boxed 5`."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1 : i].strip()
            continue  # unbalanced: try an earlier one
        m = re.match(r"([^\s$]+)", text[start:])
        if m:
            return m.group(1)
    return None


def _after_hashes(text: str) -> str | None:
    parts = text.split("####")
    for seg in reversed(parts[1:]):
        line = seg.strip().split("\n", 1)[0].strip()
        if line:
            return line
    return None


def last_number(text: str) -> str | None:
    """The last number-like token of `text` (integers, decimals, `1,000`, `3/4`, `\\frac{a}{b}`)."""
    found = None
    for m in _NUMBER_RE.finditer(text):
        if re.search(r"\d", m.group(0)):
            found = m.group(0).strip()
    return found


def _tidy(seg: str) -> str:
    """A found answer segment: itself if it is a number; its only number when the rest is words
    ("The answer is 18." -> "18"); else the segment as is (symbolic answers like `x+1`)."""
    seg = seg.strip()
    if normalize_number(seg) is not None:
        return seg
    m = next((m for m in _NUMBER_RE.finditer(seg) if re.search(r"\d", m.group(0))), None)
    if m is not None and re.fullmatch(r"[A-Za-z\s.,:;!?'\"]*", seg[: m.start()] + seg[m.end() :]):
        return m.group(0).strip()
    return seg.rstrip(".").strip()


def extract_answer(text: str | None) -> str | None:
    """The final answer of a completion: `####`, then `\\boxed{}`, `<answer>`, then the last number."""
    if not text:
        return None
    seg = _after_hashes(text)
    if seg is None:
        seg = last_boxed(text)
    if seg is None:
        tags = _ANSWER_TAG_RE.findall(text)
        if tags and tags[-1].strip():
            inner = tags[-1].strip()
            seg = inner if normalize_number(inner) is not None else (last_number(inner) or inner)
    if seg is not None:
        return _tidy(seg) or None
    return last_number(text)


def extract_gold(text: str | None) -> str | None:
    """The gold answer of a dataset row: `#### N` (GSM8K), `\\boxed{}`, `<answer>`, else the text."""
    if text is None:
        return None
    text = str(text)
    seg = _after_hashes(text)
    if seg is None:
        seg = last_boxed(text)
    if seg is None:
        tags = _ANSWER_TAG_RE.findall(text)
        seg = tags[-1] if tags else text
    seg = seg.strip()
    return seg or None


def _plain(s: str) -> str:
    s = _clean(s)
    return re.sub(r"\s+", "", s).lower()


def answers_equal(pred: str | None, gold: str | None) -> bool:
    """True when two answer strings have the same value (exact) or, non-numeric, the same text.

    Both arguments are answers, not whole texts: pass them through `extract_answer` /
    `extract_gold` first.
    """
    if pred is None or gold is None:
        return False
    p, g = parse_number(pred), parse_number(gold)
    if p is not None and g is not None:
        return p == g
    if p is not None or g is not None:
        return False
    return _plain(pred) == _plain(gold) and _plain(gold) != ""


def is_correct(completion: str, gold_text: str) -> bool:
    """Completion's extracted answer equals the gold row's answer."""
    return answers_equal(extract_answer(completion), extract_gold(gold_text))


@register("math_answer")
def math_answer(prompts, completions, *, answer=None, correct: float = 1.0, incorrect: float = 0.0, **_):
    """1.0 when the completion's final answer equals the `answer` column's, else 0.0.

    The `answer` column may be a GSM8K solution (`... #### 72`), a boxed solution, or a bare
    answer (`72`, `3/4`, `\\frac{3}{4}`).
    """
    if answer is None:
        raise ValueError("math_answer needs an 'answer' column (the gold answers, one per sample)")
    if len(answer) != len(completions):
        raise ValueError(f"math_answer: {len(answer)} answers for {len(completions)} completions")
    return [float(correct if is_correct(c, a) else incorrect) for c, a in zip(completions, answer)]
