"""Tool calling on /v1/chat/completions (hf and vllm-async engines): checks, rendering, parsing.

No torch, no Ray, nothing of the project: serve_openai checks requests with it, the engines
render prompts with it, serve_http parses answers with it.

    plan = ToolPlan.of(tools, tool_choice, parallel_tool_calls)       # after check_tools()
    ids, prefill = encode_tool_chat(tokenizer, messages, plan)        # the prompt; tools rendered
    content, calls = parse_tool_calls(prefill + answer, plan)         # -> message.tool_calls

Rendering. A chat template that mentions `tools` gets them as transformers passes them
(`apply_chat_template(messages, tools=...)`), and the conversation's assistant `tool_calls` (their
`arguments` decoded to objects, as such templates expect) and `tool` messages as they are. Any
other template gets the fallback, which needs nothing of the template: a system message lists the
tools and shows the call format (`FALLBACK_*` below), an assistant's earlier calls are written
into its content as `<tool_call>` blocks, and each run of `tool` messages becomes one user
message of `<tool_response>` blocks (so strict user/assistant templates accept it).

tool_choice. "auto": tools rendered, the answer parsed. "none": neither. "required": the
assistant turn is started with the opening of a call (`<tool_call>\\n` for the Hermes format,
`{"name": "` for a bare-JSON template), so the model can only write a call; a named function
starts it with the call's name too, and only the first call is kept. That prefix is part of the
prompt: the answer is parsed with it in front.

Parsing. Either `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks anywhere in the
answer (Hermes, Qwen; a last block may lack its closing tag, e.g. cut by a stop string), or the
whole answer one bare JSON object `{"name": ..., "arguments": ...}` (`"parameters"` accepted for
`"arguments"`, as Llama 3.1 writes it) or a JSON list of them (Mistral, once its special token
is decoded away). All calls or none: if any block is not such JSON, or names a function not
among the request's tools, the whole answer stays `content` and there are no `tool_calls`.
Arguments are not checked against the tool's `parameters` schema.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from kernels.tool_format import TOOL_OPEN, format_tool_call, tool_call_blocks

RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
MAX_TOOLS = 128                                   # OpenAI's limit
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")    # OpenAI's rule for function names
CHOICES = ("none", "auto", "required")

# The fallback's system text (templates that do not mention tools): the tools, one JSON per line,
# then how to call them. Kept short: it is part of every prompt of the request.
FALLBACK_HEADER = "You can call these functions:"
FALLBACK_FORMAT = ('To call one, write <tool_call>{"name": <name>, "arguments": {<arguments>}}</tool_call>, '
                   "one block per call. Results come back in <tool_response></tool_response>.")
FALLBACK_REQUIRED = "Answer with at least one function call."
FALLBACK_NAMED = "Answer by calling the function {name}."
FALLBACK_ONE = "Call at most one function."


class ToolFieldError(ValueError):
    """A bad tools / tool_choice / message field; `param` names it (serve_openai makes it a 400)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(f"{param}: {message}")
        self.param, self.code = param, code


# ---------------------------------------------------------------------------------------------
# Request checks
# ---------------------------------------------------------------------------------------------

def _check_function(i: int, fn) -> None:
    where = f"tools.{i}.function"
    if not isinstance(fn, dict):
        raise ToolFieldError(where, 'expected {"name": ..., "description": ..., "parameters": {...}}')
    for key in fn:
        if key not in ("name", "description", "parameters", "strict"):
            raise ToolFieldError(f"{where}.{str(key)[:40]}", "unknown field", code="unknown_parameter")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ToolFieldError(f"{where}.name", "expected 1 to 64 letters, digits, '_' or '-', got "
                                              f"{json.dumps(name)[:80]}")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise ToolFieldError(f"{where}.description", "expected a string")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise ToolFieldError(f"{where}.parameters", "expected a JSON schema object")
    if fn.get("strict") not in (None, False):
        raise ToolFieldError(f"{where}.strict", "true is not supported by this server (arguments are not "
                                                "constrained to the schema); accepted only as null or false",
                             code="unsupported_parameter")


def check_tools(tools, tool_choice) -> None:
    """ToolFieldError naming the first bad field of `tools` / `tool_choice`."""
    if tools is not None:
        if not isinstance(tools, list):
            raise ToolFieldError("tools", "expected a list of function tools")
        if len(tools) > MAX_TOOLS:
            raise ToolFieldError("tools", f"at most {MAX_TOOLS} tools are accepted, got {len(tools)}")
        seen = set()
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise ToolFieldError(f"tools.{i}", 'expected {"type": "function", "function": {...}}')
            if tool.get("type") != "function":
                raise ToolFieldError(f"tools.{i}.type", f"{json.dumps(tool.get('type'))[:40]} is not supported "
                                                        'by this server (only "function")',
                                     code="unsupported_parameter")
            extra = sorted(set(tool) - {"type", "function"})
            if extra:
                raise ToolFieldError(f"tools.{i}.{extra[0][:40]}", "unknown field", code="unknown_parameter")
            _check_function(i, tool.get("function"))
            name = tool["function"]["name"]
            if name in seen:
                raise ToolFieldError(f"tools.{i}.function.name", f"{name!r} is defined twice")
            seen.add(name)
    names = [t["function"]["name"] for t in tools or []]
    if tool_choice is None or tool_choice in ("none", "auto"):
        return
    shown = json.dumps(tool_choice)[:80]
    if tool_choice == "required":
        if not names:
            raise ToolFieldError("tool_choice", f"{shown} needs tools")
        return
    if isinstance(tool_choice, str):
        raise ToolFieldError("tool_choice", f'{shown}: expected "none", "auto", "required" or '
                                            '{"type": "function", "function": {"name": ...}}')
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(fn, dict) \
            or not isinstance(fn.get("name"), str) or set(tool_choice) - {"type", "function"} or set(fn) - {"name"}:
        raise ToolFieldError("tool_choice", f'{shown}: expected "none", "auto", "required" or '
                                            '{"type": "function", "function": {"name": ...}}',
                             code="unsupported_parameter" if isinstance(tool_choice, dict) else "invalid_value")
    if fn["name"] not in names:
        raise ToolFieldError("tool_choice", f"{shown}: {fn['name']!r} is not among the request's tools "
                                            f"({', '.join(names) or 'none'})")


def _arguments(value, param: str) -> dict:
    """A call's arguments (a JSON string, as OpenAI sends them, or an object) -> the object."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as e:
            raise ToolFieldError(param, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ToolFieldError(param, "expected a JSON object (as a string)")
    return value


def check_messages(messages: list[dict]) -> None:
    """ToolFieldError naming the first bad tool field of the messages (dicts of role, content,
    tool_calls, tool_call_id): calls only on assistant messages, each {"id", "type": "function",
    "function": {"name", "arguments"}}; a tool message answers a call made earlier (tool_call_id)."""
    ids: set[str] = set()
    for i, m in enumerate(messages):
        calls, call_id, role = m.get("tool_calls"), m.get("tool_call_id"), m.get("role")
        if calls not in (None, []):
            if role != "assistant":
                raise ToolFieldError(f"messages.{i}.tool_calls", "only assistant messages carry tool calls")
            if not isinstance(calls, list):
                raise ToolFieldError(f"messages.{i}.tool_calls", "expected a list")
            for j, c in enumerate(calls):
                where = f"messages.{i}.tool_calls.{j}"
                if not isinstance(c, dict):
                    raise ToolFieldError(where, 'expected {"id", "type": "function", '
                                                '"function": {"name", "arguments"}}')
                if not isinstance(c.get("id"), str) or not c["id"]:
                    raise ToolFieldError(f"{where}.id", "expected a non-empty string")
                if c.get("type", "function") != "function":
                    raise ToolFieldError(f"{where}.type", 'only "function" is supported', code="unsupported_parameter")
                fn = c.get("function")
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise ToolFieldError(f"{where}.function", 'expected {"name": ..., "arguments": "<JSON>"}')
                _arguments(fn.get("arguments", "{}"), f"{where}.function.arguments")
                ids.add(c["id"])
        if role == "tool":
            if not isinstance(call_id, str) or not call_id:
                raise ToolFieldError(f"messages.{i}.tool_call_id", "a tool message needs the id of the call it answers")
            if call_id not in ids:
                raise ToolFieldError(f"messages.{i}.tool_call_id", f"{call_id[:64]!r} answers no tool call of an "
                                                                 "earlier assistant message")
        elif call_id is not None:
            raise ToolFieldError(f"messages.{i}.tool_call_id", "only tool messages carry tool_call_id")


# ---------------------------------------------------------------------------------------------
# The plan of one request, and rendering
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolPlan:
    """What a (checked) request asks of tools. `active`: render the tools and parse the answer."""

    tools: tuple = ()                 # the request's function tools, as sent
    choice: str = "none"              # "none" | "auto" | "required" | "function" (named)
    name: str | None = None           # the named function
    parallel: bool = True             # parallel_tool_calls (false: the first call only)

    @classmethod
    def of(cls, tools, tool_choice, parallel_tool_calls=None) -> "ToolPlan":
        tools = tuple(tools or ())
        if isinstance(tool_choice, dict):
            return cls(tools, "function", tool_choice["function"]["name"], False)
        choice = tool_choice or ("auto" if tools else "none")
        return cls(tools, choice if tools else "none", None, parallel_tool_calls is not False)

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def prefill(self, fmt: str) -> str:
        """The start of the assistant turn that forces a call ("" unless required / named)."""
        if self.choice == "function":
            head = json.dumps({"name": self.name})[:-1] + ', "arguments": '
            return TOOL_OPEN + "\n" + head if fmt == "hermes" else head
        if self.choice == "required":
            return TOOL_OPEN + "\n" if fmt == "hermes" else '{"name": "'
        return ""

    def fallback_text(self) -> str:
        lines = [FALLBACK_HEADER] + [json.dumps(t["function"], ensure_ascii=False) for t in self.tools]
        lines.append(FALLBACK_FORMAT)
        if self.choice == "required":
            lines.append(FALLBACK_REQUIRED)
        elif self.choice == "function":
            lines.append(FALLBACK_NAMED.format(name=self.name))
        if not self.parallel and self.choice != "function":
            lines.append(FALLBACK_ONE)
        return "\n".join(lines)


def chat_template(tokenizer) -> str:
    """The template text apply_chat_template(tools=...) would use ("" without one)."""
    try:
        return tokenizer.get_chat_template(None, tools=[]) or ""
    except Exception:  # noqa: BLE001 - no template, or a dict without a default
        t = getattr(tokenizer, "chat_template", None)
        return t if isinstance(t, str) else ""


def template_supports_tools(tokenizer) -> bool:
    """Whether the chat template renders tools itself (it mentions them)."""
    return "tools" in chat_template(tokenizer)


def _block(name: str, arguments: dict) -> str:
    return format_tool_call(name, arguments, newlines=True)


def render_messages(messages: list[dict], plan: ToolPlan, native: bool) -> tuple[list[dict], list | None]:
    """(messages for the template, tools for apply_chat_template) of a conversation that may hold
    tool calls and results. native: the template renders tools; else the fallback above."""
    out: list[dict] = []
    for m in messages:
        calls = m.get("tool_calls") or []
        content = m.get("content") or ""
        if native:
            msg = {"role": m["role"], "content": content}
            if calls:
                msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["function"]["name"],
                                                   "arguments": _arguments(c["function"].get("arguments", "{}"), "")}}
                                     for c in calls]
            if m["role"] == "tool":
                msg["tool_call_id"] = m["tool_call_id"]
            out.append(msg)
        elif m["role"] == "tool":
            block = f"{RESPONSE_OPEN}\n{content}\n{RESPONSE_CLOSE}"
            if out and out[-1].get("_tool_results"):          # a run of results: one user message
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            blocks = [_block(c["function"]["name"], _arguments(c["function"].get("arguments", "{}"), ""))
                      for c in calls]
            out.append({"role": m["role"], "content": "\n".join(([content] if content else []) + blocks)})
    for msg in out:
        msg.pop("_tool_results", None)
    if native:
        return out, (list(plan.tools) if plan.active else None)
    if plan.active:
        text = plan.fallback_text()
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": (out[0]["content"] + "\n\n" + text).lstrip("\n")}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


def encode_tool_chat(tokenizer, messages: list[dict], plan: ToolPlan) -> tuple[list[int], str]:
    """(prompt token ids, prefill): the conversation rendered with its tools (native or
    fallback), the generation prompt, then the prefill that starts a forced call (or "")."""
    native = template_supports_tools(tokenizer)
    msgs, tools = render_messages(messages, plan, native)
    fmt = "hermes" if not native or TOOL_OPEN in chat_template(tokenizer) else "json"
    prefill = plan.prefill(fmt) if plan.active else ""
    text = tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    # the template writes any BOS itself, as kernels.generation.encode_prompt assumes for chats
    return list(tokenizer(text + prefill, add_special_tokens=False)["input_ids"]), prefill


# ---------------------------------------------------------------------------------------------
# Parsing answers
# ---------------------------------------------------------------------------------------------

def _load(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(obj, names: set[str], bare: bool) -> tuple[str, dict] | None:
    """(name, arguments) of one call object, or None (not a call to one of `names`)."""
    if not isinstance(obj, dict) or not set(obj) <= {"name", "arguments", "parameters"}:
        return None
    if not isinstance(obj.get("name"), str) or obj["name"] not in names or ("arguments" in obj and "parameters" in obj):
        return None
    if bare and "arguments" not in obj and "parameters" not in obj:
        return None                # a bare JSON answer that merely has a "name" is not a call
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _load(args) if args.strip() else {}
    return (obj["name"], args) if isinstance(args, dict) else None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of one answer. No calls: (text, []), the text unchanged. With calls:
    the text outside the call blocks (None when only whitespace is left) and the calls as
    OpenAI's message.tool_calls, `arguments` a JSON string."""
    names = plan.names()
    if TOOL_OPEN in text:
        blocks = tool_call_blocks(text)
        objs = [_load(m.group(1).strip()) for m in blocks]
        parsed = [_call(o, names, bare=False) for o in objs]
        outside, pos = [], 0
        for m in blocks:
            outside.append(text[pos:m.start()])
            pos = m.end()
        content = "".join(outside) + text[pos:]
    else:
        body = text.strip()
        if not body.startswith(("{", "[")):
            return text, []
        data = _load(body)
        items = data if isinstance(data, list) else [data]
        parsed = [_call(o, names, bare=True) for o in items]
        content = ""
    if not parsed or any(p is None for p in parsed):
        return text, []
    if not plan.parallel:
        parsed = parsed[:1]
    calls = [{"id": new_call_id(), "type": "function",
              "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
             for name, args in parsed]
    return (content if content.strip() else None), calls


class ToolStream:
    """The content of a streamed answer that may hold tool calls: `feed(delta)` returns what may
    be sent now, `finish()` the rest of the content and the calls (`parse_tool_calls` of the
    whole text, so the streamed content equals the non-streamed one). Held back: an answer that
    is only whitespace so far or starts with `{` / `[` (it may be a bare JSON call), everything
    from the first `<tool_call>` on, and a tail that may be the start of `<tool_call>`."""

    def __init__(self, plan: ToolPlan, prefill: str = ""):
        self.plan, self.text, self.sent = plan, prefill, 0

    def _safe(self) -> int:
        t = self.text
        cut = t.find(TOOL_OPEN)
        if cut == -1:
            cut = len(t)
            for k in range(min(len(TOOL_OPEN) - 1, len(t)), 0, -1):
                if t.endswith(TOOL_OPEN[:k]):
                    cut -= k
                    break
        if self.sent == 0 and (not t[:cut].strip() or t.lstrip()[0] in "{["):
            return 0
        return max(cut, self.sent)

    def feed(self, delta: str) -> str:
        self.text += delta
        safe = self._safe()
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = parse_tool_calls(self.text, self.plan)
        rest = (content or "")[self.sent:] if calls else self.text[self.sent:]
        self.sent = len(self.text)
        return rest, calls
