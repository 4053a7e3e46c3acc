"""The OpenAI wire format of the serving app: request schemas, errors, response and SSE chunks.

No Ray and no torch here, so every rule of the HTTP contract has fast unit tests:
- requests are pydantic models; a bad field becomes a 400 whose `param` names the field, and
  so does a field we do not implement (never ignored: see NOOP_VALUES), or one the engine
  cannot honour (`engine_refusal`: e.g. `response_format` json on the hf engine); the tool
  fields of chat (`tools`, `tool_choice`, messages' `tool_calls` / `tool_call_id`) are checked
  by cluster/serve_tools.py, which also renders and parses tool calls;
- every error body is `{"error": {"message", "type", "param", "code"}}` (what the official
  clients parse into `openai.BadRequestError` & co.);
- `StopText` turns a growing decoded string into safe-to-send deltas: text that could still
  become a stop string, or a half-decoded UTF-8 character, is held back until it is settled.
"""
from __future__ import annotations

import difflib
import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.serve_tools import ToolFieldError, ToolPlan, check_messages, check_tools

MAX_N = 16          # choices per request; each one is a row of the decode batch
MAX_STOP = 4        # stop strings per request (the OpenAI limit)
MAX_LOGPROBS = 20   # top_logprobs (chat) / logprobs (completions): OpenAI's chat limit, vLLM's default
LOGPROB_FLOOR = -9999.0     # what a -inf logprob is sent as (JSON has no infinity)
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class OpenAIError(Exception):
    """An error that reaches the client as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def too_large(limit: int, size: int | None = None) -> OpenAIError:
    """413: the body is over max_request_bytes (`size` when Content-Length told it)."""
    what = f"is {size} bytes" if size is not None else "is larger"
    return OpenAIError(413, f"request body {what}; this server accepts at most {limit} bytes "
                            f"(max_request_bytes)", code="request_too_large")


# ---------------------------------------------------------------------------------------------
# Requests. One rule: a field we do not implement is refused, never ignored. Accepted are the
# fields declared below (what we implement), and the OpenAI fields of NOOP_VALUES at a value that
# asks for nothing we skip (e.g. presence_penalty 0, response_format {"type": "text"}), which
# clients may send explicitly. Any other value of those is a 400 `unsupported_parameter`; a field
# that is neither (a typo such as "tempreature", a vendor extra) is a 400 `unknown_parameter`.
# ---------------------------------------------------------------------------------------------

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024     # ServeConfig.max_request_bytes

# OpenAI request fields this server does not implement -> the values that mean "not used".
# (logprobs, top_logprobs, the penalties and response_format are declared fields: implemented,
# or refused per engine by `engine_refusal`; so are chat's tools / tool_choice /
# parallel_tool_calls, which therefore remain here only for /v1/completions, where no tool can
# be called.) The deprecated `functions` / `function_call` are refused at any value that asks
# for a call: send `tools`.
NOOP_VALUES: dict[str, tuple] = {
    "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None,),
    "functions": (None, []), "function_call": (None, "none"),
    "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "reasoning_effort": (None,), "verbosity": (None,), "web_search_options": (None,),
}
# ... and in a chat message: what clients echo back from a response's message.
# (tool_calls and tool_call_id are declared fields of ChatMessage, checked by serve_tools.)
MESSAGE_NOOP_VALUES: dict[str, tuple] = {
    "name": (None,), "refusal": (None,), "function_call": (None,), "audio": (None,), "annotations": (None, []),
}


def _same(a, b) -> bool:
    """a == b, except that booleans equal only booleans (logprobs 0 is not logprobs false)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def _refuse_extras(extra: dict, known: set[str], noop: dict[str, tuple], where: str = "") -> None:
    """400 for the first field of `extra` (what the schema does not declare) we would ignore."""
    for key, val in extra.items():
        param = f"{where}{key[:80]}"
        if key in noop:
            if not any(_same(val, ok) for ok in noop[key]):
                raise bad_request(f"{param}: {json.dumps(val)[:80]} is not supported by this server "
                                  f"(accepted only as {' or '.join(json.dumps(v) for v in noop[key])})",
                                  param=param, code="unsupported_parameter")
            continue
        near = difflib.get_close_matches(key, sorted(known | set(noop)), n=1) if len(key) <= 80 else []
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise bad_request(f"{param}: unknown field{hint}; this server refuses fields it does not "
                          f"implement rather than ignore them", param=param, code="unknown_parameter")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False        # vLLM's extension: keep going past end-of-sequence (benchmarks)
    # OpenAI's additive penalties (0 = off) and vLLM's multiplicative repetition_penalty (1 = off)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    response_format: dict | None = None

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        if v is None:
            return None
        kind = v.get("type")
        if kind not in RESPONSE_FORMATS:
            raise ValueError(f"type must be one of {', '.join(RESPONSE_FORMATS)}, got {json.dumps(kind)[:40]}")
        if kind == "json_schema":
            spec = v.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError('json_schema: expected {"name": ..., "schema": {<a JSON schema>}}')
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are accepted, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def logprobs_k(self) -> int | None:
        """None: no logprobs; k: the sampled token's logprob and the k most likely alternatives."""
        raise NotImplementedError

    def penalties(self) -> dict:
        """The three penalties, None replaced by the value that turns each off."""
        return {"presence_penalty": self.presence_penalty or 0.0,
                "frequency_penalty": self.frequency_penalty or 0.0,
                "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty}

    def structured(self) -> dict | None:
        """response_format when it constrains the output (json_object / json_schema), else None."""
        rf = self.response_format
        return rf if rf and rf.get("type") != "text" else None

    def unsupported(self) -> None:
        """400 naming the first field we would otherwise ignore (see NOOP_VALUES)."""
        known = set(type(self).model_fields)
        extra = dict(self.model_extra or {})
        best_of = extra.pop("best_of", None)
        if best_of not in (None, 1, self.n):
            raise bad_request("best_of: only 1 or n is supported by this server", param="best_of",
                              code="unsupported_parameter")
        _refuse_extras(extra, known, NOOP_VALUES)
        bad = sorted(set(self.stream_options or {}) - {"include_usage"})
        if bad:
            raise bad_request(f"stream_options.{bad[0]}: not supported by this server (accepted: "
                              f"include_usage)", param=f"stream_options.{bad[0]}",
                              code="unsupported_parameter")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None
    tool_calls: Any = None          # assistant: [{"id", "type": "function", "function": {"name", "arguments"}}]
    tool_call_id: Any = None        # tool: the id of the call it answers

    def text(self) -> str:
        """The message's text; list content is the OpenAI parts form (text parts only)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported", param="messages",
                                  code="unsupported_parameter")
            out.append(part["text"])
        return "".join(out)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None               # checked by serve_tools.check_tools (in unsupported())
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict]:
        """The messages as dicts of role and text content (and tool_calls / tool_call_id where set)."""
        out = []
        for m in self.messages:
            # "developer" is the newer name of "system"; templates know only the latter
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out

    def has_tool_messages(self) -> bool:
        return any(m.tool_calls or m.role == "tool" for m in self.messages)

    def tool_plan(self) -> ToolPlan:
        return ToolPlan.of(self.tools, self.tool_choice, self.parallel_tool_calls)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs: needs logprobs: true", param="top_logprobs")
        for i, m in enumerate(self.messages):
            _refuse_extras(dict(m.model_extra or {}), set(ChatMessage.model_fields),
                           MESSAGE_NOOP_VALUES, where=f"messages.{i}.")
        try:
            check_tools(self.tools, self.tool_choice)
            check_messages([m.model_dump(include={"role", "tool_calls", "tool_call_id"}) for m in self.messages])
        except ToolFieldError as e:
            raise bad_request(str(e), param=e.param, code=e.code) from None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs(cls, v):
        if v is False:                  # what some clients send for "none"
            return None
        if isinstance(v, bool):
            raise ValueError(f"expected an integer from 0 to {MAX_LOGPROBS} (the number of alternatives)")
        return v

    def logprobs_k(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def engine_refusal(req: _Sampling, features: frozenset | set, engine: str) -> OpenAIError | None:
    """The 400 for the first field of `req` the engine cannot honour, or None.

    features: what the engine implements, of "logprobs", "penalties", "response_format", "tools"."""
    def refuse(param: str, what: str, hint: str = "") -> OpenAIError:
        return bad_request(f"{param}: {what} is not supported by the {engine} engine{hint}", param=param,
                           code="unsupported_parameter")

    if req.logprobs_k() is not None and "logprobs" not in features:
        return refuse("logprobs", "returning logprobs")
    for name, value in req.penalties().items():
        if value != (1.0 if name == "repetition_penalty" else 0.0) and "penalties" not in features:
            return refuse(name, f"{value:g}")
    plan = req.tool_plan() if isinstance(req, ChatCompletionRequest) else None
    if plan is not None and plan.active and "tools" not in features:
        return refuse("tools", "tool calling")
    rf = req.structured()
    if rf is not None and "response_format" not in features:
        return refuse("response_format", f'{{"type": "{rf["type"]}"}}',
                      " (structured output needs guided decoding: serve with engine=vllm-async or engine=vllm)")
    return None


def parse_request(cls, raw: bytes):
    """Body bytes -> request model, or a 400 naming the offending field."""
    try:
        data = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err.get("loc", ())) or None
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        raise bad_request(f"{param}: {msg}" if param else msg, param=param) from None
    req.unsupported()
    return req


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_message(content: str | None, tool_calls: list[dict] | None = None) -> dict:
    """The assistant message of a choice; `tool_calls` (serve_tools.parse_tool_calls) only when there are some."""
    msg = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


def chat_response(rid: str, model: str, choices: list[tuple], usage_: dict) -> dict:
    """choices: (text, finish_reason), (text, finish_reason, logprobs) or (text, finish_reason,
    logprobs, tool_calls) in index order; logprobs as `chat_logprobs` makes them (None when not
    asked for); text None when an answer is only tool calls."""
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": chat_message(c[0], c[3] if len(c) > 3 else None),
                     "logprobs": c[2] if len(c) > 2 else None, "finish_reason": c[1]}
                    for i, c in enumerate(choices)],
        "usage": usage_,
    }


def completion_response(rid: str, model: str, choices: list[tuple], usage_: dict) -> dict:
    """choices as for chat_response; logprobs as `completion_logprobs` makes them."""
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": c[0], "logprobs": c[2] if len(c) > 2 else None, "finish_reason": c[1]}
                    for i, c in enumerate(choices)],
        "usage": usage_,
    }


# A token's logprob entry, engine-neutral: (token text, its UTF-8 bytes, logprob, alternatives),
# alternatives being (text, bytes, logprob) of the k most likely tokens, most likely first.
TokenLogprob = tuple[str, list[int], float, list[tuple[str, list[int], float]]]


def _finite(lp: float) -> float:
    lp = float(lp)
    return lp if lp > LOGPROB_FLOOR else LOGPROB_FLOOR       # -inf (and nan) -> the floor


def chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    return {"content": [{"token": t, "logprob": _finite(lp), "bytes": b,
                         "top_logprobs": [{"token": at, "logprob": _finite(alp), "bytes": ab}
                                          for at, ab, alp in top]}
                        for t, b, lp, top in tokens],
            "refusal": None}


def completion_logprobs(tokens: list[TokenLogprob], offset: int = 0) -> dict:
    """The legacy completions shape: parallel lists `tokens`, `token_logprobs`, `top_logprobs`
    (one {text: logprob} per token: the k alternatives and the sampled token) and `text_offset`
    (each token's character offset in the choice's text, starting at `offset`)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, _b, lp, top in tokens:
        out["tokens"].append(t)
        out["token_logprobs"].append(_finite(lp))
        alts = {at: _finite(alp) for at, _ab, alp in top}
        alts.setdefault(t, _finite(lp))
        out["top_logprobs"].append(alts)
        out["text_offset"].append(offset)
        offset += len(t)
    return out


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict,
               finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, usage_: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage_}


def sse(data: Any) -> bytes:
    """One server-sent event; the stream ends with `sse("[DONE]")`."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def model_card(model_id: str, max_model_len: int, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ray-posttrain",
            "max_model_len": max_model_len}


# ---------------------------------------------------------------------------------------------
# Stop strings over a growing text
# ---------------------------------------------------------------------------------------------

class StopText:
    """Feed the whole decoded text after each token; get back what may be sent now.

    `update(text)` returns (delta, stopped). Once a stop string appears, the text is cut just
    before it and `stopped` is True. Until then, a tail that is a prefix of some stop string,
    or ends in U+FFFD (a multi-byte character whose bytes have not all arrived), is held back.
    `flush(text)` sends whatever is left when generation ends for another reason.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.sent = 0
        self.text = ""

    def _held(self, text: str) -> int:
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        if text.endswith("\ufffd"):
            hold = max(hold, 1)
        return hold

    def update(self, text: str) -> tuple[str, bool]:
        cut = -1
        for s in self.stops:
            i = text.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            delta = text[self.sent:cut] if cut > self.sent else ""
            self.sent = max(self.sent, cut)
            self.text = text[:cut]
            return delta, True
        safe = len(text) - self._held(text)
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        self.text = text
        return delta, False

    def flush(self, text: str) -> str:
        delta = text[self.sent:]
        self.sent = len(text)
        self.text = text
        return delta
