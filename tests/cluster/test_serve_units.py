"""Serving pieces without Ray: ServeConfig validation, request parsing, stop strings, sampling,
the HTTP app through starlette's TestClient, adapter serving, Serve config files."""
import json
import os

import pytest
import torch
import yaml

from cluster.serve import AutoscalingConfig, ServeConfig, app_builder, resolve, serve_config_file
from cluster.serve_engines import HFEngine, sample
from cluster.serve_http import make_app
from cluster.serve_openai import ChatCompletionRequest, CompletionRequest, OpenAIError, StopText, parse_request

# ---------------------------------------------------------------------------------------------
# ServeConfig
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, field", [
    (dict(path=""), "path"),
    (dict(route_prefix="v1"), "route_prefix"),
    (dict(port=0), "port"),
    (dict(port=70000), "port"),
    (dict(host=""), "host"),
    (dict(api_key="a", api_key_env="B"), "api_key"),
    (dict(max_model_len=-1), "max_model_len"),
    (dict(max_ongoing_requests=0), "max_ongoing_requests"),
    (dict(max_request_bytes=100), "max_request_bytes"),
    (dict(engine="vllm", max_request_bytes=8 << 20), "max_request_bytes"),    # Ray's app: not applied
    (dict(num_cpus=-1), "num_cpus"),
    (dict(num_gpus=2), "num_gpus"),
    (dict(tensor_parallel_size=2), "tensor_parallel_size"),
    (dict(engine="vllm", num_gpus=1, tensor_parallel_size=2), "num_gpus"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(engine_kwargs={"x": 1}), "engine_kwargs"),
    (dict(engine="tgi"), "engine"),
    (dict(dtype="fp8"), "dtype"),
    (dict(autoscaling={"min_replicas": 3, "max_replicas": 2}), "autoscaling.min_replicas"),
])
def test_config_errors_name_the_field(kw, field):
    base = dict(path="some/model")
    base.update(kw)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ServeConfig(**base)


def test_autoscaling_errors_name_the_field():
    with pytest.raises(ValueError, match=r"autoscaling\.max_replicas"):
        AutoscalingConfig(max_replicas=0)
    with pytest.raises(ValueError, match=r"autoscaling\.target_ongoing_requests"):
        AutoscalingConfig(target_ongoing_requests=0)
    assert AutoscalingConfig(min_replicas=0, max_replicas=4).serve_dict() == {
        "min_replicas": 0, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 4.0}


def test_from_dict_roundtrip_and_unknown_keys():
    cfg = ServeConfig(path="/m", api_key_env="K", autoscaling=AutoscalingConfig(1, 3, 2.0))
    assert ServeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="prot"):
        ServeConfig.from_dict({"path": "/m", "prot": 1})
    with pytest.raises(ValueError, match="autoscaling"):
        ServeConfig.from_dict({"path": "/m", "autoscaling": {"max": 2}})


def test_served_name():
    assert ServeConfig(path="runs/sft-0001/merged").served_name() == "sft-0001-merged"
    assert ServeConfig(path="/models/my-model").served_name() == "my-model"
    assert ServeConfig(path="/b", adapter="runs/x/adapter").served_name() == "x-adapter"
    assert ServeConfig(path="/b", model_name="chosen").served_name() == "chosen"
    assert ServeConfig(path="meta-llama/Llama-3.2-1B", engine="vllm").served_name() == "meta-llama/Llama-3.2-1B"


def test_api_key_env(monkeypatch):
    cfg = ServeConfig(path="/m", api_key_env="RPT_TEST_KEY")
    monkeypatch.delenv("RPT_TEST_KEY", raising=False)
    with pytest.raises(RuntimeError, match="RPT_TEST_KEY"):
        cfg.resolved_api_key()
    monkeypatch.setenv("RPT_TEST_KEY", "s3cret")
    assert cfg.resolved_api_key() == "s3cret"


def test_every_field_is_documented():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "serving.md")).read()
    import dataclasses
    for f in dataclasses.fields(ServeConfig) + dataclasses.fields(AutoscalingConfig):
        assert f"`{f.name}`" in doc, f"docs/serving.md does not document {f.name}"


# ---------------------------------------------------------------------------------------------
# Requests, stop strings, sampling
# ---------------------------------------------------------------------------------------------


def test_parse_request_errors():
    with pytest.raises(OpenAIError) as e:
        parse_request(ChatCompletionRequest, b"{nope")
    assert e.value.status == 400 and e.value.code == "invalid_json"
    with pytest.raises(OpenAIError) as e:
        parse_request(ChatCompletionRequest, b"[1]")
    assert e.value.status == 400
    with pytest.raises(OpenAIError) as e:
        parse_request(ChatCompletionRequest, json.dumps({"messages": []}).encode())
    assert e.value.param == "messages"
    with pytest.raises(OpenAIError) as e:
        parse_request(CompletionRequest, json.dumps({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).encode())
    assert e.value.param == "stop" and "at most 4" in e.value.message
    with pytest.raises(OpenAIError) as e:
        parse_request(CompletionRequest, json.dumps({"prompt": "x", "logprobs": 21}).encode())
    assert e.value.param == "logprobs" and "20" in e.value.message      # the cap, as for top_logprobs
    with pytest.raises(OpenAIError) as e:
        parse_request(CompletionRequest, json.dumps({"prompt": "x", "n": 17}).encode())
    assert e.value.param == "n"


def test_parse_request_accepts_openai_shapes():
    req = parse_request(ChatCompletionRequest, json.dumps({
        "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 5, "stop": "\n", "user": "u1"}).encode())
    assert req.chat() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert req.requested_max_tokens() == 5 and req.stop == ["\n"]
    assert parse_request(CompletionRequest, b'{"prompt": [1, 2, 3]}').prompts() == [[1, 2, 3]]
    assert parse_request(CompletionRequest, b'{"prompt": ["a", "b"]}').prompts() == ["a", "b"]


# issue 21, finding 10: a field we do not implement is refused (400 naming it), never ignored
@pytest.mark.parametrize("cls, extra, param, code", [
    (ChatCompletionRequest, {"tempreature": 0.5}, "tempreature", "unknown_parameter"),
    (CompletionRequest, {"top_k": 5}, "top_k", "unknown_parameter"),
    (CompletionRequest, {"messages": []}, "messages", "unknown_parameter"),
    # tools: implemented on chat (the checks of their fields: test_serve_tools.py), not on completions
    (CompletionRequest, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    (CompletionRequest, {"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    (ChatCompletionRequest, {"tool_choice": "required"}, "tool_choice", "invalid_value"),      # no tools
    (ChatCompletionRequest, {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice",
     "invalid_value"),
    (ChatCompletionRequest, {"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    # implemented fields (engine support is checked over HTTP: test_serve_openai_fields.py), bad values
    (ChatCompletionRequest, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    (ChatCompletionRequest, {"top_logprobs": 2}, "top_logprobs", "invalid_value"),   # needs logprobs: true
    (CompletionRequest, {"logprobs": True}, "logprobs", "invalid_value"),            # an int here
    (ChatCompletionRequest, {"response_format": {"type": "xml"}}, "response_format", "invalid_value"),
    (ChatCompletionRequest, {"response_format": {"type": "json_schema"}}, "response_format", "invalid_value"),
    (CompletionRequest, {"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
    (ChatCompletionRequest, {"frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
    (ChatCompletionRequest, {"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
    (CompletionRequest, {"best_of": 3}, "best_of", "unsupported_parameter"),
    (CompletionRequest, {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats", "unsupported_parameter"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
     "messages.0.name", "unsupported_parameter"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi", "nmae": "bob"}]},
     "messages.0.nmae", "unknown_parameter"),
])
def test_fields_not_implemented_are_refused(cls, extra, param, code):
    body = {"messages": [{"role": "user", "content": "hi"}]} if cls is ChatCompletionRequest else {"prompt": "x"}
    body.update(extra)
    with pytest.raises(OpenAIError) as e:
        parse_request(cls, json.dumps(body).encode())
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code), e.value.message
    assert e.value.message.startswith(param)


def test_unknown_field_suggests_the_accepted_name():
    with pytest.raises(OpenAIError) as e:
        parse_request(ChatCompletionRequest, b'{"messages": [{"role": "user", "content": "hi"}], "tempreature": 0.5}')
    assert "did you mean 'temperature'" in e.value.message


def test_noop_values_of_unimplemented_fields_are_accepted():
    """What clients send as explicit defaults asks for nothing we skip: accepted."""
    req = parse_request(ChatCompletionRequest, json.dumps({
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "yo", "refusal": None, "tool_calls": [],
                      "annotations": [], "audio": None, "function_call": None}],
        "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0,
        "logprobs": False, "tools": None, "tool_choice": "none", "logit_bias": {}, "store": False,
        "service_tier": "auto", "user": "u", "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": False}).encode())
    assert req.stream and req.include_usage()
    req = parse_request(CompletionRequest, b'{"prompt": "x", "n": 2, "best_of": 2, "echo": false, "suffix": null}')
    assert req.n == 2


def test_stop_text_holds_back_possible_stop_prefixes():
    st = StopText(["###"])
    assert st.update("12 #") == ("12 ", False)          # '#' might start '###'
    assert st.update("12 ##") == ("", False)
    assert st.update("12 ##x") == ("##x", False)        # it did not
    assert st.update("12 ##x ###tail") == (" ", True)   # cut right before the stop string
    assert st.text == "12 ##x "


def test_stop_text_waits_for_whole_characters_and_flushes():
    st = StopText([])
    assert st.update("ab\ufffd") == ("ab", False)
    assert st.update("abé") == ("é", False)
    st2 = StopText(["END"])
    assert st2.update("xxEN") == ("xx", False)
    assert st2.flush("xxEN") == "EN"


def test_sample_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.9]])
    assert sample(logits, 0.0, 1.0, None).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    # a nucleus this small keeps only the top token
    assert all(sample(logits, 1.0, 1e-6, g).tolist() == [1, 0] for _ in range(20))
    draws = torch.stack([sample(logits, 1.0, 1.0, g) for _ in range(400)])   # [400, 2]
    assert set(draws[:, 1].tolist()) >= {0, 2}


# ---------------------------------------------------------------------------------------------
# The HTTP app without Ray; adapters
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tiny_tokenizer_dir, tiny_merged_dir):
    """A merged model; and a base + LoRA adapter pair whose adapter is not a no-op."""
    from kernels.model import ModelConfig, add_lora, build_model, save_adapter
    from kernels.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("serve_units")
    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = ModelConfig(preset="tiny")
    base_dir = tiny_merged_dir(torch.float32)  # the same preset and seed as the PEFT model below
    peft = add_lora(build_model(cfg, vocab_size=len(tok), seed=0), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(peft, str(root / "adapter"))
    tok.save_pretrained(str(root / "adapter"))
    ids = torch.tensor([tok("Ava has 3 apples.")["input_ids"]])
    with torch.no_grad():
        want = peft(input_ids=ids).logits
    return {"base": base_dir, "adapter": str(root / "adapter"), "ids": ids, "want": want}


def test_adapter_is_merged_at_load(tiny_dirs):
    eng = HFEngine(tiny_dirs["base"], tiny_dirs["adapter"], dtype="float32", device="cpu")
    with torch.no_grad():
        got = eng.model(input_ids=tiny_dirs["ids"]).logits
    torch.testing.assert_close(got, tiny_dirs["want"], atol=1e-4, rtol=1e-4)
    plain = HFEngine(tiny_dirs["base"], dtype="float32", device="cpu")
    with torch.no_grad():
        assert not torch.allclose(plain.model(input_ids=tiny_dirs["ids"]).logits, got, atol=1e-3)


def test_resolve_checks_folders(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="^path: .*no config.json"):
        resolve(ServeConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="^adapter: "):
        resolve(ServeConfig(path=tiny_dirs["base"], adapter=str(tmp_path)))
    with pytest.raises(ValueError, match="^path: .*LoRA adapter folder"):
        resolve(ServeConfig(path=tiny_dirs["adapter"]))      # its base is not recorded as a folder
    cfg = resolve(ServeConfig(path=os.path.relpath(tiny_dirs["base"]), adapter=tiny_dirs["adapter"]))
    assert os.path.isabs(cfg.path) and cfg.model_name


class _Server:
    def __init__(self, engine, key=""):
        self.engine, self.model_id, self.api_key = engine, "m", key


@pytest.fixture(scope="module")
def http(tiny_dirs):
    from starlette.testclient import TestClient

    eng = HFEngine(tiny_dirs["base"], dtype="float32", device="cpu", max_model_len=64)
    with TestClient(make_app(_Server(eng))) as c:
        yield c


def test_no_key_mode_and_routes(http):
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/v1/models").json()["data"][0]["id"] == "m"
    assert http.get("/v1/models/m").status_code == 200
    r = http.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = http.get("/nowhere")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_budget_rules(http):
    r = http.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    r = http.post("/v1/completions", json={"prompt": "a b c"})          # default 16 tokens
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 16
    r = http.post("/v1/completions", json={"prompt": "x " * 80})
    assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"] and "64" in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = http.post("/v1/completions", json={"prompt": [1, 2, 10 ** 6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_batch_prompts_number_choices_across_prompts(http):
    r = http.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 2})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]


# issue 21, finding 1: size limit (413), cheap context check, tokenisation off the event loop


def _error(r, status):
    body = r.json()
    assert r.status_code == status and set(body["error"]) == {"message", "type", "param", "code"}, r.text
    return body["error"]


def test_body_over_max_request_bytes_is_413(tiny_dirs):
    from starlette.testclient import TestClient

    eng = HFEngine(tiny_dirs["base"], dtype="float32", device="cpu", max_model_len=64)
    big = json.dumps({"prompt": "x" * 5000, "max_tokens": 1}).encode()
    with TestClient(make_app(_Server(eng), max_request_bytes=4096)) as c:
        h = {"Content-Type": "application/json"}
        err = _error(c.post("/v1/completions", content=big, headers=h), 413)     # Content-Length
        assert err["code"] == "request_too_large" and f"{len(big)} bytes" in err["message"] and "4096" in err["message"]
        chunked = (big[i:i + 1000] for i in range(0, len(big), 1000))           # no Content-Length
        err = _error(c.post("/v1/chat/completions", content=chunked, headers=h), 413)
        assert "max_request_bytes" in err["message"]
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_overlong_text_is_refused_before_tokenising(http, monkeypatch):
    import cluster.serve_engines as se

    calls = []
    real = se.encode_prompt
    monkeypatch.setattr(se, "encode_prompt", lambda tok, p: calls.append(p) or real(tok, p))
    err = _error(http.post("/v1/completions", json={"prompt": "apples " * 10_000}), 400)
    assert err["code"] == "context_length_exceeded" and "max_model_len" in err["message"] and "64" in err["message"]
    err = _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a" * 70_000}]}), 400)
    assert err["param"] == "messages" and "70000 characters" in err["message"]
    assert calls == []                                       # refused from the length alone
    assert http.post("/v1/completions", json={"prompt": "apples", "max_tokens": 1}).status_code == 200
    assert calls == ["apples"]


def test_tokenising_does_not_hold_up_other_requests(tiny_dirs, monkeypatch):
    """A slow tokenisation (as of a long prompt) runs on the engine's tokenizer thread: a
    token-id request sent meanwhile is answered without waiting for it."""
    import asyncio
    import time

    import httpx

    import cluster.serve_engines as se

    eng = HFEngine(tiny_dirs["base"], dtype="float32", device="cpu", max_model_len=64)
    real = se.encode_prompt

    def slow(tok, p):
        time.sleep(1.5)              # the fast tokenizer releases the GIL while it works
        return real(tok, p)

    async def go():
        transport = httpx.ASGITransport(app=make_app(_Server(eng)))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            await c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 1})    # warm-up
            monkeypatch.setattr(se, "encode_prompt", slow)
            due = time.perf_counter() + 0.2      # when the small request is sent, had nothing blocked
            big = asyncio.create_task(c.post("/v1/completions", json={"prompt": "Ava has", "max_tokens": 1}))
            await asyncio.sleep(0.2)
            small = await c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2})
            took = time.perf_counter() - due
            return await big, small, took

    big, small, took = asyncio.run(go())
    assert small.status_code == 200 and big.status_code == 200
    assert took < 0.9, f"a 2-token request waited {took:.2f}s behind another request's tokenisation"


def test_engine_failure_is_500_json(http, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("engine fell over")

    import cluster.serve_engines as se

    monkeypatch.setattr(se, "encode_prompt", boom)
    err = _error(http.post("/v1/completions", json={"prompt": "hi"}), 500)
    assert err["type"] == "server_error" and err["code"] == "internal_error" and "engine fell over" in err["message"]
    assert http.get("/health").status_code == 200


def test_unimplemented_field_over_http_is_400_json(http):
    err = _error(http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}), 400)
    assert err["param"] == "response_format" and err["code"] == "unsupported_parameter"
    err = _error(http.post("/v1/completions", json={"prompt": "hi", "tempreature": 0.5}), 400)
    assert err["param"] == "tempreature" and "temperature" in err["message"]


def test_chat_without_template_is_400(tiny_dirs, tmp_path):
    from starlette.testclient import TestClient

    eng = HFEngine(tiny_dirs["base"], dtype="float32", device="cpu")
    eng.tokenizer.chat_template = None
    with TestClient(make_app(_Server(eng))) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def im_start_eos(tmp_path_factory, tiny_dirs, tiny_tokenizer_dir):
    """A model folder whose config names no eos, and the trained tokenizer saved with eos
    <|im_start|> while its ChatML template closes assistant turns with <|im_end|> (the shape of
    SmolLM2-135M-Instruct): only the chat template tells where an answer ends."""
    import shutil

    from kernels.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("im_start_eos")
    model_dir = root / "model"
    shutil.copytree(tiny_dirs["base"], model_dir)
    (model_dir / "generation_config.json").unlink(missing_ok=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["eos_token_id"] = cfg["bos_token_id"] = None
    (model_dir / "config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.eos_token = "<|im_start|>"
    tok.save_pretrained(str(root / "tok"))
    return {"model": str(model_dir), "tok": str(root / "tok"),
            "ids": tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])}


def test_hf_engine_stops_at_chat_template_end_of_turn(im_start_eos):
    from starlette.testclient import TestClient

    im_start, im_end = im_start_eos["ids"]
    eng = HFEngine(im_start_eos["model"], tokenizer=im_start_eos["tok"], dtype="float32", device="cpu")
    assert eng.tokenizer.eos_token_id == im_start
    assert sorted(eng.stop_ids) == sorted([im_start, im_end]) and eng.eos_ids == {im_start, im_end}
    calls = []

    def hook(module, args, out):  # prefill + 1 decode step, then <|im_end|> (or never a stop id)
        calls.append(1)
        out = out.clone()
        if force_end and len(calls) > 2:
            out[..., im_end] += 1e4
        if not force_end:
            out[..., [im_start, im_end]] -= 1e4
        return out

    handle = eng.model.get_output_embeddings().register_forward_hook(hook)
    body = {"messages": [{"role": "user", "content": "1 + 2"}], "max_tokens": 6, "temperature": 0}
    try:
        with TestClient(make_app(_Server(eng))) as c:
            force_end = True
            r = c.post("/v1/chat/completions", json=body).json()
            assert r["choices"][0]["finish_reason"] == "stop", r
            assert r["usage"]["completion_tokens"] == 2 and "<|im_end|>" not in r["choices"][0]["message"]["content"]
            force_end = False
            r = c.post("/v1/chat/completions", json=body).json()
            assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 6
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# Serve config files
# ---------------------------------------------------------------------------------------------


def test_emit_config_is_a_valid_serve_config(tmp_path, capsys):
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    from jobs.serve import main

    out = tmp_path / "serve.yaml"
    rc = main(["jobs/configs/tiny-serve.yaml", "host=0.0.0.0", "api_key_env=MY_KEY",
               "autoscaling.max_replicas=4", "--emit-config", str(out)])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    doc = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(doc)                       # what `serve deploy` checks
    (app,) = doc["applications"]
    assert app["import_path"] == "cluster.serve:app_builder"
    assert app["args"]["autoscaling"]["max_replicas"] == 4
    assert isinstance(app_builder(app["args"]), Application)    # the builder accepts its args
    assert doc == serve_config_file(ServeConfig.from_dict(app["args"]))


def test_cli_config_errors_exit_2(capsys, tmp_path):
    from jobs.serve import main

    assert main(["jobs/configs/tiny-serve.yaml", "prot=1", "--no-block"]) == 2
    assert "prot" in capsys.readouterr().err
    assert main([str(tmp_path), "--no-block"]) == 2              # not a model folder
    assert "path:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# vllm-async against a stand-in `vllm` module (the real one runs in test_serve_gpu.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_vllm(monkeypatch):
    """Just the vLLM API VLLMAsyncEngine uses: AsyncEngineArgs, AsyncLLMEngine, SamplingParams,
    RequestOutputKind, StructuredOutputsParams, and DELTA outputs of (text, token_ids, logprobs,
    finish_reason) per choice: three pieces, "t0", "t1", "t2", or those a test puts in seen["texts"]."""
    import sys
    import types
    from types import SimpleNamespace as NS

    seen = {}

    class SamplingParams:
        def __init__(self, **kw):
            seen["params"] = kw
            self.__dict__.update(kw)

    class Engine:
        model_config = NS(max_model_len=96, get_vocab_size=lambda: 500)

        async def generate(self, prompt, params, request_id):
            seen["prompt"] = prompt
            # with logprobs=k: the sampled token 7 and one alternative, 9 (vLLM's {id: Logprob})
            lps = None if params.logprobs is None else [{7: NS(logprob=-0.25, rank=1), 9: NS(logprob=-2.0, rank=2)}]
            texts = seen.get("texts") or ["t0", "t1", "t2"]
            for step, text in enumerate(texts):
                yield NS(outputs=[NS(index=i, text=text, token_ids=[7], logprobs=lps,
                                     finish_reason=("length" if step == len(texts) - 1 else None))
                                  for i in range(params.n)])

    class AsyncLLMEngine:
        @staticmethod
        def from_engine_args(args):
            seen["args"] = args
            return Engine()

    vllm = types.ModuleType("vllm")
    vllm.AsyncEngineArgs = lambda **kw: kw
    vllm.AsyncLLMEngine = AsyncLLMEngine
    vllm.SamplingParams = SamplingParams
    sp = types.ModuleType("vllm.sampling_params")
    sp.RequestOutputKind = NS(DELTA="delta")
    sp.StructuredOutputsParams = lambda **kw: ("structured", kw)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp)
    return seen


def test_vllm_async_engine_adapter(fake_vllm, tiny_dirs):
    from starlette.testclient import TestClient

    from cluster.serve_engines import VLLMAsyncEngine

    eng = VLLMAsyncEngine(tiny_dirs["base"], max_model_len=96, engine_kwargs={"enforce_eager": True})
    assert fake_vllm["args"]["max_model_len"] == 96 and fake_vllm["args"]["enforce_eager"] is True
    assert eng.max_model_len == 96 and eng.vocab_size == 500
    with TestClient(make_app(_Server(eng, key="k"))) as c:
        h = {"Authorization": "Bearer k"}
        r = c.post("/v1/completions", headers=h, json={"prompt": "Ava has", "n": 2, "max_tokens": 3,
                                                       "stop": ["##"], "seed": 3, "ignore_eos": True})
        body = r.json()
        assert r.status_code == 200, body
        assert [ch["text"] for ch in body["choices"]] == ["t0t1t2"] * 2
        assert [ch["finish_reason"] for ch in body["choices"]] == ["length"] * 2
        assert body["usage"]["completion_tokens"] == 6
        p = fake_vllm["params"]
        assert (p["n"], p["max_tokens"], p["stop"], p["seed"], p["ignore_eos"]) == (2, 3, ["##"], 3, True)
        assert p["output_kind"] == "delta"
        assert p["stop_token_ids"] is None          # ignore_eos: vLLM would still stop on these
        assert fake_vllm["prompt"]["prompt_token_ids"] == eng.encode_text("Ava has")
        with c.stream("POST", "/v1/chat/completions", headers=h, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
        assert text == "t0t1t2" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        # every stop id of kernels.generation (eos, generation config, chat template end-of-turn)
        assert fake_vllm["params"]["stop_token_ids"] == eng.stop_ids
        assert eng.tokenizer.convert_tokens_to_ids("<|im_end|>") in eng.stop_ids
        assert c.post("/v1/completions", headers=h, json={"prompt": "x " * 200}).status_code == 400


def test_vllm_async_passes_logprobs_penalties_and_response_format(fake_vllm, tiny_dirs):
    """Issue 17: what the hf engine cannot do (structured output) vllm-async hands to vLLM, and
    logprobs / penalties become SamplingParams fields; vLLM's logprobs come back in OpenAI shapes."""
    from starlette.testclient import TestClient

    from cluster.serve_engines import VLLMAsyncEngine

    eng = VLLMAsyncEngine(tiny_dirs["base"], max_model_len=96)
    assert eng.features == {"logprobs", "penalties", "response_format", "tools"}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    with TestClient(make_app(_Server(eng))) as c:
        r = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 1,
            "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
        assert r.status_code == 200, r.text
        p = fake_vllm["params"]
        assert (p["logprobs"], p["presence_penalty"], p["frequency_penalty"], p["repetition_penalty"]) == (1, 0.5, 0.25, 1.1)
        assert p["structured_outputs"] == ("structured", {"json": schema})
        content = r.json()["choices"][0]["logprobs"]["content"]
        assert [t["logprob"] for t in content] == [-0.25] * 3
        assert [[a["logprob"] for a in t["top_logprobs"]] for t in content] == [[-0.25]] * 3
        assert content[0]["token"] == eng.token_piece(7)[0]
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 2,
                                            "response_format": {"type": "json_object"}})
        assert r.status_code == 200, r.text
        assert fake_vllm["params"]["structured_outputs"] == ("structured", {"json_object": True})
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["token_logprobs"] == [-0.25] * 3 and len(lp["top_logprobs"][0]) == 2
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
        p = fake_vllm["params"]
        assert p["logprobs"] is None and "structured_outputs" not in p and r.json()["choices"][0]["logprobs"] is None


def test_vllm_async_tool_calls(fake_vllm, tiny_dirs):
    """Tool calling is the app's, shared by the engines: vllm-async gets the prompt with the tools
    rendered and its answer is parsed into tool_calls, streamed or not."""
    from starlette.testclient import TestClient

    from cluster.serve_engines import VLLMAsyncEngine

    eng = VLLMAsyncEngine(tiny_dirs["base"])
    eng.max_model_len = 2048          # the stand-in reports 96: too short for the tools' system text
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    fake_vllm["texts"] = ["<tool_call>", '{"name": "add", ', '"arguments": {"a": 1}}</tool_call>']
    body = {"messages": [{"role": "user", "content": "1 + 2"}], "max_tokens": 40, "tools": tools}
    with TestClient(make_app(_Server(eng))) as c:
        r = c.post("/v1/chat/completions", json=body).json()
        assert "You can call these functions" in eng.decode(fake_vllm["prompt"]["prompt_token_ids"])
        (choice,) = r["choices"]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert [(t["function"]["name"], json.loads(t["function"]["arguments"])) for t in choice["message"]["tool_calls"]] \
            == [("add", {"a": 1})]
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        deltas = [ch["choices"][0]["delta"] for ch in chunks]
        assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == ["add"]
        assert not "".join(d.get("content") or "" for d in deltas)
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
