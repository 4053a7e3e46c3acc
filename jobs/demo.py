"""The built-in demo, end to end on one machine (CPU is enough), on the arithmetic task:

  1. SFT of the `tiny` preset with 2 Ray Train workers (jobs/configs/tiny-sft.yaml), with held-out
     loss and exact-match accuracy before and after; saves the adapter and the merged model;
  2. GRPO with jobs/configs/tiny-grpo.yaml (shortened): its own warm-up (full fine-tuning of the
     tiny model to ~40% held-out exact match, where sampled answers disagree, which GRPO needs;
     the LoRA run of step 1 stays near 8%, too weak for GRPO to move in a short demo), then GRPO
     steps, with held-out accuracy before and after;
  3. report.png of both runs.

  make demo                      # sets up .venv, then runs this
  python -m jobs.demo [output_dir=runs/demo] [grpo=false] [grpo_steps=20] [--verbose]

The console shows a progress bar per long phase (plain lines when the output is not a terminal)
and one line per event; Ray's own output goes to Ray's log files (the folder is named at the
start). --verbose shows Ray's full output instead (cluster/console.py).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class DemoConfig:
    """The demo's own keys. output_dir: where both runs go; grpo: run the GRPO stage (step 2);
    grpo_steps: its GRPO steps."""

    output_dir: str = "runs/demo"
    grpo: bool = True
    grpo_steps: int = 20

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("output_dir: must be set")
        if self.grpo_steps < 1:
            raise ValueError(f"grpo_steps: must be >= 1, got {self.grpo_steps}")


def main(argv: list[str] | None = None) -> int:
    from cluster import console
    from jobs.config import ConfigError, load, parse_job_args

    try:
        args = parse_job_args("posttrain demo", argv, DemoConfig, description=__doc__, config=False,
                              verbose_option=True)
        console.configure(verbose=args.verbose)
        console.setup_logging()
        demo = load(DemoConfig, None, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    out, with_grpo, grpo_steps = demo.output_dir, demo.grpo, demo.grpo_steps
    t0 = time.time()

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
    print("[demo] ---------------- summary ----------------")
    for line in lines:
        print("[demo] " + line)
    print(f"[demo] finished in {time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
