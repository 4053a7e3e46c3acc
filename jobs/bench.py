"""Benchmark a LoRA/QLoRA training step: ours against transformers+PEFT, Liger and Unsloth, one GPU.

What it does: builds one random-weight model from a preset (seeded), saves it once (bf16
safetensors + a small local tokenizer) to a temporary folder, then runs every contender in its
own subprocess on that same model and the same seeded batch of random token ids: LoRA on all
linear layers (r=16, alpha=2r, dropout 0), bf16, gradient checkpointing on, AdamW, the loss the
mean over target tokens (labels = input ids, shifted inside). Warmup steps are not timed. For each
it reports tokens/s, peak GiB (torch.cuda.max_memory_allocated, model included), the loss after
N steps and the first 20 losses; prints a markdown table and writes JSON. A contender that is not
installed or crashes is reported with its error line; the run goes on.

Contenders (--peers; ours always runs first):
  ours          build_model / build_qlora_model + add_lora (PEFT) + patch_model (Triton ops) +
                apply_fused_lora + causal_lm_loss_sum (fused linear cross-entropy); HF-style
                per-layer checkpointing (--gc offload: our CPU-offloaded checkpointing)
  ours-offload  the same with offloaded checkpointing
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
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = ("ours", "ours-offload", "hf", "liger", "unsloth")
ALIASES = {"transformers": "hf", "peft": "hf", "hf+peft": "hf", "ours_offload": "ours-offload"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LOSS_RTOL = 1e-2  # bf16 end to end, different kernels: losses agree to well under 1% when the maths is right
N_LOSSES = 20


# ==============================================================================================
# Worker side: one contender, in its own process
# ==============================================================================================

def _init_lora(model, seed: int) -> int:
    """Same adapters in every contender: A ~ U(-1/sqrt(in), 1/sqrt(in)) from a seed derived from the
    parameter's name after 'layers.' (PEFT naming, which Unsloth shares), B = 0."""
    import torch

    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." not in name and ".lora_B." not in name:
                continue
            if ".lora_B." in name:
                p.zero_()
                continue
            key = name[name.find("layers."):] if "layers." in name else name
            g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(key.encode()))
            bound = 1.0 / p.shape[1] ** 0.5
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            n += 1
    return n


def _build_ours(spec: dict):
    from kernels.fused_lora import apply_fused_lora
    from kernels.loss import causal_lm_loss_sum
    from kernels.model import LoraConfig, ModelConfig, add_lora, build_model

    cfg = ModelConfig(path=spec["model_dir"], finetune=spec["mode"], dtype=spec["dtype"], attn_implementation="sdpa",
                      lora=LoraConfig(r=spec["rank"], alpha=spec["alpha"], dropout=0.0, target_modules=LORA_TARGETS))
    if spec["mode"] == "qlora":
        from kernels.qlora import build_qlora_model

        model = build_qlora_model(cfg, device=spec["device"])
    else:
        model = build_model(cfg, device=spec["device"])
    model = add_lora(model, cfg)
    info = {"lora_A_initialised": _init_lora(model, spec["seed"])}
    try:
        from kernels.patch import KernelsConfig, patch_model
    except ImportError as e:
        info["patched"] = f"no ({e})"
    else:
        patch_model(model, KernelsConfig(enabled=True, mode="auto"))
        info["patched"] = True
    info["fused_blocks"] = apply_fused_lora(model)
    gc = "offload" if spec["peer"] == "ours-offload" else spec["gc"]
    if gc == "offload":
        from kernels.offload import enable_offloaded_checkpointing

        enable_offloaded_checkpointing(model)
    else:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    info["gradient_checkpointing"] = gc
    model.train()

    def loss_fn(ids):
        loss_sum, n = causal_lm_loss_sum(model, ids, ids)
        return loss_sum / max(n, 1)  # mean over target tokens, as the peers' model(labels=...).loss

    return model, loss_fn, info


def _hf_model(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    kw = dict(dtype=getattr(torch, spec["dtype"]), attn_implementation="sdpa")
    if spec["mode"] == "qlora":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, spec["dtype"]))
        dev = torch.device(spec["device"])
        kw["device_map"] = {"": dev.index if dev.index is not None else torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kw)
    if spec["mode"] != "qlora":
        model.to(spec["device"])
    model.config.use_cache = False
    return model


def _build_hf(spec: dict, liger: bool = False):
    from peft import LoraConfig, get_peft_model

    info = {}
    if liger:
        import liger_kernel.transformers as lk

        with open(os.path.join(spec["model_dir"], "config.json")) as f:
            family = json.load(f)["model_type"]
        fn = getattr(lk, f"apply_liger_kernel_to_{family}", None)
        if fn is None:
            raise RuntimeError(f"liger_kernel has no apply_liger_kernel_to_{family}")
        fn()  # before the model is built: patches the family's classes (fused linear CE included)
        info["liger"] = fn.__name__
    model = _hf_model(spec)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                             target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM"))
    info["lora_A_initialised"] = _init_lora(model, spec["seed"])
    model.train()
    info["recipe"] = "no prepare_model_for_kbit_training (norms/embeddings stay bf16, as ours)" \
        if spec["mode"] == "qlora" else "bf16 model, fp32 adapters (PEFT default)"

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    return model, loss_fn, info


def _build_unsloth(spec: dict):
    import torch
    from unsloth import FastLanguageModel  # imported first in this process (see _worker)

    model, _tok = FastLanguageModel.from_pretrained(
        model_name=spec["model_dir"], max_seq_length=spec["seq"], dtype=getattr(torch, spec["dtype"]),
        load_in_4bit=spec["mode"] == "qlora")
    gc = spec["unsloth_gc"]
    model = FastLanguageModel.get_peft_model(
        model, r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=LORA_TARGETS,
        bias="none", use_gradient_checkpointing=True if gc == "true" else gc, random_state=spec["seed"])
    info = {"lora_A_initialised": _init_lora(model, spec["seed"]), "gradient_checkpointing": gc}
    model.train()

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    return model, loss_fn, info


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "triton", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth", "unsloth-zoo"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _train(spec: dict) -> dict:
    import torch

    peer = spec["peer"]
    cuda = spec["device"].startswith("cuda")
    builders = {"ours": _build_ours, "ours-offload": _build_ours, "hf": _build_hf,
                "liger": lambda s: _build_hf(s, liger=True), "unsloth": _build_unsloth}
    torch.manual_seed(spec["seed"])
    t0 = time.perf_counter()
    model, loss_fn, info = builders[peer](spec)
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    from kernels.qlora import make_optimizer

    opt = make_optimizer(params, lr=spec["lr"], kind=spec["optimizer"], weight_decay=0.0)
    B, T, V = spec["batch"], spec["seq"], spec["vocab_size"]

    def batch(step):
        g = torch.Generator().manual_seed(spec["seed"] + (step if spec["fresh_batches"] else 0))
        return torch.randint(0, V, (B, T), generator=g).to(spec["device"])

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model_bytes = torch.cuda.memory_allocated() if cuda else 0
    losses, step_s = [], []
    ids = batch(0)
    for step in range(spec["warmup"] + spec["steps"]):
        if spec["fresh_batches"] and step:
            ids = batch(step)
        t = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
        if cuda:
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t)
    timed = step_s[spec["warmup"]:]
    losses = [float(v) for v in torch.stack(losses).cpu()]
    return {
        "peer": peer, "ok": True, "tokens_per_s": B * T * len(timed) / sum(timed) if timed else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "model_gib": model_bytes / 2**30, "final_loss": losses[-1], "losses": losses[:N_LOSSES],
        "step_s": [round(s, 5) for s in step_s], "build_s": round(build_s, 2),
        "trainable_params": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "versions": _versions(), **info,
    }


def _worker(spec_path: str, result_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec["peer"] == "unsloth":
        try:
            import unsloth  # noqa: F401  - must come before transformers/peft to patch them
        except Exception as e:
            _write(result_path, {"peer": "unsloth", "ok": False, "error": _one_line(e), "oom": False})
            return 1
    try:
        result = _train(spec)
    except BaseException as e:  # report, never hang the parent
        import traceback

        traceback.print_exc()
        oom = "OutOfMemoryError" in type(e).__name__ or "out of memory" in str(e).lower()
        _write(result_path, {"peer": spec["peer"], "ok": False, "error": _one_line(e), "oom": oom})
        return 1
    _write(result_path, result)
    return 0


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def _write(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _prepare(spec_path: str) -> int:
    """Build the random-weight preset model once and save it (bf16) with a small local tokenizer."""
    import torch

    from kernels.model import ModelConfig, build_model
    from kernels.tokenizer import train_tokenizer

    with open(spec_path) as f:
        spec = json.load(f)
    out = spec["model_dir"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = ModelConfig(preset=spec["preset"], dtype=spec["dtype"], config_overrides=spec["overrides"])
    model = build_model(cfg, device=device, seed=spec["seed"])
    corpus = [f"step {i}: the quick brown fox {i * 7 % 13} jumps over {i % 5} lazy dogs." for i in range(400)]
    tok = train_tokenizer(corpus, vocab_size=512, out_dir=out)
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.bos_token_id = None
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    _write(os.path.join(out, "bench_model.json"), {k: spec[k] for k in ("preset", "overrides", "seed", "dtype")})
    print(f"[bench] saved {spec['preset']} (random weights, seed {spec['seed']}) to {out}", flush=True)
    return 0


# ==============================================================================================
# Parent side: orchestration, no torch import (no CUDA context held while the workers run)
# ==============================================================================================

def _env(workdir: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", UNSLOTH_COMPILE_LOCATION=os.path.join(workdir, "unsloth_cache"))
    return env


def _subprocess(args: list[str], workdir: str, log_path: str, timeout: float) -> tuple[int | None, str]:
    """Run `python -m jobs.bench ARGS` in a new session; (exit code or None on timeout, log tail)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.bench", *args], cwd=workdir, env=_env(workdir),
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
              batch: int | None = None, steps: int | None = None, warmup: int | None = None, tag: str = "") -> dict:
    spec = dict(peer=peer, model_dir=model_dir, mode=a.mode, dtype=a.dtype, device=a.device, rank=a.rank,
                alpha=a.alpha, seq=seq or a.seq, batch=batch or a.batch, steps=a.steps if steps is None else steps,
                warmup=a.warmup if warmup is None else warmup, lr=a.lr, optimizer=a.optimizer, seed=a.seed,
                vocab_size=vocab, fresh_batches=a.fresh_batches, gc=a.gc, unsloth_gc=a.unsloth_gc)
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
    return res


def _loss_check(ref: list[float], other: list[float]) -> dict:
    n = min(len(ref), len(other), N_LOSSES)
    if n == 0:
        return {"steps": 0}
    diffs = [abs(a - b) for a, b in zip(ref[:n], other[:n])]
    rel = [d / max(abs(r), 1e-6) for d, r in zip(diffs, ref[:n])]
    i = max(range(n), key=lambda k: rel[k])
    return {"steps": n, "max_abs": max(diffs), "max_rel": rel[i], "at_step": i, "rtol": LOSS_RTOL,
            "match": rel[i] <= LOSS_RTOL}


def _write_out(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write(path, report)


def _fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


def _table(results: dict, a) -> str:
    ours = results.get("ours") if results.get("ours", {}).get("ok") else None
    hf = results.get("hf") if results.get("hf", {}).get("ok") else None
    rows = [f"| contender | tokens/s | ours ÷ it (speed) | peak GiB | it ÷ ours (memory) | loss @ {a.warmup + a.steps} "
            f"| first {N_LOSSES} losses vs HF+PEFT | status |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not r.get("ok"):
            rows.append(f"| {name} | - | - | - | - | - | - | {r.get('error', 'failed')} |")
            continue
        speed = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}×" if ours else "-"
        mem = f"{r['peak_gib'] / ours['peak_gib']:.2f}×" if ours and ours.get("peak_gib") and r.get("peak_gib") else "-"
        chk = "-"
        if hf and name != "hf":
            c = _loss_check(hf["losses"], r["losses"])
            chk = f"max Δ {c['max_abs']:.4f} ({c['max_rel']:.2%}) {'match' if c['match'] else 'DIFFER'}"
        rows.append(f"| {name} | {_fmt(r['tokens_per_s'])} | {speed} | {_fmt(r.get('peak_gib'), '.2f')} | {mem} "
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
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--optimizer", choices=("adamw", "adamw_8bit"), default="adamw", help="the same for everyone")
    s.add_argument("--peers", default="hf,liger,unsloth",
                   help=f"comma list of {', '.join(PEERS[1:])} (ours always runs first; with --max-seq: "
                        f"exactly who is probed, default ours,unsloth)")
    s.add_argument("--gc", choices=("checkpoint", "offload"), default="checkpoint", help="our checkpointing")
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
    s.add_argument("--out", default="", help="write the results as JSON here")
    n = sub.add_parser("nf4", help="NF4 dequantisation: our Triton kernel vs bitsandbytes")
    n.add_argument("--shapes", default="2048x2048,512x2048,8192x2048,2048x8192,4096x4096,1024x4096,14336x4096,4096x14336")
    n.add_argument("--iters", type=int, default=50)
    n.add_argument("--out", default="")
    w = sub.add_parser("_worker")
    w.add_argument("spec")
    w.add_argument("result")
    pr = sub.add_parser("_prepare")
    pr.add_argument("spec")
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
        results = {}
        report["results"] = results
        for peer in peers:
            results[peer] = _run_peer(a, peer, model_dir, vocab, workdir)
            if a.out:  # partial results survive a run cut short (device time limits)
                _write_out(a.out, report)
        device = next((r["device"] for r in results.values() if r.get("ok")), "?")
        report["device"] = device
        print(f"\n{a.preset} {a.mode}, seq {a.seq} x batch {a.batch}, r={a.rank}, {a.dtype}, checkpointing on, "
              f"{a.steps} timed steps after {a.warmup} warmup, on {device}:\n")
        print(_table(results, a))
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
    a = parse_args(argv)
    a.argv = argv
    if a.cmd == "_worker":
        return _worker(a.spec, a.result)
    if a.cmd == "_prepare":
        return _prepare(a.spec)
    if a.cmd == "nf4":
        return _nf4(a)
    return _sft(a)


if __name__ == "__main__":
    sys.exit(main())
