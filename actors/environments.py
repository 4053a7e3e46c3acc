"""Environments of multi-turn RL: the API, the registry and the built-ins (docs/agentic.md).

    env = make_env({"name": "calculator", "kwargs": {"max_turns": 4}})   # or "calculator", "pkg.mod:MyEnv"
    messages = env.reset(row)                 # the initial chat messages of one episode
    res = env.step(assistant_text)            # StepResult: an observation to append, or the final reward
    res.observation, res.reward, res.done, res.info

An environment is a class: `reset(row) -> list[dict]` and `step(assistant_text) -> StepResult`,
one instance per episode (it may keep state between steps). It is registered by name
(`@register_env("calculator")`) or addressed as `module:Class` (like rewards/registry.py's
`module:function`), and built from a spec with keyword arguments (`max_turns`, ...). The episode
runner (actors/multiturn.py) sets `env.turn` (1-based) before each step and ends an episode at
`env.max_turns` turns whatever the step returned; it passes `env.stop` to the engine.

Info keys the runner counts (all optional): `tool` (name of the tool called), `tool_error`,
`timeout`, `malformed` (a tool call that could not be parsed: the step ends the episode with
reward 0), `max_turns` (the episode was cut at its last turn).

Built-ins (tool calls: actors/env_tools.py):
  - `calculator`: GSM8K-style rows (`question`, `answer`); tool `calculator` {"expression": ...}
    evaluates arithmetic in the code sandbox; a reply without a tool call is the final answer,
    scored with rewards.math.is_correct against `answer`.
  - `code`: rows with a problem (`prompt` or `question`) and `tests` (and optional `entry_point`);
    tool `python` {"code": ...} runs code and shows what it printed; a reply without a tool call
    is the final answer: its code (last ```python block) runs against the tests, reward = pass rate.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from actors.env_tools import TOOL_CALL_CLOSE, ToolRun, calculate, format_tool_call, parse_tool_call, run_python
from rewards.code import check_sandbox, extract_code, run_tests
from rewards.code_isolation import SandboxUnavailable
from rewards.math import is_correct
from rewards.registry import load_path

OBSERVATION_ROLES = ("tool", "user")


class UnknownEnvironmentError(LookupError):
    """An environment name that is neither registered nor a `module:Class` path."""


@dataclass(frozen=True)
class StepResult:
    """What a step gives back: an observation message to append (not done), or the final reward
    (done). `info` carries what the runner counts (see the module doc) and anything else to log."""

    observation: dict | None = None
    reward: float | None = None
    done: bool = False
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.done:
            r = self.reward
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise ValueError(f"StepResult: a final step needs a finite float reward, got {r!r}")
            object.__setattr__(self, "reward", float(r))
        else:
            obs = self.observation
            if not isinstance(obs, dict) or obs.get("role") not in OBSERVATION_ROLES \
                    or not isinstance(obs.get("content"), str):
                raise ValueError("StepResult: a step that is not done needs an observation "
                                 f"{{'role': 'tool' | 'user', 'content': str}}, got {obs!r}")
            if self.reward is not None:
                raise ValueError("StepResult: only a final step (done=True) carries a reward")

    @classmethod
    def observe(cls, content: str, role: str = "tool", **info) -> "StepResult":
        return cls(observation={"role": role, "content": content}, info=info)

    @classmethod
    def final(cls, reward: float, **info) -> "StepResult":
        return cls(reward=reward, done=True, info=info)


class Environment:
    """Base class. Subclasses implement reset and step; `stop` holds the stop strings the
    engine should end a turn on (e.g. the end of a tool call)."""

    stop: tuple[str, ...] = ()

    def __init__(self, max_turns: int = 4):
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"environment: max_turns must be an integer >= 1, got {max_turns!r}")
        self.max_turns = max_turns
        self.turn = 0  # set by the runner before each step: the assistant turn being stepped, 1-based

    @property
    def last_turn(self) -> bool:
        """True while stepping the last turn the runner allows (an observation would be dropped)."""
        return self.turn >= self.max_turns

    def reset(self, row: dict) -> list[dict]:
        raise NotImplementedError

    def step(self, assistant_text: str) -> StepResult:
        raise NotImplementedError


# -- the registry --------------------------------------------------------------------------

_REGISTRY: dict[str, type] = {}


def register_env(name: str) -> Callable[[type], type]:
    """Class decorator: `@register_env("calculator")` makes the class addressable by name."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"register_env: name must be a non-empty string without ':', got {name!r}")

    def deco(cls: type) -> type:
        if not isinstance(cls, type):
            raise TypeError(f"register_env({name!r}): expected a class, got {type(cls).__name__}")
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"register_env: environment name {name!r} is already taken by "
                             f"{old.__module__}.{old.__qualname__}")
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_envs() -> list[str]:
    return sorted(_REGISTRY)


def resolve_env(spec: str | type) -> type:
    """An environment class from a registered name, a `module:Class` path, or the class itself."""
    if isinstance(spec, type):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownEnvironmentError(f"environment spec must be a name or 'module:Class', got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        obj = load_path(spec, "environment", "Class", UnknownEnvironmentError)
        if not isinstance(obj, type) or not callable(getattr(obj, "reset", None)) \
                or not callable(getattr(obj, "step", None)):
            raise UnknownEnvironmentError(f"environment path {spec!r} is not a class with reset() and step()")
        return obj
    try:
        return _REGISTRY[spec]
    except KeyError:
        raise UnknownEnvironmentError(f"unknown environment {spec!r}; registered names: "
                                      f"{', '.join(registered_envs()) or '(none)'}; "
                                      "or give a 'module:Class' path") from None


@dataclass(frozen=True)
class EnvSpec:
    """Which environment and its keyword arguments: `"calculator"` or
    `{name: calculator, kwargs: {max_turns: 4, sandbox: unsafe}}` in YAML."""

    name_or_path: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            raise ValueError(f"EnvSpec.name_or_path must be a non-empty string, got {self.name_or_path!r}")
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"EnvSpec.kwargs must be a mapping, got {type(self.kwargs).__name__}")
        object.__setattr__(self, "name_or_path", self.name_or_path.strip())
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    @classmethod
    def from_config(cls, obj: "EnvSpec | str | Mapping[str, Any]") -> "EnvSpec":
        if isinstance(obj, EnvSpec):
            return obj
        if isinstance(obj, str):
            return cls(obj)
        if not isinstance(obj, Mapping):
            raise ValueError(f"environment spec must be a string or a mapping, got {type(obj).__name__}")
        d = dict(obj)
        name = d.pop("name", None)
        if name is None:
            raise ValueError(f"environment spec {obj!r}: missing 'name' (a registered name or 'module:Class')")
        extra = sorted(set(d) - {"kwargs"})
        if extra:
            raise ValueError(f"environment spec {name!r}: unknown keys {extra}; accepted: name, kwargs")
        return cls(name, d.get("kwargs") or {})


def make_env(spec: "EnvSpec | str | Mapping[str, Any] | type", **overrides) -> Environment:
    """A fresh environment (one per episode); keyword arguments that it does not take are named."""
    if isinstance(spec, type):
        cls, kwargs, label = spec, {}, spec.__qualname__
    else:
        s = EnvSpec.from_config(spec)
        cls, kwargs, label = resolve_env(s.name_or_path), dict(s.kwargs), s.name_or_path
    kwargs.update(overrides)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"environment {label!r}: bad kwargs {sorted(kwargs)}: {e}") from None
    return cls(**kwargs)


# -- built-ins -------------------------------------------------------------------------------

def _question(row: dict, keys: tuple[str, ...]) -> str:
    for k in keys:
        if isinstance(row.get(k), str) and row[k].strip():
            return row[k]
    raise ValueError(f"environment row needs one of the columns {list(keys)}, got {sorted(row)}")


def _tool_message(name: str, run: ToolRun) -> StepResult:
    content = run.output if run.error is None else (run.output + f"Error: {run.error}").strip()
    return StepResult.observe(content or "(no output)", tool=name,
                              tool_error=run.error is not None and not run.timed_out, timeout=run.timed_out)


class ToolEnvironment(Environment):
    """The shared turn logic of the built-ins: one tool, a tool call per turn, a final answer
    (a reply without a tool call) scored by `score`."""

    tool_name = ""
    tool_argument = ""
    stop = (TOOL_CALL_CLOSE,)

    def __init__(self, max_turns: int = 4, system_prompt: str | None = None, timeout_s: float = 5.0,
                 memory_mb: int = 512, sandbox: str = "isolated"):
        super().__init__(max_turns)
        if not timeout_s > 0:
            raise ValueError(f"environment: timeout_s must be > 0, got {timeout_s!r}")
        try:  # refuse before any episode runs (or log that it runs unsafe)
            check_sandbox(sandbox)
        except SandboxUnavailable as e:
            raise SandboxUnavailable(f"environment {type(self).__name__}: its tool runs in the code sandbox: "
                                     f"{e}") from None
        self.system_prompt = self.default_system_prompt() if system_prompt is None else system_prompt
        self.timeout_s, self.memory_mb, self.sandbox = float(timeout_s), int(memory_mb), sandbox
        self.row: dict = {}

    def default_system_prompt(self) -> str:
        raise NotImplementedError

    def reset(self, row: dict) -> list[dict]:
        self.row = dict(row)
        if isinstance(row.get("messages"), list):
            msgs = [dict(m) for m in row["messages"]]
        else:
            msgs = [{"role": "user", "content": _question(row, ("question", "prompt", "problem"))}]
        if self.system_prompt and not (msgs and msgs[0].get("role") == "system"):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def step(self, assistant_text: str) -> StepResult:
        call, error = parse_tool_call(assistant_text)
        if error is not None:
            return StepResult.final(0.0, malformed=True, reason=error)
        if call is None:
            return self.score(assistant_text)
        arg = call.arguments.get(self.tool_argument)
        if call.name != self.tool_name or not isinstance(arg, str):
            return StepResult.final(0.0, malformed=True, tool=call.name,
                                    reason=f"expected tool {self.tool_name!r} with a string "
                                           f"{self.tool_argument!r} argument")
        if self.last_turn:  # no turn left to read the result: do not run it
            return StepResult.final(0.0, tool=call.name, max_turns=True)
        return _tool_message(call.name, self.run_tool(arg))

    def run_tool(self, arg: str) -> ToolRun:
        raise NotImplementedError

    def score(self, final_text: str) -> StepResult:
        raise NotImplementedError


@register_env("calculator")
class CalculatorEnv(ToolEnvironment):
    """GSM8K-style rows: `question` and `answer` (a GSM8K solution `... #### 72` or a bare answer)."""

    tool_name, tool_argument = "calculator", "expression"

    def default_system_prompt(self) -> str:
        example = format_tool_call("calculator", {"expression": "48 / 2 + 48"})
        return ("Solve the math problem step by step. To compute, call the calculator (Python "
                f"arithmetic) and wait for its result:\n{example}\n"
                "When you know the answer, write it on the last line as: #### <number>")

    def run_tool(self, arg: str) -> ToolRun:
        return calculate(arg, timeout_s=self.timeout_s, memory_mb=self.memory_mb, sandbox=self.sandbox)

    def score(self, final_text: str) -> StepResult:
        if "answer" not in self.row:
            raise ValueError("calculator environment: the row has no 'answer' column")
        ok = is_correct(final_text, str(self.row["answer"]))
        return StepResult.final(1.0 if ok else 0.0, correct=ok)


@register_env("code")
class CodeEnv(ToolEnvironment):
    """Code problem rows: a problem (`prompt` / `question` / `problem`), `tests` (a list of
    asserts or one test script) and optional `entry_point` (HumanEval-style `check`)."""

    tool_name, tool_argument = "python", "code"

    def default_system_prompt(self) -> str:
        example = format_tool_call("python", {"code": "print(sorted([3, 1, 2]))"})
        return ("Solve the programming problem in Python. You may run code and see what it prints:\n"
                f"{example}\nWhen you are done, give your final solution in one ```python block.")

    def reset(self, row: dict) -> list[dict]:
        if not row.get("tests"):
            raise ValueError("code environment: the row needs a non-empty 'tests' column")
        return super().reset(row)

    def run_tool(self, arg: str) -> ToolRun:
        return run_python(arg, timeout_s=self.timeout_s, memory_mb=self.memory_mb, sandbox=self.sandbox)

    def score(self, final_text: str) -> StepResult:
        run = run_tests(extract_code(final_text), self.row["tests"], timeout_s=self.timeout_s,
                        memory_mb=self.memory_mb, entry_point=self.row.get("entry_point"), sandbox=self.sandbox)
        return StepResult.final(run.fraction, tests_passed=run.passed, tests_total=run.total,
                                timeout=run.timed_out)
