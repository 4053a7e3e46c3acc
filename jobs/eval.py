"""Exact-match evaluation of a run, an adapter or a model folder (GSM8K `#### N` / MATH `\\boxed{}`).

What it does: loads the model (a run's adapter on its base, an adapter folder, or a model folder;
see kernels.export.load_for_inference), asks each question as the user message of the chat
template, extracts the final answer of each completion (rewards.math), scores greedy (k=1) or
self-consistency majority vote (k>1), and writes eval.json with a 95% interval and every problem.
No Ray: the backend runs in this process (hf: transformers on CPU/GPU; vllm: GPU).

Launch:
  posttrain eval runs/tiny-sft                                            # built-in held-out split, greedy
  posttrain eval runs/tiny-sft jobs/configs/tiny-eval.yaml k=8 temperature=0.7
  posttrain eval runs/sft/merged data=/data/gsm8k_test.jsonl backend=vllm --out results/
  posttrain eval runs/sft/merged data=openai/gsm8k subset=main split=test    # a dataset name (offline: HF cache)
  python -m jobs.eval runs/tiny-sft max_problems=50
Overrides are keys of cluster.evaluate.EvalConfig (data, split, subset, format, backend, k, temperature,
top_p, max_new_tokens, max_problems, system_prompt, stop, batch_size, ci, bootstrap_samples, seed).
data takes what data.path takes (files, folders, globs, URIs, a saved dataset, a dataset name);
split / subset pick a dataset's split (default: its first of validation/test/eval/valid) and subset.
"""
from __future__ import annotations

import os
import sys
import time


def parse_args(argv: list[str] | None):
    """`posttrain eval TARGET [CONFIG.yaml] [key=value ...] [--out OUT] [--base BASE]` -> JobArgs."""
    from cluster.evaluate import EvalConfig
    from jobs.config import parse_job_args

    return parse_job_args(
        "posttrain eval", argv, EvalConfig, description=__doc__, target="TARGET",
        target_help="a run output_dir, an adapter folder, or a model folder",
        options=[(("--out",), dict(default="", help="where eval.json goes (a folder or a .json path); "
                                                    "default: TARGET/")),
                 (("--base",), dict(default=None, help="base model folder for an adapter"))])


def _vllm_model_dir(target: str) -> str:
    """vLLM loads model folders only: a run's merged/ export, or the target itself."""
    merged = os.path.join(target, "merged")
    if os.path.exists(os.path.join(target, "config.yaml")) and os.path.exists(os.path.join(merged, "config.json")):
        return merged
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    raise ValueError(f"backend vllm needs a model folder; export {target!r} first "
                     f"(posttrain export {target} --format merged16)")


def main(argv: list[str] | None = None) -> int:
    from cluster.evaluate import EvalConfig, evaluate
    from jobs.config import ConfigError, load
    from jobs.preflight import preflight_eval

    try:
        args = parse_args(argv)
        cfg = load(EvalConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if preflight_eval(cfg, args.target, args.options.out, args.options.base):
        return 2
    if not os.path.isdir(args.target):
        print(f"eval error: {args.target!r} is not a folder (expected a run output_dir, an adapter folder "
              f"or a model folder)", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        if cfg.backend == "vllm":
            model, tok = _vllm_model_dir(args.target), None
        else:
            from kernels.export import load_for_inference
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model, tok = load_for_inference(args.target, base=args.options.base, device=device,
                                            dtype=torch.bfloat16 if device == "cuda" else None)
        out = args.options.out or args.target
        res = evaluate(model, tok, None, cfg, output_path=out)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"eval error: {e}", file=sys.stderr)
        return 2
    lo, hi = res["ci95"]
    path = out if out.endswith(".json") else os.path.join(out, "eval.json")
    print(f"[eval] accuracy {res['accuracy']:.3f} ({res['correct']}/{res['n']}), 95% CI [{lo:.3f}, {hi:.3f}] "
          f"({res['ci_method']}), k={res['k']} T={res['temperature']}, pass@k {res['pass_at_k']:.3f}, "
          f"{time.time() - t0:.1f}s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
