"""Write tool-use SFT conversations for the calculator environment (actors/tool_traces.py).

    posttrain tool-traces builtin runs/calc-traces.jsonl                  # the built-in task's train split
    posttrain tool-traces data/gsm8k/train.jsonl runs/calc-traces.jsonl   # GSM8K's <<a*b=c>> marks
    posttrain tool-traces SOURCE OUT.jsonl --max-calls 2 --eval-out runs/calc-eval.jsonl

SOURCE: "builtin" or rows with `question` and `answer` columns in any form the readers take
(files, folders, globs, URIs, dataset names; --split / --subset for datasets). OUT: a .jsonl file
of {"messages": [...]} rows, which SFT reads as they are (data.path=OUT). The system prompt is the
calculator environment's (or --system-prompt), so the warm-up and `env: {name: calculator}` in
GRPO show the model the same conversation. A row without a usable calculation or a `#### answer`
line is left out and counted; the counts are printed. --eval-out writes the built-in task's
held-out split as conversations too (for data.eval_path), only with SOURCE builtin.

Then, for example:
    posttrain sft jobs/configs/tiny-sft.yaml data.path=runs/calc-traces.jsonl output_dir=runs/calc-sft
    posttrain grpo jobs/configs/tiny-grpo.yaml model.path=runs/calc-sft/merged env.name=calculator
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(prog="posttrain tool-traces", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help='"builtin" or question/answer rows (files, folders, URIs, dataset names)')
    p.add_argument("out", help="the .jsonl file to write")
    p.add_argument("--max-calls", type=int, default=3,
                   help="tool calls per conversation at most (default 3: fits the environment's max_turns 4)")
    p.add_argument("--system-prompt", default=None, help="default: the calculator environment's")
    p.add_argument("--split", default="", help="a dataset's split (datasets only)")
    p.add_argument("--subset", default="", help="a dataset's subset (datasets only)")
    p.add_argument("--builtin-train-size", type=int, default=2000, help="rows of the built-in train split")
    p.add_argument("--eval-out", default="", help="also write the built-in held-out split (SOURCE builtin)")
    a = p.parse_args(argv)
    if a.max_calls < 1:
        p.error(f"--max-calls: expected >= 1, got {a.max_calls}")
    if a.eval_out and a.source != "builtin":
        p.error("--eval-out: only with SOURCE builtin (other sources: run the command on their eval split)")
    if not a.out.endswith(".jsonl"):
        p.error(f"out: expected a .jsonl path, got {a.out!r}")
    return a


def read_source(a) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows: builtin only)."""
    if a.source == "builtin":
        from cluster.builtin_task import generate

        return generate(a.builtin_train_size, 200, seed=0)  # the split SFT and GRPO use
    from cluster.readers import read_rows

    return read_rows(a.source, field="source", on_bad_row="fail", subset=a.subset, split=a.split), []


def write(rows: list[dict], out: str, system_prompt: str, max_calls: int) -> dict:
    from actors.tool_traces import calculator_conversation

    counts = {"rows": len(rows), "written": 0, "no_calculation": 0, "no_question_or_answer": 0, "calls": 0}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".partial"
    with open(tmp, "w") as f:
        for r in rows:
            q, ans = r.get("question"), r.get("answer")
            if not isinstance(q, str) or not isinstance(ans, str):
                counts["no_question_or_answer"] += 1
                continue
            msgs = calculator_conversation(q, ans, system_prompt, max_calls=max_calls)
            if msgs is None:
                counts["no_calculation"] += 1
                continue
            counts["written"] += 1
            counts["calls"] += sum(m["role"] == "tool" for m in msgs)
            f.write(json.dumps({"messages": msgs, "answer": ans}) + "\n")
    os.replace(tmp, out)
    return counts


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from actors.environments import CalculatorEnv

    system = a.system_prompt if a.system_prompt is not None else CalculatorEnv.default_system_prompt(None)
    try:
        train, held = read_source(a)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for rows, out in ((train, a.out), (held, a.eval_out)):
        if not out:
            continue
        c = write(rows, out, system, a.max_calls)
        print(f"[tool-traces] {out}: {c['written']} of {c['rows']} rows written, {c['calls']} tool calls "
              f"({c['calls'] / max(c['written'], 1):.2f} per conversation); left out: {c['no_calculation']} "
              f"without a usable calculation or '#### answer', {c['no_question_or_answer']} without "
              f"question/answer strings", flush=True)
        if c["written"] == 0:
            print(f"error: {a.source}: no row gave a conversation", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
