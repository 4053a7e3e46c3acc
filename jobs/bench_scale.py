"""Throughput of one SFT config across strategies and worker counts: `posttrain bench-scale`.

    python -m jobs.bench_scale jobs/configs/llama-lora.yaml \\
        --runs ddp:lora:1,ddp:lora:2,zero2:lora:2,zero3:lora:2,ddp:full:2,zero2:full:2,zero3:full:2

Each run is the SFT job itself (Ray Train workers, the data pipeline, checkpoints and the saved
models) on the config plus overrides: strategy (ddp | zero2 | zero3), model.finetune (lora | full |
qlora) and trainer.num_workers. It reports the median global tokens/s over the steps after
--warmup, rank 0's peak GPU memory and the first and last loss, prints a table, the line
`ddp scaling N gpus: X.XXx` (median tokens/s with N workers over 1 worker, same finetune mode),
and writes everything as JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

STRATEGIES = {"ddp": ["trainer.strategy=ddp"],
              "zero2": ["trainer.strategy=deepspeed", "trainer.deepspeed.zero_stage=2"],
              "zero3": ["trainer.strategy=deepspeed", "trainer.deepspeed.zero_stage=3"]}
FINETUNES = ("lora", "full", "qlora")


def parse_runs(text: str) -> list[tuple[str, str, int]]:
    """'ddp:lora:1,zero3:full:2' -> [('ddp', 'lora', 1), ('zero3', 'full', 2)] (errors name the item)."""
    runs = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        parts = item.split(":")
        if len(parts) != 3:
            raise ValueError(f"--runs item {item!r}: expected STRATEGY:FINETUNE:WORKERS, e.g. ddp:lora:2")
        strategy, finetune, workers = parts
        if strategy not in STRATEGIES:
            raise ValueError(f"--runs item {item!r}: strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        if finetune not in FINETUNES:
            raise ValueError(f"--runs item {item!r}: finetune {finetune!r} is not one of {', '.join(FINETUNES)}")
        if not workers.isdigit() or int(workers) < 1:
            raise ValueError(f"--runs item {item!r}: workers must be a positive integer")
        runs.append((strategy, finetune, int(workers)))
    if not runs:
        raise ValueError("--runs: no runs given")
    return runs


def summarize(metrics: list[dict], warmup: int) -> dict:
    """Median tokens/s and step time after `warmup` steps, peak memory, first/last loss."""
    timed = [m for m in metrics if m["step"] > warmup] or metrics
    return {"steps": len(metrics),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
            "step_time_s": statistics.median(m["step_time_s"] for m in timed),
            "peak_mem_gib": max((m.get("peak_mem_gib", 0.0) for m in metrics), default=0.0),
            "first_loss": metrics[0]["loss"], "last_loss": metrics[-1]["loss"]}


def scaling_lines(results: list[dict], unit: str = "gpus") -> list[str]:
    """`ddp scaling N gpus: X.XXx` for every DDP run with N > 1 whose 1-worker run is present
    (unit "cpu workers" for CPU runs)."""
    one = {r["finetune"]: r for r in results if r["strategy"] == "ddp" and r["workers"] == 1 and r.get("ok")}
    lines = []
    for r in results:
        if r["strategy"] == "ddp" and r["workers"] > 1 and r.get("ok") and r["finetune"] in one:
            ratio = r["tokens_per_s"] / one[r["finetune"]]["tokens_per_s"]
            r["scaling"] = ratio
            lines.append(f"ddp scaling {r['workers']} {unit}: {ratio:.2f}x ({r['finetune']})")
    return lines


def table(results: list[dict]) -> str:
    head = "| strategy | finetune | workers | tokens/s (global, median) | step s | peak GiB (rank 0) | loss first -> last |"
    rows = [head, "|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("ok"):
            rows.append(f"| {r['strategy']} | {r['finetune']} | {r['workers']} | failed: {r.get('error', '')[:80]} | | | |")
            continue
        rows.append(f"| {r['strategy']} | {r['finetune']} | {r['workers']} | {r['tokens_per_s']:,.0f} | "
                    f"{r['step_time_s']:.3f} | {r['peak_mem_gib']:.2f} | {r['first_loss']:.4f} -> {r['last_loss']:.4f} |")
    return "\n".join(rows)


def run_one(config: str, overrides: list[str], strategy: str, finetune: str, workers: int, steps: int,
            workdir: str) -> dict:
    from jobs.config import load
    from jobs.sft import SFTJobConfig, run_sft

    out_dir = os.path.join(workdir, f"{strategy}-{finetune}-{workers}")
    over = [*overrides, f"output_dir={out_dir}", f"max_steps={steps}", f"trainer.num_workers={workers}",
            f"model.finetune={finetune}", "trainer.checkpoint_every=0", *STRATEGIES[strategy]]
    cfg = load(SFTJobConfig, config, over)
    t0 = time.time()
    run_sft(cfg)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return {"wall_s": time.time() - t0, "overrides": over, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="posttrain bench-scale", description=__doc__.split("\n")[0])
    p.add_argument("config", help="SFT YAML config (its trainer.use_gpu decides GPU or CPU workers)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every run")
    p.add_argument("--runs", default="ddp:lora:1,ddp:lora:2",
                   help="comma-separated STRATEGY:FINETUNE:WORKERS (strategy ddp|zero2|zero3; finetune lora|full|qlora)")
    p.add_argument("--steps", type=int, default=15, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    p.add_argument("--full-lr", type=float, default=1e-5, help="trainer.lr for finetune=full runs")
    p.add_argument("--workdir", default="", help="run folders (default: a new temp folder)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    a = p.parse_args(argv)
    try:
        runs = parse_runs(a.runs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.steps <= a.warmup:
        print(f"error: --steps ({a.steps}) must exceed --warmup ({a.warmup})", file=sys.stderr)
        return 2
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench-scale-")
    results = []
    for i, (strategy, finetune, workers) in enumerate(runs, 1):
        print(f"[bench-scale] run {i}/{len(runs)}: {strategy} {finetune} x{workers}", flush=True)
        extra = [f"trainer.lr={a.full_lr}"] if finetune == "full" else []
        rec = {"strategy": strategy, "finetune": finetune, "workers": workers}
        try:
            raw = run_one(a.config, [*a.overrides, *extra], strategy, finetune, workers, a.steps, workdir)
            rec.update(summarize(raw["metrics"], a.warmup), ok=True, wall_s=raw["wall_s"], losses=[
                m["loss"] for m in raw["metrics"]])
        except Exception as e:  # noqa: BLE001 - one failed run is reported, the others still run
            rec.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0])
            print(f"[bench-scale] run failed: {rec['error']}", flush=True)
        results.append(rec)
    from jobs.config import load
    from jobs.sft import SFTJobConfig

    on_gpu = load(SFTJobConfig, a.config, list(a.overrides)).trainer.use_gpu
    lines = scaling_lines(results, "gpus" if on_gpu else "cpu workers")
    print(table(results))
    for line in lines:
        print(line)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "config": a.config, "overrides": a.overrides,
                       "steps": a.steps, "warmup": a.warmup, "results": results, "scaling": lines}, f, indent=2)
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
