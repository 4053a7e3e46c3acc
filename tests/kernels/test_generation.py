"""kernels/generation.py: left padding, greedy determinism, sampling, stop strings, chat prompts,
stop token ids (eos, generation config, chat template end-of-turn), trimming, the engine interface."""
from __future__ import annotations

import contextlib

import pytest
import torch

from kernels.engine import Completion, Engine
from kernels.generation import (HFGenerator, end_of_turn_ids, generate, generate_completions, render_prompt,
                                stop_token_ids, trim_completion)
from kernels.model import ModelConfig, build_model
from kernels.tokenizer import load_tokenizer
from lora_helpers import logit_hook


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


def test_trim_completion_eos_and_stop(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    ids = tok("12 + 3 = 15\n#### 15", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    lps = [-0.1] * (len(ids) + 3)
    got, lp, text, finish = trim_completion(tok, ids + [eos, 5, 6], lps, {eos}, [])
    assert got == ids + [eos] and len(lp) == len(got) and finish == "stop" and text == "12 + 3 = 15\n#### 15"
    got, lp, text, finish = trim_completion(tok, ids, lps[:len(ids)], {eos}, ["####"])
    assert finish == "stop" and text == "12 + 3 = 15\n" and len(got) < len(ids) and len(lp) == len(got)
    got, lp, text, finish = trim_completion(tok, ids, lps[:len(ids)], {eos}, [])
    assert finish == "length" and got == ids


# --------------------------------------------------------------------------- stop token ids
# SmolLM2-135M-Instruct names <|im_start|> as its eos token while its chat template ends each
# assistant turn with <|im_end|>; the tokenizer below is the locally trained one set up the same way.


@pytest.fixture(scope="module")
def im_start_eos_tok(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.eos_token = "<|im_start|>"
    return tok


def _id(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


def test_stop_token_ids_eos_config_and_template(im_start_eos_tok):
    from transformers import GenerationConfig

    tok = im_start_eos_tok
    im_start, im_end = _id(tok, "<|im_start|>"), _id(tok, "<|im_end|>")
    assert tok.eos_token_id == im_start and im_start != im_end
    assert end_of_turn_ids(tok) == [im_end]
    assert stop_token_ids(tok) == [im_start, im_end]                   # eos first (the pad fallback)
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[5, 7])) == [im_start, 5, 7, im_end]
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=9)) == [im_start, 9, im_end]
    assert stop_token_ids(tok, {"eos_token_id": [im_end, 11]}) == [im_start, im_end, 11]
    assert stop_token_ids(tok, GenerationConfig()) == [im_start, im_end]


def test_stop_token_ids_without_chat_template(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.chat_template = None
    assert end_of_turn_ids(tok) == []
    assert stop_token_ids(tok) == [tok.eos_token_id]
    assert stop_token_ids(tok, {"eos_token_id": 4}) == [tok.eos_token_id, 4]


@contextlib.contextmanager
def _no_config_eos(model):
    """The tiny preset's generation_config names id 2 (<|im_end|> here) as eos: drop it, so that
    only the tokenizer and the chat template can tell where a completion ends."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def test_stops_at_chat_template_end_of_turn_not_only_eos(tiny, im_start_eos_tok):
    model, _ = tiny
    tok = im_start_eos_tok
    im_end = _id(tok, "<|im_end|>")
    msgs = [[{"role": "user", "content": "1 + 2"}]]
    with _no_config_eos(model):
        with logit_hook(model, [im_end], 1e4, after_calls=2):  # prefill + 1 step, then <|im_end|>
            c = generate_completions(model, tok, msgs, max_new_tokens=6, logprobs=True)[0][0]
        with logit_hook(model, [im_end], 1e4, after_calls=2):
            eos_only = generate_completions(model, tok, msgs, max_new_tokens=6, stop_ids=[tok.eos_token_id])[0][0]
    assert c.finish_reason == "stop" and len(c.token_ids) == 3 and c.token_ids[-1] == im_end
    assert "<|im_end|>" not in c.text and len(c.logprobs) == 3
    assert c.logprobs[-1] == pytest.approx(0.0, abs=1e-3)  # the forced token had all the mass
    # stopping at tokenizer.eos alone (the defect) runs to the length limit
    assert eos_only.finish_reason == "length" and len(eos_only.token_ids) == 6


def test_length_only_at_max_tokens(tiny, im_start_eos_tok):
    model, _ = tiny
    tok = im_start_eos_tok
    stops = stop_token_ids(tok, model.generation_config)
    with logit_hook(model, stops, -1e4):  # no stop id can be sampled
        outs = generate_completions(model, tok, PROMPTS, max_new_tokens=5, n=2, temperature=1.0, logprobs=True)
    for row in outs:
        for c in row:
            assert c.finish_reason == "length" and len(c.token_ids) == 5 == len(c.logprobs)
    with logit_hook(model, [stops[-1]], 1e4, after_calls=1):  # a stop id right away, ignored on request
        c = generate_completions(model, tok, PROMPTS[:1], max_new_tokens=4, ignore_eos=True)[0][0]
    assert c.finish_reason == "length" and len(c.token_ids) == 4


def test_hf_generator_is_an_engine(tiny):
    model, tok = tiny
    eng = HFGenerator(model, tok, batch_size=2)
    assert isinstance(eng, Engine)
    outs = eng.generate(PROMPTS, n=2, temperature=1.0, max_tokens=4, seed=3)
    assert len(outs) == 3 and all(len(r) == 2 and isinstance(r[0], Completion) for r in outs)
    for c in (c for r in outs for c in r):
        assert 1 <= len(c.token_ids) <= 4 and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)
    ids = tok("1 + 2")["input_ids"]  # token-id prompts pass through
    assert eng.generate([ids], max_tokens=4)[0][0].token_ids == eng.generate(["1 + 2"], max_tokens=4)[0][0].token_ids
    name = "model.embed_tokens.weight"
    assert eng.weight_checksum([name])[name] == pytest.approx(float(model.model.embed_tokens.weight.detach().sum()))
    eng.sleep()
    eng.wake_up()  # no-ops for an HF engine
    with pytest.raises(NotImplementedError, match="vllm"):
        eng.load_ipc({})


def test_a_cut_inside_a_multibyte_character_leaves_no_replacement_char(tiny_tokenizer_dir):
    """A length cut between the bytes of one character: the text ends before it (it used to end
    in U+FFFD)."""
    from kernels.generation_text import decode
    from kernels.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    ids = tok("café ok", add_special_tokens=False)["input_ids"]
    cut = next(j for j in range(1, len(ids) + 1) if "\ufffd" in tok.decode(ids[:j]))
    assert "\ufffd" in tok.decode(ids[:cut])  # the raw decode shows the broken character
    assert decode(tok, ids[:cut]) == "caf"
    assert decode(tok, ids) == "café ok"
