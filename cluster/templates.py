"""Chat templates and the conversation encoder (messages -> token ids + labels).

Built-in templates (chatml, llama-3, alpaca) wrap every assistant turn in `{% generation %}` ...
`{% endgeneration %}`, so `apply_chat_template(..., return_assistant_tokens_mask=True)` returns the
mask of assistant tokens. A tokenizer's own template without those markers (most published ones)
still works: the assistant spans are then found by rendering each conversation prefix and taking
the text each assistant turn adds ("prefix-diff"), then mapping characters to tokens via offsets.

Labels follow kernels/loss.py: labels == input_ids, IGNORE_INDEX (-100) where no loss is taken; the
shift happens in the loss. The first label of every sequence is always ignored (it is never a target
of its own sequence, and in a packed row it must not become the target of the previous one).
"""
from __future__ import annotations

import re

import numpy as np

from cluster.formats import RowError
from kernels.tokenizer import CHATML_TEMPLATE

IGNORE_INDEX = -100

CHATML = CHATML_TEMPLATE

# Llama 3 header/turn layout; the turn terminator is part of the assistant's target.
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ALPACA_PREAMBLE = "Below is an instruction describing a task. Write a response that completes the request."

# Alpaca instruction/response layout; a system message replaces the preamble. The tokenizer's EOS
# ends each response so that the model learns to stop.
ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% else %}{{ '" + ALPACA_PREAMBLE + "\n\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' }}"
    "{% generation %}{{ message['content'] }}{{ eos_token if eos_token is defined else '' }}{% endgeneration %}"
    "{{ '\n\n' }}"
    "{% elif message['role'] == 'tool' %}{{ '### Tool output:\n' + message['content'] + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML, "llama-3": LLAMA3, "alpaca": ALPACA}
TEMPLATE_CHOICES = ("auto", "tokenizer", *BUILTIN_TEMPLATES)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION_TAG.search(template or ""))


def tokenizer_template(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):  # named templates: the default one
        t = t.get("default")
    return t or None


def resolve_template(choice: str, tokenizer, *, where: str = "") -> tuple[str, str]:
    """(name, Jinja source) for data.chat_template: auto = the tokenizer's own if any, else chatml."""
    if choice not in TEMPLATE_CHOICES:
        raise ValueError(f"data.chat_template: expected one of {', '.join(TEMPLATE_CHOICES)}, got {choice!r}")
    own = tokenizer_template(tokenizer)
    if choice == "auto":
        return ("tokenizer", own) if own else ("chatml", CHATML)
    if choice == "tokenizer":
        if not own:
            raise ValueError(
                f"data.chat_template: 'tokenizer' but the tokenizer{(' at ' + where) if where else ''} has no "
                f"chat template; choose one of {', '.join(BUILTIN_TEMPLATES)}")
        return "tokenizer", own
    return choice, BUILTIN_TEMPLATES[choice]


class ChatEncoder:
    """Conversations -> (input_ids, labels) int32 arrays, with loss on assistant turns or on all tokens."""

    def __init__(self, tokenizer, template: str, train_on: str = "assistant"):
        if train_on not in ("assistant", "all"):
            raise ValueError(f"data.train_on: expected 'assistant' or 'all', got {train_on!r}")
        self.tok = tokenizer
        self.template = template
        self.train_on = train_on
        self.markers = has_generation_markers(template)

    @property
    def mask_method(self) -> str:
        if self.train_on == "all":
            return "all-tokens"
        return "generation-markers" if self.markers else "prefix-diff"

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def encode(self, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray] | RowError]:
        """One result per conversation: (input_ids, labels) or the RowError that rejected it."""
        if not conversations:
            return []
        if self.train_on == "all" or self.markers:
            try:
                return self._encode_batched(conversations)
            except Exception:  # one bad conversation fails the whole batch: isolate it
                return [self._encode_one(c) for c in conversations]
        return [self._encode_one(c) for c in conversations]

    def _encode_one(self, conversation: list[dict]):
        try:
            if self.train_on == "all" or self.markers:
                return self._encode_batched([conversation])[0]
            return self._encode_prefix_diff(conversation)
        except RowError as e:
            return e
        except Exception as e:  # template errors (raise_exception, bad roles for the template, ...)
            return RowError("messages", f"chat template failed: {type(e).__name__}: {e}")

    def _encode_batched(self, conversations):
        want_mask = self.train_on == "assistant"
        out = self.tok.apply_chat_template(
            conversations, chat_template=self.template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=want_mask)
        results = []
        for i, ids in enumerate(out["input_ids"]):
            ids = np.asarray(ids, dtype=np.int32)
            mask = np.asarray(out["assistant_masks"][i], dtype=bool) if want_mask else np.ones(len(ids), bool)
            results.append(self._labels(ids, mask))
        return results

    def _encode_prefix_diff(self, conversation):
        full = self.render(conversation)
        spans = []
        for i, m in enumerate(conversation):
            if m["role"] != "assistant":
                continue
            before = self.render(conversation[:i], add_generation_prompt=True) if i > 0 else ""
            upto = self.render(conversation[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise RowError("messages", "the chat template is not prefix-stable, so assistant tokens cannot be "
                                           "located; use data.chat_template=chatml|llama-3|alpaca")
            # the text this turn adds, minus trailing layout whitespace after its end token
            spans.append((len(before), len(upto.rstrip())))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            mask |= (starts >= a) & (starts < b)
        return self._labels(ids, mask)

    @staticmethod
    def _labels(ids: np.ndarray, mask: np.ndarray):
        if len(ids) == 0:
            return RowError("messages", "the chat template rendered no tokens")
        labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
        labels[0] = IGNORE_INDEX
        if not (labels != IGNORE_INDEX).any():
            return RowError("messages", "no assistant tokens after rendering with the chat template")
        return ids, labels
