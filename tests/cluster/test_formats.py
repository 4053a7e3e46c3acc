"""Formats -> messages, built-in chat templates and the assistant loss mask (no Ray)."""
from __future__ import annotations

import numpy as np
import pytest

from cluster.formats import FORMATS, RowError, detect_format, to_messages, to_text, with_system_prompt
from cluster.templates import (ALPACA, BUILTIN_TEMPLATES, CHATML, LLAMA3, ChatEncoder, has_generation_markers,
                               resolve_template)

IGNORE = -100

ROWS = {
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+3?"},
                                   {"from": "gpt", "value": "5"}]},
    "messages": {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]},
    "gsm8k": {"question": "Ava has 2 pens and gets 3. How many?", "answer": "2 + 3 = 5\n#### 5"},
    "prompt_completion": {"prompt": "2+3?", "completion": "5"},
    "text": {"text": "Some raw text."},
}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from kernels.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_is_detected_from_its_columns(fmt):
    assert detect_format(ROWS[fmt].keys()) == fmt


def test_unknown_columns_are_not_detected():
    assert detect_format(["foo", "bar"]) is None
    assert detect_format(["instruction"]) is None  # alpaca needs output too


def test_each_chat_format_renders_to_messages():
    assert to_messages(ROWS["alpaca"], "alpaca") == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert to_messages(ROWS["sharegpt"], "sharegpt") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"}]
    assert to_messages(ROWS["messages"], "messages") == ROWS["messages"]["messages"]
    assert to_messages(ROWS["gsm8k"], "gsm8k") == [
        {"role": "user", "content": ROWS["gsm8k"]["question"]},
        {"role": "assistant", "content": ROWS["gsm8k"]["answer"]}]
    assert to_messages(ROWS["prompt_completion"], "prompt_completion") == [
        {"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
    assert to_text(ROWS["text"]) == "Some raw text."


def test_alpaca_without_input_and_with_system():
    msgs = to_messages({"instruction": "Say hi.", "output": "hi", "input": "", "system": "S"}, "alpaca")
    assert msgs == [{"role": "system", "content": "S"}, {"role": "user", "content": "Say hi."},
                    {"role": "assistant", "content": "hi"}]


def test_conversational_prompt_completion_and_text_parts():
    row = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "3?"}]}],
           "completion": [{"role": "assistant", "content": "5"}]}
    assert to_messages(row, "prompt_completion") == [{"role": "user", "content": "2+3?"},
                                                     {"role": "assistant", "content": "5"}]


@pytest.mark.parametrize("fmt,row,field,what", [
    ("alpaca", {"instruction": "x"}, "output", "missing"),
    ("alpaca", {"instruction": "x", "output": 5}, "output", "expected a string, got int"),
    ("alpaca", {"instruction": "x", "output": "  "}, "output", "empty"),
    ("gsm8k", {"question": None, "answer": "1"}, "question", "expected a string, got null"),
    ("messages", {"msgs": []}, "messages", "missing"),
    ("messages", {"messages": "hi"}, "messages", "expected a list of messages, got str"),
    ("messages", {"messages": []}, "messages", "empty conversation"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     "messages[1].role", "unknown role 'bot'"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "messages[1].content", "empty assistant turn"),
    ("messages", {"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant turn"),
    ("messages", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "expected a string, got int"),
    ("messages", {"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
     "conversations[1].from", "unknown role 'robot'"),
    ("prompt_completion", {"prompt": "a"}, "completion", "missing"),
    ("messages", ["not", "an", "object"], "row", "expected a JSON object, got list"),
])
def test_malformed_rows_name_the_field(fmt, row, field, what):
    with pytest.raises(RowError) as e:
        to_messages(row, fmt)
    assert e.value.field == field
    assert what in e.value.what
    assert str(e.value).startswith(f"{field}: ")


def test_text_row_errors():
    with pytest.raises(RowError, match="text: missing"):
        to_text({"body": "x"})
    with pytest.raises(RowError, match="text: expected a string, got int"):
        to_text({"text": 1})


def test_system_prompt_is_prepended_unless_present():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert with_system_prompt(msgs, "S")[0] == {"role": "system", "content": "S"}
    own = [{"role": "system", "content": "mine"}] + msgs
    assert with_system_prompt(own, "S") == own
    assert with_system_prompt(msgs, "") == msgs


# ------------------------------------------------------------------ templates and the loss mask

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "2 + 3 = 5\n#### 5"}, {"role": "user", "content": "And 4+4?"},
        {"role": "assistant", "content": "8"}]
END = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>", "alpaca": "<|im_end|>"}  # alpaca ends with the EOS


def _target_runs(ids, labels):
    """Contiguous runs of target tokens, decoded."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_loss_mask_covers_exactly_the_assistant_turns(tok, name):
    assert has_generation_markers(BUILTIN_TEMPLATES[name])
    ids, labels = ChatEncoder(tok, BUILTIN_TEMPLATES[name]).encode([CONV])[0]
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    assert np.all((labels == IGNORE) | (labels == ids))
    runs = [tok.decode(r) for r in _target_runs(ids, labels)]
    assert runs == [f"2 + 3 = 5\n#### 5{END[name]}", f"8{END[name]}"]
    # everything outside the runs is the prompt side: system, user turns and headers
    prompt = tok.decode(ids[labels == IGNORE])
    assert "Be brief." in prompt and "What is 2+3?" in prompt and "And 4+4?" in prompt
    assert "#### 5" not in prompt


def test_train_on_all_labels_every_token_but_the_first(tok):
    ids, labels = ChatEncoder(tok, CHATML, train_on="all").encode([CONV])[0]
    assert labels[0] == IGNORE
    np.testing.assert_array_equal(labels[1:], ids[1:])


@pytest.mark.parametrize("template", [CHATML, LLAMA3, ALPACA])
def test_prefix_diff_mask_matches_generation_markers(tok, template):
    """A template without {% generation %} markers (most published ones) gets the same assistant mask."""
    plain = template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    enc = ChatEncoder(tok, plain)
    assert enc.mask_method == "prefix-diff"
    ids_a, lab_a = ChatEncoder(tok, template).encode([CONV])[0]
    ids_b, lab_b = enc.encode([CONV])[0]
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(lab_a, lab_b)


def test_a_template_error_is_a_row_error_not_a_batch_failure(tok):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" \
             "{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}" \
             "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    out = ChatEncoder(tok, strict).encode([CONV[1:3], CONV, CONV[1:]])
    assert isinstance(out[1], RowError) and "no system" in str(out[1])
    assert not isinstance(out[0], RowError) and not isinstance(out[2], RowError)


def test_resolve_template(tok):
    assert resolve_template("auto", tok)[0] == "tokenizer"  # ours ships a ChatML template
    assert resolve_template("llama-3", tok) == ("llama-3", LLAMA3)
    saved = tok.chat_template
    try:
        tok.chat_template = None
        assert resolve_template("auto", tok) == ("chatml", CHATML)
        with pytest.raises(ValueError, match="data.chat_template: 'tokenizer' but the tokenizer has no chat template"):
            resolve_template("tokenizer", tok)
    finally:
        tok.chat_template = saved
    with pytest.raises(ValueError, match="data.chat_template: expected one of"):
        resolve_template("vicuna", tok)
