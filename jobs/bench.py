"""Benchmark a LoRA/QLoRA training step: ours against transformers+PEFT, Liger and Unsloth, one GPU.

What it does: builds one random-weight model from a preset (seeded), saves it once (bf16
safetensors + a small local tokenizer) to a temporary folder, then runs every contender in its
own subprocess on that same model and the same seeded batch of random token ids: LoRA on all
linear layers (r=16, alpha=2r, dropout 0), bf16, gradient checkpointing on, AdamW, the loss the
mean over target tokens (labels = input ids, shifted inside). Warmup steps are not timed. For each
it reports tokens/s, peak GiB (torch.cuda.max_memory_allocated, model included), the loss after
N steps and the first 20 losses; prints a markdown table, a line `ratio tokens/s ours/<peer>: N.NN`
per peer, and writes JSON. --rounds N runs the whole set N times, round after round, and reports
the median tokens/s with every round's figure and per-round ratios. A contender that is not
installed or crashes is reported with its error line; the run goes on.

The contenders' code is in jobs/bench_worker.py (one process each); this module orchestrates.
`posttrain bench learner ...` compares the GRPO learner's update with our SFT step on one model
(jobs/bench_learner.py; `posttrain bench learner --help`); `posttrain bench grpo ...` a whole GRPO
step against TRL's GRPOTrainer and plain vLLM (jobs/bench_grpo.py; `posttrain bench grpo --help`).

Contenders (--peers; ours always runs first):
  ours          build_model / build_qlora_model + add_lora (PEFT) + patch_model (Triton ops) +
                apply_fused_lora + causal_lm_loss (fused linear cross-entropy); HF-style
                per-layer checkpointing (--gc offload: our CPU-offloaded checkpointing); each
                step's forward+backward a replayed CUDA graph (kernels/cuda_graph.py), as the
                trainer does on one GPU (--no-cuda-graphs: eager)
  ours-eager    the same without CUDA graphs (what the graphs add, in the same run)
  ours-offload  the same with offloaded checkpointing (eager: offload is not captured)
  hf            transformers (sdpa) + PEFT; QLoRA: BitsAndBytesConfig(nf4, double quant, bf16)
  liger         hf after liger_kernel.transformers.apply_liger_kernel_to_<family>()
  unsloth       FastLanguageModel.from_pretrained(local folder, load_in_4bit=qlora) + get_peft_model
                (use_gradient_checkpointing="unsloth" unless --unsloth-gc true)

Launch (GPU machine; the peers come from the devkit, see docs/benchmarks.md):
  python -m jobs.bench sft --preset llama-3.2-1b --seq 2048 --batch 4 --rank 16 --steps 20 \\
      --peers hf,liger,unsloth --out docs/bench-1b-lora.json
  python -m jobs.bench sft --mode qlora --preset llama-3.1-8b --seq 2048 --batch 2 --peers hf,unsloth
  python -m jobs.bench sft --max-seq --mode qlora --preset llama-3.1-8b --peers ours,unsloth
  python -m jobs.bench nf4 --out docs/bench-nf4.json        # NF4 dequant: our Triton kernel vs bitsandbytes

--max-seq: the longest sequence (a multiple of 1024) that trains at batch 1, by doubling then
bisection, each probe a fresh subprocess (out of memory = fail). Here `--peers` lists exactly who
is probed. Deviations from a real run, on purpose: random weights and tokens; the same batch is
repeated every step (--fresh-batches draws new ones) so the loss falls and the loss curves compare
gradients, not just forwards; LoRA A is re-initialised from a per-name seed in every contender
so all start from the same adapters.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from jobs.bench_worker import N_LOSSES, _write  # the worker module imports torch only inside functions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = ("ours", "ours-eager", "ours-offload", "hf", "liger", "unsloth")
ALIASES = {"transformers": "hf", "peft": "hf", "hf+peft": "hf", "ours_offload": "ours-offload", "ours_eager": "ours-eager"}
LOSS_RTOL = 1e-2  # bf16 end to end, different kernels: losses agree to well under 1% when the maths is right


# Parent side (the workers are jobs/bench_worker.py): orchestration, no torch import (no CUDA
# context held while the workers run)

def _env(workdir: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", UNSLOTH_COMPILE_LOCATION=os.path.join(workdir, "unsloth_cache"))
    return env


def _subprocess(args: list[str], workdir: str, log_path: str, timeout: float) -> tuple[int | None, str]:
    """Run `python -m jobs.bench_worker ARGS` in a new session; (exit code or None on timeout, log tail)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.bench_worker", *args], cwd=workdir, env=_env(workdir),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the worker and anything it started
            proc.wait()
            rc = None
    with open(log_path, errors="replace") as f:
        lines = [ln.rstrip() for ln in f.read().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error:" in ln.lower()]
    return rc, (errs[-1] if errs else (lines[-1] if lines else "(no output)"))[:400]


def _prepare_model(a, workdir: str) -> str:
    model_dir = a.model_dir or os.path.join(workdir, f"model-{a.preset}")
    marker = os.path.join(model_dir, "bench_model.json")
    want = {"preset": a.preset, "overrides": a.overrides, "seed": a.seed, "dtype": a.dtype}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == want:
                print(f"[bench] reusing {model_dir}", flush=True)
                return model_dir
        raise SystemExit(f"[bench] {model_dir} holds another model ({marker}); pick another --model-dir")
    os.makedirs(model_dir, exist_ok=True)
    spec_path = os.path.join(workdir, "prepare.json")
    _write(spec_path, {**want, "model_dir": model_dir})
    t = time.time()
    rc, tail = _subprocess(["_prepare", spec_path], workdir, os.path.join(workdir, "prepare.log"), a.peer_timeout)
    if rc != 0:
        raise SystemExit(f"[bench] building the model failed ({tail}); log: {workdir}/prepare.log")
    print(f"[bench] model ready in {time.time() - t:.0f}s", flush=True)
    return model_dir


def _run_peer(a, peer: str, model_dir: str, vocab: int, workdir: str, seq: int | None = None,
              batch: int | None = None, steps: int | None = None, warmup: int | None = None, tag: str = "",
              profile: bool = False) -> dict:
    spec = dict(peer=peer, model_dir=model_dir, mode=a.mode, dtype=a.dtype, device=a.device, rank=a.rank,
                alpha=a.alpha, seq=seq or a.seq, batch=batch or a.batch, steps=a.steps if steps is None else steps,
                warmup=a.warmup if warmup is None else warmup, lr=a.lr, optimizer=a.optimizer, seed=a.seed,
                vocab_size=vocab, fresh_batches=a.fresh_batches, gc=a.gc, unsloth_gc=a.unsloth_gc,
                cuda_graphs=getattr(a, "cuda_graphs", True),
                profile=profile)
    name = f"{peer}{tag}"
    spec_path, result_path = os.path.join(workdir, f"{name}.spec.json"), os.path.join(workdir, f"{name}.result.json")
    log_path = os.path.join(workdir, f"{name}.log")
    _write(spec_path, spec)
    if os.path.exists(result_path):
        os.remove(result_path)
    t = time.time()
    rc, tail = _subprocess(["_worker", spec_path, result_path], workdir, log_path, a.peer_timeout)
    res = None
    if os.path.exists(result_path):
        with open(result_path) as f:
            res = json.load(f)
    if res is None or (rc != 0 and res.get("ok")):
        why = f"timeout after {a.peer_timeout:.0f}s" if rc is None else f"exit code {rc}: {tail}"
        res = {"peer": peer, "ok": False, "error": why, "oom": "out of memory" in tail.lower()}
    res.update(log=log_path, wall_s=round(time.time() - t, 1))
    state = (f"{res['tokens_per_s']:,.0f} tok/s, peak {res['peak_gib'] or 0:.2f} GiB, loss {res['final_loss']:.4f}"
             if res.get("ok") else f"FAILED: {res['error']}")
    print(f"[bench] {name} (seq {spec['seq']}, batch {spec['batch']}): {state} [{res['wall_s']}s, log {log_path}]",
          flush=True)
    if res.get("profile"):
        path = os.path.join(workdir, f"profile-{name}.txt")
        with open(path, "w") as f:
            f.write(_profile_text(name, res["profile"]))
        print(f"[bench] {name}: profile in {path}", flush=True)
    return res


def _profile_text(name: str, prof: dict) -> str:
    lines = [f"{name}: {prof['total_ms_per_step']:.2f} ms per step of {prof['by']}"]
    if "gpu_busy_ms_per_step" in prof:  # kernels running vs the span they ran in (less: host-bound)
        lines.append(f"GPU busy {prof['gpu_busy_ms_per_step']:.1f} ms of a {prof['gpu_span_ms_per_step']:.1f} ms span "
                     f"per step, {prof['gpu_idle_gaps_per_step']:.0f} idle gaps")
    lines += ["", f"{'ms/step':>9} {'share':>6} {'calls':>6}  kernel"]
    for e in prof["top"]:
        lines.append(f"{e['ms_per_step']:9.3f} {e['share']:6.1%} {e['calls_per_step']:6.0f}  {e['name']}")
    return "\n".join(lines) + "\n"


def _loss_check(ref: list[float], other: list[float]) -> dict:
    n = min(len(ref), len(other), N_LOSSES)
    if n == 0:
        return {"steps": 0}
    diffs = [abs(a - b) for a, b in zip(ref[:n], other[:n])]
    rel = [d / max(abs(r), 1e-6) for d, r in zip(diffs, ref[:n])]
    i = max(range(n), key=lambda k: rel[k])
    return {"steps": n, "max_abs": max(diffs), "max_rel": rel[i], "at_step": i, "rtol": LOSS_RTOL,
            "match": rel[i] <= LOSS_RTOL}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _combine_rounds(runs: list[dict]) -> dict:
    """One contender's result over --rounds runs: tokens/s the median of the runs that finished,
    peak memory the largest, losses and the rest from the first that finished; every run's figures
    under "rounds". A contender counts as ok when every round finished."""
    rounds = [{"ok": bool(r.get("ok")), "tokens_per_s": r.get("tokens_per_s"), "peak_gib": r.get("peak_gib"),
               **({} if r.get("ok") else {"error": r.get("error")})} for r in runs]
    done = [r for r in runs if r.get("ok")]
    if not done:
        return {**runs[0], "rounds": rounds}
    out = {**done[0], "rounds": rounds, "tokens_per_s": _median([r["tokens_per_s"] for r in done])}
    peaks = [r["peak_gib"] for r in done if r.get("peak_gib") is not None]
    out["peak_gib"] = max(peaks) if peaks else None
    if len(done) < len(runs):
        failed = next(r for r in runs if not r.get("ok"))
        out.update(ok=False, error=f"{len(runs) - len(done)} of {len(runs)} rounds failed: {failed.get('error')}")
    return out


def _ratios(results: dict) -> dict:
    """ours ÷ each peer in tokens/s: of the medians, and round by round (the contenders of one round
    ran back to back, so a per-round ratio shares the GPU's state of that moment)."""
    ours = results.get("ours", {})
    out = {}
    for name, r in results.items():
        if name == "ours" or not ours.get("tokens_per_s") or not r.get("tokens_per_s"):
            continue
        per_round = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours.get("rounds", []), r.get("rounds", []))
                     if o.get("ok") and t.get("ok")]
        out[name] = {"ratio": ours["tokens_per_s"] / r["tokens_per_s"], "per_round": per_round}
    return out


def _ratio_lines(ratios: dict, results: dict, rounds: int) -> list[str]:
    lines = []
    for name, q in ratios.items():
        each = (" (per round: " + ", ".join(f"{x:.2f}" for x in q["per_round"]) + ")") if rounds > 1 else ""
        partial = "" if results[name].get("ok") and results["ours"].get("ok") else " (not every round finished)"
        lines.append(f"ratio tokens/s ours/{name}: {q['ratio']:.2f}{each}{partial}")
    return lines


def _write_out(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write(path, report)


def _fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


def _table(results: dict, a) -> str:
    ours = results.get("ours") if results.get("ours", {}).get("ok") else None
    hf = results.get("hf") if results.get("hf", {}).get("ok") else None
    many = getattr(a, "rounds", 1) > 1
    head = "tokens/s (median of rounds) | tokens/s per round" if many else "tokens/s"
    rows = [f"| contender | {head} | ours ÷ it (speed) | peak GiB | it ÷ ours (memory) | loss @ {a.warmup + a.steps} "
            f"| first {N_LOSSES} losses vs HF+PEFT | status |", "|---|---|---|---|---|---|---|---|" + ("---|" if many else "")]
    for name, r in results.items():
        each = " / ".join(_fmt(x.get("tokens_per_s")) if x.get("ok") else "failed" for x in r.get("rounds", []))
        if not r.get("ok"):
            tps = f"{_fmt(r.get('tokens_per_s'))} | {each}" if many else "-"
            rows.append(f"| {name} | {tps} | - | - | - | - | - | {r.get('error', 'failed')} |")
            continue
        speed = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}×" if ours else "-"
        mem = f"{r['peak_gib'] / ours['peak_gib']:.2f}×" if ours and ours.get("peak_gib") and r.get("peak_gib") else "-"
        chk = "-"
        if hf and name != "hf":
            c = _loss_check(hf["losses"], r["losses"])
            chk = f"max Δ {c['max_abs']:.4f} ({c['max_rel']:.2%}) {'match' if c['match'] else 'DIFFER'}"
        tps = f"{_fmt(r['tokens_per_s'])} | {each}" if many else _fmt(r["tokens_per_s"])
        rows.append(f"| {name} | {tps} | {speed} | {_fmt(r.get('peak_gib'), '.2f')} | {mem} "
                    f"| {r['final_loss']:.4f} | {chk} | ok |")
    return "\n".join(rows)


def _max_seq(a, model_dir: str, vocab: int, workdir: str, peer: str) -> dict:
    """Doubling from --max-seq-lo, then bisection, over multiples of 1024; each probe a subprocess."""
    unit = 1024
    lo_k, hi_cap = max(1, a.max_seq_lo // unit), max(1, a.max_seq_hi // unit)
    probes = []

    def probe(k):
        r = _run_peer(a, peer, model_dir, vocab, workdir, seq=k * unit, batch=1, steps=1, warmup=1, tag=f"-seq{k * unit}")
        probes.append({"seq": k * unit, "ok": bool(r.get("ok")), "peak_gib": r.get("peak_gib"),
                       "tokens_per_s": r.get("tokens_per_s"), "error": r.get("error")})
        return bool(r.get("ok"))

    good, bad = 0, None
    k = lo_k
    while k <= hi_cap:  # doubling
        if probe(k):
            good, k = k, k * 2
        else:
            bad = k
            break
    if bad is None and good and good < hi_cap:  # doubling overshot the cap: try the cap itself
        if probe(hi_cap):
            good = hi_cap
        else:
            bad = hi_cap
    while bad is not None and good and bad - good > 1:  # bisection between the last success and first failure
        mid = (good + bad) // 2
        if probe(mid):
            good = mid
        else:
            bad = mid
    best = next((p for p in probes if p["seq"] == good * unit and p["ok"]), None)
    first = probes[0] if probes else {}
    error = first.get("error") if not good else None  # e.g. not installed: not a memory limit
    return {"peer": peer, "max_seq": good * unit if good else 0, "error": error,
            "peak_gib_at_max": best and best["peak_gib"],
            "tokens_per_s_at_max": best and best["tokens_per_s"], "searched": [lo_k * unit, hi_cap * unit],
            "probes": probes}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="posttrain bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sft", help="LoRA/QLoRA training step: ours vs the peers")
    s.add_argument("--preset", default="llama-3.2-1b")
    s.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override of the preset, e.g. num_hidden_layers=8 (repeatable)")
    s.add_argument("--mode", choices=("lora", "qlora"), default="lora")
    s.add_argument("--seq", type=int, default=2048)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--rank", type=int, default=16)
    s.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2 x rank)")
    s.add_argument("--steps", type=int, default=20, help="timed steps")
    s.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    s.add_argument("--rounds", type=int, default=1,
                   help="run every contender this many times, round after round; tokens/s is the median, the "
                        "ratios are given per round too (a peer whose speed swings between runs)")
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--optimizer", choices=("adamw", "adamw_8bit"), default="adamw", help="the same for everyone")
    s.add_argument("--peers", default="hf,liger,unsloth",
                   help=f"comma list of {', '.join(PEERS[1:])} (ours always runs first; with --max-seq: "
                        f"exactly who is probed, default ours,unsloth)")
    s.add_argument("--gc", choices=("checkpoint", "offload"), default="checkpoint", help="our checkpointing")
    s.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run ours eagerly (default: forward+backward replayed as a CUDA graph, as the trainer does)")
    s.add_argument("--unsloth-gc", choices=("unsloth", "true"), default="unsloth",
                   help='Unsloth\'s use_gradient_checkpointing: "unsloth" (offloaded, its default) or True')
    s.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    s.add_argument("--device", default="cuda", help="cuda (benchmarks) or cpu (a smoke test of the plumbing)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fresh-batches", action="store_true", help="a new random batch each step")
    s.add_argument("--max-seq", action="store_true", help="find the longest trainable sequence at batch 1")
    s.add_argument("--max-seq-lo", type=int, default=1024)
    s.add_argument("--max-seq-hi", type=int, default=131072)
    s.add_argument("--model-dir", default="", help="where the random-weight model is saved (reused when it matches)")
    s.add_argument("--workdir", default="", help="logs, specs and results (default: a new temp folder)")
    s.add_argument("--keep", action="store_true", help="keep the workdir (default: keep only on failure)")
    s.add_argument("--peer-timeout", type=float, default=480.0,
                   help="seconds per subprocess (the device tool stops a command after 600 s)")
    s.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile 2 more per contender; the top kernels go to the JSON "
                        "and to WORKDIR/profile-<contender>.txt")
    s.add_argument("--out", default="", help="write the results as JSON here")
    n = sub.add_parser("nf4", help="NF4 dequantisation: our Triton kernel vs bitsandbytes")
    n.add_argument("--shapes", default="2048x2048,512x2048,8192x2048,2048x8192,4096x4096,1024x4096,14336x4096,4096x14336")
    n.add_argument("--iters", type=int, default=50)
    n.add_argument("--out", default="")
    return p.parse_args(argv)


def _peer_list(text: str, max_seq: bool) -> list[str]:
    names = [ALIASES.get(x.strip().lower(), x.strip().lower()) for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in PEERS]
    if bad:
        raise SystemExit(f"--peers: unknown {', '.join(bad)}; accepted: {', '.join(PEERS)}")
    if max_seq:
        return list(dict.fromkeys(names))
    return ["ours"] + [x for x in dict.fromkeys(names) if x != "ours"]


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--override {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _sft(a) -> int:
    if a.alpha is None:
        a.alpha = 2 * a.rank
    a.overrides = _parse_overrides(a.override)
    if a.max_seq and a.peers == "hf,liger,unsloth":
        a.peers = "ours,unsloth"
    peers = _peer_list(a.peers, a.max_seq)
    if a.rounds < 1:
        raise SystemExit(f"--rounds {a.rounds}: expected 1 or more")
    if a.rounds > 1 and a.max_seq:
        raise SystemExit("--rounds applies to the timed runs; --max-seq probes each length once")
    workdir = a.workdir or tempfile.mkdtemp(prefix="posttrain-bench-")
    os.makedirs(workdir, exist_ok=True)
    print(f"[bench] workdir {workdir}; contenders: {', '.join(peers)}", flush=True)
    model_dir = _prepare_model(a, workdir)
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python -m jobs.bench " + " ".join(a.argv),
              "preset": a.preset, "overrides": a.overrides, "mode": a.mode, "seq": a.seq, "batch": a.batch,
              "rank": a.rank, "alpha": a.alpha, "steps": a.steps, "warmup": a.warmup, "lr": a.lr,
              "optimizer": a.optimizer, "dtype": a.dtype, "seed": a.seed, "fresh_batches": a.fresh_batches,
              "nf4_dequant": os.environ.get("POSTTRAIN_NF4_DEQUANT", "triton")}
    ok = True
    if a.max_seq:
        report["max_seq"] = {}
        for peer in peers:
            r = _max_seq(a, model_dir, vocab, workdir, peer)
            report["max_seq"][peer] = r
            if a.out:
                _write_out(a.out, report)
            print(f"[bench] {peer}: longest sequence at batch 1 = {r['max_seq']}", flush=True)
        print("\n| contender | longest seq (batch 1) | peak GiB there | tokens/s there |\n|---|---|---|---|")
        for peer, r in report["max_seq"].items():
            longest = f"{r['max_seq']:,}" if r["max_seq"] else f"none ({r['error']})"
            print(f"| {peer} | {longest} | {_fmt(r['peak_gib_at_max'], '.2f')} | {_fmt(r['tokens_per_s_at_max'])} |")
        ok = report["max_seq"].get("ours", {"max_seq": 1})["max_seq"] > 0
    else:
        results, runs = {}, {peer: [] for peer in peers}
        report["results"] = results
        report["rounds"] = a.rounds
        for i in range(a.rounds):  # round after round, every contender once per round, in the same order
            if a.rounds > 1:
                print(f"[bench] round {i + 1} of {a.rounds}", flush=True)
            for peer in peers:
                runs[peer].append(_run_peer(a, peer, model_dir, vocab, workdir, tag=f"-r{i + 1}" if a.rounds > 1 else "",
                                            profile=a.profile and i == 0))
                results[peer] = _combine_rounds(runs[peer])
                if a.out:  # partial results survive a run cut short (device time limits)
                    _write_out(a.out, report)
        device = next((r["device"] for r in results.values() if r.get("ok")), "?")
        report["device"] = device
        print(f"\n{a.preset} {a.mode}, seq {a.seq} x batch {a.batch}, r={a.rank}, {a.dtype}, checkpointing on, "
              f"{a.steps} timed steps after {a.warmup} warmup, on {device}:\n")
        print(_table(results, a))
        report["ratios"] = _ratios(results)
        if report["ratios"]:
            print("\n" + "\n".join(_ratio_lines(report["ratios"], results, a.rounds)))
        if results.get("hf", {}).get("ok"):
            report["loss_check_vs_hf"] = {n: _loss_check(results["hf"]["losses"], r["losses"])
                                          for n, r in results.items() if r.get("ok") and n != "hf"}
            c = report["loss_check_vs_hf"].get("ours")
            if c and c.get("steps"):
                print(f"\nlosses, ours vs transformers+PEFT over the first {c['steps']} steps: max |Δ| "
                      f"{c['max_abs']:.5f} ({c['max_rel']:.3%}, step {c['at_step']}) -> "
                      f"{'MATCH' if c['match'] else 'DIFFER'} (tolerance {LOSS_RTOL:.0%} relative, bf16)")
                print("  ours: " + " ".join(f"{v:.4f}" for v in results["ours"]["losses"]))
                print("  hf:   " + " ".join(f"{v:.4f}" for v in results["hf"]["losses"]))
        ok = bool(results["ours"].get("ok"))
    if a.out:
        _write_out(a.out, report)
        print(f"\n[bench] wrote {a.out}", flush=True)
    if ok and not a.keep and not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not ok:
        print(f"[bench] logs kept in {workdir}", flush=True)
    return 0 if ok else 1


def _nf4(a) -> int:
    """Time dequantisation of one weight: ours (Triton) vs bitsandbytes.functional.dequantize_4bit."""
    import torch

    if not torch.cuda.is_available():
        print("nf4 bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    import bitsandbytes.functional as bnbf

    from kernels.nf4 import NF4State, nf4_dequantize_triton

    rows, out = [], {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name(), "shapes": {}}

    def timed(fn):
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(a.iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / a.iters * 1e3  # microseconds

    for shape in a.shapes.split(","):
        o, i = (int(x) for x in shape.lower().split("x"))
        w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.02
        q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        st = NF4State.from_bnb(qs)
        buf = torch.empty(o, i, device="cuda", dtype=torch.bfloat16)
        ours = timed(lambda: nf4_dequantize_triton(q, st, out=buf))
        theirs = timed(lambda: bnbf.dequantize_4bit(q, qs, out=buf))
        same = torch.equal(nf4_dequantize_triton(q, st), bnbf.dequantize_4bit(q, qs))
        gbs = (q.numel() + o * i * 2) / (ours * 1e-6) / 1e9
        out["shapes"][shape] = {"ours_us": ours, "bnb_us": theirs, "ours_gb_s": gbs, "bit_identical": same}
        rows.append(f"| {o}x{i} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}× | {gbs:.0f} | {same} |")
    print(f"NF4 dequantisation (double-quantised absmax, blocksize 64, bf16 out) on {out['device']}:\n")
    print("| weight | ours µs | bitsandbytes µs | bnb ÷ ours | ours GB/s | bit-identical |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    faster = sum(v["ours_us"] <= v["bnb_us"] for v in out["shapes"].values())
    print(f"\nours faster on {faster} of {len(rows)} shapes (fused LoRA uses POSTTRAIN_NF4_DEQUANT=triton|bnb; "
          f"default triton)")
    if a.out:
        _write(a.out, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "learner":  # the GRPO learner against our SFT step (jobs/bench_learner.py)
        from jobs.bench_learner import main as learner_main

        return learner_main(argv[1:])
    if argv and argv[0] == "grpo":  # a GRPO step against TRL and plain vLLM (jobs/bench_grpo.py)
        from jobs.bench_grpo import main as grpo_main

        return grpo_main(argv[1:])
    a = parse_args(argv)
    a.argv = argv
    if a.cmd == "nf4":
        return _nf4(a)
    return _sft(a)


if __name__ == "__main__":
    sys.exit(main())
