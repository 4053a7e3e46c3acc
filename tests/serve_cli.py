"""`posttrain serve` as a user runs it: `python -m jobs.cli serve FOLDER key=value ...` in a subprocess
(which starts its own local Ray), waited for on GET /health, driven with the official `openai` client
(chat, streamed chat, chat with logprobs, a round of concurrent clients), stopped with Ctrl-C (SIGINT).

The helpers (`serve_cli`, `check_*`, `load_round`) are shared with the GPU variant,
tests/cluster/test_serve_gpu.py::test_smollm2_serve_cli_openai (engine vllm-async on the real
SmolLM2-135M-Instruct, 32 clients x 10 requests). Here: the hf engine on the tiny random model, on CPU.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "cli-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class CLIServer:
    url: str                    # http://127.0.0.1:PORT/v1, the openai client's base_url
    key: str
    proc: subprocess.Popen
    log_dir: str
    startup_s: float = 0.0

    def tail(self, n: int = 60) -> str:
        """The last `n` lines of the server's stderr and stdout."""
        parts = []
        for name in ("stderr", "stdout"):
            with open(os.path.join(self.log_dir, name), errors="replace") as f:
                lines = f.read().splitlines()
            parts.append(f"--- server {name} (last {min(n, len(lines))} of {len(lines)} lines) ---\n"
                         + "\n".join(lines[-n:]))
        return "\n".join(parts)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Ctrl-C (SIGINT to the command), then SIGKILL to its process group if it has not exited in
        `timeout` s; its return code (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)   # its own session: the command and its local Ray
            self.proc.wait(10)
            return None


def serve_command(target: str, overrides=(), port: int = 8000, key: str = KEY) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "serve", target, "host=127.0.0.1", f"port={port}",
            f"api_key={key}", *overrides]


@contextlib.contextmanager
def serve_cli(target: str, *overrides: str, key: str = KEY, env: dict | None = None,
              startup_timeout: float = 180.0, stop_timeout: float = 60.0):
    """Run `python -m jobs.cli serve TARGET host=127.0.0.1 port=<free> api_key=KEY *overrides` from the
    repo root, a fresh local Ray (RAY_ADDRESS=local); yield a CLIServer once it printed "Ctrl-C to stop."
    and GET /health answers 200. On any failure inside, the server's output tail is printed; at the
    end the server is stopped as a user stops it (Ctrl-C), killed if it does not exit."""
    import httpx

    port = free_port()
    log_dir = tempfile.mkdtemp(prefix="serve-cli-")
    penv = dict(os.environ)
    penv.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    penv["PYTHONPATH"] = ROOT + os.pathsep + penv.get("PYTHONPATH", "")
    # a fresh local Ray: without an address ray.init() joins the newest local cluster, which in a
    # test session is the session's own (its Serve holds other HTTP options)
    penv["RAY_ADDRESS"] = "local"
    with open(os.path.join(log_dir, "stdout"), "w") as out, open(os.path.join(log_dir, "stderr"), "w") as err:
        proc = subprocess.Popen(serve_command(target, overrides, port, key), cwd=ROOT, env=penv, stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    server = CLIServer(url=f"http://127.0.0.1:{port}/v1", key=key, proc=proc, log_dir=log_dir)
    t0 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"posttrain serve exited with code {proc.returncode} before it was healthy")
            if time.perf_counter() - t0 > startup_timeout:
                pytest.fail(f"posttrain serve was not healthy after {startup_timeout:.0f} s")
            with open(os.path.join(log_dir, "stdout"), errors="replace") as f:
                ready = "Ctrl-C to stop." in f.read()
            if ready:
                with contextlib.suppress(httpx.HTTPError):
                    r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                    if r.status_code == 200 and r.json().get("status") == "ok":
                        break
            time.sleep(0.5)
        server.startup_s = time.perf_counter() - t0
        print(f"\n[serve-cli] {' '.join(proc.args[2:])}: healthy in {server.startup_s:.1f} s")
        yield server
    except BaseException:
        print(f"\n[serve-cli] failed; the server's output:\n{server.tail()}")
        raise
    finally:
        server.stop(stop_timeout)


# ----------------------------------------------------------------------------------- the checks

QUESTION = [{"role": "user", "content": "Ava has 3 apples and gets 4 more. How many apples?"}]


def client_for(server: CLIServer, timeout: float = 120.0):
    import openai

    return openai.OpenAI(base_url=server.url, api_key=server.key, max_retries=0, timeout=timeout)


def check_models(client, model: str) -> None:
    assert [m.id for m in client.models.list().data] == [model]


def check_chat(client, model: str, max_tokens: int = 16):
    """(a) A chat completion: one assistant choice, a finish reason, usage within max_tokens."""
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0)
    assert r.object == "chat.completion" and r.model == model
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 1 <= r.usage.completion_tokens <= max_tokens
    return r


def check_stream(client, model: str, max_tokens: int = 16) -> str:
    """(b) A streamed chat completion: chunks of one choice, a final finish reason, the usage chunk."""
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=max_tokens,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks and all(c.object == "chat.completion.chunk" and c.model == model for c in chunks)
    with_choice = [c for c in chunks if c.choices]
    assert with_choice and all(c.choices[0].index == 0 for c in with_choice)
    assert with_choice[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in with_choice[:-1])
    usage = chunks[-1].usage
    assert usage is not None and 1 <= usage.completion_tokens <= max_tokens
    return "".join(c.choices[0].delta.content or "" for c in with_choice)


def check_logprobs(client, model: str, top: int = 2, max_tokens: int = 8):
    """(c) Chat with logprobs=True, top_logprobs=`top`: one entry per completion token, each a
    finite logprob <= 0 with `top` alternatives, most likely first; greedy: the token is the first."""
    r = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0,
                                       logprobs=True, top_logprobs=top)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content, r
    assert len(lp.content) == r.usage.completion_tokens
    for t in lp.content:
        assert isinstance(t.token, str) and -9999.0 <= t.logprob <= 1e-4
        assert t.bytes is None or isinstance(t.bytes, list)
        assert len(t.top_logprobs) == top, t
        alts = [a.logprob for a in t.top_logprobs]
        assert all(-9999.0 <= a <= 1e-4 for a in alts) and alts == sorted(alts, reverse=True), t
        assert abs(t.logprob - alts[0]) < 1e-3, t              # greedy: the sampled token is the most likely
    return r


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * len(xs))) - 1))]


def load_round(server: CLIServer, model: str, clients: int, requests: int, max_tokens: int,
               temperature: float = 0.7, timeout: float = 300.0) -> dict:
    """(d) `clients` concurrent openai clients, `requests` chat requests each, alternating plain and
    streamed (with usage); every exception or malformed answer counts as an error. Returns the figures
    (errors, completion tokens, tokens/s over the wall time, latency p50/p99)."""
    pool_clients = [client_for(server, timeout) for _ in range(clients)]

    def one(i: int, j: int) -> tuple[float, int]:
        c = pool_clients[i]
        messages = [{"role": "user", "content": f"Client {i}, question {j}: what is {i} + {j}?"}]
        t = time.perf_counter()
        if j % 2 == 0:
            r = c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                          temperature=temperature)
            if r.choices[0].finish_reason not in ("stop", "length"):
                raise AssertionError(f"finish_reason {r.choices[0].finish_reason!r}")
            tokens = r.usage.completion_tokens
        else:
            finish, tokens = None, None
            for chunk in c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                   temperature=temperature, stream=True,
                                                   stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            if finish not in ("stop", "length") or tokens is None:
                raise AssertionError(f"stream ended without a finish reason or usage ({finish!r}, {tokens!r})")
        return time.perf_counter() - t, tokens

    def run(i: int):
        done, errors = [], []
        for j in range(requests):
            try:
                done.append(one(i, j))
            except Exception as e:  # noqa: BLE001 - counted, the first few reported
                errors.append(f"client {i} request {j}: {type(e).__name__}: {str(e)[:200]}")
        return done, errors

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(run, range(clients)))
    wall = time.perf_counter() - t0
    lat = [d[0] for done, _ in results for d in done]
    errors = [e for _, errs in results for e in errs]
    tokens = sum(d[1] for done, _ in results for d in done)
    return {
        "clients": clients, "requests_per_client": requests, "requests": clients * requests,
        "max_tokens": max_tokens, "answered": len(lat), "errors": len(errors), "error_examples": errors[:5],
        "completion_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(lat) / wall, 2),
        "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "latency_p99_s": round(_pct(lat, 0.99), 3) if lat else None,
    }
