"""Serve a trained model behind an OpenAI-compatible endpoint on Ray Serve.

    posttrain serve runs/sft-0001/merged                          # prints the URL, Ctrl-C stops
    posttrain serve jobs/configs/tiny-serve.yaml port=8001 api_key_env=MY_KEY
    posttrain serve BASE_DIR adapter=runs/sft-0001/adapter autoscaling.max_replicas=4
    posttrain serve runs/sft-0001/merged engine=vllm-async host=0.0.0.0 --emit-config serve.yaml  # GPU
    python -m jobs.serve ...                                      # same thing

The first argument is a YAML config (fields of cluster.serve.ServeConfig) or a model folder
(then it is `path`). `key=value` overrides follow. Ray: the cluster in RAY_ADDRESS, else a
local one started here. `--no-block` returns once the app is healthy (the app keeps running
only while the Ray cluster does: a local Ray started by this process ends with it).
`--emit-config OUT.yaml` writes a Serve config file for `serve deploy` / a RayService and
deploys nothing. On GPU the packaged engine is `engine=vllm-async` (this project's app over
vLLM's AsyncLLMEngine); `engine=vllm` (Ray's ray.serve.llm) needs a Ray whose ray.serve.llm
imports with the installed vLLM, and is refused in one line before Ray starts where it does not.
"""
import os
import sys
import time

import yaml

from cluster.serve import ServeConfig, deploy, resolve, serve_config_file
from jobs.config import ConfigError, load, parse_job_args
from jobs.preflight import preflight_serve


def parse_args(argv):
    """`posttrain serve TARGET [key=value ...] [--no-block] [--emit-config OUT.yaml]` -> JobArgs
    (TARGET: a serve YAML config or a model folder; see load_config)."""
    return parse_job_args(
        "posttrain serve", argv, ServeConfig, description=__doc__, target="TARGET", config=False,
        target_help="a serve YAML config, or a model folder (merged, or base with adapter=...)",
        options=[(("--no-block",), dict(action="store_true",
                                         help="return after the app is deployed and healthy")),
                 (("--emit-config",), dict(metavar="OUT.yaml", help="write a Serve config file and exit"))])


def load_config(target: str, overrides: list[str]) -> ServeConfig:
    if target.endswith((".yaml", ".yml")):
        return load(ServeConfig, target, overrides)
    return load(ServeConfig, None, [f"path={target}", *overrides])


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        cfg = load_config(args.target, args.overrides)
    except ConfigError as e:
        print(f"posttrain serve: config error: {e}", file=sys.stderr)
        return 2

    if args.options.emit_config:
        if cfg.api_key:
            print("posttrain serve: warning: api_key is written in clear into the config file; "
                  "prefer api_key_env", file=sys.stderr)
        for name in ("path", "adapter", "tokenizer"):
            value = getattr(cfg, name)
            local = cfg.engine == "hf" or os.path.exists(value)      # vllm also takes HF hub ids
            if value and "://" not in value and not os.path.isabs(value) and local:
                print(f"posttrain serve: warning: {name}={value!r} is relative; replicas resolve it "
                      f"against their own working directory (use an absolute path on shared storage, "
                      f"or a URI)", file=sys.stderr)
        with open(args.options.emit_config, "w") as f:
            f.write("# Serve config file: `serve deploy " + os.path.basename(args.options.emit_config) + "`\n")
            yaml.safe_dump(serve_config_file(cfg), f, sort_keys=False)
        print(f"wrote {args.options.emit_config}")
        return 0

    try:
        cfg = resolve(cfg)
    except ValueError as e:
        print(f"posttrain serve: {e}", file=sys.stderr)
        return 2
    if preflight_serve(cfg):  # one line on stderr, before Ray starts (engine=vllm: ray.serve.llm imports)
        return 2

    import ray
    from ray import serve

    # RAY_ADDRESS=local means a new local instance, as in Ray: started here, stopped here
    started_here = not ray.is_initialized() and os.environ.get("RAY_ADDRESS", "") in ("", "local")
    url = deploy(cfg)
    print(f"Serving {cfg.served_name()!r} ({cfg.engine}) at {url}", flush=True)
    print(f"  try: curl {url}/models" + (' -H "Authorization: Bearer $KEY"' if cfg.api_key or cfg.api_key_env else ""),
          flush=True)
    if args.options.no_block:
        return 0
    print("Ctrl-C to stop.", flush=True)
    from cluster.ray_session import stop_on_signals

    # Ctrl-C and SIGTERM (e.g. a pod's stop) end the wait, also where SIGINT was inherited as
    # ignored (a command started in the background of a script); installed after ray.init, which
    # sets a SIGTERM handler of its own
    stop_on_signals()
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping...", flush=True)
    finally:
        serve.delete(cfg.app_name)
        if started_here:
            serve.shutdown()
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
