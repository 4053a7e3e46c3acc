"""Tool-use SFT conversations (actors/tool_traces.py, jobs/tool_traces.py): made from GSM8K's
calculator marks, the tool's output as the real tool prints it, and - replayed through the
calculator environment - the very conversation an RL episode with the same turns produces."""
from __future__ import annotations

import json

import pytest

from actors.env_tools import calculate, evaluate_arithmetic, run_python
from actors.environments import CalculatorEnv
from actors.multiturn import ChatTurns, EpisodeConfig, run_episodes
from actors.tool_traces import annotate, calculator_conversation, tool_output
from cluster.templates import IGNORE_INDEX, ChatEncoder
from kernels.engine import Completion, Engine
from kernels.tokenizer import load_tokenizer
from rewards.code_isolation import isolation_error

SANDBOX = "isolated" if isolation_error() is None else "unsafe"
NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def call(expr: str) -> str:
    return '<tool_call>{"name": "calculator", "arguments": {"expression": "%s"}}</tool_call>' % expr


def test_gsm8k_marks_become_calls_and_tool_messages():
    msgs = calculator_conversation("How many clips?", NATALIA, "SYS")
    assert msgs == [
        {"role": "system", "content": "SYS"}, {"role": "user", "content": "How many clips?"},
        {"role": "assistant", "content": "Natalia sold 48/2 = " + call("48/2")},
        {"role": "tool", "content": "24.0\n"},
        {"role": "assistant", "content": "24 clips in May.\nNatalia sold 48+24 = " + call("48+24")},
        {"role": "tool", "content": "72\n"},
        {"role": "assistant", "content": "72 clips altogether in April and May.\n#### 72"}]


def test_max_calls_unsafe_and_unusable_marks_stay_text():
    text = "a <<1+1=2>>2 b <<2**100=big>>big c <<$3=3>>3 d <<2*3=6>>6 e <<6-1=5>>5\n#### 5"
    msgs = calculator_conversation("q", text, "S", max_calls=2)
    tools = [m["content"] for m in msgs if m["role"] == "tool"]
    assert tools == ["2\n", "6\n"]  # ** and $ are not computed here; the third usable mark is past max_calls
    assert msgs[-1]["content"] == "6 e 5\n#### 5" and "<<" not in json.dumps(msgs)
    assert msgs[4]["content"] == "2 b big c 3 d " + call("2*3")


def test_plain_solutions_are_annotated_and_rows_without_a_calculation_are_left_out():
    assert annotate("10 - 5 = 5\n#### 5") == "10 - 5 = <<10 - 5=5>>5\n#### 5"
    assert calculator_conversation("q", "10 - 5 = 5\n#### 5", "S")[2]["content"] == "10 - 5 = " + call("10 - 5")
    assert calculator_conversation("q", "It is 5.\n#### 5", "S") is None       # nothing to compute
    assert calculator_conversation("q", "10 - 5 = <<10-5=5>>5", "S") is None   # no #### answer line


@pytest.mark.parametrize("expr", ["48/2", "48+24", "3*5-2", "7/3", "(2+3)*4", "max(2, 9) - abs(-1)", "1/0",
                                  "log(0)", "exp(1000)", "round(2.5)", "7 // 2", "1e308*10", "9" * 150 + "*" + "9" * 150])
def test_in_process_arithmetic_prints_what_the_sandboxed_python_prints(expr):
    """calculate() computes `**`-free arithmetic in-process: output and errors as the sandbox's run."""
    sandboxed = run_python(f"from math import sqrt, floor, ceil, log, exp, pi, e\nprint(({expr}))",
                           max_output_chars=200, sandbox=SANDBOX)
    assert evaluate_arithmetic(expr) == sandboxed == calculate(expr, sandbox=SANDBOX)
    assert tool_output(expr) == (sandboxed.output if sandboxed.error is None else None)


def test_exponentiation_goes_to_the_sandbox():
    assert evaluate_arithmetic("2**10") is None and calculate("2**10", sandbox=SANDBOX).output == "1024\n"


def test_no_power_and_no_code_evaluated_in_process():
    assert tool_output("9**9**9") is None and tool_output("__import__('os')") is None and tool_output("1/0") is None


class Replay(Engine):
    """Answers each turn with the trace's next assistant text (tokenised; a stop string ends a call)."""

    def __init__(self, tok, turns):
        self.tok, self.turns, self.i = tok, turns, 0

    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=64, stop=None, seed=0,
                 ignore_eos=False):
        text = self.turns[self.i]
        self.i += 1
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if not text.endswith("</tool_call>"):
            ids = ids + [self.tok.convert_tokens_to_ids("<|im_end|>")]
        return [[Completion(text, ids, "stop", [-0.1] * len(ids))] for _ in prompts]


def test_a_trace_replayed_in_the_environment_is_the_same_conversation(tiny_tokenizer_dir):
    """SFT data and RL episodes share one layout: the environment's system prompt, its tool's
    observations, its final score (reward 1 for the right answer)."""
    tok = load_tokenizer(tiny_tokenizer_dir)
    env = {"name": "calculator", "kwargs": {"sandbox": SANDBOX, "max_turns": 4}}
    row = {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many?",
           "answer": NATALIA}
    trace = calculator_conversation(row["question"], row["answer"], CalculatorEnv(sandbox=SANDBOX).system_prompt)
    engine = Replay(tok, [m["content"] for m in trace if m["role"] == "assistant"])
    (traj,), = run_episodes(engine, ChatTurns(tok), env, [row], EpisodeConfig(n=1, max_tokens=200))
    assert traj.messages == trace and traj.reward == 1.0 and traj.tool_calls == 2 and traj.tool_errors == 0


def test_sft_trains_on_the_assistant_turns_only(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    msgs = calculator_conversation("q?", NATALIA, "S")
    (ids, labels), = ChatEncoder(tok, tok.chat_template).encode([msgs])
    trained = tok.decode([int(t) for t, y in zip(ids, labels) if y != IGNORE_INDEX])
    assert "24.0" not in trained and "#### 72" in trained and trained.count("<tool_call>") == 2


def test_tool_traces_command(tmp_path, capsys):
    from jobs.tool_traces import main

    out = tmp_path / "traces.jsonl"
    assert main(["builtin", str(out), "--builtin-train-size", "50", "--eval-out", str(tmp_path / "ev.jsonl")]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert len(rows) == 50 and all([m["role"] for m in r["messages"]][:3] == ["system", "user", "assistant"]
                                   for r in rows)
    assert rows[0]["messages"][0]["content"] == CalculatorEnv(sandbox=SANDBOX).system_prompt
    printed = capsys.readouterr().out
    assert f"[tool-traces] {out}: 50 of 50 rows written, 50 tool calls" in printed and "ev.jsonl: 200 of 200" in printed
    src = tmp_path / "gsm.jsonl"
    src.write_text(json.dumps({"question": "q", "answer": NATALIA}) + "\n"
                   + json.dumps({"question": "q", "answer": "no numbers\n#### 1"}) + "\n")
    assert main([str(src), str(out)]) == 0
    assert "1 of 2 rows written, 2 tool calls" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(src), str(out), "--eval-out", str(tmp_path / "x.jsonl")])


def test_builtin_templates_render_tool_messages(tiny_tokenizer_dir):
    """No built-in SFT template drops a tool message (the model would learn answers it never saw)."""
    from cluster.templates import BUILTIN_TEMPLATES

    tok = load_tokenizer(tiny_tokenizer_dir)
    msgs = calculator_conversation("q?", NATALIA, "S")
    for name, template in BUILTIN_TEMPLATES.items():
        assert "24.0" in ChatEncoder(tok, template).render(msgs), name
