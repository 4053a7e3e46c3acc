"""Environments of multi-turn RL (actors/environments.py, actors/env_tools.py): the API, the
registry, the tool-call format and the built-ins' steps.

Tools run in the code reward's sandbox: isolated (bubblewrap) where it works here, else in
`sandbox="unsafe"` mode, like tests/rewards/test_reward_code.py.
"""
from __future__ import annotations

import pytest

from actors import environments as envs
from actors.env_tools import calculate, format_tool_call, parse_tool_call, run_python
from actors.environments import (CalculatorEnv, CodeEnv, EnvSpec, Environment, StepResult, UnknownEnvironmentError,
                                 make_env, register_env, resolve_env)
from rewards.code_isolation import isolation_error

SANDBOX = "isolated" if isolation_error() is None else "unsafe"
ROW = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
       "answer": "Natalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72"}


def calc(**kw) -> CalculatorEnv:
    env = make_env({"name": "calculator", "kwargs": {"sandbox": SANDBOX, **kw}})
    env.reset(ROW)
    env.turn = 1
    return env


class EchoEnv(Environment):
    """Addressed as `<this module>:EchoEnv`: answers every turn with a user message."""

    def __init__(self, max_turns: int = 3, word: str = "ok"):
        super().__init__(max_turns)
        self.word = word

    def reset(self, row):
        return [{"role": "user", "content": row["question"]}]

    def step(self, assistant_text):
        return StepResult.observe(f"{self.word} {self.turn}", role="user")


# -- the tool-call format ----------------------------------------------------------------

def test_parse_tool_call_format():
    text = "Half of 48 first. " + format_tool_call("calculator", {"expression": "48 / 2"}) + " ignored"
    call, err = parse_tool_call(text)
    assert err is None and call.name == "calculator" and call.arguments == {"expression": "48 / 2"}
    # cut by the stop string: no closing tag; arguments as a JSON string (OpenAI style)
    call, err = parse_tool_call('<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"1\\"}"}')
    assert err is None and call.arguments == {"code": "1"}
    assert parse_tool_call("#### 72") == (None, None)
    for bad, why in [("<tool_call>{name: calculator}</tool_call>", "not valid JSON"),
                     ("<tool_call>[1, 2]</tool_call>", "JSON object"),
                     ('<tool_call>{"arguments": {}}</tool_call>', "no string 'name'"),
                     ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', "must be an object")]:
        call, err = parse_tool_call(bad)
        assert call is None and why in err


def test_calculator_tool_runs_arithmetic_in_the_sandbox():
    assert calculate("48 / 2 + 48", sandbox=SANDBOX).output.strip() == "72.0"
    assert calculate("sqrt(16) + 2 ** 3", sandbox=SANDBOX).output.strip() == "12.0"
    assert calculate("1 / 0", sandbox=SANDBOX).error == "ZeroDivisionError: division by zero"
    # not arithmetic: refused before anything runs
    assert "only calls of" in calculate("__import__('os').getcwd()", sandbox=SANDBOX).error
    assert "unknown name" in calculate("x + 1", sandbox=SANDBOX).error


def test_python_tool_output_errors_and_limits():
    run = run_python('for i in range(3):\n    print("line", i)\nraise KeyError("k")', sandbox=SANDBOX)
    assert run.output == "line 0\nline 1\nline 2\n" and run.error == "KeyError: 'k'" and not run.timed_out
    run = run_python('print("\u00e9" * 5000)', max_output_chars=300, sandbox=SANDBOX)
    assert run.output == "\u00e9" * 300 and run.error is None  # cut, multi-byte and JSON escapes intact
    assert run_python("x = bytearray(2 ** 31)", memory_mb=256, sandbox=SANDBOX).error.startswith("MemoryError")


# -- the API --------------------------------------------------------------------------------

def test_step_result_validation():
    assert StepResult.final(1).reward == 1.0 and StepResult.final(1).done
    obs = StepResult.observe("72", tool="calculator")
    assert obs.observation == {"role": "tool", "content": "72"} and not obs.done and obs.info["tool"] == "calculator"
    with pytest.raises(ValueError, match="finite float reward"):
        StepResult(done=True)
    with pytest.raises(ValueError, match="needs an observation"):
        StepResult(observation={"role": "assistant", "content": "x"})
    with pytest.raises(ValueError, match="only a final step"):
        StepResult(observation={"role": "user", "content": "x"}, reward=1.0)


def test_registry_module_class_and_errors(monkeypatch):
    monkeypatch.setattr(envs, "_REGISTRY", dict(envs._REGISTRY))  # registrations here are undone
    assert resolve_env("calculator") is CalculatorEnv and resolve_env("code") is CodeEnv
    register_env("test_echo")(EchoEnv)
    assert isinstance(make_env("test_echo"), EchoEnv)
    with pytest.raises(ValueError, match="already taken"):
        register_env("test_echo")(CalculatorEnv)
    # module:Class, with kwargs from the spec
    env = make_env({"name": f"{__name__}:EchoEnv", "kwargs": {"max_turns": 2, "word": "seen"}})
    assert isinstance(env, EchoEnv) and env.max_turns == 2 and env.word == "seen"
    assert EnvSpec.from_config(f"{__name__}:EchoEnv") == EnvSpec(f"{__name__}:EchoEnv", {})
    with pytest.raises(UnknownEnvironmentError, match=r"unknown environment 'calculater'; registered names: "
                                                       r"calculator, code.*'module:Class'"):
        make_env("calculater")
    with pytest.raises(UnknownEnvironmentError, match="cannot import module 'no_such_mod'"):
        make_env("no_such_mod:Env")
    with pytest.raises(UnknownEnvironmentError, match="has no attribute 'Nope'"):
        make_env(f"{__name__}:Nope")
    with pytest.raises(UnknownEnvironmentError, match="not a class with reset"):
        make_env(f"{__name__}:calc")
    with pytest.raises(ValueError, match=r"environment 'calculator': bad kwargs \['max_turn'\]"):
        make_env({"name": "calculator", "kwargs": {"max_turn": 3}})
    with pytest.raises(ValueError, match="unknown keys"):
        EnvSpec.from_config({"name": "calculator", "max_turns": 3})
    with pytest.raises(ValueError, match="max_turns must be an integer >= 1"):
        make_env("calculator", max_turns=0, sandbox=SANDBOX)


# -- built-ins ------------------------------------------------------------------------------

def test_calculator_reset_and_steps():
    env = make_env("calculator", sandbox=SANDBOX)
    msgs = env.reset(ROW)
    assert [m["role"] for m in msgs] == ["system", "user"] and msgs[1]["content"] == ROW["question"]
    assert format_tool_call("calculator", {"expression": "48 / 2 + 48"}) in msgs[0]["content"]
    assert env.stop == ("</tool_call>",)
    env.turn = 1
    res = env.step("May is half. " + format_tool_call("calculator", {"expression": "48 / 2 + 48"}))
    assert not res.done and res.observation == {"role": "tool", "content": "72.0\n"}
    assert res.info == {"tool": "calculator", "tool_error": False, "timeout": False}
    assert env.step("So she sold 72 clips.\n#### 72") == StepResult.final(1.0, correct=True)
    assert env.step("#### 71").reward == 0.0


def test_calculator_tool_error_and_timeout():
    env = calc(timeout_s=0.5)
    res = env.step(format_tool_call("calculator", {"expression": "48 / 0"}))
    assert res.observation["content"] == "Error: ZeroDivisionError: division by zero"
    assert res.info["tool_error"] and not res.info["timeout"] and not res.done
    res = env.step(format_tool_call("calculator", {"expression": "9 ** 9 ** 9"}))  # runs past the limit
    assert res.observation["content"] == "Error: timed out after 0.5 s"
    assert res.info["timeout"] and not res.info["tool_error"] and not res.done


def test_malformed_tool_call_ends_with_reward_zero():
    env = calc()
    for text in ["<tool_call>{'name': 'calculator'}</tool_call> #### 72",                 # not JSON
                 format_tool_call("search", {"query": "clips"}) + " #### 72",             # unknown tool
                 format_tool_call("calculator", {"expr": "1 + 1"})]:                      # wrong argument
        res = env.step(text)
        assert res.done and res.reward == 0.0 and res.info["malformed"], text


def test_tool_call_on_the_last_turn_is_not_run():
    env = calc(max_turns=2)
    env.turn = 2
    res = env.step(format_tool_call("calculator", {"expression": "9 ** 9 ** 9"}))  # would time out if run
    assert res == StepResult.final(0.0, tool="calculator", max_turns=True)


def test_code_env_python_tool_and_pass_rate():
    env = make_env({"name": "code", "kwargs": {"sandbox": SANDBOX, "timeout_s": 5}})
    row = {"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 5"]}
    msgs = env.reset(row)
    assert msgs[-1] == {"role": "user", "content": "Write add(a, b)."} and "```python" in msgs[0]["content"]
    env.turn = 1
    res = env.step(format_tool_call("python", {"code": "def add(a, b):\n    return a + b\nprint(add(1, 2))"}))
    assert res.observation == {"role": "tool", "content": "3\n"} and res.info["tool"] == "python"
    res = env.step("Done.\n```python\ndef add(a, b):\n    return a + b\n```")
    assert res.done and res.reward == 0.5 and res.info["tests_passed"] == 1 and res.info["tests_total"] == 2
    with pytest.raises(ValueError, match="'tests'"):
        env.reset({"prompt": "no tests"})


def test_without_isolation_the_environment_refuses_unless_unsafe(tmp_path, monkeypatch):
    from rewards.code_isolation import BWRAP_ENV, SandboxUnavailable

    monkeypatch.setenv(BWRAP_ENV, str(tmp_path / "no-such-bwrap"))
    with pytest.raises(SandboxUnavailable, match="environment CalculatorEnv: .*not an executable file"):
        make_env("calculator")
    assert make_env("code", sandbox="unsafe").sandbox == "unsafe"
