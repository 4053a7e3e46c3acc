"""The tools of the built-in environments: the tool-call format and sandboxed Python.

    calls, error = parse_tool_call(text)          # the first <tool_call>{...}</tool_call> of a turn
    run = run_python("print(6 * 7)", timeout_s=2) # ToolRun(output="42\\n", error=None, timed_out=False)
    run = calculate("48 / 2 + 48")                # arithmetic only, checked here, evaluated in the sandbox

Tool-call format (Hermes style, what Qwen2.5-style chat templates write for tools): the model
writes, in its own text,

    <tool_call>{"name": "calculator", "arguments": {"expression": "48 / 2 + 48"}}</tool_call>

`arguments` is a JSON object (a JSON string holding an object is accepted too). One call per
turn: the environments ask the engine to stop at `</tool_call>`, and text after the first call
is ignored. A call that is not valid JSON, has no string `name`, or whose arguments are not an
object is malformed (the environments end the episode with reward 0 and count it).

Python runs through the code reward's child-process harness (rewards/code.py run_tests:
bubblewrap isolation by default, `sandbox="unsafe"` for a plain child process, logged as
unsafe; time, memory and file-size limits either way). The harness reports only pass/fail lines
with the exception's message (200 characters, one line), so the tool's printed output comes
back JSON-encoded (no newlines), cut into chunks, one raised exception per "test".
"""
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass

from kernels.tool_format import TOOL_CLOSE, TOOL_OPEN, tool_call_blocks
from kernels.tool_format import format_tool_call as _format
from rewards.code import run_tests

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = TOOL_OPEN, TOOL_CLOSE
_CHUNK = 180  # characters of the report per harness line (the harness keeps 200 of a message)
_REPORT = "ToolReport"
_MAX_ERROR = 300


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolRun:
    """What one sandboxed run printed (cut to the output limit), the exception it ended on
    ("ZeroDivisionError: division by zero") and whether the wall-clock limit killed it."""

    output: str = ""
    error: str | None = None
    timed_out: bool = False


def has_tool_call(text: str) -> bool:
    return TOOL_CALL_OPEN in text


def parse_tool_call(text: str) -> tuple[ToolCall | None, str | None]:
    """(the first tool call of `text`, None) or (None, why it is malformed); (None, None) when
    the text holds no `<tool_call>` at all. A missing `</tool_call>` at the end of the text is
    accepted (a completion cut by the stop string or the token limit)."""
    blocks = tool_call_blocks(text)
    m = blocks[0] if blocks else None
    if m is None:
        return None, None
    body = m.group(1).strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return None, f"tool call is not valid JSON ({e.msg} at character {e.pos})"
    if not isinstance(obj, dict):
        return None, f"tool call must be a JSON object, got {type(obj).__name__}"
    name, args = obj.get("name"), obj.get("arguments", {})
    if not isinstance(name, str) or not name:
        return None, "tool call has no string 'name'"
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None, "tool call 'arguments' is a string that is not a JSON object"
    if not isinstance(args, dict):
        return None, f"tool call 'arguments' must be an object, got {type(args).__name__}"
    return ToolCall(name, args), None


def format_tool_call(name: str, arguments: dict) -> str:
    """The text of one call, as the model should write it (prompts and tests)."""
    return _format(name, arguments)


def _wrapped(code: str, max_output_chars: int) -> tuple[str, list[str]]:
    """(harness code, harness tests): the code runs with stdout captured, every exception caught;
    each test raises one chunk of the JSON report {"out": ..., "err": ...}."""
    prelude = (
        "import io as _io, contextlib as _cl, json as _json\n"
        f"class {_REPORT}(Exception):\n    pass\n"
        "_buf, _err = _io.StringIO(), None\n"
        "try:\n"
        "    with _cl.redirect_stdout(_buf):\n"
        f"        exec(compile({code!r}, '<tool>', 'exec'), {{'__name__': '__main__'}})\n"
        "except BaseException as _e:\n"
        "    _err = (type(_e).__name__ + ': ' + str(_e))[:" + str(_MAX_ERROR) + "]\n"
        f"_report = _json.dumps({{'out': _buf.getvalue()[:{int(max_output_chars)}], 'err': _err}})\n"
    )
    # ensure_ascii JSON: at most 6 characters per output character, plus the error and the keys
    n_chunks = -(-(6 * int(max_output_chars) + 6 * _MAX_ERROR + 32) // _CHUNK)
    tests = [f"raise {_REPORT}(_report[{i * _CHUNK}:{(i + 1) * _CHUNK}])" for i in range(n_chunks)]
    return prelude, tests


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 1000,
               sandbox: str = "isolated") -> ToolRun:
    """Run `code` in the code reward's sandbox; what it printed and the exception it raised."""
    prelude, tests = _wrapped(code, max_output_chars)
    res = run_tests(prelude, tests, timeout_s=timeout_s, memory_mb=memory_mb, sandbox=sandbox)
    if res.timed_out:
        return ToolRun(timed_out=True, error=f"timed out after {timeout_s:g} s")
    chunks: dict[int, str] = {}
    marker = f": {_REPORT}: "
    for f in res.failures:  # "test <i>: ToolReport: <chunk>"
        head, sep, chunk = f.partition(marker)
        if sep and head.startswith("test ") and head[5:].isdigit():
            chunks[int(head[5:])] = chunk
    try:
        report = json.loads("".join(chunks[i] for i in sorted(chunks)))
    except (json.JSONDecodeError, ValueError):
        # the harness itself failed (out of memory before the report, killed, ...)
        why = next((f for f in res.failures if marker not in f), "no output")
        return ToolRun(error=f"the tool process failed: {why}"[:_MAX_ERROR])
    return ToolRun(output=report.get("out") or "", error=report.get("err"))


# -- the calculator: arithmetic only -------------------------------------------------------

_FUNCS = {"abs", "round", "min", "max", "int", "float", "sqrt", "floor", "ceil", "log", "exp"}
_CONSTS = {"pi", "e"}
_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Call, ast.Name, ast.Load, ast.Tuple,
          ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd)


def check_arithmetic(expr: str) -> str | None:
    """None when `expr` is a Python arithmetic expression (numbers, + - * / // % **, parentheses,
    and abs round min max int float sqrt floor ceil log exp pi e); else why not."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        return f"SyntaxError: {e.msg}"
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            return f"only arithmetic is allowed, not {type(node).__name__}"
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool) or
                                               not isinstance(node.value, (int, float))):
            return f"only numbers are allowed, not {node.value!r}"
        if isinstance(node, ast.Name) and node.id not in _FUNCS | _CONSTS:
            return f"unknown name {node.id!r}"
        if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS
                                           or node.keywords):
            return "only calls of abs round min max int float sqrt floor ceil log exp are allowed"
    return None


_MATH = {"sqrt": math.sqrt, "floor": math.floor, "ceil": math.ceil, "log": math.log, "exp": math.exp,
         "pi": math.pi, "e": math.e, "abs": abs, "round": round, "min": min, "max": max, "int": int, "float": float}


def evaluate_arithmetic(expr: str) -> ToolRun | None:
    """The value of an expression that check_arithmetic accepts and that has no `**`, computed in
    this process (as Python prints it, newline included), or its error; None when it holds `**`.

    Without exponentiation the cost is bounded by the expression's length (numbers, + - * / // %,
    a few math functions: no loops, no names beyond those, no attribute access), so no sandbox is
    needed; `**` can ask for unbounded work (`9**9**9`) and goes to the sandbox's time limit."""
    if "**" in expr or check_arithmetic(expr) is not None:
        return None
    try:
        value = eval(compile(expr.strip(), "<calculator>", "eval"), {"__builtins__": {}}, dict(_MATH))  # noqa: S307
    except Exception as e:  # noqa: BLE001 - as the sandboxed run reports it: the exception's name and text
        return ToolRun(error=f"{type(e).__name__}: {e}")
    text = f"{value}\n"
    return ToolRun(output=text[:200])


def calculate(expr: str, *, timeout_s: float = 5.0, memory_mb: int = 512, sandbox: str = "isolated") -> ToolRun:
    """Evaluate an arithmetic expression; the output is the value as Python prints it. Plain
    arithmetic runs here (evaluate_arithmetic: cheap, bounded); an expression with `**` runs in
    the sandbox, where `9**9**9` meets the time limit."""
    why = check_arithmetic(expr)
    if why is not None:
        return ToolRun(error=why)
    local = evaluate_arithmetic(expr)
    if local is not None:
        return local
    code = f"from math import sqrt, floor, ceil, log, exp, pi, e\nprint(({expr.strip()}))"
    return run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_chars=200, sandbox=sandbox)


__all__ = ["TOOL_CALL_CLOSE", "TOOL_CALL_OPEN", "ToolCall", "ToolRun", "calculate", "check_arithmetic",
           "evaluate_arithmetic",
           "format_tool_call", "has_tool_call", "parse_tool_call", "run_python"]
