"""Tool-use conversations for supervised warm-up before multi-turn RL (docs/agentic.md).

A small instruct model does not call a tool it has only been told about (SmolLM2-135M-Instruct
made 0 calls in 32 calculator episodes, greedy and sampled). The usual recipe is to first teach
the call format by SFT on worked conversations, then let RL improve when and how to call. This
module writes those conversations for the `calculator` environment from GSM8K-style solutions:

    Natalia sold 48/2 = <<48/2=24>>24 clips in May. ... #### 72

Each `<<expression=result>>` annotation (GSM8K's own calculator marks) becomes a tool call: the
assistant's turn ends with the call, a `tool` message holds the value as the environment's tool
prints it, and the next assistant turn continues the solution after the mark. Solutions without
marks (the built-in task's `10 - 5 = 5`) get them where a line holds `arithmetic = number`.

    calculator_conversation(question, answer, system_prompt, max_calls=3) -> messages | None

The system prompt and the observation text are the environment's own (CalculatorEnv), so SFT
and RL see the same conversation layout. Values come from the tool's own in-process path
(env_tools.evaluate_arithmetic: plain arithmetic without `**`); a mark it does not compute stays
as text. None when a solution has no usable mark or no `#### answer`.
"""
from __future__ import annotations

import re

from actors.env_tools import evaluate_arithmetic, format_tool_call

_MARK = re.compile(r"<<([^<>=]+)=([^<>]*)>>")
# "10 - 5 = 5" or "48 / 2 = 24.0": an arithmetic left side (digits, operators, parentheses)
_PLAIN = re.compile(r"(?<![\w.])(\d[\d.\s+\-*/()]*[+\-*/][\d.\s+\-*/()]*\d\)?)\s*=\s*(-?\d[\d,]*(?:\.\d+)?)")


def tool_output(expr: str) -> str | None:
    """What the calculator tool prints for `expr` (Python's print of the value, newline included),
    or None when it holds `**` (not computed here), is not arithmetic or does not evaluate."""
    run = evaluate_arithmetic(expr)
    return run.output if run is not None and run.error is None else None


def annotate(solution: str) -> str:
    """`solution` with `<<expr=result>>` marks added after each `expr = result` of plain arithmetic
    (lines that already hold marks are left as they are)."""
    out = []
    for line in solution.split("\n"):
        if "<<" in line or line.startswith("####"):
            out.append(line)
            continue
        out.append(_PLAIN.sub(lambda m: f"{m.group(1)} = <<{m.group(1).strip()}={m.group(2)}>>{m.group(2)}", line))
    return "\n".join(out)


def calculator_conversation(question: str, answer: str, system_prompt: str, max_calls: int = 3,
                            tool_name: str = "calculator", argument: str = "expression") -> list[dict] | None:
    """system, user, then assistant turns that end in a tool call, each followed by the tool's
    output, and a last assistant turn ending with `#### <answer>` (see the module docstring)."""
    if "####" not in answer:
        return None
    text = answer if "<<" in answer else annotate(answer)
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    pos, calls, pending = 0, 0, ""
    for m in _MARK.finditer(text):
        expr = m.group(1)
        output = tool_output(expr) if calls < max_calls else None
        if output is None:  # stays text: the mark is dropped, the written result follows it
            pending += text[pos:m.start()]
            pos = m.end()
            continue
        before = (pending + text[pos:m.start()]).rstrip(" ")
        call = format_tool_call(tool_name, {argument: expr.strip()})
        messages.append({"role": "assistant", "content": (before + " " if before else "") + call})
        messages.append({"role": "tool", "content": output})
        pending, pos, calls = "", m.end(), calls + 1
    if calls == 0:
        return None
    final = (pending + text[pos:]).strip()
    final = _MARK.sub(lambda m: "", final)  # marks past max_calls
    if not final:
        return None
    messages.append({"role": "assistant", "content": final})
    return messages
