"""Batched generation with a Hugging Face causal LM: greedy or sampled, left padding, stop at eos.

No Ray here. Used by evaluation (cluster/evaluate.py), the HF rollout on CPU and the demo.

    texts = generate(model, tok, ["2 + 3 = ?"], max_new_tokens=16)           # [[str]] greedy
    outs = generate_completions(model, tok, [[{"role": "user", "content": q}]], n=4, temperature=1.0)
    outs[0][0].text, outs[0][0].token_ids, outs[0][0].finish_reason

Prompts are plain strings (tokenized as is, with the tokenizer's special tokens) or chat
message lists (rendered with the tokenizer's chat template and `add_generation_prompt=True`,
the same rendering SFT trains on). A completion stops at the tokenizer's eos (or the model's
generation_config eos ids) or at the first of `stop`; its text excludes the eos and the stop
string, its token ids include the tokens that produced them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

Prompt = str | list[dict]


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (eos or a stop string) | "length"


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """A prompt as the text the model sees: chat messages go through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("generate: chat-message prompts need a tokenizer with a chat_template")
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    raise TypeError(f"generate: a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        extra = [extra]
    for i in extra or []:
        if int(i) not in ids:
            ids.append(int(i))
    return ids


class _StopOnStrings:
    """Per-row stopping on stop strings; decodes only a short tail of each row at each step."""

    def __init__(self, tokenizer, stop: list[str], prompt_len: int):
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_len = prompt_len
        # a stop string of L characters spans at most L tokens (+ slack for multi-byte pieces)
        self.window = max(len(s) for s in stop) + 4

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:]
        tail = new[:, -self.window:].tolist()
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut(tokenizer, ids: list[int], eos: set[int], stop: list[str] | None) -> Completion:
    """Trim one generated row at eos / first stop string; text excludes eos and the stop string."""
    finish = "length"
    for j, t in enumerate(ids):
        if t in eos:
            ids = ids[: j + 1]
            finish = "stop"
            break
    text = tokenizer.decode([t for t in ids if t not in eos], skip_special_tokens=True)
    if stop:
        hits = [(text.find(s), s) for s in stop if s in text]
        if hits:
            pos, _ = min(hits)
            text = text[:pos]
            finish = "stop"
            # keep the shortest prefix of ids whose text reaches past the stop string
            for j in range(1, len(ids) + 1):
                piece = tokenizer.decode(ids[:j], skip_special_tokens=True)
                if any(s in piece for s in stop):
                    ids = ids[:j]
                    break
    return Completion(text=text, token_ids=list(ids), finish_reason=finish)


@contextlib.contextmanager
def _inference(model, tokenizer):
    was_training = model.training
    side = tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
    try:
        with torch.no_grad():
            yield
    finally:
        tokenizer.padding_side = side
        if was_training:
            model.train()


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def generate_completions(model, tokenizer, prompts: list[Prompt], max_new_tokens: int = 64, n: int = 1,
                         temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                         batch_size: int = 32, seed: int = 0) -> list[list[Completion]]:
    """`n` completions per prompt (texts, token ids, finish reasons), in prompt order.

    temperature 0 is greedy (the n completions are then identical: generated once, copied).
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

    texts = [render_prompt(tokenizer, p) for p in prompts]
    # chat templates already carry any BOS; plain strings get the tokenizer's special tokens
    add_special = [isinstance(p, str) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=a)["input_ids"] for t, a in zip(texts, add_special)]
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    sample = temperature > 0
    n_run = n if sample else 1
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, num_return_sequences=n_run,
        temperature=temperature if sample else None, top_p=top_p if sample else None,
        top_k=0 if sample else None, eos_token_id=eos or None, pad_token_id=pad_id,
        use_cache=True)
    device = _device(model)
    # sort by length so that each batch pads little; restore prompt order at the end
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[Completion] | None] = [None] * len(prompts)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with _inference(model, tokenizer), torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            input_ids = batch["input_ids"].to(device)            # [B, T] left padded
            attention_mask = batch["attention_mask"].to(device)  # [B, T]
            criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, input_ids.shape[1])]) if stop else None
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=gen_cfg, stopping_criteria=criteria)
            new = out[:, input_ids.shape[1]:].tolist()           # [B * n_run, new]
            for b, i in enumerate(idx):
                rows = new[b * n_run:(b + 1) * n_run]
                comps = [_cut(tokenizer, r, set(eos), stop) for r in rows]
                if not sample and n > 1:
                    comps = [Completion(c.text, list(c.token_ids), c.finish_reason) for c in comps * n]
                results[i] = comps
    return results  # type: ignore[return-value]


def generate(model, tokenizer, prompts: list[Prompt], max_new_tokens: int = 64, n: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
             batch_size: int = 32, seed: int = 0) -> list[list[str]]:
    """`n` completion texts per prompt, in prompt order (see generate_completions)."""
    outs = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, n=n,
                                temperature=temperature, top_p=top_p, stop=stop,
                                batch_size=batch_size, seed=seed)
    return [[c.text for c in row] for row in outs]
