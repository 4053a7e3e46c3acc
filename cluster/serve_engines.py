"""Serving engines behind the app of cluster/serve_http.py: `hf` and `vllm-async`.

Both have one interface: encode_chat / encode_text, max_model_len, vocab_size, and
`stream(prompt_ids, n=, max_tokens=, temperature=, top_p=, stop=, seed=, ignore_eos=)`, an
async iterator of `Event`s (text deltas per choice, a finish_reason on each choice's last).
Chat rendering, prompt encoding, decoding and the stop ids (eos, generation config eos ids, the
chat template's end-of-turn token) come from kernels.generation, as for rollout and eval:
finish_reason is "stop" on any stop id or stop string, "length" only at max_tokens.

`hf` decodes token by token itself rather than calling `generate()`: each step is a small job
on one worker thread, so concurrent requests interleave step by step (no request waits for
another to finish), streaming is natural, and stop strings, `n` and `max_tokens` are exact.
The `n` choices of a request are the rows of one batch (same prompt, no padding).

`vllm-async` drives vLLM's AsyncLLMEngine (continuous batching) through its stable public API
(AsyncEngineArgs, SamplingParams, generate). The `vllm` engine, Ray's own ray.serve.llm, is
in cluster/serve_vllm.py. vLLM is imported only when one of these is asked for.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cluster.serve_openai import StopText
from kernels.generation import decode, encode_prompt, load_generation_config, stop_token_ids

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def has_tokenizer(path: str) -> bool:
    return bool(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def resolve_tokenizer_dir(path: str, adapter: str = "", tokenizer: str = "") -> str:
    """The tokenizer folder: the explicit one, else the adapter's, else the model's."""
    for cand in (tokenizer, adapter, path):
        if cand and has_tokenizer(cand):
            return cand
    raise FileNotFoundError(
        f"tokenizer: no tokenizer files in {tokenizer or adapter or path!r}; set tokenizer=<folder>")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_model(path: str, adapter: str, dtype: torch.dtype, device: str):
    """The causal LM at `path`; with `adapter`, the PEFT LoRA merged in (one matmul per layer)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to(device).eval()
    model.config.use_cache = True
    return model


def merge_adapter(path: str, adapter: str, out_dir: str, dtype: str = "bfloat16") -> str:
    """Write base + adapter as one merged folder (what vLLM loads); returns out_dir."""
    from kernels.model import save_merged
    from kernels.tokenizer import load_tokenizer

    torch_dtype = resolve_dtype(dtype if dtype != "auto" else "bfloat16", "cpu")
    model = load_model(path, adapter, torch.float32, "cpu")
    tok = load_tokenizer(resolve_tokenizer_dir(path, adapter))
    save_merged(model, out_dir, tokenizer=tok, dtype=torch_dtype)
    with open(os.path.join(out_dir, "merged_from.json"), "w") as f:
        json.dump({"base": os.path.abspath(path), "adapter": os.path.abspath(adapter)}, f)
    return out_dir


def merged_dir_for(adapter: str) -> str:
    return adapter.rstrip("/") + "-merged"


def ensure_merged(path: str, adapter: str, dtype: str = "auto") -> str:
    """`<adapter>-merged`: base + adapter merged once (what vLLM loads); reused while it records
    the same pair. Written to a temporary folder and renamed, so racing replicas are safe."""
    import shutil
    import tempfile

    out = merged_dir_for(adapter)
    want = {"base": os.path.abspath(path), "adapter": os.path.abspath(adapter)}
    marker = os.path.join(out, "merged_from.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == want:
                return out
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".", dir=os.path.dirname(os.path.abspath(out)))
    merge_adapter(path, adapter, tmp, dtype="bfloat16" if dtype == "auto" else dtype)
    if os.path.isdir(out):
        shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:                       # another replica renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """[R, V] logits -> [R] token ids. temperature 0 is greedy; top_p keeps the nucleus."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        picked = torch.multinomial(sorted_p, 1, generator=generator)       # [R, 1] in sorted order
        return order.gather(-1, picked).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Event:
    """One piece of a choice's output. `finish_reason` is set on the choice's last event."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0            # completion tokens of this choice so far


class _Decode:
    """The state of one request's decode: n rows sharing a prompt, one KV cache."""

    def __init__(self, engine: "HFEngine", prompt_ids: list[int], n: int, temperature: float,
                 top_p: float, seed: int | None):
        self.engine, self.n = engine, n
        self.temperature, self.top_p = temperature, top_p
        self.input = torch.tensor([prompt_ids] * n, dtype=torch.long, device=engine.device)  # [n, P]
        self.past = None
        self.gen = torch.Generator(device=engine.device)
        self.gen.manual_seed(seed if seed is not None else secrets.randbits(63))

    @torch.inference_mode()
    def step(self) -> list[int]:
        out = self.engine.model(input_ids=self.input, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        nxt = sample(out.logits[:, -1, :], self.temperature, self.top_p, self.gen)    # [n]
        self.input = nxt[:, None]                                                     # [n, 1]
        return nxt.tolist()


class _Text:
    """The tokenizer side shared by the engines: kernels.generation's chat rendering, prompt
    encoding, decoding and stop ids (`stop_ids`, set by each engine).

    `encode` tokenises on a thread of its own, so a long prompt never holds the event loop (the
    fast tokenizer releases the GIL); one thread, because a fast tokenizer must not be called
    from several threads at once. `max_token_chars` bounds the characters one token covers, so
    a prompt far over the context is refused from its length before any tokenisation.
    """

    tokenizer = None
    stop_ids: list[int] | tuple = ()
    _tok_pool: ThreadPoolExecutor | None = None

    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_prompt(self.tokenizer, messages)

    def encode_text(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    async def encode(self, prompt: str | list[dict]) -> list[int]:
        """encode_text (a string) or encode_chat (messages), off the event loop."""
        if self._tok_pool is None:
            self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        return await asyncio.get_running_loop().run_in_executor(
            self._tok_pool, encode_prompt, self.tokenizer, prompt)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token string of the vocabulary: no token covers more characters of the
        text (byte-level and SentencePiece tokens spell one character per byte or character)."""
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return max([len(t) for t in vocab if t] + [1])

    def decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)


class HFEngine(_Text):
    """A transformers causal LM behind an async, step-interleaved decode loop."""

    def __init__(self, path: str, adapter: str = "", tokenizer: str = "", dtype: str = "auto",
                 device: str | None = None, max_model_len: int = 0):
        from kernels.tokenizer import load_tokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(resolve_tokenizer_dir(path, adapter, tokenizer))
        self.model = load_model(path, adapter, resolve_dtype(dtype, self.device), self.device)
        limit = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len, limit) if max_model_len else limit
        self.vocab_size = int(self.model.config.vocab_size)
        self.stop_ids = stop_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        self.eos_ids = set(self.stop_ids)
        # one thread owns the model: forward passes never overlap, requests interleave per step
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")

    async def stream(self, prompt_ids: list[int], *, n: int, max_tokens: int, temperature: float,
                     top_p: float, stop: list[str], seed: int | None = None,
                     ignore_eos: bool = False) -> AsyncIterator[Event]:
        """Yield Events for the n choices until each has finished ("stop" or "length")."""
        loop = asyncio.get_running_loop()
        dec = _Decode(self, prompt_ids, n, temperature, top_p, seed)
        ids: list[list[int]] = [[] for _ in range(n)]
        stoppers = [StopText(stop) for _ in range(n)]
        finished = [False] * n
        try:
            while not all(finished):
                tokens = await loop.run_in_executor(self._pool, dec.step)
                for i, tok in enumerate(tokens):
                    if finished[i]:
                        continue
                    if tok in self.eos_ids and not ignore_eos:
                        finished[i] = True
                        yield Event(i, stoppers[i].flush(self.decode(ids[i])), "stop", len(ids[i]))
                        continue
                    ids[i].append(tok)
                    delta, stopped = stoppers[i].update(self.decode(ids[i]))
                    if stopped:
                        finished[i] = True
                        yield Event(i, delta, "stop", len(ids[i]))
                    elif len(ids[i]) >= max_tokens:
                        finished[i] = True
                        yield Event(i, delta + stoppers[i].flush(self.decode(ids[i])), "length", len(ids[i]))
                    elif delta:
                        yield Event(i, delta, None, len(ids[i]))
        finally:
            dec.past = None     # free the KV cache even when the client went away

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._tok_pool is not None:
            self._tok_pool.shutdown(wait=False, cancel_futures=True)


class VLLMAsyncEngine(_Text):
    """vLLM's AsyncLLMEngine (one replica, `tensor_parallel_size` GPUs) behind the same stream()."""

    def __init__(self, path: str, tokenizer: str = "", dtype: str = "auto", max_model_len: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 engine_kwargs: dict | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from kernels.tokenizer import load_tokenizer

        tok_dir = resolve_tokenizer_dir(path, "", tokenizer)
        self.tokenizer = load_tokenizer(tok_dir)
        self.stop_ids = stop_token_ids(self.tokenizer, load_generation_config(path))
        args = AsyncEngineArgs(model=path, tokenizer=tok_dir, dtype=dtype,
                               max_model_len=max_model_len or None,
                               tensor_parallel_size=tensor_parallel_size,
                               gpu_memory_utilization=gpu_memory_utilization, **(engine_kwargs or {}))
        self.engine = AsyncLLMEngine.from_engine_args(args)
        model_config = getattr(self.engine, "model_config", None)
        if model_config is not None:
            self.max_model_len = int(model_config.max_model_len)
            self.vocab_size = int(model_config.get_vocab_size())
        else:
            from transformers import AutoConfig

            hf = AutoConfig.from_pretrained(path)
            self.max_model_len = max_model_len or int(hf.max_position_embeddings)
            self.vocab_size = int(hf.vocab_size)

    async def stream(self, prompt_ids: list[int], *, n: int, max_tokens: int, temperature: float,
                     top_p: float, stop: list[str], seed: int | None = None,
                     ignore_eos: bool = False) -> AsyncIterator[Event]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # ignore_eos: vLLM still ends on stop_token_ids, so none are passed then
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                stop=list(stop) or None, seed=seed, ignore_eos=ignore_eos,
                                stop_token_ids=None if ignore_eos else list(self.stop_ids) or None,
                                output_kind=RequestOutputKind.DELTA)
        counts = [0] * n
        request_id = secrets.token_hex(8)
        async for out in self.engine.generate({"prompt_token_ids": list(prompt_ids)}, params, request_id):
            for o in out.outputs:                      # DELTA: only what is new since the last output
                counts[o.index] += len(o.token_ids)
                reason = o.finish_reason
                if reason is not None and reason not in ("stop", "length"):
                    reason = "stop"                    # vLLM's "abort" and the like
                if o.text or reason:
                    yield Event(o.index, o.text, reason, counts[o.index])

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown:
            shutdown()
