"""`posttrain bench grpo`: a GRPO step, ours against TRL's GRPOTrainer and plain vLLM, one GPU.

    posttrain bench grpo --model /models/smollm2-135m-instruct --data gsm8k.jsonl --out grpo.json
    posttrain bench grpo --preset llama-3.2-1b --fixed-length --out grpo-1b.json
    posttrain bench grpo --cpu --preset tiny --prompts-per-step 2 --n 2 --max-tokens 8   # smoke test

The model: --model (a local Hugging Face folder, or a .gguf file converted once to a folder) or
--preset (random weights, saved once with a small local tokenizer padded with placeholder tokens
to the model's vocabulary, so every sampled id decodes). Prompts: --data (a jsonl of
question/answer rows) or the built-in arithmetic task; --system-prompt before each question.

Contenders (--contenders, each in its own process, one after another; jobs/bench_grpo_worker.py):
  ours   `posttrain grpo` itself (Ray actors; vLLM colocated with the LoRA learner, sleep/wake, CUDA
         graphs, weights synced every step; the hf engine with --cpu), dynamic sampling off
  trl    TRL GRPOTrainer, vLLM colocate mode, PEFT LoRA (needs trl and vllm; devkit on the GPU machine)
  vllm   plain vLLM generating the same prompts x n with the same sampling settings (no training)
Shared settings: n, max tokens (--fixed-length: every completion exactly that long, ignore_eos),
temperature 1, top_p 1, LoRA r (alpha 2r, all linear layers), lr, no KL, token-mean loss, clip
0.2/0.28, one optimizer step per generation batch, the math_answer reward.

Per contender: median step time over the steps after --warmup, rollout tokens/s (completion
tokens / generation time, the phase as the contender runs it), learner tokens/s (prompt +
completion tokens / update time; TRL: step - generation - weight sync), peak GPU memory (the
GPU's used memory polled with nvidia-smi every 0.2 s, less what was in use before the contender
started: every process of the contender counts), and the reward of every step. Then the lines
`ratio grpo step time trl/ours: N.NN` and `rollout tokens/s ÷ plain vllm: N.NN`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from jobs.bench_grpo_worker import _write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTENDERS = ("ours", "trl", "vllm")


def _env(cpu: bool = False) -> dict:
    env = dict(os.environ)
    if cpu:  # TRL's GRPO loss calls a Triton kernel; on a CPU only Triton's interpreter runs it
        env.setdefault("TRITON_INTERPRET", "1")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", VLLM_NO_USAGE_STATS="1", PYTHONUNBUFFERED="1")
    return env


def gpu_used_mib() -> float | None:
    """Memory in use on GPU 0 (every process), from nvidia-smi; None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class MemoryPoller:
    """The largest GPU memory in use while a contender runs, less what was in use before it started."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.base, self.peak = every_s, gpu_used_mib(), None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if self.base is not None:
            self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            v = gpu_used_mib()
            if v is not None:
                self.peak = v if self.peak is None else max(self.peak, v)
            self._stop.wait(self.every_s)

    def stop(self) -> float | None:
        """Peak GiB above the baseline (None without a GPU)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.base is None or self.peak is None:
            return None
        return max(0.0, self.peak - self.base) / 1024


def run_contender(name: str, spec: dict, workdir: str, timeout_s: float) -> dict:
    """One contender in its own process (new session: killed with everything it started on timeout)."""
    spec_path, result_path, log_path = (os.path.join(workdir, f"{name}.{x}") for x in ("spec.json", "result.json", "log"))
    _write(spec_path, spec)
    if os.path.exists(result_path):
        os.remove(result_path)
    mem = MemoryPoller()
    t = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.bench_grpo_worker", name, spec_path, result_path],
                                cwd=workdir, env=_env(spec.get("device") == "cpu"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    peak = mem.stop()
    res = None
    if os.path.exists(result_path):
        with open(result_path) as f:
            res = json.load(f)
    if res is None:
        with open(log_path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
        errs = [ln for ln in lines if "Error" in ln or "error:" in ln.lower()]
        tail = (errs[-1] if errs else (lines[-1] if lines else "(no output)"))[:300]
        why = f"timeout after {timeout_s:.0f}s" if rc is None else f"exit code {rc}: {tail}"
        res = {"contender": name, "ok": False, "error": why}
    res.update(peak_gib=peak, log=log_path, wall_s=round(time.time() - t, 1))
    return res


def summarize(res: dict, warmup: int) -> dict:
    """Medians over the timed steps (those after the warmup; all when there are no more)."""
    if not res.get("ok"):
        return res
    steps = res["steps"][warmup:] or res["steps"]

    def med(key):
        vals = [s[key] for s in steps if s.get(key) is not None]
        return statistics.median(vals) if vals else None

    res["summary"] = {k: med(k) for k in ("step_s", "generate_s", "sync_s", "update_s", "rollout_tokens_per_s",
                                          "learner_tokens_per_s", "completion_tokens")}
    res["summary"]["timed_steps"] = len(steps)
    res["reward_curve"] = [s.get("reward") for s in res["steps"]]
    return res


def _fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


def report_lines(results: dict) -> list[str]:
    rows = ["| contender | step s (median) | generate s | weight sync s | update s | rollout tok/s | learner tok/s "
            "| peak GPU GiB | reward per step | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not r.get("ok"):
            rows.append(f"| {name} | - | - | - | - | - | - | - | - | {r.get('error', 'failed')} |")
            continue
        s = r["summary"]
        curve = " ".join("-" if x is None else f"{x:.2f}" for x in r.get("reward_curve", []))
        rows.append(f"| {name} | {_fmt(s['step_s'], '.2f')} | {_fmt(s['generate_s'], '.2f')} | {_fmt(s['sync_s'], '.2f')} "
                    f"| {_fmt(s['update_s'], '.2f')} | {_fmt(s['rollout_tokens_per_s'])} | {_fmt(s['learner_tokens_per_s'])} "
                    f"| {_fmt(r.get('peak_gib'), '.1f')} | {curve or '-'} | ok |")
    return rows


def ratio_lines(results: dict) -> list[str]:
    def fig(name, key):
        r = results.get(name, {})
        return r.get("summary", {}).get(key) if r.get("ok") else None

    lines = []
    ours, trl = fig("ours", "step_s"), fig("trl", "step_s")
    if ours and trl:
        lines.append(f"ratio grpo step time trl/ours: {trl / ours:.2f}")
    plain = fig("vllm", "rollout_tokens_per_s")
    for name in ("ours", "trl"):
        mine = fig(name, "rollout_tokens_per_s")
        if plain and mine:
            lines.append(("" if name == "ours" else "trl ") + f"rollout tokens/s ÷ plain vllm: {mine / plain:.2f}")
    return lines


def _prepare(a, workdir: str) -> str:
    """A model folder every contender loads: --model as given, or converted/built once in the workdir."""
    if a.model and os.path.isdir(a.model):
        return os.path.abspath(a.model)
    model_dir = os.path.join(workdir, "model")
    if os.path.exists(os.path.join(model_dir, "config.json")):
        return model_dir
    spec = {"model": os.path.abspath(a.model) if a.model else "", "preset": a.preset, "overrides": a.override,
            "seed": a.seed, "model_dir": model_dir, "dtype": "float32" if a.cpu else "bfloat16"}
    res = run_contender("prepare", spec, workdir, a.timeout)
    if not res.get("ok"):
        raise SystemExit(f"[bench grpo] preparing the model failed: {res.get('error')} (log {res['log']})")
    print(f"[bench grpo] model ready: {res['what']} -> {model_dir} [{res['wall_s']}s]", flush=True)
    return model_dir


def _prompts(a, workdir: str) -> str:
    """The prompt rows every contender reads (jsonl of question/answer)."""
    if a.data:
        return os.path.abspath(a.data)
    from cluster.builtin_task import generate

    rows, _ = generate(max(2000, a.prompts_per_step * (a.steps + a.warmup)), 200, seed=0)
    path = os.path.join(workdir, "prompts.jsonl")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="posttrain bench grpo", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="", help="a local Hugging Face folder or .gguf file (wins over --preset)")
    p.add_argument("--preset", default="smollm2-135m", help="random-weight model shape (kernels.model presets)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override of the preset, e.g. num_hidden_layers=2 (repeatable)")
    p.add_argument("--data", default="", help="a jsonl of question/answer rows (default: the built-in task)")
    p.add_argument("--system-prompt", default="", help="a system message before each question")
    p.add_argument("--prompts-per-step", type=int, default=64)
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--fixed-length", action="store_true", help="every completion exactly --max-tokens (ignore eos)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sync", choices=("merged", "adapter"), default="merged", help="ours: rollout.sync")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="vLLM's share of the GPU (all contenders)")
    p.add_argument("--gpu-share", type=float, default=0.5, help="ours: rollout.num_gpus (the learner gets the rest)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=64, help="trl: per_device_train_batch_size")
    p.add_argument("--no-gc", action="store_true", help="gradient checkpointing off (all contenders)")
    p.add_argument("--trl-sleep", action="store_true", help="trl: vllm_enable_sleep_mode (default: TRL's, off)")
    p.add_argument("--sleep-level", type=int, choices=(0, 1, 2), default=1,
                   help="ours: rollout.sleep_level (default 1, the job's: vLLM frees its memory during the update; "
                        "0 keeps it, as TRL does without --trl-sleep)")
    p.add_argument("--contenders", default="ours,trl,vllm")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (ours with the hf engine; smoke tests)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per contender")
    p.add_argument("--workdir", default="", help="keep models, logs and runs here (default: a temporary folder)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    a = p.parse_args(argv)
    for name in ("prompts_per_step", "n", "max_tokens", "rank", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(a, name)}")
    if a.n < 2:
        p.error("--n: GRPO compares samples within a group; need >= 2")
    unknown = [c for c in a.contenders.split(",") if c not in CONTENDERS]
    if unknown:
        p.error(f"--contenders: unknown {', '.join(unknown)}; accepted: {', '.join(CONTENDERS)}")
    if a.model and not os.path.exists(a.model):
        p.error(f"--model: {a.model!r} does not exist (a local Hugging Face folder or a .gguf file)")
    if a.data and not os.path.isfile(a.data):
        p.error(f"--data: {a.data!r} is not a file (a jsonl of question/answer rows)")
    if not 0 < a.gpu_share < 1:
        p.error(f"--gpu-share: must be in (0, 1), got {a.gpu_share}")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    workdir = os.path.abspath(a.workdir) if a.workdir else tempfile.mkdtemp(prefix="bench-grpo-")
    os.makedirs(workdir, exist_ok=True)
    model_dir = _prepare(a, workdir)
    spec = {"model_dir": model_dir, "prompts": _prompts(a, workdir), "system_prompt": a.system_prompt,
            "prompts_per_step": a.prompts_per_step, "n": a.n, "max_tokens": a.max_tokens, "fixed_length": a.fixed_length,
            "rank": a.rank, "lr": a.lr, "steps": a.steps, "warmup": a.warmup, "seed": a.seed, "sync": a.sync,
            "gpu_memory_utilization": a.gpu_memory_utilization, "gpu_share": a.gpu_share,
            "max_model_len": a.max_model_len, "micro_batch": a.micro_batch, "gradient_checkpointing": not a.no_gc,
            "trl_sleep": a.trl_sleep, "sleep_level": a.sleep_level, "device": "cpu" if a.cpu else "cuda"}
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "posttrain bench grpo " + " ".join(argv),
              "settings": {k: v for k, v in spec.items() if k not in ("model_dir", "prompts")},
              "model": a.model or f"preset {a.preset} (random weights)", "results": {}}
    results = report["results"]
    for name in a.contenders.split(","):
        if name == "vllm" and a.cpu:
            results[name] = {"contender": name, "ok": False, "error": "plain vLLM needs a GPU"}
            continue
        s = dict(spec, run_dir=os.path.join(workdir, f"run-{name}"))
        shutil.rmtree(s["run_dir"], ignore_errors=True)
        print(f"[bench grpo] {name}: {a.warmup} warmup + {a.steps} timed steps of {a.prompts_per_step} prompts x {a.n} "
              f"(log {os.path.join(workdir, name + '.log')})", flush=True)
        r = summarize(run_contender(name, s, workdir, a.timeout), a.warmup)
        results[name] = r
        state = (f"step {r['summary']['step_s']:.2f}s, rollout {_fmt(r['summary']['rollout_tokens_per_s'])} tok/s, "
                 f"peak {_fmt(r.get('peak_gib'), '.1f')} GiB" if r.get("ok") else f"FAILED: {r['error']}")
        print(f"[bench grpo] {name}: {state} [{r['wall_s']}s]", flush=True)
        if a.out:
            _write(a.out, report)  # partial results survive a run cut short
    report["device"] = next((r["device"] for r in results.values() if r.get("device")), "?")
    print(f"\nGRPO step, {report['model']}, {a.prompts_per_step} prompts x {a.n}, {a.max_tokens} tokens"
          f"{' (fixed length)' if a.fixed_length else ''}, LoRA r={a.rank}, on {report['device']}:\n")
    print("\n".join(report_lines(results)))
    report["ratios"] = ratio_lines(results)
    if report["ratios"]:
        print("\n" + "\n".join(report["ratios"]))
    if a.out:
        _write(a.out, report)
        print(f"\n[bench grpo] wrote {a.out}", flush=True)
    ok = results.get("ours", {"ok": True}).get("ok", False)
    if ok and not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not ok:
        print(f"[bench grpo] logs kept in {workdir}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
