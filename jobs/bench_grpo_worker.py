"""The contenders of `posttrain bench grpo`, one per process (jobs/bench_grpo.py starts them).

    python -m jobs.bench_grpo_worker <ours|trl|vllm> SPEC.json RESULT.json

  ours  the GRPO job itself (jobs.grpo.run_grpo: Ray actors, vLLM rollout colocated with the LoRA
        learner on GPU, the hf engine on CPU), configured from the spec; figures from its metrics.jsonl.
  trl   TRL's GRPOTrainer with vLLM in colocate mode and a PEFT LoRA; step time from a callback,
        generation and weight-sync time from wrappers around its vLLM generation object.
  vllm  plain vLLM: LLM.generate of the same prompts x n with the same sampling settings, CUDA
        graphs on (vLLM's default), nothing else; the rollout speed to measure ours against.

Every contender gets the same local model folder, prompts (a jsonl of question/answer rows plus a
system prompt), n, max tokens, temperature 1, top_p 1, LoRA rank (alpha 2r, all linear layers),
learning rate, no KL, token-mean loss, clip 0.2 / 0.28, one optimizer step per generation batch,
and the math_answer reward (rewards.math). The result JSON holds per-step figures; the parent
aggregates them (median over the steps after --warmup).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _rows(spec: dict) -> list[dict]:
    with open(spec["prompts"]) as f:
        return [json.loads(line) for line in f if line.strip()]


def _messages(spec: dict, question: str) -> list[dict]:
    msgs = [{"role": "user", "content": question}]
    return ([{"role": "system", "content": spec["system_prompt"]}] + msgs) if spec["system_prompt"] else msgs


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# ours: the GRPO job
# ----------------------------------------------------------------------------------------------

def ours_config(spec: dict) -> dict:
    """The GRPO job's config (a dict for jobs.config.build) that matches the shared settings."""
    gpu = spec["device"] == "cuda"
    share = spec["gpu_share"]
    return {
        "output_dir": spec["run_dir"], "max_steps": spec["warmup"] + spec["steps"], "seed": spec["seed"],
        "resume": "never", "checkpoint_every": 0, "keep_checkpoints": 1,
        "model": {"path": spec["model_dir"], "finetune": "lora", "dtype": "bfloat16" if gpu else "float32",
                  "gradient_checkpointing": spec["gradient_checkpointing"],
                  "lora": {"r": spec["rank"], "alpha": 2 * spec["rank"], "dropout": 0.0, "target_modules": "all-linear"}},
        "data": {"path": spec["prompts"], "system_prompt": spec["system_prompt"]},
        "rollout": {"backend": "vllm" if gpu else "hf", "n": spec["n"], "temperature": 1.0, "top_p": 1.0,
                    "max_tokens": spec["max_tokens"], "ignore_eos": spec["fixed_length"], "sync": spec["sync"],
                    "num_gpus": share if gpu else 0.0, "placement": "colocated",
                    "gpu_memory_utilization": spec["gpu_memory_utilization"], "max_model_len": spec["max_model_len"],
                    "batch_size": spec["prompts_per_step"], "sleep_level": spec.get("sleep_level", 1)},
        "reward": {"functions": [{"name": "math_answer"}], "num_actors": 1},
        "grpo": {"prompts_per_step": spec["prompts_per_step"], "kl_coef": 0.0, "log_kl": False,
                 "loss_agg": "token-mean", "eps_low": 0.2, "eps_high": 0.28, "lr": spec["lr"], "ppo_epochs": 1,
                 "num_minibatches": 1, "dynamic_sampling": False, "num_gpus": (1.0 - share) if gpu else 0.0},
        "eval": {"enabled": False},
    }


def run_ours(spec: dict) -> dict:
    from jobs.config import build
    from jobs.grpo import GRPOJobConfig, run_grpo

    cfg = build(GRPOJobConfig, ours_config(spec))
    t0 = time.time()
    run_grpo(cfg)
    with open(os.path.join(spec["run_dir"], "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = []
    for r in rows:
        steps.append({"step_s": r["time/step_s"], "generate_s": r["time/rollout_s"], "sync_s": r["time/sync_s"],
                      "update_s": r["time/update_s"], "reward_s": r["time/reward_s"],
                      "rollout_tokens_per_s": r["rollout_tokens_per_s"],
                      "learner_tokens_per_s": r["update_tokens_per_s"], "reward": r["reward/mean"],
                      "completion_tokens": round(r["response_length/mean"] * r["groups/total"] * spec["n"])})
    return {"ok": True, "steps": steps, "wall_s": time.time() - t0,
            "settings": {"backend": cfg.rollout.backend, "sync": cfg.rollout.sync, "transport": cfg.rollout.resolved_transport(),
                         "enforce_eager": cfg.rollout.enforce_eager, "sleep_level": cfg.rollout.sleep_level}}


# ----------------------------------------------------------------------------------------------
# TRL's GRPOTrainer (vLLM colocate)
# ----------------------------------------------------------------------------------------------

class _Timer:
    """Wraps a method of an object; adds the seconds of every call (and what `count` says) to a tally."""

    def __init__(self, obj, name: str, count=None):
        self.seconds, self.tokens, self.calls = 0.0, 0, 0
        fn = getattr(obj, name)

        def wrapped(*a, **k):
            import torch

            t = time.perf_counter()
            out = fn(*a, **k)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t
            self.calls += 1
            if count is not None:
                self.tokens += count(out)
            return out

        setattr(obj, name, wrapped)

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.tokens)
        self.seconds, self.tokens = 0.0, 0
        return out


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.math import is_correct

    gpu = spec["device"] == "cuda"
    P, n = spec["prompts_per_step"], spec["n"]
    micro = min(spec["micro_batch"], P * n)
    accum = max(1, (P * n) // micro)  # one optimizer step per generation batch of P x n completions
    rows = _rows(spec)
    ds = Dataset.from_list([{"prompt": _messages(spec, r["question"]), "answer": str(r.get("answer", ""))} for r in rows])

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if is_correct(t, a) else 0.0 for t, a in zip(texts, answer)]

    args = GRPOConfig(
        output_dir=spec["run_dir"], max_steps=spec["warmup"] + spec["steps"], seed=spec["seed"],
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum, steps_per_generation=accum,
        num_generations=n, max_completion_length=spec["max_tokens"], temperature=1.0, top_p=1.0,
        beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, num_iterations=1,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        bf16=gpu, use_cpu=not gpu, gradient_checkpointing=spec["gradient_checkpointing"],
        model_init_kwargs={"dtype": "bfloat16" if gpu else "float32"},
        use_vllm=gpu, vllm_mode="colocate", vllm_gpu_memory_utilization=spec["gpu_memory_utilization"],
        vllm_max_model_length=spec["max_model_len"], vllm_enable_sleep_mode=spec["trl_sleep"],
        generation_kwargs={"ignore_eos": True} if spec["fixed_length"] else None,
        logging_steps=1, report_to="none", save_strategy="no", shuffle_dataset=True, remove_unused_columns=False,
        dataloader_num_workers=0)
    peft = LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    trainer = GRPOTrainer(model=spec["model_dir"], reward_funcs=reward, args=args, train_dataset=ds,
                          peft_config=peft, processing_class=tok)
    gen = sync = None
    if gpu:
        gen = _Timer(trainer.vllm_generation, "generate", count=lambda out: sum(len(c) for c in out[1]))
        sync = _Timer(trainer.vllm_generation, "sync_weights")
    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_s = time.perf_counter() - self.t
            g_s, g_tok = gen.take() if gen else (0.0, 0)
            s_s, _ = sync.take() if sync else (0.0, 0)
            steps.append({"step_s": step_s, "generate_s": g_s, "sync_s": s_s, "update_s": step_s - g_s - s_s,
                          "rollout_tokens_per_s": g_tok / g_s if g_s else None, "completion_tokens": g_tok})

    trainer.add_callback(Clock())
    t0 = time.time()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    # prompt + completion tokens of a batch, for the update's tokens/s (prompt length: a sample's mean)
    prompt_tok = statistics.mean(len(tok.apply_chat_template(_messages(spec, r["question"]), tokenize=True,
                                                             add_generation_prompt=True, return_dict=True)["input_ids"])
                                 for r in rows[:64])
    for s, h in zip(steps, logs):
        s["reward"] = h["reward"]
        mean_len = h.get("completions/mean_length")
        if mean_len is not None and s["update_s"] > 0:
            s["learner_tokens_per_s"] = P * n * (prompt_tok + mean_len) / s["update_s"]
    return {"ok": True, "steps": steps, "wall_s": time.time() - t0,
            "settings": {"micro_batch": micro, "gradient_accumulation_steps": accum,
                         "vllm_enable_sleep_mode": spec["trl_sleep"], "loss_type": "dapo",
                         "vllm_importance_sampling_correction": args.vllm_importance_sampling_correction}}


# ----------------------------------------------------------------------------------------------
# plain vLLM
# ----------------------------------------------------------------------------------------------

def run_vllm(spec: dict) -> dict:
    from actors.rollout_vllm import VLLM_ENV

    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = _rows(spec)
    P = spec["prompts_per_step"]
    llm = LLM(model=spec["model_dir"], dtype="bfloat16", seed=spec["seed"], max_model_len=spec["max_model_len"],
              gpu_memory_utilization=spec["gpu_memory_utilization"])
    params = SamplingParams(n=spec["n"], temperature=1.0, top_p=1.0, max_tokens=spec["max_tokens"],
                            ignore_eos=spec["fixed_length"], seed=spec["seed"])
    steps = []
    for i in range(spec["warmup"] + spec["steps"]):
        batch = [rows[(i * P + j) % len(rows)] for j in range(P)]
        prompts = [{"prompt_token_ids": list(tok.apply_chat_template(_messages(spec, r["question"]), tokenize=True,
                                                                     add_generation_prompt=True, return_dict=True)["input_ids"])}
                   for r in batch]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        steps.append({"step_s": dt, "generate_s": dt, "rollout_tokens_per_s": tokens / dt, "completion_tokens": tokens})
    return {"ok": True, "steps": steps, "settings": {"enforce_eager": False}}


# ----------------------------------------------------------------------------------------------
# the model folder every contender loads
# ----------------------------------------------------------------------------------------------

def prepare(spec: dict) -> dict:
    """A .gguf file converted to a folder, or a random-weight preset saved with a small local
    tokenizer that is padded with placeholder tokens to the model's vocabulary (a random model
    samples any id; every one must decode, in vLLM's detokenizer too)."""
    import torch

    from kernels.model import ModelConfig, build_model, gguf_to_folder
    from kernels.tokenizer import train_tokenizer

    out, dtype = spec["model_dir"], getattr(torch, spec["dtype"])
    if spec["model"]:
        gguf_to_folder(spec["model"], out, dtype=spec["dtype"])
        return {"ok": True, "what": f"{spec['model']} converted"}
    os.makedirs(out, exist_ok=True)
    overrides = dict(kv.split("=", 1) for kv in spec["overrides"])
    overrides = {k: int(v) if v.isdigit() else v for k, v in overrides.items()}
    model = build_model(ModelConfig(preset=spec["preset"], dtype=spec["dtype"], config_overrides=overrides),
                        device="cpu", seed=spec["seed"])
    corpus = [f"question {i}: what is {i * 7 % 13} plus {i % 5}? answer: {i * 7 % 13 + i % 5}." for i in range(400)]
    tok = train_tokenizer(corpus, vocab_size=512)
    vocab = model.config.vocab_size
    if len(tok) < vocab:
        tok.add_tokens([f"<placeholder_{i}>" for i in range(vocab - len(tok))])
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None:
            cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, tok.eos_token_id, None
    model.to(dtype).save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    tok.save_pretrained(out)
    return {"ok": True, "what": f"preset {spec['preset']} (random weights, seed {spec['seed']})"}


RUNNERS = {"ours": run_ours, "trl": run_trl, "vllm": run_vllm, "prepare": prepare}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[0] not in RUNNERS:
        print(f"usage: python -m jobs.bench_grpo_worker <{'|'.join(RUNNERS)}> SPEC RESULT", file=sys.stderr)
        return 2
    name, spec_path, result_path = argv
    spec = _read(spec_path)
    res = RUNNERS[name](spec)
    res.update(contender=name, device=_device_name())
    _write(result_path, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
