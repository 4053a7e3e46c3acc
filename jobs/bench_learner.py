"""`posttrain bench learner`: the GRPO learner's update against our own SFT step, side by side.

    posttrain bench learner --model runs/smollm2.gguf --seq 384 --prompt 128
    posttrain bench learner --preset llama-3.2-1b --seq 384 --prompt 128

One process, one model spec, one GPU, the same sequence length, contenders one after another:
  sft            the SFT worker's step (kernels.factory model, fused cross-entropy, CUDA graphs where
                 they apply): rows of --seq tokens, --tokens tokens per forward/backward.
  learner        actors.learner.Learner.update on a GRPO batch of --samples sequences of --seq
                 tokens (--prompt of prompt, the rest completion; the loss on completions only), one
                 optimizer step per batch, no KL, micro-batches of --tokens tokens, packed rows.
  learner-plain  the same learner with kernels.enabled=false (Hugging Face modules, the chunked
                 full-softmax head): what the learner did before it shared the SFT model.
tokens/s counts every token a forward/backward processes (prompt + completion for the learner,
the whole row for SFT). Prints one line per contender, then
`grpo learner tokens/s ÷ sft tokens/s: N.NN` and writes --out (JSON).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time


def _model_cfg(a):
    from kernels.model import LoraConfig, ModelConfig

    overrides = dict(kv.split("=", 1) for kv in a.override)
    overrides = {k: int(v) if v.isdigit() else v for k, v in overrides.items()}
    return ModelConfig(preset=a.preset, path=a.model or "", finetune=a.mode, dtype="auto",
                       gradient_checkpointing=a.gc, config_overrides=overrides,
                       lora=LoraConfig(r=a.rank, alpha=2 * a.rank, target_modules="all-linear"))


def _vocab(model) -> int:
    from kernels.model import base_model

    return base_model(model).config.vocab_size


def _peak_reset(device):
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_sft(a, device) -> dict:
    import torch

    from kernels.factory import build_training_model
    from kernels.loss import causal_lm_loss_sum
    from kernels.patch import KernelsConfig
    from kernels.qlora import make_optimizer

    _peak_reset(device)
    model, notes = build_training_model(_model_cfg(a), kernels=KernelsConfig(), device=device, seed=a.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=a.lr)
    rows = max(1, a.tokens // a.seq)
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, _vocab(model), (rows, a.seq), generator=g).to(device)
    graph, why = None, "cpu"
    if device.type == "cuda" and not a.no_graphs:
        from kernels.cuda_graph import graphed_causal_lm

        graph, why = graphed_causal_lm(model, device)
    notes["cuda_graphs"] = "on" if graph is not None else f"off ({why})"
    n = rows * (a.seq - 1)

    def step():
        if graph is not None:
            graph({"input_ids": ids, "labels": ids}, 1.0 / n)
        else:
            loss, k = causal_lm_loss_sum(model, ids, ids)
            (loss / k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(a.warmup + a.steps):
        _sync(device)
        t = time.perf_counter()
        for _ in range(a.accum):
            step()
        _sync(device)
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    tokens = rows * a.seq * a.accum
    out = {"contender": "sft", "tokens_per_s": tokens / statistics.median(times), "tokens_per_step": tokens,
           "step_s": statistics.median(times), "peak_gib": _peak(device), "notes": notes}
    return out


def _grpo_batch(a, vocab: int, step: int) -> dict:
    """A learner batch (actors.learner_batch layout) of random prompt and completion ids."""
    import torch

    g = torch.Generator().manual_seed(a.seed * 1000 + step)
    comp = a.seq - a.prompt
    return {"prompt_ids": torch.randint(0, vocab, (a.samples, a.prompt), generator=g).tolist(),
            "completion_ids": torch.randint(0, vocab, (a.samples, comp), generator=g).tolist(),
            "rollout_logprobs": [[-1.0] * comp for _ in range(a.samples)],
            "advantages": (torch.rand(a.samples, generator=g) * 2 - 1).tolist()}


def bench_learner(a, device, kernels_on: bool) -> dict:
    from actors.learner import GRPOConfig, Learner
    from kernels.patch import KernelsConfig

    _peak_reset(device)
    cfg = GRPOConfig(prompts_per_step=max(1, a.samples // 8), lr=a.lr, log_kl=False, kl_coef=0.0,
                     micro_batch_size=a.samples, micro_batch_tokens=a.tokens, num_gpus=1 if device.type == "cuda" else 0)
    learner = Learner(_model_cfg(a), cfg, seed=a.seed, kernels=KernelsConfig(enabled=kernels_on))
    vocab = _vocab(learner.model)
    rates, steps = [], []
    for i in range(a.warmup + a.steps):
        m = learner.update(_grpo_batch(a, vocab, i))
        if i >= a.warmup:
            rates.append(m["learner_tokens"] / m["learner_update_s"])
            steps.append(m["learner_update_s"])
    out = {"contender": "learner" if kernels_on else "learner-plain", "tokens_per_s": statistics.median(rates),
           "tokens_per_step": a.samples * a.seq, "step_s": statistics.median(steps), "peak_gib": _peak(device),
           "notes": learner.notes}
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="posttrain bench learner", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default="", help="a local Hugging Face folder or .gguf file (wins over --preset)")
    p.add_argument("--preset", default="llama-3.2-1b")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="config override of the preset, e.g. num_hidden_layers=2 (repeatable)")
    p.add_argument("--mode", choices=("lora", "qlora", "full"), default="lora")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--seq", type=int, default=384, help="tokens per sequence (prompt + completion; SFT row)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens of each GRPO sequence")
    p.add_argument("--samples", type=int, default=512, help="GRPO sequences per update (64 prompts x 8)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per forward/backward (both contenders)")
    p.add_argument("--accum", type=int, default=0,
                   help="SFT micro-batches per step (0 = as many as the learner's batch has tokens)")
    p.add_argument("--gc", choices=("true", "false", "offload"), default="true", help="gradient checkpointing")
    p.add_argument("--no-graphs", action="store_true", help="SFT without CUDA graphs")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contenders", default="sft,learner,learner-plain")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (smoke tests)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    a = p.parse_args(argv)
    a.gc = {"true": True, "false": False, "offload": "offload"}[a.gc]
    for name in ("seq", "samples", "tokens", "steps", "rank"):
        if getattr(a, name) < 1:
            p.error(f"--{name}: must be >= 1, got {getattr(a, name)}")
    if not 1 <= a.prompt < a.seq:
        p.error(f"--prompt: must be in [1, --seq), got {a.prompt} with --seq {a.seq}")
    if a.warmup < 0 or a.accum < 0:
        p.error("--warmup and --accum: must be >= 0")
    a.accum = a.accum or max(1, round(a.samples * a.seq / (max(1, a.tokens // a.seq) * a.seq)))
    unknown = set(a.contenders.split(",")) - {"sft", "learner", "learner-plain"}
    if unknown:
        p.error(f"--contenders: unknown {', '.join(sorted(unknown))}; accepted: sft, learner, learner-plain")
    return a


def main(argv: list[str] | None = None) -> int:
    import torch

    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    on_gpu = torch.cuda.is_available() and not a.cpu
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    spec = a.model or f"preset {a.preset}"
    print(f"[bench learner] {spec}, {a.mode} r{a.rank}, seq {a.seq} (prompt {a.prompt}), {a.samples} samples, "
          f"{a.tokens} tokens per forward/backward, gradient checkpointing {a.gc}, on {name}", flush=True)
    results = []
    for c in a.contenders.split(","):
        r = bench_sft(a, device) if c == "sft" else bench_learner(a, device, kernels_on=(c == "learner"))
        peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "-"
        print(f"[bench learner] {c:<13} {r['tokens_per_s']:>10,.0f} tokens/s  step {r['step_s']:.3f}s "
              f"({r['tokens_per_step']} tokens)  peak {peak}  notes {r['notes']}", flush=True)
        results.append(r)
    by = {r["contender"]: r for r in results}
    ratios = {}
    if "sft" in by:
        for c in ("learner", "learner-plain"):
            if c in by:
                ratios[c] = by[c]["tokens_per_s"] / by["sft"]["tokens_per_s"]
        if "learner" in ratios:
            print(f"grpo learner tokens/s ÷ sft tokens/s: {ratios['learner']:.2f}")
        if "learner-plain" in ratios:
            print(f"(kernels off) grpo learner tokens/s ÷ sft tokens/s: {ratios['learner-plain']:.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": name, "args": {k: v for k, v in vars(a).items()}, "results": results,
                       "ratios": ratios, "date": time.strftime("%Y-%m-%d")}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
