"""Exact-match evaluation on math word problems: greedy or self-consistency, with a 95% interval.

    rows = load_rows("builtin")                    # or files, a URI, a dataset name (what data.path takes)
    res = evaluate(model, tokenizer, rows, EvalConfig(max_problems=200, max_new_tokens=32))
    res["accuracy"], res["ci95"], res["per_problem"][0]

Data: GSM8K rows {"question", "answer": "...#### N"} or MATH rows {"problem", "solution" with
\\boxed{...}} (or an explicit "answer"); `format: auto` tells them apart from the keys.
Prompt: the question as the user message (after an optional system message), rendered with the
tokenizer's chat template and add_generation_prompt - the same rendering SFT trains on.
Scoring: rewards.math.extract_answer on each completion, rewards.math.answers_equal against the
gold answer (rewards.math.extract_gold of the answer/solution). With k > 1 the answers of the k
samples vote (equal answers pool their votes; ties go to the answer seen first) and the voted
answer is scored: self-consistency (Wang et al., 2022).

Backends share one interface, `sample(prompts, n, temperature, max_new_tokens, seed) -> [[text]]`:
`hf` runs kernels.generation on a model object or a model folder; `vllm` imports vLLM lazily and
needs a model folder (a merged export). Any object with that `sample` method can be passed instead
of a model (tests use fixed texts).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from rewards.math import answers_equal, extract_answer, extract_gold

FORMATS = ("auto", "gsm8k", "math")
BACKENDS = ("hf", "vllm")
CI_METHODS = ("wilson", "bootstrap")
Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate.

    data: "builtin" (the built-in task's held-out split), or what data.path accepts (cluster/readers.py):
      .jsonl/.json/.parquet/.txt files, folders, globs, URIs (s3://, gs://, hf://, file://), a
      datasets.save_to_disk folder, or a dataset name for datasets.load_dataset (`org/name`; offline
      from the Hugging Face cache).
    split / subset: a dataset's split ("" = its first of validation/test/eval/valid, or its only one)
      and subset (its config name; "" = its only one); for datasets only, not files or "builtin".
    format: auto | gsm8k | math (how to read question and gold answer from a row).
    backend: hf (transformers generate) | vllm (GPU; needs a model folder).
    k: samples per problem; 1 = one completion (greedy at temperature 0), > 1 = majority vote.
    temperature: sampling temperature; None = 0 for k = 1 and 0.7 for k > 1.
    top_p: nucleus sampling mass (sampling only).
    max_new_tokens: completion length limit.
    max_problems: evaluate the first N rows (0 = all).
    system_prompt: an optional system message before the question.
    stop: extra stop strings (kernels.generation.stop_token_ids always stop: the tokenizer's eos,
      the generation config's eos ids, the chat template's end-of-turn token).
    batch_size: prompts per generate call (hf backend).
    ci: wilson | bootstrap (95% interval of the accuracy).
    bootstrap_samples: resamples for ci=bootstrap.
    seed: sampling and bootstrap seed.
    """

    data: str = "builtin"
    split: str = ""
    subset: str = ""
    format: Literal["auto", "gsm8k", "math"] = "auto"
    backend: Literal["hf", "vllm"] = "hf"
    k: int = 1
    temperature: float | None = None
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_problems: int = 0
    system_prompt: str = ""
    stop: list[str] = field(default_factory=list)
    batch_size: int = 32
    ci: Literal["wilson", "bootstrap"] = "wilson"
    bootstrap_samples: int = 2000
    seed: int = 0

    def __post_init__(self):
        check_eval_source(self.data, self.split, self.subset)
        if self.format not in FORMATS:
            raise ValueError(f"eval.format: {self.format!r} is not accepted; expected one of {', '.join(FORMATS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"eval.backend: {self.backend!r} is not accepted; expected one of {', '.join(BACKENDS)}")
        if self.k < 1:
            raise ValueError(f"eval.k: must be >= 1 (1 = greedy, > 1 = self-consistency), got {self.k}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"eval.temperature: must be >= 0, got {self.temperature}")
        if self.k > 1 and self.temperature == 0:
            raise ValueError("eval.temperature: self-consistency (k > 1) needs temperature > 0 "
                             "(k greedy samples are identical)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"eval.top_p: must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.max_problems < 0:
            raise ValueError(f"eval.max_problems: must be >= 0 (0 = all), got {self.max_problems}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size: must be >= 1, got {self.batch_size}")
        if self.ci not in CI_METHODS:
            raise ValueError(f"eval.ci: {self.ci!r} is not accepted; expected one of {', '.join(CI_METHODS)}")
        if self.bootstrap_samples < 100:
            raise ValueError(f"eval.bootstrap_samples: must be >= 100, got {self.bootstrap_samples}")

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return float(self.temperature)
        return 0.0 if self.k == 1 else 0.7


# ----------------------------------------------------------------------------- data

def check_eval_source(data, split, subset) -> None:
    """eval.data / eval.split / eval.subset as values (shared by EvalConfig and the GRPO job's eval
    section): a non-empty data string, string split and subset, neither given with 'builtin'."""
    if not isinstance(data, str) or not data.strip():
        raise ValueError("eval.data: empty; expected 'builtin', data files, a URI or a dataset name")
    if not isinstance(split, str):
        raise ValueError(f"eval.split: expected a split name of the dataset (e.g. test) or '', got {split!r}")
    if not isinstance(subset, str):
        raise ValueError(f"eval.subset: expected a subset (config) name of the dataset or '', got {subset!r}")
    _check_builtin(data, subset, split)


def _check_builtin(data: str, subset: str, split: str) -> None:
    if data == "builtin" and (subset or split):
        key, value = ("eval.subset", subset) if subset else ("eval.split", split)
        raise ValueError(f"{key}: {value!r} is for dataset names, dataset folders and saved datasets; "
                         f"eval.data is 'builtin' (the built-in held-out split)")


def check_subset(data: str, subset: str = "", split: str = "", field: str = "eval.data") -> None:
    """A subset without a split is for dataset names and dataset repo folders: the readers read other
    folders and files as files then, and a saved dataset has no subsets. Given where no such dataset
    takes it, it is an error naming the setting (as data.subset given for files only is)."""
    if not subset or split or data == "builtin":
        return
    from cluster.readers import resolve_sources

    if not any(s.kind == "dataset" for s in resolve_sources(data, field, subset=subset, split=split)):
        section = field.rsplit(".", 1)[0] if "." in field else field
        raise ValueError(f"{section}.subset: {subset!r} is for dataset names and dataset repo folders; "
                         f"{field} {data!r} names none (files, folders of files or a saved dataset)")


def load_rows(data: str, seed: int = 0, subset: str = "", split: str = "") -> list[dict]:
    """Rows from "builtin" (held-out split of the built-in task) or what data.path accepts, read by the
    one set of readers (cluster.readers: files of every format SFT reads, .gz, folders, globs, URIs,
    saved datasets, dataset names). A dataset gives `split` ("" = its first eval split: validation,
    test, eval or valid; or its only split) of `subset`. Errors name eval.data / eval.split /
    eval.subset; a bad row fails naming file:row."""
    _check_builtin(data, subset, split)
    if data == "builtin":
        from cluster.builtin_task import generate

        _, held = generate(n_train=0, n_eval=200, seed=seed)
        return held
    from cluster.readers import read_rows

    check_subset(data, subset, split)
    return read_rows(data, field="eval.data", part=1, on_bad_row="fail", setting="eval.data", subset=subset,
                     split=split)


def detect_format(row: dict) -> str:
    if "question" in row and "answer" in row:
        return "gsm8k"
    if "problem" in row and ("solution" in row or "answer" in row):
        return "math"
    raise ValueError(f"eval: cannot tell the data format from the row keys {sorted(row)}; expected "
                     f"question/answer (gsm8k) or problem/solution|answer (math)")


def question_and_gold(row: dict, fmt: str) -> tuple[str, str | None]:
    """(question text, gold answer string) of a row."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "gsm8k":
        if "question" not in row or "answer" not in row:
            raise ValueError(f"eval: a gsm8k row needs 'question' and 'answer', got keys {sorted(row)}")
        return str(row["question"]), extract_gold(str(row["answer"]))
    if "problem" not in row:
        raise ValueError(f"eval: a math row needs 'problem' and 'solution' or 'answer', got keys {sorted(row)}")
    if row.get("answer") not in (None, ""):
        return str(row["problem"]), extract_gold(str(row["answer"]))
    if "solution" not in row:
        raise ValueError(f"eval: a math row needs 'solution' or 'answer', got keys {sorted(row)}")
    return str(row["problem"]), extract_gold(str(row["solution"]))


def messages_for(question: str, system_prompt: str = "") -> list[dict]:
    """The chat a question is asked as (same shape as an SFT sample without its answer)."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": question}]


# ----------------------------------------------------------------------------- backends

@runtime_checkable
class Sampler(Protocol):
    def sample(self, prompts: list[list[dict]], n: int, temperature: float, max_new_tokens: int,
               seed: int) -> list[list[str]]: ...


class HFBackend:
    """transformers generate through kernels.generation's engine (HFGenerator; CPU or GPU)."""

    def __init__(self, model, tokenizer, batch_size: int = 32, top_p: float = 1.0, stop: list[str] | None = None):
        from kernels.generation import HFGenerator

        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.top_p, self.stop = batch_size, top_p, list(stop or [])
        self.engine = HFGenerator(model, tokenizer, batch_size=batch_size, logprobs=False)

    @classmethod
    def from_path(cls, path: str, tokenizer=None, **kw) -> "HFBackend":
        from kernels.export import load_for_inference

        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tok = load_for_inference(path, device=device,
                                        dtype=torch.bfloat16 if device == "cuda" else None)
        return cls(model, tokenizer or tok, **kw)

    def sample(self, prompts, n, temperature, max_new_tokens, seed):
        outs = self.engine.generate(prompts, n=n, temperature=temperature, top_p=self.top_p,
                                    max_tokens=max_new_tokens, stop=self.stop, seed=seed)
        return [[c.text for c in row] for row in outs]


class VLLMBackend:
    """vLLM offline engine on a model folder (merged16 export or an HF model). GPU only."""

    def __init__(self, path: str, tokenizer=None, top_p: float = 1.0, stop: list[str] | None = None, **engine_kw):
        try:
            from vllm import LLM
        except ImportError as e:
            raise RuntimeError("eval.backend vllm needs vLLM (pip install 'ray-posttrain[gpu]' on a GPU machine); "
                               "use backend hf on CPU") from e
        if not isinstance(path, str) or not os.path.isdir(path):
            raise ValueError("eval.backend vllm needs a model folder (export with --format merged16), "
                             f"got {type(path).__name__}")
        from kernels.generation import load_generation_config, stop_token_ids

        self.llm = LLM(model=path, **engine_kw)
        self.tokenizer = tokenizer or self.llm.get_tokenizer()
        self.top_p, self.stop = top_p, list(stop or [])
        # every id that ends a completion, as for the hf backend (eos, generation config, chat template)
        self.stop_ids = stop_token_ids(self.tokenizer, load_generation_config(path))

    def sample(self, prompts, n, temperature, max_new_tokens, seed):
        from vllm import SamplingParams

        from kernels.generation import render_prompt

        texts = [render_prompt(self.tokenizer, p) for p in prompts]
        params = SamplingParams(n=n, temperature=temperature, top_p=self.top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, stop=self.stop or None, seed=seed,
                                stop_token_ids=list(self.stop_ids) or None)
        from cluster import console

        outs = self.llm.generate(texts, params, use_tqdm=console.bars_on())  # vLLM's bar, on a terminal
        return [[c.text for c in o.outputs] for o in outs]


def make_backend(model_or_path, tokenizer, cfg: EvalConfig) -> Sampler:
    if isinstance(model_or_path, Sampler):
        return model_or_path
    if cfg.backend == "vllm":
        if not isinstance(model_or_path, str):
            raise ValueError("eval.backend vllm needs a model folder path, not a model object "
                             "(export with --format merged16 first, or use backend hf)")
        return VLLMBackend(model_or_path, tokenizer, top_p=cfg.top_p, stop=cfg.stop)
    if isinstance(model_or_path, str):
        return HFBackend.from_path(model_or_path, tokenizer, batch_size=cfg.batch_size, top_p=cfg.top_p,
                                   stop=cfg.stop)
    if tokenizer is None:
        raise ValueError("evaluate: a model object needs its tokenizer")
    return HFBackend(model_or_path, tokenizer, batch_size=cfg.batch_size, top_p=cfg.top_p, stop=cfg.stop)


# ----------------------------------------------------------------------------- scoring

def majority_vote(answers: list[str | None]) -> tuple[str | None, int]:
    """(winning answer, its votes). Equal answers (answers_equal) pool votes; None never wins;
    a tie goes to the answer that appeared first."""
    groups: list[list[Any]] = []  # [representative, votes]
    for a in answers:
        if a is None:
            continue
        for g in groups:
            if answers_equal(a, g[0]):
                g[1] += 1
                break
        else:
            groups.append([a, 1])
    if not groups:
        return None, 0
    best = max(groups, key=lambda g: g[1])  # max keeps the first of equals
    return best[0], best[1]


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sound at 0 and n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct == 0 else max(0.0, center - half)  # exact ends: no rounding residue
    hi = 1.0 if correct == n else min(1.0, center + half)
    return lo, hi


def bootstrap_interval(outcomes: list[bool], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of 0/1 outcomes."""
    n = len(outcomes)
    if n == 0:
        return 0.0, 1.0
    rng = random.Random(seed)
    vals = [float(o) for o in outcomes]
    means = sorted(sum(rng.choices(vals, k=n)) / n for _ in range(samples))
    lo = means[int(math.floor(0.025 * (samples - 1)))]
    hi = means[int(math.ceil(0.975 * (samples - 1)))]
    return lo, hi


def evaluate(model_or_path, tokenizer, rows: list[dict] | None, cfg: EvalConfig = EvalConfig(),
             output_path: str | None = None) -> dict:
    """Accuracy of a model on rows (None: load cfg.data). Writes eval.json when output_path is given
    (a folder, or a file path ending in .json).

    Returns {accuracy, n, correct, ci95: [low, high], pass_at_k, answered, k, temperature, config,
    per_problem: [{question, gold, predictions, answers, voted, votes, correct}]}.
    """
    if rows is None:
        rows = load_rows(cfg.data, subset=cfg.subset, split=cfg.split)
    if cfg.max_problems:
        rows = rows[: cfg.max_problems]
    if not rows:
        raise ValueError("evaluate: no rows to evaluate")
    pairs = [question_and_gold(r, cfg.format) for r in rows]
    backend = make_backend(model_or_path, tokenizer, cfg)
    temperature = cfg.sampling_temperature
    prompts = [messages_for(q, cfg.system_prompt) for q, _ in pairs]
    from cluster import console

    # the elapsed time on a terminal (vLLM draws its own bar)
    with contextlib.nullcontext() if isinstance(backend, VLLMBackend) else \
            console.phase(f"[eval] {len(prompts)} problems" + (f" x {cfg.k} samples" if cfg.k > 1 else "")):
        completions = backend.sample(prompts, cfg.k, temperature, cfg.max_new_tokens, cfg.seed)
    if len(completions) != len(prompts):
        raise RuntimeError(f"evaluate: the backend returned {len(completions)} results for {len(prompts)} prompts")

    per_problem = []
    for (question, gold), texts in zip(pairs, completions):
        answers = [extract_answer(t) for t in texts]
        voted, votes = majority_vote(answers)
        per_problem.append({
            "question": question, "gold": gold, "predictions": list(texts), "answers": answers,
            "voted": voted, "votes": votes, "correct": bool(answers_equal(voted, gold)),
            "any_correct": any(answers_equal(a, gold) for a in answers),
        })
    n = len(per_problem)
    outcomes = [p["correct"] for p in per_problem]
    correct = sum(outcomes)
    ci = (wilson_interval(correct, n) if cfg.ci == "wilson"
          else bootstrap_interval(outcomes, cfg.bootstrap_samples, cfg.seed))
    n_samples = sum(len(p["answers"]) for p in per_problem)
    result = {
        "accuracy": correct / n,
        "n": n,
        "correct": correct,
        "ci95": [ci[0], ci[1]],
        "ci_method": cfg.ci,
        "pass_at_k": sum(p["any_correct"] for p in per_problem) / n,
        "answered": sum(a is not None for p in per_problem for a in p["answers"]) / max(n_samples, 1),
        "k": cfg.k,
        "temperature": temperature,
        "config": asdict(cfg),
        "per_problem": per_problem,
    }
    if output_path:
        write_eval_json(result, output_path)
    return result


def write_eval_json(result: dict, output_path: str) -> str:
    path = output_path if output_path.endswith(".json") else os.path.join(output_path, "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    return path
