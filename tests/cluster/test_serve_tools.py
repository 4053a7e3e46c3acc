"""Issue 16: tool calling on /v1/chat/completions (cluster/serve_tools.py, shared by the hf and
vllm-async engines). The parsing of both formats on fixed strings; the request checks (400s
naming the field); rendering through a tool-aware template and through the fallback; then the
official `openai` client against the hf engine's app (starlette's TestClient, no Ray): the tiny
random model forced to write a call (a logit bonus per step), then, faster, the engine's stream
scripted to a fixed answer: the tool call, streamed and not, the round trip with the assistant's
tool_calls and a tool message, tool_choice named / none. The vllm-async side: test_serve_units.py."""
import contextlib
import json

import pytest
import torch

from cluster.serve_engines import Event, HFEngine
from cluster.serve_http import make_app
from cluster.serve_openai import ChatCompletionRequest, OpenAIError, parse_request
from cluster.serve_tools import ToolPlan, ToolStream, encode_tool_chat, parse_tool_calls, render_messages

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
TOOLS = [WEATHER, ADD]
AUTO = ToolPlan.of(TOOLS, "auto")
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# ---------------------------------------------------------------------------------------------
# Parsing (fixed strings)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ('Let me look.\n<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\n'
     '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', "Let me look.\n\n",
     [("add", {"a": 1}), ("get_weather", {"city": "Oslo"})]),          # arguments as a JSON string too
    ('<tool_call>{"name": "add", "arguments": {}}', None, [("add", {})]),     # cut before </tool_call>
    ('  {"name": "get_weather", "arguments": {"city": "Zürich"}}\n', None, [("get_weather", {"city": "Zürich"})]),
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', None, [("get_weather", {"city": "Rome"})]),
    ('[{"name": "add", "arguments": {"a": 2}}, {"name": "add", "arguments": {"a": 3}}]', None,
     [("add", {"a": 2}), ("add", {"a": 3})]),
])
def test_parse_hermes_blocks_and_bare_json(text, content, calls):
    got_content, got = parse_tool_calls(text, AUTO)
    assert got_content == content and _calls(got) == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)
    assert len({c["id"] for c in got}) == len(got)


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    '<tool_call>{"name": "send_email", "arguments": {}}</tool_call>',                     # not among the tools
    '<tool_call>{"name": "add", "arguments": {}}</tool_call><tool_call>{"name": "rm", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "add", "arguments": {"a": </tool_call>',                          # not JSON
    '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',                            # arguments not an object
    '{"name": "add"}',                                   # a bare JSON answer with a "name" is not a call
    '{"answer": 42}', "[]",
])
def test_anything_else_stays_content(text):
    assert parse_tool_calls(text, AUTO) == (text, [])


def test_parallel_false_keeps_the_first_call():
    text = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>{"name": "add", "arguments": {}}</tool_call>'
    assert _calls(parse_tool_calls(text, ToolPlan.of(TOOLS, "auto", False))[1]) == [("add", {"a": 1})]
    named = ToolPlan.of(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert named.prefill("hermes") == '<tool_call>\n{"name": "add", "arguments": '
    assert named.prefill("json") == '{"name": "add", "arguments": '
    assert ToolPlan.of(TOOLS, "required").prefill("hermes") == "<tool_call>\n"
    assert AUTO.prefill("hermes") == "" and not ToolPlan.of(TOOLS, "none").active and not ToolPlan.of(None, "auto").active


@pytest.mark.parametrize("text, prefill", [
    ('Sure.\n<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call> and more', ""),
    (' \n{"name": "add", "arguments": {}}', ""),
    ("no call <tool here", ""),
    ('{"not": "a call"}', ""),
    ('{"a": 1}}\n</tool_call>', '<tool_call>\n{"name": "add", "arguments": '),
    ("garbage", '<tool_call>\n{"name": "add", "arguments": '),
])
def test_streamed_content_equals_the_parsed_content(text, prefill):
    content, calls = parse_tool_calls(prefill + text, AUTO)
    ts = ToolStream(AUTO, prefill)
    pieces = [ts.feed(ch) for ch in text]
    rest, streamed_calls = ts.finish()
    assert "".join(pieces) + rest == (content or "")
    assert _calls(streamed_calls) == _calls(calls)
    if calls:          # nothing of a call block is ever sent as content
        assert "<tool_call" not in "".join(pieces) + rest


# ---------------------------------------------------------------------------------------------
# Request checks: 400s naming the field
# ---------------------------------------------------------------------------------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
HISTORY = ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]


def _with(i: int, **kw) -> list[dict]:
    msgs = json.loads(json.dumps(HISTORY))
    msgs[i].update(kw)
    return msgs


@pytest.mark.parametrize("body, param", [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "get_weather"}}]}, "tools.1.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}, "tools.0.function.strict"),
    ({"tools": [{"type": "function", "function": {"name": "f", "paramters": {}}}]}, "tools.0.function.paramters"),
    ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "maybe"}, "parallel_tool_calls"),
    ({"messages": _with(2, tool_call_id=None)}, "messages.2.tool_call_id"),
    ({"messages": _with(2, tool_call_id="call_9")}, "messages.2.tool_call_id"),
    ({"messages": _with(0, tool_call_id="call_1")}, "messages.0.tool_call_id"),
    ({"messages": _with(0, tool_calls=[CALL])}, "messages.0.tool_calls"),
    ({"messages": _with(1, tool_calls=[{**CALL, "id": ""}])}, "messages.1.tool_calls.0.id"),
    ({"messages": _with(1, tool_calls=[{**CALL, "function": {"name": "f", "arguments": "{oops"}}])},
     "messages.1.tool_calls.0.function.arguments"),
    ({"messages": _with(1, tool_calls=[{"id": "c", "type": "function"}])}, "messages.1.tool_calls.0.function"),
])
def test_bad_tool_fields_are_400_naming_them(body, param):
    req = {"messages": ASK, **body}
    with pytest.raises(OpenAIError) as e:
        parse_request(ChatCompletionRequest, json.dumps(req).encode())
    assert (e.value.status, e.value.param) == (400, param), e.value.message
    assert e.value.message.startswith(param)


def test_good_tool_requests_parse():
    for body in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
                 {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "add"}}},
                 {"tool_choice": "auto"}, {"tools": [], "tool_choice": "none"}, {"messages": HISTORY}):
        req = parse_request(ChatCompletionRequest, json.dumps({"messages": ASK, **body}).encode())
    assert req.has_tool_messages() and req.chat()[1]["tool_calls"] == [CALL] and req.chat()[1]["content"] == ""
    assert req.chat()[2] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"}


# ---------------------------------------------------------------------------------------------
# Rendering: a tool-aware template, and the fallback
# ---------------------------------------------------------------------------------------------

TOOL_TEMPLATE = (     # a minimal ChatML template that renders tools and calls itself
    "{% if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from kernels.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def test_fallback_rendering_for_a_template_without_tools(tok):
    msgs = [{"role": "system", "content": "Be brief."}] + [dict(m) for m in HISTORY] + \
        [{"role": "tool", "tool_call_id": "call_1", "content": "again"}]
    msgs[2]["content"] = ""
    out, tools = render_messages(msgs, ToolPlan.of(TOOLS, "required"), native=False)
    assert tools is None and [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these functions:")
    assert json.dumps(WEATHER["function"]) in out[0]["content"] and "at least one function call" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert out[3]["content"] == "<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\nagain\n</tool_response>"
    ids, prefill = encode_tool_chat(tok, msgs, ToolPlan.of(TOOLS, "required"))
    assert prefill == "<tool_call>\n" and tok.decode(ids).endswith("<|im_start|>assistant\n<tool_call>\n")
    # tool_choice "none": no tools in the prompt, the history still rendered
    none, _ = render_messages(HISTORY, ToolPlan.of(TOOLS, "none"), native=False)
    assert [m["role"] for m in none] == ["user", "assistant", "user"]


def test_a_template_that_renders_tools_gets_them(tok):
    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.chat_template = TOOL_TEMPLATE
    ids, prefill = encode_tool_chat(tok, HISTORY, ToolPlan.of([ADD], {"type": "function", "function": {"name": "add"}}))
    text = tok.decode(ids)
    assert text.startswith('<|im_start|>system\nTOOLS [{"type": "function", "function": {"name": "add"')
    assert 'CALL get_weather {"city": "Paris"}' in text                  # arguments handed over as an object
    assert "<|im_start|>tool\n18 C, sunny" in text
    assert prefill == '{"name": "add", "arguments": ' and text.endswith("assistant\n" + prefill)   # bare JSON style


# ---------------------------------------------------------------------------------------------
# Through the app with the official client; the tiny model forced to write a call
# ---------------------------------------------------------------------------------------------

class _Server:
    def __init__(self, engine):
        self.engine, self.model_id, self.api_key = engine, "m", ""


@pytest.fixture(scope="module")
def engine(tiny_merged_dir):
    return HFEngine(tiny_merged_dir(torch.float32), dtype="float32", device="cpu", max_model_len=1024)


@pytest.fixture(scope="module")
def client(engine):
    from starlette.testclient import TestClient

    with TestClient(make_app(_Server(engine))) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@contextlib.contextmanager
def forced(engine, text: str):
    """Greedy decoding writes `text`, then <|im_end|>: the k-th forward pass of the request gets
    a bonus on the k-th token (the tiny tokenizer spells any text, byte-level)."""
    tok = engine.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    calls = []

    def hook(module, args, out):
        step = len(calls)
        calls.append(1)
        out = out.clone()
        out[..., ids[min(step, len(ids) - 1)]] += 1e4
        return out

    handle = engine.model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def scripted(engine, text: str, seen: list | None = None):
    """The engine's stream answers `text` (n = 1) in pieces of 7 characters, then "stop"; the
    prompt ids of each request are appended to `seen`."""
    async def stream(prompt_ids, **kw):
        if seen is not None:
            seen.append(prompt_ids)
        pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
        for k, piece in enumerate(pieces):
            yield Event(0, piece, None, k + 1)
        yield Event(0, "", "stop", len(pieces))

    engine.stream = stream
    try:
        yield
    finally:
        del engine.stream


CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_call_and_the_round_trip(client, engine):
    with forced(engine, CALL_TEXT):
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=100, temperature=0)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    # what agent code does: append the assistant message as returned, then the tool's result
    follow = ASK + [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    with scripted(engine, "It is sunny."):
        r2 = client.chat.completions.create(model="m", messages=follow, tools=TOOLS, max_tokens=20, temperature=0)
    assert r2.choices[0].message.content == "It is sunny." and r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.tool_calls is None and r2.usage.prompt_tokens > r.usage.prompt_tokens

    # streamed: the same call, as one tool_calls delta at the end of the choice
    with scripted(engine, "Checking. " + CALL_TEXT):
        chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=100,
                                                     temperature=0, stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas) == "Checking. "
    (streamed,) = [tc for d in deltas for tc in d.tool_calls or []]
    assert (streamed.index, streamed.function.name, json.loads(streamed.function.arguments)) == (0, "get_weather",
                                                                                               {"city": "Paris"})
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_named_none_and_unknown_names(client, engine):
    # named: the prompt ends with the call's opening, the model writes only the arguments
    named, prompts = {"type": "function", "function": {"name": "add"}}, []
    with scripted(engine, '{"a": 1, "b": 2}}\n</tool_call>', prompts):
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=40,
                                           temperature=0)
    assert engine.decode(prompts[0]).endswith('assistant\n<tool_call>\n{"name": "add", "arguments": ')
    assert r.choices[0].finish_reason == "tool_calls"
    assert _calls([c.model_dump() for c in r.choices[0].message.tool_calls]) == [("add", {"a": 1, "b": 2})]

    # none: tools neither rendered nor parsed
    plain = client.chat.completions.create(model="m", messages=ASK, max_tokens=1, temperature=0)
    with scripted(engine, CALL_TEXT):
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=100,
                                           temperature=0)
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    assert r.choices[0].message.content == CALL_TEXT and r.choices[0].finish_reason == "stop"

    # a function the request did not offer: the text stays content
    other = CALL_TEXT.replace("get_weather", "send_email")
    with scripted(engine, other):
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=100, temperature=0)
    assert r.choices[0].message.content == other and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"


def test_bad_tool_message_over_http_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=_with(2, tool_call_id="call_9"), tools=TOOLS, max_tokens=2)
    assert e.value.param == "messages.2.tool_call_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt="x", max_tokens=2, extra_body={"tools": TOOLS})
    assert e.value.param == "tools"
