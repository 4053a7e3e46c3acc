"""The built-in task: arithmetic word problems generated in code, GSM8K-shaped.

Each row is {"question": ..., "answer": "<working>\n#### <N>"}, so every GSM8K tool path
(format detection, answer reward, exact-match eval) is exercised without any download.
Train and held-out splits come from disjoint seeds and are de-duplicated against each other.
"""
from __future__ import annotations

import json
import os
import random

NAMES = ["Ava", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Ida", "Jon", "Kim", "Leo", "Mia"]
ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps", "cards", "marbles"]

TEMPLATES_ADD = [
    "{n} has {a} {i}. {n} gets {b} more. How many {i} does {n} have now?",
    "There are {a} {i} in a box and {b} {i} on a shelf. How many {i} are there in all?",
    "{n} found {a} {i} on Monday and {b} {i} on Tuesday. How many {i} did {n} find?",
]
TEMPLATES_SUB = [
    "{n} has {a} {i}. {n} gives away {b}. How many {i} are left?",
    "A shop had {a} {i} and sold {b}. How many {i} does the shop have now?",
]


def make_problem(rng: random.Random, max_operand: int = 20) -> dict:
    n, i = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if rng.random() < 0.5:
        q = rng.choice(TEMPLATES_ADD).format(n=n, i=i, a=a, b=b)
        ans = a + b
        work = f"{a} + {b} = {ans}"
    else:
        a, b = max(a, b), min(a, b)
        q = rng.choice(TEMPLATES_SUB).format(n=n, i=i, a=a, b=b)
        ans = a - b
        work = f"{a} - {b} = {ans}"
    return {"question": q, "answer": f"{work}\n#### {ans}"}


def generate(n_train: int = 2000, n_eval: int = 200, seed: int = 0, max_operand: int = 20
             ) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows; no held-out question appears in train."""
    rng = random.Random(seed)
    held = []
    seen = set()
    while len(held) < n_eval:
        p = make_problem(rng, max_operand)
        if p["question"] not in seen:
            seen.add(p["question"])
            held.append(p)
    train = []
    while len(train) < n_train:
        p = make_problem(rng, max_operand)
        if p["question"] not in seen:
            train.append(p)
    return train, held


def write_jsonl(rows: list[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_task(out_dir: str, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
               max_operand: int = 20) -> dict[str, str]:
    """Write train.jsonl and eval.jsonl into out_dir; return their paths."""
    train, held = generate(n_train, n_eval, seed, max_operand)
    return {
        "train": write_jsonl(train, os.path.join(out_dir, "train.jsonl")),
        "eval": write_jsonl(held, os.path.join(out_dir, "eval.jsonl")),
    }


def tokenizer_corpus(rows: list[dict]) -> list[str]:
    """Texts to train the built-in tokenizer on (questions, answers, chat markers)."""
    out = []
    for r in rows:
        out.append(r["question"])
        out.append(r["answer"])
    out.append("system user assistant Solve the problem. Answer with #### and the number.")
    return out
