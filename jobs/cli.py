"""`posttrain` command line: one subcommand per job module, each identical to
`python -m jobs.<name> ...` (the form `ray job submit` uses)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sft": ("jobs.sft", "supervised fine-tuning on Ray Train"),
    "cpt": ("jobs.cpt", "continued pre-training on raw text"),
    "grpo": ("jobs.grpo", "GRPO reinforcement learning (vLLM/HF rollouts, reward actors, learner)"),
    "serve": ("jobs.serve", "OpenAI-compatible endpoint on Ray Serve"),
    "bench": ("jobs.bench", "benchmark against the peers (SFT: HF+PEFT, Liger, Unsloth; grpo: TRL, plain vLLM)"),
    "bench-scale": ("jobs.bench_scale", "SFT throughput across strategies and worker counts (DDP, ZeRO-2/3)"),
    "export": ("jobs.export", "export a run: adapter, merged16, merged4, gguf"),
    "eval": ("jobs.eval", "exact-match evaluation (greedy or self-consistency)"),
    "tool-traces": ("jobs.tool_traces", "tool-use SFT conversations for the calculator environment"),
    "demo": ("jobs.demo", "the built-in demo: SFT then GRPO on the arithmetic task"),
}


def usage() -> str:
    lines = ["usage: posttrain COMMAND [CONFIG.yaml] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`posttrain COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"posttrain: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
