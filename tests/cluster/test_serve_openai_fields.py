"""Issue 17: the OpenAI request fields as the official `openai` client sends them, against the hf
engine's app (starlette's TestClient as the client's HTTP transport; no Ray): logprobs and
top_logprobs (chat, streaming included) and logprobs (completions) are returned; the penalties
change the output; what the engine cannot honour (response_format json, tool_choice "required"
without tools) and any unknown field is a 400 naming the field, never ignored (tool calling
itself: test_serve_tools.py)."""
import math

import pytest
import torch

from cluster.serve_engines import HFEngine, Penalties, token_logprobs
from cluster.serve_http import make_app
from cluster.serve_openai import ChatCompletionRequest, CompletionRequest, engine_refusal, parse_request

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "Ava has 3 apples. How many?"}]


class _Server:
    def __init__(self, engine):
        self.engine, self.model_id, self.api_key = engine, "m", ""


@pytest.fixture(scope="module")
def client(tiny_merged_dir):
    from starlette.testclient import TestClient

    eng = HFEngine(tiny_merged_dir(torch.float32), dtype="float32", device="cpu", max_model_len=64)
    with TestClient(make_app(_Server(eng))) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def _check_greedy(lp: float, alternatives: list[float], k: int) -> None:
    assert lp <= 0 and all(a <= 0 for a in alternatives)
    assert len(alternatives) == k
    # greedy: the sampled token is the most likely one
    assert alternatives == sorted(alternatives, reverse=True) and lp == pytest.approx(max(alternatives), abs=1e-5)


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for t in content:
        _check_greedy(t.logprob, [a.logprob for a in t.top_logprobs], 3)
        assert t.token == t.top_logprobs[0].token and bytes(t.bytes).decode("utf-8", "replace") == t.token
    text = b"".join(bytes(t.bytes) for t in content).decode("utf-8", "ignore")
    assert text.startswith(r.choices[0].message.content)          # the bytes spell the answer

    plain = client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    only = client.chat.completions.create(model="m", messages=CHAT, max_tokens=2, temperature=0, logprobs=True)
    assert [t.top_logprobs for t in only.choices[0].logprobs.content] == [[], []]
    assert [t.logprob for t in only.choices[0].logprobs.content] == pytest.approx([t.logprob for t in content[:2]])

    # streaming: the same tokens and logprobs, spread over the chunks
    chunks = list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, pytest.approx(t.logprob)) for t in content]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content


def test_completion_logprobs(client):
    r = client.completions.create(model="m", prompt="Ava has", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 4
    for tok, p, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert p <= 0 and 1 <= len(top) <= 3 and top[tok] == pytest.approx(p)   # k alternatives + the sampled one
        assert p == pytest.approx(max(top.values()), abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    chunks = list(client.completions.create(model="m", prompt="Ava has", max_tokens=4, temperature=0, logprobs=2,
                                            stream=True))
    got = [(t, o) for ch in chunks if ch.choices[0].logprobs
           for t, o in zip(ch.choices[0].logprobs.tokens, ch.choices[0].logprobs.text_offset)]
    assert got == list(zip(lp.tokens, lp.text_offset))
    assert client.completions.create(model="m", prompt="Ava has", max_tokens=2).choices[0].logprobs is None


def test_penalties_change_the_output(client):
    def tokens(**kw):
        r = client.completions.create(model="m", prompt="Ava has", max_tokens=12, temperature=0, logprobs=0, **kw)
        return r.choices[0].logprobs.tokens

    base = tokens()
    assert len(set(base)) < len(base), base        # the random model repeats itself: a penalty has work to do
    assert tokens(presence_penalty=0, frequency_penalty=0, extra_body={"repetition_penalty": 1}) == base
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 3.0}}):
        assert tokens(**kw) != base, kw


def test_penalties_processor_matches_its_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    p = Penalties([2], 1, 4, "cpu", presence=0.5, frequency=0.25, repetition=2.0)
    p.update(torch.tensor([0]))
    p.update(torch.tensor([0]))
    # token 0: generated twice (2 / 2 - 0.25 * 2 - 0.5); token 2: in the prompt (0.5 / 2); 1, 3: untouched
    assert p(logits)[0].tolist() == pytest.approx([0.0, -1.0, 0.25, 0.0])
    assert Penalties([2], 1, 4, "cpu")(logits).tolist() == logits.tolist()
    lps = token_logprobs(logits, torch.tensor([2]), 0.0, 2)
    assert lps[0][0] == 2 and lps[0][1] == pytest.approx(torch.log_softmax(logits, -1)[0, 2].item())
    assert [i for i, _ in lps[0][2]] == [0, 2]


@pytest.mark.parametrize("endpoint, kw, param", [
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}},
     "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}, "strict": True}}]},
     "tools.0.function.strict"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logit_bias": {"5": 10}}, "logit_bias"),
    ("chat", {"extra_body": {"top_k": 5}}, "top_k"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"extra_body": {"guided_json": {}}}, "guided_json"),
])
def test_fields_the_hf_engine_cannot_honour_are_400_naming_them(client, endpoint, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        if endpoint == "chat":
            client.chat.completions.create(model="m", messages=CHAT, max_tokens=2, **kw)
        else:
            client.completions.create(model="m", prompt="x", max_tokens=2, **kw)
    assert e.value.status_code == 400 and e.value.param == param and e.value.body["message"].startswith(param)


def test_accepted_no_op_values(client):
    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=2, temperature=0, response_format={
        "type": "text"}, tool_choice="none", logprobs=False, presence_penalty=0, seed=3, user="u", n=2, stop=["\n"])
    assert len(r.choices) == 2 and r.choices[0].logprobs is None


def test_an_engine_without_a_feature_refuses_its_fields():
    chat = b'{"messages": [{"role": "user", "content": "hi"}], '
    for body, param in [(b'"logprobs": true}', "logprobs"), (b'"presence_penalty": 0.5}', "presence_penalty"),
                        (b'"repetition_penalty": 1.2}', "repetition_penalty")]:
        err = engine_refusal(parse_request(ChatCompletionRequest, chat + body), frozenset(), "test")
        assert err.status == 400 and err.param == param and err.code == "unsupported_parameter"
    req = parse_request(CompletionRequest, b'{"prompt": "x", "logprobs": 0, "frequency_penalty": 0}')
    assert engine_refusal(req, frozenset(), "test").param == "logprobs"        # 0 alternatives: still logprobs
    assert engine_refusal(req, frozenset({"logprobs"}), "test") is None
    assert math.isclose(req.penalties()["repetition_penalty"], 1.0)
