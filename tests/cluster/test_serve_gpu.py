"""The vLLM engines on the GPU machine: `vllm` (Ray's `ray.serve.llm`) and `vllm-async` (this
project's HTTP app over vLLM's AsyncLLMEngine). Each deploys a merged llama-3.2-1b-shaped
model, checks the contract, and measures 32 concurrent streaming clients. Then the packaged GPU
engine as a user runs it (test_smollm2_serve_cli_openai): `posttrain serve` in a subprocess,
engine vllm-async, the real SmolLM2-135M-Instruct, the official openai client.

Random weights and a locally trained 1k-token tokenizer (nothing can be downloaded), so the
model's vocabulary is the tokenizer's, not Llama's 128k: every other dimension is the public
Llama-3.2-1B shape. Results are printed and, when $OUT is set, written to
$OUT/serve_<engine>_bench.json and $OUT/serve_smollm2_openai.json. The `vllm` engine is skipped
where Ray's ray.serve.llm does not import with the installed vLLM (Ray 2.60 with vLLM 0.26).
"""
import concurrent.futures as cf
import importlib
import json
import os
import socket
import statistics
import time

import pytest

# tests/cluster has no __init__.py, so pytest puts it on sys.path: the CPU variant's helpers
from serve_cli import check_chat, check_logprobs, check_models, check_stream, client_for, load_round, serve_cli

pytestmark = pytest.mark.gpu

# What the devkit notes found vLLM needs to start on the GPU machine (offline, no usage stats,
# in-process engine core, no FlashInfer sampler).
VLLM_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0"}
KEY = "gpu-test-key"
CLIENTS, REQUESTS_PER_CLIENT, MAX_TOKENS = 32, 4, 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def merged_1b(tmp_path_factory, tiny_tokenizer_dir):
    import torch

    from kernels.model import ModelConfig, build_model, save_merged
    from kernels.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(ModelConfig(preset="llama-3.2-1b", dtype="bfloat16"), vocab_size=len(tok), device="cpu")
    out = str(tmp_path_factory.mktemp("vllm") / "merged")
    save_merged(model, out, tokenizer=tok, dtype=torch.bfloat16)
    del model
    return out


@pytest.fixture(scope="module", params=["vllm", "vllm-async"])
def vllm_server(request, ray_local, merged_1b):
    pytest.importorskip("vllm")
    from ray import serve

    from cluster.serve import AutoscalingConfig, ServeConfig, deploy, resolve

    engine = request.param
    if engine == "vllm":
        try:
            importlib.import_module("cluster.serve_vllm")
        except ImportError as e:
            pytest.skip(f"engine vllm: Ray's ray.serve.llm does not import with this vLLM ({e})")
    cfg = resolve(ServeConfig(
        path=merged_1b, engine=engine, model_name="llama-1b-shape", host="127.0.0.1", port=free_port(),
        api_key=KEY, max_model_len=2048, dtype="bfloat16", gpu_memory_utilization=0.85,
        max_ongoing_requests=128, env_vars=VLLM_ENV,
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=1, target_ongoing_requests=64)))
    serve.shutdown()
    t0 = time.perf_counter()
    url = deploy(cfg)
    print(f"\n[{engine}] deployed in {time.perf_counter() - t0:.0f}s at {url}")
    try:
        yield engine, url
    finally:
        serve.shutdown()


def test_vllm_contract(vllm_server):
    import openai

    engine, url = vllm_server
    c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in c.models.list().data] == ["llama-1b-shape"]
    r = c.chat.completions.create(model="llama-1b-shape", max_tokens=8, n=2,
                                  messages=[{"role": "user", "content": "3 + 4 = ?"}])
    assert len(r.choices) == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="llama-1b-shape", prompt="apples " * 3000, max_tokens=4)


def test_vllm_32_streaming_clients(vllm_server):
    import openai

    engine, url = vllm_server
    clients = [openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=300)
               for _ in range(CLIENTS)]

    def run(i):
        out = []
        for j in range(REQUESTS_PER_CLIENT):
            t0 = time.perf_counter()
            ttft, tokens = None, 0
            stream = clients[i].chat.completions.create(
                model="llama-1b-shape", max_tokens=MAX_TOKENS, temperature=0.8, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": f"Client {i}, question {j}: Ava has {j} apples."}])
            for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - t0
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            out.append((time.perf_counter() - t0, ttft or 0.0, tokens))
        return out

    run(0)                                                    # warm-up (CUDA graphs, caches)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(run, range(CLIENTS)) for r in rs]
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    tokens = sum(r[2] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, max(0, int(round(q * len(xs))) - 1))]

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "engine": {"vllm": "vllm (ray.serve.llm)", "vllm-async": "vllm-async (posttrain app + AsyncLLMEngine)"}[engine],
        "model": "llama-3.2-1b shape, random, bf16",
        "clients": CLIENTS, "requests": len(results), "max_tokens": MAX_TOKENS,
        "completion_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(statistics.median(lat), 3), "latency_p99_s": round(pct(lat, 0.99), 3),
        "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p99_s": round(pct(ttft, 0.99), 3),
    }
    try:
        import torch
        report["device"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001
        pass
    print(f"\n[{engine}-bench] " + json.dumps(report))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"serve_{engine}_bench.json"), "w") as f:
            json.dump(report, f, indent=2)
    assert tokens == CLIENTS * REQUESTS_PER_CLIENT * MAX_TOKENS


# ---------------------------------------------------------------------------------------------
# The packaged GPU engine as a user runs it: `posttrain serve` (a subprocess, its own local Ray),
# engine vllm-async, the real SmolLM2-135M-Instruct, the official openai client. The helpers are
# those of the CPU variant (tests/cluster/test_serve_cli.py, hf engine, runs in CI; helpers in tests/serve_cli.py).
SMOLLM2_CLIENTS, SMOLLM2_REQUESTS, SMOLLM2_MAX_TOKENS = 32, 10, 64


def gpu_name() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        if out:
            return out[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    return torch.cuda.get_device_name(0)


def test_smollm2_serve_cli_openai(smollm2_folder):
    """Acceptance: `posttrain serve <SmolLM2 folder> engine=vllm-async` answers the openai client
    (chat, stream, logprobs); 32 concurrent clients x 10 requests (alternating plain and streamed
    chat, max_tokens 64), 0 errors. The figures: printed, and $OUT/serve_smollm2_openai.json."""
    pytest.importorskip("vllm")
    pytest.importorskip("openai")
    model = "smollm2-135m-instruct"
    with serve_cli(smollm2_folder, "engine=vllm-async", f"model_name={model}", "dtype=bfloat16",
                   "max_model_len=2048", "gpu_memory_utilization=0.85", "max_ongoing_requests=128",
                   "autoscaling.target_ongoing_requests=64", f"env_vars={json.dumps(VLLM_ENV)}",
                   key=KEY, env=VLLM_ENV, startup_timeout=480, stop_timeout=90) as server:
        client = client_for(server, timeout=120)
        check_models(client, model)
        r = check_chat(client, model, max_tokens=32)
        text = check_stream(client, model, max_tokens=32)
        check_logprobs(client, model, top=2, max_tokens=16)
        print(f"\n[smollm2] chat: {r.choices[0].message.content!r}\n[smollm2] stream: {text!r}")
        load_round(server, model, clients=4, requests=2, max_tokens=SMOLLM2_MAX_TOKENS)   # warm-up
        figures = load_round(server, model, clients=SMOLLM2_CLIENTS, requests=SMOLLM2_REQUESTS,
                             max_tokens=SMOLLM2_MAX_TOKENS)
        report = {"date": time.strftime("%Y-%m-%d"), "device": gpu_name(),
                  "engine": "vllm-async (posttrain serve: posttrain app + vLLM AsyncLLMEngine)",
                  "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> HF folder, served bf16)",
                  "command": "python -m jobs.cli serve <folder> engine=vllm-async dtype=bfloat16 max_model_len=2048",
                  "startup_s": round(server.startup_s, 1), **figures}
        print("[smollm2-serve] " + json.dumps(report))
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "serve_smollm2_openai.json"), "w") as f:
                json.dump(report, f, indent=2)
        assert figures["errors"] == 0, figures["error_examples"]
        assert figures["answered"] == SMOLLM2_CLIENTS * SMOLLM2_REQUESTS
