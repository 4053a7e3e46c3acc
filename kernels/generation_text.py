"""The tokenizer side of generation, written once for every engine (HF generate, vLLM, Serve).

    text = render_prompt(tok, [{"role": "user", "content": q}])     # chat template + generation prompt
    ids = encode_prompts(tok, prompts)                              # str | messages | token ids -> ids
    stop = stop_token_ids(tok, model.generation_config)             # every id that ends a completion
    ids, lps, text, finish = trim_completion(tok, ids, lps, set(stop), ["\\n\\n"])

Stop ids: a completion ends on the tokenizer's eos, on any eos id of the model's generation
config, and on the token that closes an assistant turn in the chat template. They are not always
the same token: SmolLM2-135M-Instruct's tokenizer names `<|im_start|>` as eos while its template
closes each assistant turn with `<|im_end|>`; stopping at the eos alone runs every completion to
its length limit.
"""
from __future__ import annotations

Prompt = str | list[dict] | list[int]

# a marker no chat template rewrites, so that the text right after it is the end of the turn
_TURN_MARK = "y"


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """A prompt as the text the model sees: chat messages go through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("generate: chat-message prompts need a tokenizer with a chat_template")
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    raise TypeError(f"generate: a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def is_token_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(t, int) for t in prompt)


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of one prompt. Chat templates already carry any BOS; plain strings get the
    tokenizer's special tokens; token ids pass through."""
    if is_token_ids(prompt):
        return [int(t) for t in prompt]
    text = render_prompt(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"])


def encode_prompts(tokenizer, prompts: list[Prompt]) -> list[list[int]]:
    return [encode_prompt(tokenizer, p) for p in prompts]


def _special_ids(tokenizer) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) the chat template writes right after an assistant message's content
    ([] without a template, or when the template writes none)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _TURN_MARK}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template that refuses this conversation: no end-of-turn to learn from it
        return []
    pos = text.rfind(_TURN_MARK)
    if pos < 0:
        return []
    tail = tokenizer(text[pos + len(_TURN_MARK):], add_special_tokens=False)["input_ids"]
    special = _special_ids(tokenizer)
    out: list[int] = []
    for t in tail:  # the leading special tokens of the tail, past whitespace (e.g. "<|im_end|>\n")
        if int(t) in special:
            out.append(int(t))
        elif tokenizer.decode([t]).strip():
            break
    return out


def _config_eos(generation_config) -> list[int]:
    if generation_config is None:
        return []
    eos = (generation_config.get("eos_token_id") if isinstance(generation_config, dict)
           else getattr(generation_config, "eos_token_id", None))
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token id that ends a completion, tokenizer eos first: the tokenizer's eos, the
    generation config's eos_token_id (an int or a list; a GenerationConfig or a dict) and the chat
    template's end-of-turn token."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for i in ([int(eos)] if eos is not None else []) + _config_eos(generation_config) + end_of_turn_ids(tokenizer):
        if i not in ids:
            ids.append(i)
    return ids


def load_generation_config(path: str | None):
    """The generation config saved in a model folder, or None (no file, not a folder)."""
    if not path:
        return None
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


def decode(tokenizer, ids: list[int]) -> str:
    """Text of completion ids (ids outside the tokenizer, possible with padded vocabularies, dropped).

    A multi-byte character whose bytes are not all there yet (a completion cut at its length
    limit, or a stream between two tokens of one character) is left out instead of ending the
    text in U+FFFD: streaming holds it back until its last byte arrives."""
    vocab = len(tokenizer)
    return tokenizer.decode([i for i in ids if i < vocab], skip_special_tokens=True).rstrip("\ufffd")


def trim_completion(tokenizer, ids: list[int], logprobs: list[float], eos: set[int],
                    stop: list[str] | None) -> tuple[list[int], list[float], str, str]:
    """Cut at the first stop id (kept: the model learns to stop) or the first stop string.

    Returns (ids, logprobs, text, finish_reason): "stop" when it ended on a stop id or a stop
    string, "length" otherwise. The text excludes the stop id and the stop string; the ids keep
    the tokens that produced them. `logprobs` may be empty (not asked for).
    """
    finish = "length"
    for j, t in enumerate(ids):
        if t in eos:
            ids, logprobs, finish = ids[:j + 1], logprobs[:j + 1], "stop"
            break
    text = decode(tokenizer, [t for t in ids if t not in eos])
    if stop:
        hits = [(text.find(s), s) for s in stop if s in text]
        if hits:
            text = text[:min(hits)[0]]
            finish = "stop"
            for j in range(1, len(ids) + 1):  # shortest prefix whose text reaches the stop string
                if any(s in decode(tokenizer, ids[:j]) for s in stop):
                    ids, logprobs = ids[:j], logprobs[:j]
                    break
    return list(ids), list(logprobs), text, finish
