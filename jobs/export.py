"""Export a run (or an adapter, or a model folder): adapter | merged16 | merged4 | gguf.

What it does: finds the adapter, the base model and the tokenizer behind RUN_OR_ADAPTER
(kernels.export_source.resolve_source: a run folder's run.json, written by the training jobs;
config.yaml for runs saved before run.json existed), merges the adapter into the base in float32
and writes the requested format. No Ray: it runs where it is started (merged4 needs a CUDA GPU).

Launch:
  posttrain export runs/tiny-sft --format merged16                       # -> runs/tiny-sft/merged
  posttrain export runs/tiny-sft --format gguf --gguf-type q8_0          # -> runs/tiny-sft/tiny-sft-q8_0.gguf
  posttrain export runs/sft/adapter --format merged16 --out /models/m --max-shard-size 2GB
  posttrain export runs/sft --format merged4                              # GPU + bitsandbytes
  python -m jobs.export runs/tiny-sft --format adapter --out /tmp/adapter
"""
from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None):
    from kernels.export import FORMATS, GGUF_TYPES

    p = argparse.ArgumentParser(prog="posttrain export", description=__doc__.split("\n")[0])
    p.add_argument("source", help="a run output_dir, an adapter folder, or a model folder")
    p.add_argument("--format", required=True, dest="fmt", metavar="FORMAT",
                   help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", default="", help="output folder (a .gguf file path for gguf); "
                                             "default: inside the run / beside the adapter")
    p.add_argument("--gguf-type", default="f16", help=f"gguf weight type: one of {', '.join(GGUF_TYPES)}")
    p.add_argument("--dtype", default="bfloat16", help="merged16 weight dtype: bfloat16 | float16 | float32")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (merged16/merged4), e.g. 2GB")
    p.add_argument("--base", default=None, help="base model folder (overrides the adapter's/run's base)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from kernels.export import export

    args = parse_args(argv)
    t0 = time.time()
    try:
        out = export(args.source, args.fmt, args.out, base=args.base, gguf_type=args.gguf_type,
                     dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (FileNotFoundError, NotADirectoryError, ValueError, RuntimeError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"[export] {args.fmt} -> {out} ({time.time() - t0:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
