"""The worker side of `posttrain bench sft` (jobs/bench.py): one contender's training steps in
its own process, and the one-time preparation of the shared random-weight model.

    python -m jobs.bench_worker _worker SPEC.json RESULT.json
    python -m jobs.bench_worker _prepare SPEC.json

Each contender runs in a fresh process so that peak memory, kernels and patches do not leak from
one to the next; the parent (jobs/bench.py) never imports torch.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import zlib

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
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
    from kernels.factory import build_training_model
    from kernels.loss import causal_lm_loss_sum
    from kernels.model import LoraConfig, ModelConfig
    from kernels.patch import KernelsConfig

    cfg = ModelConfig(path=spec["model_dir"], finetune=spec["mode"], dtype=spec["dtype"], attn_implementation="sdpa",
                      lora=LoraConfig(r=spec["rank"], alpha=spec["alpha"], dropout=0.0, target_modules=LORA_TARGETS))
    gc_mode = "offload" if spec["peer"] == "ours-offload" else spec["gc"]
    model, notes = build_training_model(cfg, kernels=KernelsConfig(enabled=True, mode="auto"),
                                        device=spec["device"], gradient_checkpointing=gc_mode)
    info = {"lora_A_initialised": _init_lora(model, spec["seed"]), "patched": notes.get("kernels") == "patched",
            "fused_blocks": notes.get("fused_lora_blocks", 0), "gradient_checkpointing": gc_mode}
    step, info["cuda_graphs"] = None, "off"
    if spec.get("cuda_graphs", True) and spec["peer"] == "ours" and spec["device"].startswith("cuda"):
        import torch

        from kernels.cuda_graph import graphed_causal_lm

        step, why = graphed_causal_lm(model, torch.device(spec["device"]))
        info["cuda_graphs"] = "on" if step is not None else f"off ({why})"
    if step is not None:
        n = spec["batch"] * (spec["seq"] - 1)  # labels = input ids: every shifted position counts

        def fwd_bwd(ids):  # the mean over target tokens, as the peers' model(labels=...).loss
            return step({"input_ids": ids, "labels": ids}, 1.0 / n) / n
    else:
        def fwd_bwd(ids):
            loss_sum, k = causal_lm_loss_sum(model, ids, ids)
            loss = loss_sum / max(k, 1)
            loss.backward()
            return loss

    return model, fwd_bwd, info


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

    return model, _labels_fwd_bwd(model, use_cache=False), info


def _labels_fwd_bwd(model, **kwargs):
    """A peer's step: the model's own loss (labels = input ids, shifted inside), then its backward."""
    def fwd_bwd(ids):
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        return loss

    return fwd_bwd


def _build_unsloth(spec: dict):
    import torch
    from unsloth import FastLanguageModel  # imported first in this process (see _worker)

    model, _tok = FastLanguageModel.from_pretrained(
        model_name=spec["model_dir"], max_seq_length=spec["seq"], dtype=getattr(torch, spec["dtype"]),
        load_in_4bit=spec["mode"] == "qlora")
    gc_mode = spec["unsloth_gc"]
    model = FastLanguageModel.get_peft_model(
        model, r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=LORA_TARGETS,
        bias="none", use_gradient_checkpointing=True if gc_mode == "true" else gc_mode, random_state=spec["seed"])
    info = {"lora_A_initialised": _init_lora(model, spec["seed"]), "gradient_checkpointing": gc_mode}
    model.train()

    return model, _labels_fwd_bwd(model), info


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "triton", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth", "unsloth-zoo"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _one_step(fwd_bwd, opt, ids):
    """One training step; returns the loss (a tensor: reading it would sync)."""
    loss = fwd_bwd(ids)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _profile(step, cuda: bool, steps: int = 2, rows: int = 30) -> dict:
    """torch.profiler over `steps` more steps (after the timed ones): the kernels that take the
    time, by self device time (CPU time on CPU), per step. For finding where a contender's step
    goes (matmuls, attention, our Triton kernels, copies) - not for the headline figures."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    top = [{"name": e.key[:120], "ms_per_step": getattr(e, key) / 1e3 / steps, "calls_per_step": e.count / steps,
            "share": getattr(e, key) / total} for e in events[:rows]]
    out = {"by": key, "total_ms_per_step": total / 1e3 / steps, "top": top}
    if cuda:
        out.update(_gpu_busy(prof, steps))
    return out


def _gpu_busy(prof, steps: int) -> dict:
    """How much of the profiled span the GPU was running kernels (union of kernel intervals).
    Much less than the span means the step is bound by the host issuing kernels, not by them."""
    import torch

    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    if not spans:
        return {}
    busy, gaps, end = 0.0, 0, spans[0][0]
    for start, stop in spans:
        if start > end:
            gaps += 1
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return {"gpu_busy_ms_per_step": busy / 1e3 / steps, "gpu_span_ms_per_step": (end - spans[0][0]) / 1e3 / steps,
            "gpu_idle_gaps_per_step": gaps / steps}


def _train(spec: dict) -> dict:
    import torch

    peer = spec["peer"]
    cuda = spec["device"].startswith("cuda")
    builders = {"ours": _build_ours, "ours-eager": _build_ours, "ours-offload": _build_ours, "hf": _build_hf,
                "liger": lambda s: _build_hf(s, liger=True), "unsloth": _build_unsloth}
    torch.manual_seed(spec["seed"])
    t0 = time.perf_counter()
    model, fwd_bwd, info = builders[peer](spec)
    build_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    from kernels.qlora import make_optimizer

    opt = make_optimizer(params, lr=spec["lr"], kind=spec["optimizer"], weight_decay=0.0)
    B, T, V = spec["batch"], spec["seq"], spec["vocab_size"]

    def batch(step):
        g = torch.Generator().manual_seed(spec["seed"] + (step if spec["fresh_batches"] else 0))
        return torch.randint(0, V, (B, T), generator=g).to(spec["device"])

    # every contender alike, as our trainer does: the model's Python objects live for the run, so
    # the cyclic GC need not rescan them during steps that are bound by host time
    gc.collect()
    gc.freeze()
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
        loss = _one_step(fwd_bwd, opt, ids)
        losses.append(loss.detach().float())
        if cuda:
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - t)
    timed = step_s[spec["warmup"]:]
    losses = [float(v) for v in torch.stack(losses).cpu()]
    profile = _profile(lambda: _one_step(fwd_bwd, opt, ids), cuda) if spec.get("profile") else None
    return {
        "profile": profile,
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 3 and argv[0] == "_worker":
        return _worker(argv[1], argv[2])
    if len(argv) == 2 and argv[0] == "_prepare":
        return _prepare(argv[1])
    print("usage: python -m jobs.bench_worker _worker SPEC RESULT | _prepare SPEC", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
