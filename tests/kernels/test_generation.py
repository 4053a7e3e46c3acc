"""kernels/generation.py: left padding, greedy determinism, sampling, stop strings, chat prompts."""
from __future__ import annotations

import pytest
import torch

from kernels.generation import generate, generate_completions, render_prompt
from kernels.model import ModelConfig, build_model
from kernels.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    model = build_model(ModelConfig(preset="tiny", dtype="float32"), vocab_size=len(tok), seed=0)
    return model, tok


PROMPTS = ["Ava has 3 apples.", "There are 12 books in a box and 7 books on a shelf. How many", "1 + 2"]


def test_batched_greedy_equals_one_by_one(tiny):
    model, tok = tiny
    batched = generate_completions(model, tok, PROMPTS, max_new_tokens=8, batch_size=3)
    for p, row in zip(PROMPTS, batched):
        alone = generate_completions(model, tok, [p], max_new_tokens=8, batch_size=1)[0][0]
        assert row[0].token_ids == alone.token_ids
        assert row[0].text == alone.text


def test_shapes_and_restores_state(tiny):
    model, tok = tiny
    model.train()
    side = tok.padding_side
    out = generate(model, tok, PROMPTS, max_new_tokens=5, n=3, temperature=0.0, batch_size=2)
    assert len(out) == 3 and all(len(r) == 3 for r in out)
    assert all(r[0] == r[1] == r[2] for r in out)  # greedy: identical copies
    assert model.training and tok.padding_side == side
    comps = generate_completions(model, tok, PROMPTS, max_new_tokens=5)
    for row in comps:
        c = row[0]
        assert 1 <= len(c.token_ids) <= 5
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "length":
            assert len(c.token_ids) == 5


def test_sampling_is_seeded_and_varied(tiny):
    model, tok = tiny
    rng_before = torch.get_rng_state()
    a = generate(model, tok, PROMPTS[:1], max_new_tokens=8, n=6, temperature=1.5, seed=1)
    b = generate(model, tok, PROMPTS[:1], max_new_tokens=8, n=6, temperature=1.5, seed=1)
    assert torch.equal(rng_before, torch.get_rng_state())  # global RNG untouched
    assert a == b
    assert len(set(a[0])) > 1  # a random tiny model at T=1.5 does not repeat itself 6 times


def test_stops_at_eos(tiny):
    model, tok = tiny
    # force eos after two tokens: a hook on the output layer raises the eos logit
    eos = tok.eos_token_id
    calls = []

    def hook(module, args, out):
        calls.append(1)
        if len(calls) >= 3:  # prefill + 1 decode step, then eos
            out = out.clone()
            out[..., eos] += 1e4
        return out

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        c = generate_completions(model, tok, ["x"], max_new_tokens=6)[0][0]
    finally:
        handle.remove()
    assert len(c.token_ids) == 3
    assert c.finish_reason == "stop"
    assert c.token_ids[-1] == eos
    assert tok.eos_token not in c.text


def test_stop_strings_trim_text(tiny):
    model, tok = tiny
    full = generate_completions(model, tok, PROMPTS[:1], max_new_tokens=12)[0][0]
    assert len(full.text) >= 3
    stop = full.text[2:4] if full.text[2:4].strip() else full.text[1:3]
    cut = generate_completions(model, tok, PROMPTS[:1], max_new_tokens=12, stop=[stop])[0][0]
    assert stop not in cut.text
    assert full.text.startswith(cut.text)
    assert cut.finish_reason == "stop"
    assert stop in tok.decode(cut.token_ids, skip_special_tokens=True)


def test_chat_prompts_use_template(tiny):
    model, tok = tiny
    msgs = [{"role": "user", "content": "1 + 2"}]
    text = render_prompt(tok, msgs)
    assert text.endswith("<|im_start|>assistant\n") and "1 + 2" in text
    assert generate(model, tok, [msgs], max_new_tokens=4) == generate(model, tok, [text], max_new_tokens=4)


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, ["a"], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, tok, ["a"], top_p=0.0)
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        generate(model, tok, [123])
    assert generate(model, tok, []) == []
