"""Serving engines behind the app of cluster/serve_http.py: `hf` and `vllm-async`.

Both have one interface: encode_chat / encode_text (and async encode / encode_tool_chat, on the
tokenizer thread), max_model_len, vocab_size, `features` (what of "logprobs", "penalties",
"response_format", "tools" the engine honours; the app refuses the rest with a 400), and
`stream(prompt_ids, n=, max_tokens=, temperature=, top_p=, stop=, seed=, ignore_eos=, logprobs=,
presence_penalty=, frequency_penalty=, repetition_penalty=, response_format=)`, an async iterator
of `Event`s (text deltas per choice, a finish_reason on each choice's last, and with `logprobs=k`
the logprob of every sampled token with its k most likely alternatives).
Chat rendering, prompt encoding, decoding and the stop ids (eos, generation config eos ids, the
chat template's end-of-turn token) come from kernels.generation, as for rollout and eval:
finish_reason is "stop" on any stop id or stop string, "length" only at max_tokens. A chat with
tools (or tool calls and results in its history) is rendered by cluster.serve_tools instead
(`apply_chat_template(..., tools=)`, or its fallback); the engines generate text either way and
the app parses tool calls out of it, so tool calling is the same on both engines.

`hf` decodes token by token itself rather than calling `generate()`: each step is a small job
on one worker thread, so concurrent requests interleave step by step (no request waits for
another to finish), streaming is natural, and stop strings, `n` and `max_tokens` are exact.
The `n` choices of a request are the rows of one batch (same prompt, no padding). Penalties are
a logits processor (`Penalties`) applied before sampling; logprobs are those of the distribution
sampled from: after the penalties and the temperature (0 counts as 1), over the full vocabulary,
before top_p truncation (as kernels.generation reports them to the GRPO learner).

`vllm-async` drives vLLM's AsyncLLMEngine (continuous batching) through its stable public API
(AsyncEngineArgs, SamplingParams, generate); logprobs, penalties and structured outputs
(`response_format` json_object / json_schema) are SamplingParams fields there. The `vllm`
engine, Ray's own ray.serve.llm, is in cluster/serve_vllm.py. vLLM is imported only when one of these is asked for.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import secrets
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cluster.serve_openai import StopText
from cluster.serve_tools import ToolPlan, encode_tool_chat
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


class Penalties:
    """The penalties of one request as a logits processor over its n rows, in vLLM's order:
    repetition_penalty (tokens of the prompt or the output so far: a positive logit is divided
    by it, a negative one multiplied; 1 = off), then frequency_penalty x (times the token was
    generated) and presence_penalty x (whether it was), subtracted (0 = off)."""

    def __init__(self, prompt_ids: list[int], n: int, vocab: int, device, presence: float = 0.0,
                 frequency: float = 0.0, repetition: float = 1.0):
        self.presence, self.frequency, self.repetition = presence, frequency, repetition
        self.counts = torch.zeros(n, vocab, device=device)                   # [n, V] output counts
        self.seen = None
        if repetition != 1.0:
            self.seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)  # [n, V] prompt + output
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab], dtype=torch.long, device=device)
            self.seen[:, ids] = True

    @staticmethod
    def active(presence: float = 0.0, frequency: float = 0.0, repetition: float = 1.0) -> bool:
        return presence != 0.0 or frequency != 0.0 or repetition != 1.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, V] logits -> [n, V] penalised logits (fp32)."""
        logits = logits.float()
        if self.seen is not None:
            scaled = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(self.seen, scaled, logits)
        if self.frequency:
            logits = logits - self.frequency * self.counts
        if self.presence:
            logits = logits - self.presence * (self.counts > 0).float()
        return logits

    def update(self, tokens: torch.Tensor) -> None:
        """Count the [n] tokens just sampled."""
        self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self.counts.dtype))
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)


# (token id, logprob, [(alternative id, logprob)] most likely first): one sampled token
RawLogprob = tuple[int, float, list[tuple[int, float]]]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float, k: int) -> list[RawLogprob]:
    """[n, V] logits and the [n] tokens sampled from them -> each token's logprob under
    softmax(logits / temperature) (temperature 0 counts as 1) and the k most likely tokens."""
    lp = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)   # [n, V]
    chosen = lp.gather(-1, tokens[:, None]).squeeze(-1).tolist()                                 # [n]
    if k:
        top_lp, top_id = lp.topk(k, dim=-1)                                                      # [n, k]
        tops = [list(zip(i, v)) for i, v in zip(top_id.tolist(), top_lp.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [(t, c, top) for t, c, top in zip(tokens.tolist(), chosen, tops)]


@dataclass
class Event:
    """One piece of a choice's output. `finish_reason` is set on the choice's last event."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0            # completion tokens of this choice so far
    logprobs: list[RawLogprob] | None = None    # the tokens sampled since the last event (logprobs=k)


class _Decode:
    """The state of one request's decode: n rows sharing a prompt, one KV cache."""

    def __init__(self, engine: "HFEngine", prompt_ids: list[int], n: int, temperature: float,
                 top_p: float, seed: int | None, logprobs: int | None = None, penalties: dict | None = None):
        self.engine, self.n = engine, n
        self.temperature, self.top_p, self.logprobs = temperature, top_p, logprobs
        self.input = torch.tensor([prompt_ids] * n, dtype=torch.long, device=engine.device)  # [n, P]
        self.past = None
        self.gen = torch.Generator(device=engine.device)
        self.gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        self.prompt_ids = prompt_ids
        self.penalty_args = penalties if penalties and Penalties.active(**penalties) else None
        self.penalties: Penalties | None = None       # built at the first step, from the logits' width

    @torch.inference_mode()
    def step(self) -> tuple[list[int], list[RawLogprob] | None]:
        """One token per row, and with logprobs=k each one's logprob and alternatives."""
        out = self.engine.model(input_ids=self.input, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        logits = out.logits[:, -1, :]                                                 # [n, V]
        if self.penalty_args is not None:
            if self.penalties is None:
                self.penalties = Penalties(self.prompt_ids, self.n, logits.shape[-1], logits.device,
                                           **self.penalty_args)
            logits = self.penalties(logits)
        nxt = sample(logits, self.temperature, self.top_p, self.gen)                 # [n]
        lps = None if self.logprobs is None else token_logprobs(logits, nxt, self.temperature, self.logprobs)
        if self.penalties is not None:
            self.penalties.update(nxt)
        self.input = nxt[:, None]                                                     # [n, 1]
        return nxt.tolist(), lps


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

    async def _on_tokenizer_thread(self, fn, *args):
        if self._tok_pool is None:
            self._tok_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        return await asyncio.get_running_loop().run_in_executor(self._tok_pool, fn, *args)

    async def encode(self, prompt: str | list[dict]) -> list[int]:
        """encode_text (a string) or encode_chat (messages), off the event loop."""
        return await self._on_tokenizer_thread(encode_prompt, self.tokenizer, prompt)

    async def encode_tool_chat(self, messages: list[dict], plan: ToolPlan) -> tuple[list[int], str]:
        """(prompt ids, prefill) of a chat with tools or tool messages (cluster.serve_tools), off the event loop."""
        return await self._on_tokenizer_thread(encode_tool_chat, self.tokenizer, messages, plan)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token string of the vocabulary: no token covers more characters of the
        text (byte-level and SentencePiece tokens spell one character per byte or character)."""
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        return max([len(t) for t in vocab if t] + [1])

    def decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

    @functools.cached_property
    def _byte_decoder(self) -> dict[str, int] | None:
        """Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): vocabulary character -> the byte it spells."""
        decoder = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "decoder", None)
        if "ByteLevel" not in type(decoder).__name__ and "ByteLevel" not in repr(decoder):
            return None
        printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
        mapping, extra = {}, 0
        for b in range(256):       # printable bytes spell themselves, the rest 256, 257, ... in order
            if b in printable:
                mapping[chr(b)] = b
            else:
                mapping[chr(256 + extra)] = b
                extra += 1
        return mapping

    def token_piece(self, token_id: int) -> tuple[str, list[int]]:
        """(text, UTF-8 bytes) of one token, for logprobs. The bytes are exact where the
        vocabulary spells them (byte-level BPE, `<0xNN>` byte tokens); a token holding part of a
        character shows U+FFFD in its text, and the client can join the bytes."""
        cache = self.__dict__.setdefault("_pieces", {})
        if token_id in cache:
            return cache[token_id]
        raw = self.tokenizer.convert_ids_to_tokens(token_id) if 0 <= token_id < len(self.tokenizer) else None
        data = None
        if raw is not None and self._byte_decoder is not None and raw not in self._special_tokens:
            if all(ch in self._byte_decoder for ch in raw):
                data = bytes(self._byte_decoder[ch] for ch in raw)
        if data is None and raw is not None and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", raw):
            data = bytes([int(raw[3:5], 16)])
        if data is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False) if raw is not None else ""
            data = text.encode("utf-8")
        piece = (data.decode("utf-8", errors="replace"), list(data))
        cache[token_id] = piece
        return piece

    @functools.cached_property
    def _special_tokens(self) -> set[str]:
        return set(getattr(self.tokenizer, "all_special_tokens", []) or [])


class HFEngine(_Text):
    """A transformers causal LM behind an async, step-interleaved decode loop. No structured
    output: `response_format` json is refused (400) by the app."""

    name = "hf"
    features = frozenset({"logprobs", "penalties", "tools"})

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
                     top_p: float, stop: list[str], seed: int | None = None, ignore_eos: bool = False,
                     logprobs: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     repetition_penalty: float = 1.0, response_format: dict | None = None) -> AsyncIterator[Event]:
        """Yield Events for the n choices until each has finished ("stop" or "length").

        logprobs=k: every counted token (not the stop id that ends a choice) comes with its
        logprob and k alternatives, on the event of the step that sampled it."""
        if response_format is not None and response_format.get("type") != "text":
            raise ValueError("the hf engine has no structured output (response_format)")
        loop = asyncio.get_running_loop()
        penalties = {"presence": presence_penalty, "frequency": frequency_penalty, "repetition": repetition_penalty}
        dec = _Decode(self, prompt_ids, n, temperature, top_p, seed, logprobs, penalties)
        ids: list[list[int]] = [[] for _ in range(n)]
        stoppers = [StopText(stop) for _ in range(n)]
        finished = [False] * n
        try:
            while not all(finished):
                tokens, lps = await loop.run_in_executor(self._pool, dec.step)
                for i, tok in enumerate(tokens):
                    if finished[i]:
                        continue
                    if tok in self.eos_ids and not ignore_eos:
                        finished[i] = True
                        yield Event(i, stoppers[i].flush(self.decode(ids[i])), "stop", len(ids[i]))
                        continue
                    ids[i].append(tok)
                    lp = None if lps is None else [lps[i]]
                    delta, stopped = stoppers[i].update(self.decode(ids[i]))
                    if stopped:
                        finished[i] = True
                        yield Event(i, delta, "stop", len(ids[i]), lp)
                    elif len(ids[i]) >= max_tokens:
                        finished[i] = True
                        yield Event(i, delta + stoppers[i].flush(self.decode(ids[i])), "length", len(ids[i]), lp)
                    elif delta or lp:
                        yield Event(i, delta, None, len(ids[i]), lp)
        finally:
            dec.past = None     # free the KV cache even when the client went away

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._tok_pool is not None:
            self._tok_pool.shutdown(wait=False, cancel_futures=True)


def _structured_outputs_api():
    """(params class, SamplingParams field) of the installed vLLM's structured outputs, or None:
    StructuredOutputsParams / structured_outputs (vLLM >= 0.11), else the older
    GuidedDecodingParams / guided_decoding."""
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return StructuredOutputsParams, "structured_outputs"
    except ImportError:
        pass
    try:
        from vllm.sampling_params import GuidedDecodingParams

        return GuidedDecodingParams, "guided_decoding"
    except ImportError:
        return None


class VLLMAsyncEngine(_Text):
    """vLLM's AsyncLLMEngine (one replica, `tensor_parallel_size` GPUs) behind the same stream()."""

    name = "vllm-async"

    def __init__(self, path: str, tokenizer: str = "", dtype: str = "auto", max_model_len: int = 0,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 engine_kwargs: dict | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from kernels.tokenizer import load_tokenizer

        tok_dir = resolve_tokenizer_dir(path, "", tokenizer)
        self.tokenizer = load_tokenizer(tok_dir)
        self.stop_ids = stop_token_ids(self.tokenizer, load_generation_config(path))
        self._structured = _structured_outputs_api()
        self.features = frozenset({"logprobs", "penalties", "tools"} |
                                  ({"response_format"} if self._structured else set()))
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

    def structured_params(self, response_format: dict | None) -> dict:
        """SamplingParams keyword for a json_object / json_schema response_format ({} for text)."""
        if not response_format or response_format.get("type") == "text":
            return {}
        if self._structured is None:
            raise ValueError("this vLLM has no structured outputs API")
        cls, field = self._structured
        if response_format["type"] == "json_object":
            return {field: cls(json_object=True)}
        return {field: cls(json=response_format["json_schema"]["schema"])}

    async def stream(self, prompt_ids: list[int], *, n: int, max_tokens: int, temperature: float,
                     top_p: float, stop: list[str], seed: int | None = None, ignore_eos: bool = False,
                     logprobs: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     repetition_penalty: float = 1.0, response_format: dict | None = None) -> AsyncIterator[Event]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # ignore_eos: vLLM still ends on stop_token_ids, so none are passed then
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                stop=list(stop) or None, seed=seed, ignore_eos=ignore_eos,
                                stop_token_ids=None if ignore_eos else list(self.stop_ids) or None,
                                output_kind=RequestOutputKind.DELTA, logprobs=logprobs,
                                presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                repetition_penalty=repetition_penalty, **self.structured_params(response_format))
        counts = [0] * n
        request_id = secrets.token_hex(8)
        async for out in self.engine.generate({"prompt_token_ids": list(prompt_ids)}, params, request_id):
            for o in out.outputs:                      # DELTA: only what is new since the last output
                counts[o.index] += len(o.token_ids)
                reason = o.finish_reason
                if reason is not None and reason not in ("stop", "length"):
                    reason = "stop"                    # vLLM's "abort" and the like
                lps = None
                if logprobs is not None:
                    lps = _vllm_logprobs(o.token_ids, getattr(o, "logprobs", None), logprobs)
                    if reason == "stop" and lps and lps[-1][0] in self.stop_ids:
                        lps = lps[:-1]                 # the stop id: not part of the answer
                if o.text or reason or lps:
                    yield Event(o.index, o.text, reason, counts[o.index], lps)

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown:
            shutdown()


def _vllm_logprobs(token_ids, logprobs, k: int) -> list[RawLogprob]:
    """vLLM's per-token {token id: Logprob(logprob, rank, ...)} (the sampled token and the top k)
    -> RawLogprob per token."""
    out = []
    for tok, alts in zip(list(token_ids), list(logprobs or [])):
        chosen = alts.get(tok)
        top = sorted(((int(i), float(x.logprob)) for i, x in alts.items()), key=lambda a: -a[1])[:k]
        out.append((int(tok), float(chosen.logprob) if chosen is not None else float("-inf"), top))
    return out
