"""Batched generation with a Hugging Face causal LM: the one HF generation module.

No Ray here. Used by evaluation (cluster/evaluate.py), the HF rollout engine (actors/rollout.py),
the Serve HF engine's tokenizer side (cluster/serve_engines.py) and the demo.

    texts = generate(model, tok, ["2 + 3 = ?"], max_new_tokens=16)           # [[str]] greedy
    outs = generate_completions(model, tok, [[{"role": "user", "content": q}]], n=4, temperature=1.0,
                                logprobs=True)
    outs[0][0].text, outs[0][0].token_ids, outs[0][0].logprobs, outs[0][0].finish_reason
    engine = HFGenerator(model, tok)                                         # kernels.engine.Engine

Prompts are plain strings (tokenized as is, with the tokenizer's special tokens), chat message
lists (rendered with the tokenizer's chat template and `add_generation_prompt=True`, the same
rendering SFT trains on) or token ids. A completion stops at any of `stop_token_ids` (the
tokenizer's eos, the model's generation_config eos ids, the chat template's end-of-turn token)
or at the first of `stop`; its text excludes the stop token and the stop string, its token ids
include the tokens that produced them. The tokenizer side lives in kernels/generation_text.py.

Logprobs (logprobs=True): the log-probability of each sampled token under
softmax(logits / temperature) over the full vocabulary (temperature 0 -> 1), before top-p
truncation - what the GRPO learner recomputes.
"""
from __future__ import annotations

import contextlib

import torch

from kernels.engine import Completion, Engine
from kernels.generation_text import (Prompt, decode, encode_prompt, encode_prompts, end_of_turn_ids,
                                     load_generation_config, render_prompt, stop_token_ids,
                                     trim_completion)

__all__ = ["Completion", "Engine", "HFGenerator", "Prompt", "decode", "encode_prompt", "encode_prompts",
           "end_of_turn_ids", "generate", "generate_completions", "load_generation_config",
           "render_prompt", "stop_token_ids", "trim_completion"]


class _StopOnStrings:
    """Per-row stopping on stop strings; decodes only a short tail of each row at each step."""

    def __init__(self, tokenizer, stop: list[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_len = prompt_len
        # a stop string of L characters spans at most L tokens (+ slack for multi-byte pieces)
        self.window = max(len(s) for s in stop) + 4

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_len:][:, -self.window:].tolist()
        done = [any(s in decode(self.tokenizer, t) for s in self.stop) for t in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _inference(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding (generation appends on the right): ([B, T] ids, [B, T] attention mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            att[b, width - len(r):] = 1
    return ids, att


def generate_completions(model, tokenizer, prompts: list[Prompt], max_new_tokens: int = 64, n: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                         batch_size: int = 32, seed: int = 0, logprobs: bool = False,
                         ignore_eos: bool = False, stop_ids: list[int] | None = None) -> list[list[Completion]]:
    """`n` completions per prompt (texts, token ids, finish reasons, optional logprobs), in prompt order.

    temperature 0 is greedy (the n completions are then identical: generated once, copied).
    ignore_eos: generate exactly max_new_tokens tokens unless a stop string ends the row first.
    stop_ids: the ids that end a completion (default: stop_token_ids of the tokenizer and model).
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got {n}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise ValueError(f"generate: batch_size must be >= 1, got {batch_size}")
    stop = [s for s in (stop or []) if s]
    if not prompts:
        return []

    from transformers import GenerationConfig, StoppingCriteriaList

    encoded = encode_prompts(tokenizer, prompts)
    eos = list(stop_ids) if stop_ids is not None else stop_token_ids(
        tokenizer, getattr(model, "generation_config", None))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    sample = temperature > 0
    lp_temp = temperature if sample else 1.0
    n_run = n if sample else 1
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if ignore_eos else None,
        do_sample=sample, num_return_sequences=n_run,
        temperature=temperature if sample else None, top_p=top_p if sample else None,
        top_k=0 if sample else None, eos_token_id=None if ignore_eos else (eos or None), pad_token_id=pad_id,
        use_cache=True, output_logits=logprobs, return_dict_in_generate=True)
    cut_ids = set() if ignore_eos else set(eos)
    device = _device(model)
    # sort by length so that each batch pads little; restore prompt order at the end
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[Completion] | None] = [None] * len(prompts)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with _inference(model), torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)  # seeds the CUDA generators too
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            input_ids, attention_mask = _left_pad([encoded[i] for i in idx], pad_id)  # [B, T] each
            width = input_ids.shape[1]
            criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, width)]) if stop else None
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=gen_cfg, stopping_criteria=criteria)
            new = out.sequences[:, width:]                                            # [B * n_run, L]
            if logprobs:
                logits = torch.stack(out.logits, dim=1).float() / lp_temp             # [B * n_run, L, V]
                lps = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1).tolist()
            else:
                lps = [[] for _ in range(new.shape[0])]
            new = new.tolist()
            for b, i in enumerate(idx):
                comps = []
                for k in range(b * n_run, (b + 1) * n_run):
                    ids, lp, text, finish = trim_completion(tokenizer, new[k], lps[k], cut_ids, stop)
                    comps.append(Completion(text, ids, finish, lp))
                results[i] = comps if sample else [c.copy() for c in comps * n]
    return results  # type: ignore[return-value]


def generate(model, tokenizer, prompts: list[Prompt], max_new_tokens: int = 64, n: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
             batch_size: int = 32, seed: int = 0) -> list[list[str]]:
    """`n` completion texts per prompt, in prompt order (see generate_completions)."""
    outs = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, n=n,
                                temperature=temperature, top_p=top_p, stop=stop,
                                batch_size=batch_size, seed=seed)
    return [[c.text for c in row] for row in outs]


class HFGenerator(Engine):
    """A model and its tokenizer behind the Engine interface (per-token logprobs included)."""

    def __init__(self, model, tokenizer, batch_size: int = 32, logprobs: bool = True):
        self.model, self.tok = model, tokenizer
        self.batch_size, self.logprobs = batch_size, logprobs

    @property
    def active(self):
        """The module that generates (subclasses may wrap `model`, e.g. with a LoRA adapter)."""
        return self.model

    def stop_ids(self) -> list[int]:
        return stop_token_ids(self.tok, getattr(self.model, "generation_config", None))

    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=64, stop=None, seed=0,
                 ignore_eos=False) -> list[list[Completion]]:
        return generate_completions(self.active, self.tok, prompts, max_new_tokens=max_tokens, n=n,
                                    temperature=temperature, top_p=top_p, stop=stop,
                                    batch_size=self.batch_size, seed=seed, logprobs=self.logprobs,
                                    ignore_eos=ignore_eos, stop_ids=self.stop_ids())

    def weight_checksum(self, names: list[str]) -> dict[str, float]:
        params = dict(self.model.named_parameters())
        return {n: float(params[n].detach().float().sum()) for n in names if n in params}
