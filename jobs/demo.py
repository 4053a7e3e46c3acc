"""The built-in demo, end to end on one machine (CPU is enough), on the arithmetic task:

  1. SFT of the `tiny` preset with 2 Ray Train workers (jobs/configs/tiny-sft.yaml), with held-out
     loss and exact-match accuracy before and after; saves the adapter and the merged model;
  2. GRPO with jobs/configs/tiny-grpo.yaml (shortened): its own warm-up (full fine-tuning of the
     tiny model to ~40% held-out exact match, where sampled answers disagree, which GRPO needs;
     the LoRA run of step 1 stays near 8%, too weak for GRPO to move in a short demo), then GRPO
     steps, with held-out accuracy before and after;
  3. report.png of both runs.

  make demo                      # sets up .venv, then runs this
  python -m jobs.demo [output_dir=runs/demo] [grpo=false] [grpo_steps=20]
"""
from __future__ import annotations

import os
import sys
import time


def _flag(argv: list[str], key: str, default: str) -> str:
    for a in argv:
        if a.startswith(key + "="):
            return a.split("=", 1)[1]
    return default


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    out = _flag(argv, "output_dir", "runs/demo")
    with_grpo = _flag(argv, "grpo", "true").lower() != "false"
    grpo_steps = int(_flag(argv, "grpo_steps", "20"))
    t0 = time.time()

    from jobs.config import load
    from jobs.sft import SFTJobConfig, run_sft

    here = os.path.dirname(os.path.abspath(__file__))
    sft_cfg = load(SFTJobConfig, os.path.join(here, "configs", "tiny-sft.yaml"),
                   [f"output_dir={out}/sft", "eval_accuracy.enabled=true", "trainer.num_workers=2",
                    "max_steps=120", "trainer.eval_every=40", "trainer.checkpoint_every=40"])
    print(f"[demo] 1/3 SFT -> {sft_cfg.output_dir}", flush=True)
    sft = run_sft(sft_cfg)
    lines = [f"SFT   loss {sft['first_loss']:.3f} -> {sft['last_loss']:.3f}; "
             f"held-out eval loss {sft.get('eval_loss_end') or float('nan'):.3f}; "
             f"exact match {sft['eval_accuracy_start']:.1%} -> {sft['eval_accuracy_end']:.1%} "
             f"({sft['eval_problems']} problems)",
             f"      adapter: {sft.get('adapter_dir')}", f"      merged:  {sft.get('merged_dir')}"]
    runs = [sft_cfg.output_dir]

    if with_grpo:
        from jobs.grpo import demo_grpo

        print(f"[demo] 2/3 GRPO -> {out}/grpo", flush=True)
        g = demo_grpo(f"{out}/grpo", [f"max_steps={grpo_steps}", "checkpoint_every=10"])
        lines.append(f"GRPO  exact match {g['eval_accuracy_start']:.1%} -> {g['eval_accuracy_end']:.1%}; "
                     f"reward {g.get('reward_first', float('nan')):.3f} -> {g.get('reward_last', float('nan')):.3f}")
        runs.append(f"{out}/grpo")

    from cluster.report import write_report

    print("[demo] 3/3 reports", flush=True)
    for r in runs:
        lines.append(f"report: {os.path.abspath(write_report(r)['png'])}")
    print("\n[demo] ---------------- summary ----------------")
    for line in lines:
        print("[demo] " + line)
    print(f"[demo] finished in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
