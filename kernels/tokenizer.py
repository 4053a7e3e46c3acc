"""Tokenizers: load one (a folder, a .gguf file, a hub id), or train a small BPE locally with `tokenizers`.

The trained tokenizer splits digits one by one (arithmetic is learnable by a tiny model),
and carries a ChatML chat template with `{% generation %}` markers so that
`apply_chat_template(..., return_assistant_tokens_mask=True)` gives the assistant-token mask.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, out_dir: str | None = None):
    """Train a byte-level BPE tokenizer on `texts`; return a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None,
        unk_token=None, additional_special_tokens=["<|endoftext|>", "<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: str, field: str = "tokenizer"):
    """A tokenizer from a local folder, a .gguf file or a hub id (its snapshot in the Hugging Face
    cache: kernels.hub), with a pad token guaranteed. `field` names the setting in errors."""
    from transformers import AutoTokenizer

    from kernels.hub import resolve_tokenizer

    path = resolve_tokenizer(path, field)
    if path.lower().endswith(".gguf") and os.path.isfile(path):  # the tokenizer stored in a GGUF file
        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"{field}: {path!r} is not a folder (expected a local tokenizer), a .gguf "
                                f"file, nor a Hugging Face hub id (org/name)")
    else:
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
