"""Dataset formats: detect a format from a row's columns and convert rows to chat messages.

Pure Python (no Ray, no tokenizer). Every problem with a row raises `RowError(field, what)`,
which the pipeline turns into "file:row: field: what" in its log and stats.

    alpaca             {"instruction", "input"?, "output", "system"?}
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
    messages           {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}
                       ("tool": a tool's output after an assistant turn that called it, as in
                       actors/tool_traces.py; trained on like user turns: not at all)
    gsm8k              {"question", "answer"}  -> user = question, assistant = answer
    prompt_completion  {"prompt", "completion"}: strings, or lists of messages (conversational)
    text               {"text"}  (continued pre-training: raw text, no template)
"""
from __future__ import annotations

from collections.abc import Iterable

FORMATS = ("alpaca", "sharegpt", "messages", "gsm8k", "prompt_completion", "text")
# columns whose value in one record may be a list (of messages): a .json file holding a single object with
# one of these keys is one record, not a wrapper of a list of records (cluster/readers_formats.py, records_of)
LIST_COLUMNS = ("messages", "conversations", "prompt", "completion")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool"}


class RowError(ValueError):
    """A malformed row: `field` names the offending field (e.g. "messages[2].role")."""

    def __init__(self, field: str, what: str):
        self.field = field
        self.what = what
        super().__init__(f"{field}: {what}")


def detect_format(columns: Iterable[str]) -> str | None:
    """The format whose required columns are present (first match in a fixed order), else None."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"question", "answer"} <= cols:
        return "gsm8k"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    return None


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _get(record: dict, field: str):
    if field not in record:
        raise RowError(field, "missing")
    return record[field]


def _string(value, field: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise RowError(field, "empty")
    return value


def _content(value, field: str) -> str:
    """Message content: a string, or OpenAI-style parts [{"type": "text", "text": ...}, ...]."""
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RowError(f"{field}[{j}]", "only text parts are supported ({'type': 'text', 'text': ...})")
            texts.append(part["text"])
        return "".join(texts)
    return _string(value, field, allow_empty=True)


def _message_list(value, field: str, *, role_key: str = "role", content_key: str = "content",
                  role_map: dict[str, str] | None = None) -> list[dict]:
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise RowError(field, "empty conversation")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f"expected an object, got {_type_name(m)}")
        rk, ck = role_key, content_key
        if rk not in m and "role" in m:  # sharegpt files sometimes use role/content
            rk, ck = "role", "content"
        role = _string(_get_in(m, rk, where), f"{where}.{rk}")
        mapped = (role_map or {r: r for r in ROLES}).get(role)
        if mapped is None:
            accepted = ", ".join(sorted(role_map or ROLES))
            raise RowError(f"{where}.{rk}", f"unknown role {role!r} (accepted: {accepted})")
        out.append({"role": mapped, "content": _content(_get_in(m, ck, where), f"{where}.{ck}")})
    return out


def _get_in(m: dict, key: str, where: str):
    if key not in m:
        raise RowError(f"{where}.{key}", "missing")
    return m[key]


def check_conversation(messages: list[dict], field: str = "messages") -> list[dict]:
    """At least one assistant turn, and no empty assistant turn."""
    n_assistant = 0
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            n_assistant += 1
            if not m["content"].strip():
                raise RowError(f"{field}[{i}].content", "empty assistant turn")
    if n_assistant == 0:
        raise RowError(field, "no assistant turn")
    return messages


def to_messages(record: dict, fmt: str) -> list[dict]:
    """One row of a chat format -> validated [{"role", "content"}, ...]."""
    if not isinstance(record, dict):
        raise RowError("row", f"expected a JSON object, got {_type_name(record)}")
    if fmt == "messages":
        msgs = _message_list(_get(record, "messages"), "messages")
        return check_conversation(msgs, "messages")
    if fmt == "sharegpt":
        msgs = _message_list(_get(record, "conversations"), "conversations", role_key="from",
                             content_key="value", role_map=SHAREGPT_ROLES)
        return check_conversation(msgs, "conversations")
    if fmt == "alpaca":
        instruction = _string(_get(record, "instruction"), "instruction")
        extra = record.get("input")
        if extra is not None:
            extra = _string(extra, "input", allow_empty=True)
        output = _string(_get(record, "output"), "output")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        msgs = []
        system = record.get("system")
        if system is not None and _string(system, "system", allow_empty=True).strip():
            msgs.append({"role": "system", "content": system})
        return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt == "gsm8k":
        question = _string(_get(record, "question"), "question")
        answer = _string(_get(record, "answer"), "answer")
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if fmt == "prompt_completion":
        prompt, completion = _get(record, "prompt"), _get(record, "completion")
        if isinstance(prompt, list):
            msgs = _message_list(prompt, "prompt")
        else:
            msgs = [{"role": "user", "content": _string(prompt, "prompt")}]
        if isinstance(completion, list):
            tail = _message_list(completion, "completion")
        else:
            tail = [{"role": "assistant", "content": _string(completion, "completion")}]
        check_conversation(tail, "completion")
        return msgs + tail
    if fmt == "text":
        raise RowError("text", "format 'text' has no messages (it is for continued pre-training)")
    raise ValueError(f"data.format: unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")


def to_text(record: dict) -> str:
    """One row of the text format -> its text."""
    if not isinstance(record, dict):
        raise RowError("row", f"expected a JSON object, got {_type_name(record)}")
    return _string(_get(record, "text"), "text")


def with_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """Prepend `system_prompt` unless the conversation already opens with a system message."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}] + messages
