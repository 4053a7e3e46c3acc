"""Multi-turn episodes against an engine, token-exact (docs/agentic.md).

    turns = ChatTurns(tokenizer)
    trajs = run_episodes(engine, turns, "calculator", rows, EpisodeConfig(n=4, max_tokens=256))
    t = trajs[row][k]
    t.token_ids, t.loss_mask, t.logprobs          # aligned; mask 1 exactly on the tokens the engine sampled
    t.prompt_token_ids, t.completion_token_ids, t.completion_loss_mask, t.completion_logprobs
    t.reward, t.finish_reason, t.turns, t.tool_calls, t.tool_errors, t.timeouts, t.malformed

Token exactness: every turn generates from the exact token ids of the episode so far. Earlier
turns are never re-rendered or re-tokenised: the ids the engine sampled are kept as they are,
and only the new observation message is tokenised and appended. So the trained ids equal the
ids the engine saw and generated, turn after turn:

    token_ids == prompt_ids + sampled_1 + observation_1 + sampled_2 + ... + sampled_T

Observation tokens (ChatTurns.observation_ids) are what the chat template writes after an
assistant message when the next message is the observation, up to the next generation prompt:
the rest of the assistant turn's closing (e.g. ChatML's `\\n` after `<|im_end|>`; the whole
`<|im_end|>\\n` when the model stopped on a stop string or at its token limit instead of on the
end-of-turn token), the observation message, and the generation prompt. They are found by
rendering a stand-in conversation [user, assistant] and [user, assistant, observation] (with the
generation prompt) and taking the difference. Assumptions (the first one is checked):
  1. the template appends: the second rendering starts with the first;
  2. what it writes after an assistant message and for the observation does not depend on the
     earlier messages' contents;
  3. the difference is tokenised on its own. With templates whose turns start and end with
     special tokens (ChatML, Llama 3, ...) that is how a full rendering tokenises too; either
     way the trajectory is exactly what the engine was given.

Batching: turn-synchronous. Each turn makes ONE engine.generate call for every live episode;
identical contexts (the n episodes of a row at turn 1) are sent once with n = their count, so
engines that seed per request (vLLM) still draw different samples, and turn 1 is the usual
grouped rollout call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from actors.environments import EnvSpec, Environment, StepResult, make_env
from kernels.engine import Engine
from kernels.generation_text import decode, encode_prompt

_USER_MARK, _ASSISTANT_MARK = "STANDIN-USER-Q7", "STANDIN-ASSISTANT-Q7"
FINISH_REASONS = ("done", "malformed", "max_turns", "max_total_tokens")


class ChatTemplateError(ValueError):
    """A chat template whose observation tokens cannot be found by difference (see module doc)."""


class ChatTurns:
    """The token ids of an episode's pieces, from the tokenizer's chat template."""

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError("multi-turn episodes need a tokenizer with a chat_template")
        self.tok = tokenizer
        self._head = [{"role": "user", "content": _USER_MARK}, {"role": "assistant", "content": _ASSISTANT_MARK}]
        self._before = self._render(self._head, False)
        pos = self._before.rfind(_ASSISTANT_MARK)
        if pos < 0:
            raise ChatTemplateError("the chat template does not render the assistant message's content")
        self.closing = self._before[pos + len(_ASSISTANT_MARK):]  # e.g. "<|im_end|>\n"
        closing_ids = self._encode(self.closing)
        self._closing_first = closing_ids[0] if closing_ids else None

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises its own errors (e.g. roles that must alternate)
            roles = [m.get("role") for m in messages]
            raise ChatTemplateError(f"the chat template cannot render roles {roles}: {e}") from e

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tok(text, add_special_tokens=False)["input_ids"]]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The initial messages, rendered with the generation prompt and tokenised once."""
        return encode_prompt(self.tok, messages)

    def observation_ids(self, message: Mapping[str, Any], sampled_ids: Sequence[int]) -> list[int]:
        """The ids that follow a turn that sampled `sampled_ids`: the rest of the assistant turn's
        closing, `message` as the template renders it, and the next generation prompt."""
        after = self._render(self._head + [dict(message)], True)
        if not after.startswith(self._before):
            raise ChatTemplateError(
                f"the chat template re-renders the conversation when a {message.get('role')!r} message "
                "follows an assistant message, so its tokens cannot be appended; token-exact episodes "
                "need a template that appends")
        ids = self._encode(self.closing + after[len(self._before):])
        # the model ended its turn on the closing's first token (e.g. <|im_end|>): not twice
        if self._closing_first is not None and sampled_ids and sampled_ids[-1] == self._closing_first \
                and ids[:1] == [self._closing_first]:
            ids = ids[1:]
        return ids


@dataclass(frozen=True)
class EpisodeConfig:
    """n: episodes per row; max_tokens: tokens sampled per turn; max_total_tokens: cap on a whole
    trajectory (None: none; an episode that reaches it ends with reward 0); seed: turn t uses seed + t - 1."""

    n: int = 1
    max_tokens: int = 256
    max_total_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EpisodeConfig.{name} must be an integer >= 1, got {v!r}")
        m = self.max_total_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 2):
            raise ValueError(f"EpisodeConfig.max_total_tokens must be None or an integer >= 2, got {m!r}")
        if not self.temperature >= 0:
            raise ValueError(f"EpisodeConfig.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"EpisodeConfig.top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class Trajectory:
    """One episode. token_ids, loss_mask and logprobs are aligned: loss_mask is 1 exactly on the
    tokens the engine sampled (their logprobs as the engine reported them), 0 on the prompt and
    observation tokens (logprob 0.0). spans: (kind, start, end) for "prompt" | "model" | "observation"."""

    row_index: int
    sample_index: int
    messages: list[dict]
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    prompt_len: int
    spans: list[tuple[str, int, int]] = field(default_factory=list)
    reward: float = 0.0
    finish_reason: str = ""  # one of FINISH_REASONS
    turns: int = 0
    turn_finish_reasons: list[str] = field(default_factory=list)  # the engine's "stop" | "length", per turn
    sampled_tokens_per_turn: list[int] = field(default_factory=list)
    observation_tokens_per_turn: list[int] = field(default_factory=list)
    tool_calls: int = 0
    tool_errors: int = 0
    timeouts: int = 0
    malformed: int = 0
    has_logprobs: bool = True  # False when the engine returned none (the zeros are placeholders)
    infos: list[dict] = field(default_factory=list)  # every step's info, in turn order

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.prompt_len]

    @property
    def completion_token_ids(self) -> list[int]:
        """Everything after the initial prompt: model turns and observations (see completion_loss_mask)."""
        return self.token_ids[self.prompt_len:]

    @property
    def completion_loss_mask(self) -> list[int]:
        return self.loss_mask[self.prompt_len:]

    @property
    def completion_logprobs(self) -> list[float]:
        return self.logprobs[self.prompt_len:]

    def _append(self, kind: str, ids: Sequence[int], mask: int, lps: Sequence[float] | None = None) -> None:
        start = len(self.token_ids)
        self.token_ids.extend(int(i) for i in ids)
        self.loss_mask.extend([mask] * len(ids))
        self.logprobs.extend([float(x) for x in lps] if lps is not None else [0.0] * len(ids))
        self.spans.append((kind, start, len(self.token_ids)))


@dataclass
class _Episode:
    env: Environment
    traj: Trajectory
    live: bool = True


def _count(traj: Trajectory, res: StepResult) -> None:
    info = res.info
    traj.infos.append(dict(info))
    traj.tool_calls += bool(info.get("tool"))
    traj.tool_errors += bool(info.get("tool_error"))
    traj.timeouts += bool(info.get("timeout"))
    traj.malformed += bool(info.get("malformed"))


def _end(ep: _Episode, reward: float, reason: str) -> None:
    ep.traj.reward, ep.traj.finish_reason, ep.live = float(reward), reason, False


def run_episodes(engine: Engine, turns: ChatTurns, env: "EnvSpec | str | Mapping | type",
                 rows: Sequence[Mapping[str, Any]], cfg: EpisodeConfig = EpisodeConfig()) -> list[list[Trajectory]]:
    """cfg.n episodes per row (one environment instance each), turn-synchronously: each turn one
    engine.generate call for all live episodes. Returns the trajectories per row, in row order."""
    episodes: list[_Episode] = []
    for r, row in enumerate(rows):
        for k in range(cfg.n):
            e = make_env(env)
            msgs = e.reset(dict(row))
            ids = turns.prompt_ids(msgs)
            if cfg.max_total_tokens is not None and len(ids) >= cfg.max_total_tokens:
                raise ValueError(f"row {r}: its prompt has {len(ids)} tokens, max_total_tokens is "
                                 f"{cfg.max_total_tokens}: no room to generate")
            traj = Trajectory(r, k, [dict(m) for m in msgs], [], [], [], prompt_len=len(ids))
            traj._append("prompt", ids, 0)
            episodes.append(_Episode(e, traj))
    if not episodes:
        return [[] for _ in rows]
    stop = list(episodes[0].env.stop)
    turn = 0
    while any(ep.live for ep in episodes):
        turn += 1
        live = [ep for ep in episodes if ep.live]
        groups: dict[tuple[int, ...], list[_Episode]] = {}
        for ep in live:  # identical contexts go once, with n = their count
            groups.setdefault(tuple(ep.traj.token_ids), []).append(ep)
        room = [cfg.max_tokens if cfg.max_total_tokens is None else cfg.max_total_tokens - len(ep.traj.token_ids)
                for ep in live]
        outs = engine.generate([list(ctx) for ctx in groups], n=max(len(g) for g in groups.values()),
                               temperature=cfg.temperature, top_p=cfg.top_p,
                               max_tokens=min(cfg.max_tokens, max(room)), stop=stop or None,
                               seed=cfg.seed + turn - 1)
        if len(outs) != len(groups):
            raise RuntimeError(f"engine returned {len(outs)} rows for {len(groups)} prompts")
        for group, comps in zip(groups.values(), outs):
            if len(comps) < len(group):
                raise RuntimeError(f"engine returned {len(comps)} completions for a prompt, asked for "
                                   f"{max(len(g) for g in groups.values())}")
            for ep, comp in zip(group, comps):
                _take_turn(ep, comp, turn, turns, cfg)
    by_row: list[list[Trajectory]] = [[] for _ in rows]
    for ep in episodes:
        by_row[ep.traj.row_index].append(ep.traj)
    return by_row


def _take_turn(ep: _Episode, comp, turn: int, turns: ChatTurns, cfg: EpisodeConfig) -> None:
    traj = ep.traj
    ids, lps, finish = list(comp.token_ids), list(comp.logprobs), comp.finish_reason
    if lps and len(lps) != len(ids):
        raise RuntimeError(f"engine returned {len(lps)} logprobs for {len(ids)} token ids")
    if not lps:
        traj.has_logprobs, lps = False, [0.0] * len(ids)
    if cfg.max_total_tokens is not None:
        room = cfg.max_total_tokens - len(traj.token_ids)
        if len(ids) > room:  # a prefix of a sample is a sample: cut it to the trajectory's room
            ids, lps, finish = ids[:room], lps[:room], "length"
    traj._append("model", ids, 1, lps)
    traj.turns, text = turn, decode(turns.tok, ids)  # the stop string stays in: it is the model's text
    traj.turn_finish_reasons.append(finish)
    traj.sampled_tokens_per_turn.append(len(ids))
    traj.messages.append({"role": "assistant", "content": text})
    ep.env.turn = turn
    res = ep.env.step(text)
    if not isinstance(res, StepResult):
        raise TypeError(f"{type(ep.env).__name__}.step must return a StepResult, got {type(res).__name__}")
    _count(traj, res)
    if res.done:
        reason = "malformed" if res.info.get("malformed") else "max_turns" if res.info.get("max_turns") else "done"
        return _end(ep, res.reward, reason)
    if turn >= ep.env.max_turns:
        return _end(ep, 0.0, "max_turns")  # its observation would have no turn to answer it
    obs = turns.observation_ids(res.observation, ids)
    if cfg.max_total_tokens is not None and len(traj.token_ids) + len(obs) >= cfg.max_total_tokens:
        return _end(ep, 0.0, "max_total_tokens")
    traj._append("observation", obs, 0)
    traj.observation_tokens_per_turn.append(len(obs))
    traj.messages.append(dict(res.observation))


def episode_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Means and totals of a batch of trajectories, for metrics.jsonl."""
    if not trajs:
        return {}
    n = len(trajs)
    out = {"episodes": float(n), "reward_mean": sum(t.reward for t in trajs) / n,
           "turns_mean": sum(t.turns for t in trajs) / n,
           "sampled_tokens_mean": sum(sum(t.loss_mask) for t in trajs) / n}
    for key in ("tool_calls", "tool_errors", "timeouts", "malformed"):
        out[key] = float(sum(getattr(t, key) for t in trajs))
    for reason in FINISH_REASONS:
        out[f"finish/{reason}"] = sum(t.finish_reason == reason for t in trajs) / n
    return out
