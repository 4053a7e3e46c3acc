"""Multi-turn episodes (actors/multiturn.py): turn-synchronous batching, the loss mask, the
counts, and token exactness: the trained ids are the ids the engine was given and sampled.

A scripted engine returns chosen token ids (deliberately NOT the tokenizer's own tokenisation of
their text, so any re-tokenisation would show); a real tiny HF engine runs the same checks.
"""
from __future__ import annotations

import pytest
import torch

from actors.env_tools import format_tool_call
from actors.environments import Environment, StepResult
from actors.multiturn import ChatTemplateError, ChatTurns, EpisodeConfig, episode_metrics, run_episodes
from kernels.engine import Completion, Engine
from kernels.generation_text import encode_prompt
from kernels.tokenizer import load_tokenizer
from rewards.code_isolation import isolation_error

SANDBOX = "isolated" if isolation_error() is None else "unsafe"
CALC = {"name": "calculator", "kwargs": {"sandbox": SANDBOX, "max_turns": 3, "timeout_s": 0.5}}
ROW = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?", "answer": "#### 72"}


class EchoEnv(Environment):
    """Never ends by itself: a user message every turn (the runner's max_turns ends it)."""

    def reset(self, row):
        return [{"role": "user", "content": row["question"]}]

    def step(self, assistant_text):
        return StepResult.observe(f"turn {self.turn} seen", role="user")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def turns(tok):
    return ChatTurns(tok)


class ScriptedEngine(Engine):
    """`policy(context_text, turn) -> (reply text, finish)`; the reply's ids are its characters
    tokenised one by one (not the tokenizer's merges), plus <|im_end|> when finish is "stop" and
    the reply does not end on a tool call (as a stop string ends it). Logprobs: -0.01 * position."""

    def __init__(self, tok, policy):
        self.tok, self.policy, self.calls = tok, policy, []
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def ids(self, text: str) -> list[int]:
        return [i for ch in text for i in self.tok(ch, add_special_tokens=False)["input_ids"]]

    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=64, stop=None, seed=0,
                 ignore_eos=False):
        self.calls.append({"prompts": [list(p) for p in prompts], "n": n, "stop": stop, "seed": seed,
                           "max_tokens": max_tokens, "outs": []})
        rows = []
        for p in prompts:
            context = self.tok.decode(p)
            turn = context.count("<|im_start|>assistant")
            row = []
            for k in range(n):
                text, finish = self.policy(context, turn, k)
                ids = self.ids(text) + ([self.im_end] if finish == "stop" and not text.endswith("</tool_call>")
                                        else [])
                ids = ids[:max_tokens]
                row.append(Completion(text, ids, finish, [-0.01 * (j + 1) for j in range(len(ids))]))
            rows.append(row)
        self.calls[-1]["outs"] = [[c.token_ids for c in r] for r in rows]
        return rows


def tool(expr: str) -> str:
    return "Let me compute. " + format_tool_call("calculator", {"expression": expr})


def assert_token_exact(traj, engine_calls, turns):
    """trajectory == prompt + sampled_1 + obs_1 + ... + sampled_T, each turn generated from the prefix."""
    sampled = []
    for call in engine_calls:  # the context each turn was given is a prefix of the trajectory
        for p, outs in zip(call["prompts"], call["outs"]):
            if traj.token_ids[:len(p)] == p:
                sampled += [(len(p), o) for o in outs if traj.token_ids[len(p):len(p) + len(o)] == o]
    expected = list(traj.prompt_token_ids)
    model_spans = [s for s in traj.spans if s[0] == "model"]
    assert len(model_spans) == traj.turns
    for t, (_, start, end) in enumerate(model_spans):
        assert len(expected) == start and (start, traj.token_ids[start:end]) in sampled
        expected += traj.token_ids[start:end]
        if t < len(traj.observation_tokens_per_turn):
            first = next(i for i, m in enumerate(traj.messages) if m["role"] == "assistant")
            expected += turns.observation_ids(traj.messages[first + 2 * t + 1], traj.token_ids[start:end])
    assert expected == traj.token_ids
    mask_idx = [i for i, m in enumerate(traj.loss_mask) if m]
    assert mask_idx == [i for k, s, e in traj.spans if k == "model" for i in range(s, e)]
    assert len(traj.logprobs) == len(traj.token_ids)
    assert all(traj.logprobs[i] == 0.0 for i, m in enumerate(traj.loss_mask) if not m)


def test_multi_turn_episode_calculator(tok, turns):
    def policy(ctx, turn, k):
        return (tool("48 / 2 + 48"), "stop") if turn == 1 else ("She sold 72 clips.\n#### 72", "stop")

    eng = ScriptedEngine(tok, policy)
    [[a, b]] = run_episodes(eng, turns, CALC, [ROW], EpisodeConfig(n=2, max_tokens=200, seed=5))
    assert len(eng.calls) == 2
    # turn 1: one prompt (the row's), n=2, the tool call's end as stop string; turn 2: two contexts
    assert eng.calls[0]["n"] == 2 and len(eng.calls[0]["prompts"]) == 1 and eng.calls[0]["stop"] == ["</tool_call>"]
    assert eng.calls[1]["n"] == 2 and len(eng.calls[1]["prompts"]) == 1  # both episodes' contexts are equal
    assert [c["seed"] for c in eng.calls] == [5, 6]
    for t in (a, b):
        assert t.reward == 1.0 and t.finish_reason == "done" and t.turns == 2
        assert (t.tool_calls, t.tool_errors, t.timeouts, t.malformed) == (1, 0, 0, 0)
        assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "tool", "assistant"]
        assert t.messages[3]["content"] == "72.0\n" and t.messages[2]["content"].endswith("</tool_call>")
        assert t.turn_finish_reasons == ["stop", "stop"]
        assert [k for k, _, _ in t.spans] == ["prompt", "model", "observation", "model"]
        # the model stopped on the stop string: the template's whole closing comes as observation tokens
        obs = tok.decode(t.token_ids[t.spans[2][1]:t.spans[2][2]])
        assert obs == "<|im_end|>\n<|im_start|>tool\n72.0\n<|im_end|>\n<|im_start|>assistant\n"
        assert sum(t.loss_mask) == sum(t.sampled_tokens_per_turn) and t.has_logprobs
        assert t.completion_token_ids == t.token_ids[t.prompt_len:] and t.prompt_token_ids == eng.calls[0]["prompts"][0]
        assert t.completion_loss_mask[0] == 1 and len(t.completion_logprobs) == len(t.completion_token_ids)
        assert_token_exact(t, eng.calls, turns)
    m = episode_metrics([a, b])
    assert m["reward_mean"] == 1.0 and m["tool_calls"] == 2.0 and m["finish/done"] == 1.0 and m["turns_mean"] == 2.0


def test_token_exactness_scripted(tok, turns):
    """The engine's ids are not the tokenizer's own tokenisation of their text; they are kept as sampled."""
    replies = {1: tool("(48 + 24) * 1"), 2: "thinking... " + tool("72 - 0"), 3: "#### 72"}
    eng = ScriptedEngine(tok, lambda ctx, turn, k: (replies[turn], "stop"))
    [[t]] = run_episodes(eng, turns, CALC, [ROW], EpisodeConfig(max_tokens=300))
    assert t.turns == 3 and t.reward == 1.0
    for _, s, e in [sp for sp in t.spans if sp[0] == "model"]:
        ids = t.token_ids[s:e]
        assert ids != tok(tok.decode(ids), add_special_tokens=False)["input_ids"]  # re-tokenising would change them
    assert_token_exact(t, eng.calls, turns)
    # every turn's context was exactly the trajectory so far
    for call in eng.calls:
        assert call["prompts"][0] == t.token_ids[:len(call["prompts"][0])]


def test_tool_error_timeout_and_batching(tok, turns):
    rows = [dict(ROW, question="q-error"), dict(ROW, question="q-timeout"), dict(ROW, question="q-direct")]

    def policy(ctx, turn, k):
        if "q-direct" in ctx or turn == 2:
            return "#### 72" if k == 0 else "#### 70", "stop"
        return tool("48 / 0" if "q-error" in ctx else "9 ** 9 ** 9"), "stop"

    eng = ScriptedEngine(tok, policy)
    out = run_episodes(eng, turns, CALC, rows, EpisodeConfig(n=2, max_tokens=200))
    # turn-synchronous: turn 1 sends 3 prompts with n=2; turn 2 the 4 live episodes (2 distinct contexts, n=2)
    assert [(len(c["prompts"]), c["n"]) for c in eng.calls] == [(3, 2), (2, 2)]
    err, slow, direct = out
    assert [t.reward for t in err] == [1.0, 0.0] and all(t.tool_errors == 1 and t.timeouts == 0 for t in err)
    assert err[0].messages[3] == {"role": "tool", "content": "Error: ZeroDivisionError: division by zero"}
    assert all(t.timeouts == 1 and t.tool_errors == 0 and t.turns == 2 for t in slow)
    assert slow[0].messages[3]["content"] == "Error: timed out after 0.5 s"
    assert [t.reward for t in direct] == [1.0, 0.0] and all(t.turns == 1 and t.tool_calls == 0 for t in direct)
    for t in err + slow + direct:
        assert_token_exact(t, eng.calls, turns)
    m = episode_metrics(err + slow + direct)
    assert m["tool_errors"] == 2.0 and m["timeouts"] == 2.0 and m["reward_mean"] == 0.5


def test_max_turns_and_malformed(tok, turns):
    rows = [dict(ROW, question="q-loop"), dict(ROW, question="q-bad")]

    def policy(ctx, turn, k):
        return (tool("1 + 1"), "stop") if "q-loop" in ctx else ('<tool_call>{"name": calculator}</tool_call>', "stop")

    eng = ScriptedEngine(tok, policy)
    [[loop], [bad]] = run_episodes(eng, turns, CALC, rows, EpisodeConfig(max_tokens=200))
    assert loop.finish_reason == "max_turns" and loop.reward == 0.0 and loop.turns == 3 and loop.tool_calls == 3
    assert loop.infos[-1] == {"tool": "calculator", "max_turns": True}  # the last call was not run
    assert bad.finish_reason == "malformed" and bad.reward == 0.0 and bad.turns == 1 and bad.malformed == 1
    assert "not valid JSON" in bad.infos[0]["reason"]
    assert [len(c["prompts"]) for c in eng.calls] == [2, 1, 1]
    # an environment that never ends: the runner stops it at max_turns
    eng = ScriptedEngine(tok, lambda ctx, turn, k: ("hm", "stop"))
    [[t]] = run_episodes(eng, turns, {"name": f"{__name__}:EchoEnv", "kwargs": {"max_turns": 2}}, [ROW])
    assert t.finish_reason == "max_turns" and t.turns == 2 and t.reward == 0.0
    assert [m["role"] for m in t.messages] == ["user", "assistant", "user", "assistant"]
    assert_token_exact(t, eng.calls, turns)
    m = episode_metrics([loop, bad, t])
    assert m["malformed"] == 1.0 and m["finish/max_turns"] == pytest.approx(2 / 3)


def test_max_total_tokens(tok, turns):
    eng = ScriptedEngine(tok, lambda ctx, turn, k: ("a fairly long reply " * 3, "stop"))
    prompt_len = len(turns.prompt_ids(EchoEnv().reset(ROW)))
    cap = prompt_len + 100
    [[t]] = run_episodes(eng, turns, EchoEnv, [ROW], EpisodeConfig(max_tokens=64, max_total_tokens=cap))
    assert t.finish_reason == "max_total_tokens" and t.reward == 0.0 and len(t.token_ids) <= cap
    assert eng.calls[-1]["max_tokens"] <= cap - len(eng.calls[-1]["prompts"][0])
    with pytest.raises(ValueError, match="row 0: its prompt has"):
        run_episodes(eng, turns, EchoEnv, [ROW], EpisodeConfig(max_total_tokens=prompt_len))
    with pytest.raises(ValueError, match="EpisodeConfig.n must be"):
        EpisodeConfig(n=0)


def test_observation_ids_match_the_full_rendering(tok, turns):
    """With the model's turn tokenised as the tokenizer would, prompt + turn + observation ids equal
    the chat template's rendering of the whole conversation, tokenised at once."""
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    reply, im_end = "Adding: 3 + 4 = 7", tok.convert_tokens_to_ids("<|im_end|>")
    sampled = tok(reply, add_special_tokens=False)["input_ids"] + [im_end]
    obs = {"role": "tool", "content": "7"}
    ids = turns.prompt_ids(msgs) + sampled + turns.observation_ids(obs, sampled)
    full = msgs + [{"role": "assistant", "content": reply}, obs]
    assert ids == encode_prompt(tok, full)
    # a turn cut at its token limit gets the whole closing <|im_end|>\n
    assert turns.observation_ids(obs, sampled[:-1])[:2] == tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]


def test_template_that_does_not_append_is_refused(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.chat_template = ("{{ messages | length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ChatTemplateError, match="re-renders the conversation"):
        ChatTurns(tok).observation_ids({"role": "tool", "content": "1"}, [])


def test_token_exactness_real_hf_engine(tok, turns):
    """The tiny model generates (sampling, batched, left-padded); the trajectory is its exact ids,
    and the model's own log-probs of the masked tokens in the full trajectory are the engine's."""
    from kernels.generation import HFGenerator
    from kernels.model import ModelConfig, build_model

    model = build_model(ModelConfig(preset="tiny", dtype="float32"), vocab_size=len(tok), seed=0)
    calls = []

    class Spy(HFGenerator):
        def generate(self, prompts, **kw):
            outs = super().generate(prompts, **kw)
            calls.append({"prompts": [list(p) for p in prompts], "outs": [[c.token_ids for c in r] for r in outs]})
            return outs

    rows = [{"question": "Ava has 3 apples and gets 4 more. How many?"}, {"question": "12 pens, 5 sold. Left?"}]
    out = run_episodes(Spy(model, tok), turns, {"name": f"{__name__}:EchoEnv", "kwargs": {"max_turns": 3}}, rows,
                       EpisodeConfig(n=2, max_tokens=4, temperature=1.0, seed=3))
    assert len(calls) == 3
    trajs = [t for r in out for t in r]
    for t in trajs:
        assert t.turns == 3 and t.finish_reason == "max_turns" and len(t.observation_tokens_per_turn) == 2
        assert_token_exact(t, calls, turns)
    assert len({tuple(t.token_ids) for t in trajs}) == 4  # the n samples of a row differ
    model.eval()
    with torch.no_grad():
        for t in trajs:
            ids = torch.tensor([t.token_ids])
            lp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1]          # [T-1, V]
            own = lp.gather(-1, ids[0, 1:, None])[:, 0]                              # [T-1]
            idx = [i for i, m in enumerate(t.loss_mask) if m]
            assert torch.allclose(own[[i - 1 for i in idx]], torch.tensor([t.logprobs[i] for i in idx]), atol=1e-4)
