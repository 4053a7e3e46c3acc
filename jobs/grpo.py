"""GRPO on Ray: rollouts -> rewards -> group advantages -> learner update -> weight sync, per step.

What it does, top to bottom (`run_grpo`):
  1. resolve the config (YAML + dotted overrides), write OUTPUT_DIR/config.yaml, start/join Ray;
  2. starting point: model.path, or - when it is empty and init.sft_config is set - run the SFT job
     (jobs.sft.run_sft) into OUTPUT_DIR/sft first (skipped when OUTPUT_DIR/sft/merged exists);
  3. prompts through Ray Data: the built-in task's train split or a jsonl/json/parquet file with
     `question` (+ `answer`) or `prompt` (string or chat messages) columns; every other column is
     handed to the reward functions (e.g. `answer` to math_answer);
  4. held-out greedy exact-match accuracy of the starting model (cluster.evaluate) -> eval_accuracy_start;
  5. the actors: rollout workers (HF generate on CPU, vLLM on GPU), learner(s), reward pool, weight sync;
  6. per step, each phase timed: sample `grpo.prompts_per_step` prompts x `rollout.n` completions;
     score them (RewardPool); group-normalised advantages; dynamic sampling over-samples prompts in
     the same generate call and trains on prompts_per_step groups whose rewards vary
     (jobs/grpo_sampling.py; grpo.max_refill_rounds extra rounds when a step still falls short);
     learner update(s); weights to the rollout engines; a line of OUTPUT_DIR/metrics.jsonl;
     a checkpoint every `checkpoint_every` steps;
  7. the final merged model (OUTPUT_DIR/merged, + OUTPUT_DIR/adapter for LoRA), held-out accuracy again
     -> eval_accuracy_end in OUTPUT_DIR/summary.json.

Launch:
  posttrain grpo jobs/configs/tiny-grpo.yaml output_dir=runs/grpo          # CPU, ~10 minutes
  python -m jobs.grpo jobs/configs/gsm8k-grpo.yaml model.path=/models/qwen  # GPU, vLLM rollouts
  ray job submit --working-dir . -- python -m jobs.grpo jobs/configs/gsm8k-grpo.yaml
Running it again with the same output_dir resumes from the last intact checkpoint (resume: auto; a
changed training config is refused unless resume=force: docs/reliability.md). Ctrl-C or SIGTERM ends
it with one line naming the last checkpoint saved (exit code 130 / 143).

Deviations from the papers (GRPO: Shao et al. 2024; DAPO: Yu et al. 2025; GSPO: Zheng et al. 2025;
Dr. GRPO: Liu et al. 2025), all deliberate:
  - The group std is the unbiased (n - 1) one; groups of one sample get advantage 0 instead of NaN.
  - The KL penalty is off by default (kl_coef 0, as DAPO); the KL to the reference is still
    measured and logged (log_kl). With kl_coef > 0 it is added per token to the loss, as in GRPO.
  - The default aggregation is DAPO's token-mean; GRPO's seq-mean-token-mean and Dr. GRPO's
    seq-mean-token-sum-norm are options (grpo.loss_agg). Dr. GRPO's constant is rollout.max_tokens.
  - "Old" logprobs are recomputed by the learner only when a batch takes more than one optimizer
    step; with one step the ratio is exactly 1 and the recompute is skipped (its value is known).
    grpo.old_logprobs=rollout uses the engine's logprobs instead (the true behaviour policy).
  - Dynamic sampling (DAPO) over-samples prompts in one generate call instead of DAPO's repeated
    sampling, and is bounded: after max_refill_rounds extra rounds the step trains on the groups
    it has (possibly fewer than prompts_per_step); a step with none skips the update.
    DAPO's overlong reward shaping is a reward function (rewards.length:overlong_penalty), not built in.
  - GSPO is implemented in its GSPO-token form (same value and gradient as the sequence objective
    for outcome rewards); use it with loss_agg seq-mean-token-mean and small eps (3e-4, 4e-4).
  - Asynchronous modes (grpo.async_mode one_step | bounded) train on rollouts made by weights up to
    1 | grpo.max_weights_lag versions old. is_correction auto then weights each token by the
    truncated importance ratio pi_old / pi_rollout against the engine's logprobs (the behaviour
    policy); the PPO ratio itself stays against pi_old, as in decoupled PPO.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace

from actors import grpo_math
from actors.learner import make_batch
from cluster.run_files import RunFiles
from jobs.config import ConfigError, dump_yaml, load
from jobs.grpo_config import GRPOJobConfig, HeldOutEvalConfig, InitConfig, PromptDataConfig, RewardConfig
from jobs.grpo_sampling import Oversampler, PromptStream
from jobs.preflight import preflight_grpo

__all__ = ["GRPOJobConfig", "HeldOutEvalConfig", "InitConfig", "PromptDataConfig", "PromptStream", "RewardConfig",
           "main", "run_grpo"]


# ----------------------------------------------------------------------------------------------
# Helpers of the controller (no state of their own)
# ----------------------------------------------------------------------------------------------

def init_ray(cfg: GRPOJobConfig):
    """Ray for the GRPO job: a local instance gets CPUs for every actor the config asks for."""
    from cluster.ray_session import init_ray as connect

    need = (cfg.rollout.num_workers * cfg.rollout.num_cpus + cfg.grpo.num_learners * cfg.grpo.num_cpus
            + cfg.reward.num_actors * cfg.reward.num_cpus)
    return connect(min_cpus=max(math.ceil(need) + 1, 4), num_cpus=cfg.ray_num_cpus, tag="grpo")


def prepare_start_model(cfg: GRPOJobConfig, files: RunFiles) -> GRPOJobConfig:
    """model.path (a .gguf file converted once to OUTPUT_DIR/base: the engines load a folder),
    or the merged model of an SFT run made here (init.sft_config)."""
    from kernels.model import gguf_to_folder, is_gguf

    if cfg.model.path and is_gguf(cfg.model.path):
        base = files.path("base")
        print(f"[grpo] {cfg.model.path}: a .gguf file, converted to a model folder {base} (once)", flush=True)
        gguf_to_folder(cfg.model.path, base, dtype="bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype)
        tok = cfg.model.tokenizer if cfg.model.tokenizer and not is_gguf(cfg.model.tokenizer) else base
        return replace(cfg, model=replace(cfg.model, path=base, tokenizer=tok))
    if cfg.model.path or not cfg.init.sft_config:
        return cfg
    sft_dir = files.path("sft")
    merged = os.path.join(sft_dir, "merged")
    if not os.path.exists(os.path.join(merged, "config.json")):
        from jobs.sft import SFTJobConfig, run_sft

        overrides = [f"output_dir={sft_dir}", f"seed={cfg.seed}"] + list(cfg.init.sft_overrides)
        if cfg.init.sft_steps:
            overrides.append(f"max_steps={cfg.init.sft_steps}")
        sft_cfg = load(SFTJobConfig, cfg.init.sft_config_path(), overrides)
        print(f"[grpo] no model.path: SFT first ({cfg.init.sft_config}, {cfg.init.sft_steps or 'all'} steps) "
              f"-> {sft_dir}", flush=True)
        t0 = time.time()
        run_sft(sft_cfg)
        files.write_summary({"sft_seconds": time.time() - t0})
    else:
        print(f"[grpo] starting from the existing SFT run {sft_dir}", flush=True)
    tok = cfg.model.tokenizer or (merged if os.path.exists(os.path.join(merged, "tokenizer_config.json"))
                                  else os.path.join(sft_dir, "tokenizer"))
    return replace(cfg, model=replace(cfg.model, path=merged, tokenizer=tok))


def resolved_grpo(cfg: GRPOJobConfig):
    """The learner's config with grpo.is_correction "auto" decided: token_truncate against vLLM's
    logprobs (another engine: its kernels and bf16 rounding differ from the learner's) or in an
    async mode (samples of older weights: the ratio to them is the off-policy correction); off for
    the hf engine in sync mode (the learner's own model code, the current weights)."""
    g = cfg.grpo
    if g.is_correction != "auto":
        return g
    off_policy = cfg.rollout.backend == "vllm" or g.async_mode != "off"
    return replace(g, is_correction="token_truncate" if off_policy else "off")


def tokenizer_dir(cfg: GRPOJobConfig) -> str:
    d = cfg.model.tokenizer or cfg.model.path
    if not d or not os.path.exists(os.path.join(d, "tokenizer_config.json")):
        raise ConfigError("model.tokenizer: no tokenizer found (set model.tokenizer, or model.path to a "
                          "folder that holds one)")
    return d


def read_prompts(cfg: PromptDataConfig, episodes: bool = False) -> list[dict]:
    """Prompt rows {"prompt": chat messages, "text": str, "columns": {...}, "row": the row as read},
    read in the driver by the one set of file readers (cluster.readers: every format SFT reads; a
    bad row fails naming file:row). episodes (env.name set): the environment's reset() builds the
    prompt from the row, so a row needs no question/prompt column here (e.g. `problem`, `messages`)."""
    if cfg.path == "builtin":
        from cluster.builtin_task import generate

        rows, _ = generate(cfg.builtin_train_size, 200, seed=0)  # the split SFT trains on
    else:
        from cluster.readers import read_rows

        rows = read_rows(cfg.path, field="data.path", on_bad_row="fail", subset=cfg.subset, split=cfg.split)
    system = cfg.system_prompt

    def to_prompt(row: dict) -> dict:
        if "question" in row:
            text, messages = str(row["question"]), [{"role": "user", "content": str(row["question"])}]
        elif "prompt" in row:
            p = row["prompt"]
            if isinstance(p, str):
                text, messages = p, [{"role": "user", "content": p}]
            else:
                messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in p]
                text = messages[-1]["content"]
        elif episodes:
            text, messages = "", []
        else:
            raise ValueError(f"data: a prompt row needs a 'question' or 'prompt' column, got {sorted(row)}")
        if system and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        columns = {k: v for k, v in row.items() if k not in ("question", "prompt")}
        return {"prompt": json.dumps(messages), "text": text, "columns": json.dumps(columns, default=str)}

    # rows are few and small: converting them in the driver is faster than scheduling map tasks
    out = [to_prompt(dict(r)) for r in rows]
    out = [{"prompt": json.loads(r["prompt"]), "text": r["text"], "columns": json.loads(r["columns"]),
            "row": json.loads(json.dumps(dict(raw), default=str))}  # as it was: multi-turn reset() reads it
           for r, raw in zip(out, rows)]
    if not out:
        raise ConfigError(f"data.path: {cfg.path!r} holds no prompts")
    return out


def held_out_accuracy(cfg: GRPOJobConfig, model_dir: str, tok_dir: str) -> dict:
    from cluster.evaluate import EvalConfig, evaluate, load_rows
    from kernels.tokenizer import load_tokenizer

    e = cfg.eval
    ecfg = EvalConfig(data=e.data, subset=e.subset, split=e.split, backend=e.backend,
                      max_new_tokens=e.max_new_tokens,
                      max_problems=e.max_problems, system_prompt=cfg.data.system_prompt,
                      batch_size=e.batch_size, stop=list(cfg.rollout.stop))
    t0 = time.time()
    res = evaluate(model_dir, load_tokenizer(tok_dir), load_rows(e.data, subset=e.subset, split=e.split), ecfg)
    res["seconds"] = time.time() - t0
    return res


def score(pool, prompts: list[dict], groups: list[list]) -> tuple[list[float], object]:
    """Rewards of every sample (flattened group by group) and the RewardResult. Columns: the prompt
    row's other fields (e.g. answer) and completion_lengths (tokens)."""
    n = len(groups[0]) if groups else 0
    texts = [p["text"] for p in prompts for _ in range(n)]
    completions = [s.text for g in groups for s in g]
    keys = sorted({k for p in prompts for k in p["columns"]})
    columns = {k: [p["columns"].get(k) for p in prompts for _ in range(n)] for k in keys}
    # token counts, for length-based rewards (rewards.length:overlong_penalty)
    columns["completion_lengths"] = [len(s.completion_token_ids) for g in groups for s in g]
    res = pool.score(texts, completions, columns)
    return list(res.total), res


def accuracy_term(cfg: GRPOJobConfig) -> str | None:
    """The reward term that means "correct" (math_answer; multi-turn: the environment's reward,
    success = reward > 0), for the accuracy metric."""
    if cfg.env.enabled:
        return "env"
    for s in cfg.reward.specs():
        if s.name_or_path.endswith("math_answer"):
            return s.key
    return None


def _ckpt_step(folder: str) -> int | None:
    name = os.path.basename(folder)
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def checkpoints(files: RunFiles) -> list[str]:
    """The checkpoint folders (step_NNNNNN), oldest step first; an interrupted save is a
    step_NNNNNN.partial folder and not among them."""
    found = [d for d in glob.glob(files.path("checkpoints", "step_*")) if _ckpt_step(d) is not None]
    return sorted(found, key=_ckpt_step)


def checkpoint_problem(folder: str) -> str | None:
    """None when a GRPO checkpoint is intact: the learner's state (kernels.training_state) and
    controller.json; else what is wrong, naming the file."""
    from kernels.training_state import checkpoint_problem as learner_problem

    why = learner_problem(folder)
    if why:
        return why
    try:
        with open(os.path.join(folder, "controller.json")) as f:
            state = json.load(f)
        int(state["step"]), int(state["prompt_position"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"controller.json: unreadable ({type(e).__name__}: {e})"
    return None


def prune_checkpoints(files: RunFiles, keep: int, protect: str, step: int) -> None:
    """Keep `keep` checkpoint folders of every attempt (`protect`, the newest or the one resumed
    from, among them; those above `step`, left by an attempt cut off later, go first) and remove
    the .partial folders of interrupted saves."""
    from cluster.checkpoint import prune_checkpoints as prune

    prune(checkpoints(files), keep, protect=(protect,), current_step=step, step_of=_ckpt_step)
    for partial in glob.glob(files.path("checkpoints", "step_*.partial")):
        shutil.rmtree(partial, ignore_errors=True)


def save_checkpoint(files: RunFiles, learners, step: int, stream: PromptStream, keep: int,
                    keep_fraction: float | None = None) -> str:
    """The learner's state and the controller's position as checkpoints/step_NNNNNN. Written under
    a .partial name and renamed when complete, so a save cut off by Ctrl-C never looks like a
    checkpoint; then pruned to `keep` folders, counting earlier attempts' too."""
    path = files.path("checkpoints", f"step_{step:06d}")
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    learners.save(tmp)
    with open(os.path.join(tmp, "controller.json"), "w") as f:
        json.dump({"step": step, "prompt_position": stream.position, "keep_fraction": keep_fraction}, f)
    shutil.rmtree(path, ignore_errors=True)  # the same step, saved by an attempt that was cut off
    os.replace(tmp, path)
    prune_checkpoints(files, keep, protect=path, step=step)
    return path


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs) -> float:
    xs = list(xs)
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def step_record(step: int, groups: list[list], rewards: list[float], keep: list[bool], kept: list[int],
                samples: list, train_rewards: list[float], refill_rounds: int, reward_results: list,
                acc_key: str | None, lm: dict, si: dict, timing: dict, v_before: int) -> dict:
    """One metrics.jsonl line: every sample generated this step (first round + refills) for the
    reward/length statistics, the trained groups for the update statistics."""
    flat = [s for g in groups for s in g]
    lengths = [len(s.completion_token_ids) for s in flat]
    train_tok = sum(len(s.prompt_token_ids) + len(s.completion_token_ids) for s in samples)
    per_fn: dict[str, list[float]] = {}
    for r in reward_results:
        for k, v in r.per_function.items():
            per_fn.setdefault(k, []).extend(v)
    record = {
        "step": step,
        "reward/mean": _mean(rewards), "reward/std": _std(rewards), "reward/train_mean": _mean(train_rewards),
        "groups/total": len(groups), "groups/kept": len(kept), "groups/refill_rounds": refill_rounds,
        "groups/zero_variance_frac": 1.0 - sum(keep) / max(len(keep), 1),
        "samples/trained": len(samples),
        "response_length/mean": _mean(lengths), "response_length/max": max(lengths) if lengths else 0,
        "truncation_rate": _mean(1.0 if s.finish_reason == "length" else 0.0 for s in flat),
        "rollout_tokens_per_s": sum(lengths) / max(timing["rollout_s"], 1e-9),
        "update_tokens_per_s": train_tok / max(timing["update_s"], 1e-9) if samples else 0.0,
        "sync_engine_s": si.get("sync_engine_s", 0.0),
        # weight versions between the oldest sample's generator and the policy it trains (async: <= the bound)
        "weights_lag": v_before - min(s.weights_version for s in flat) if flat else 0,
    }
    if acc_key in per_fn:
        record["accuracy"] = _mean(1.0 if v > 0 else 0.0 for v in per_fn[acc_key])
    for k, v in per_fn.items():
        record[f"reward/{k}/mean"], record[f"reward/{k}/std"] = _mean(v), _std(v)
        record[f"reward/{k}/failures"] = sum(r.failures.get(k, 0) for r in reward_results)
        record[f"reward/{k}/timeouts"] = sum(r.timeouts.get(k, 0) for r in reward_results)
    record.update({f"time/{k}": v for k, v in timing.items()})
    for k in ("loss", "kl", "clip_frac", "clip_frac_low", "clip_frac_high", "entropy", "grad_norm",
              "lr", "ratio_mean", "mismatch_kl", "is_weight_mean", "is_clip_frac", "optimizer_steps"):
        if k in lm:
            record[k] = lm[k]
    return record


def step_fields(r: dict, sep: str = "  ") -> str:
    """A step's metrics on the console: the plain line's tail, or (sep " ") the progress bar's postfix."""
    return (f"reward {r['reward/mean']:.3f}"
            + (f"{sep}acc {r['accuracy']:.3f}" if "accuracy" in r else "")
            + f"{sep}kept {r['groups/kept']}/{r['groups/total']}{sep}len {r['response_length/mean']:.1f}"
            + (f"{sep}turns {r['env/turns_mean']:.2f}{sep}tool-err {r['env/tool_error_rate']:.2f}"
               if "env/turns_mean" in r else "")
            + (f"{sep}kl {r['kl']:.4f}" if "kl" in r else "")
            + (f"{sep}clip {r['clip_frac']:.3f}" if "clip_frac" in r else "")
            + f"{sep}| rollout {r['time/rollout_s']:.1f}s reward {r['time/reward_s']:.1f}s "
              f"update {r['time/update_s']:.1f}s sync {r['time/sync_s']:.2f}s other {r.get('time/other_s', 0.0):.2f}s")


def print_step(r: dict, max_steps: int) -> None:
    """One step on the console (cluster.console): a progress bar with ETA on a terminal, these
    fields as its postfix; elsewhere a plain line at every ~10% of the run (--verbose: every step)."""
    from cluster import console

    # the run's clock starts with its first step (this call comes at its end)
    bar = console.progress("grpo", "[grpo] step", max_steps, initial=r["step"] - 1,
                           started=time.monotonic() - r.get("time/step_s", 0.0))
    bar.update(r["step"], step_fields(r, sep=" " if bar.bar is not None else "  "))
    if r["step"] >= max_steps:
        bar.close()


# ----------------------------------------------------------------------------------------------
# The controller
# ----------------------------------------------------------------------------------------------

# Keys a resumed run may change (docs/reliability.md): they do not change what the checkpoints'
# weights were trained with. Every other key must match config.yaml, unless resume=force.
RESUME_SAFE_KEYS = ("output_dir", "max_steps", "resume", "checkpoint_every", "keep_checkpoints", "ray_num_cpus",
                    "num_threads", "eval", "init", "reward.num_actors", "reward.num_cpus", "reward.batch_size",
                    "reward.max_failure_rate", "report_to")


def check_resume_config(cfg: GRPOJobConfig, files: RunFiles) -> None:
    """A resume whose training config differs from the run's config.yaml is refused, the differing
    keys listed (resume=force continues anyway)."""
    from cluster.run_files import check_config_unchanged
    from jobs.config import to_dict

    if cfg.resume == "never" or not checkpoints(files):
        return
    try:
        check_config_unchanged(files.read_config(), to_dict(cfg), RESUME_SAFE_KEYS, output_dir=cfg.output_dir,
                               force=cfg.resume == "force", force_key="resume", tag="grpo")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_prompts_per_step(cfg: GRPOJobConfig, n_prompts: int | None) -> None:
    """A step samples grpo.prompts_per_step distinct prompts: the prompt set must hold that many
    (n_prompts None: the built-in set, whose size the config gives, before anything is read)."""
    if n_prompts is None:
        if cfg.data.path != "builtin":
            return
        n_prompts = cfg.data.builtin_train_size
    if cfg.grpo.prompts_per_step > n_prompts:
        where = "data.builtin_train_size" if cfg.data.path == "builtin" else f"data.path {cfg.data.path!r}"
        raise ConfigError(f"grpo.prompts_per_step: {cfg.grpo.prompts_per_step} is more than the {n_prompts} "
                          f"prompts of {where}; a step would repeat prompts; lower it or add prompts")


def run_grpo(cfg: GRPOJobConfig) -> dict:
    import torch

    from actors.reward import RewardPool
    from cluster.grpo_group import LearnerGroup, Placement, RolloutGroup, WeightSync
    from kernels.tokenizer import load_tokenizer

    t_start = time.time()
    files = RunFiles(cfg.output_dir)
    if cfg.resume == "never" and (files.read_metrics() or checkpoints(files)):
        raise ConfigError(f"resume=never but {cfg.output_dir} already holds a run; choose a new output_dir "
                          f"or resume=auto")
    check_prompts_per_step(cfg, None)
    init_ray(cfg)

    # 1-2. starting model (maybe SFT first), config on disk (compared first with the one the
    # checkpoints were trained with)
    cfg = prepare_start_model(cfg, files)
    t_grpo = time.time()  # after the SFT warm-up, if any
    check_resume_config(cfg, files)
    dump_yaml(cfg, files.path("config.yaml"))
    tok_dir = tokenizer_dir(cfg)
    tok = load_tokenizer(tok_dir)
    start_model = cfg.model.path
    summary = files.read_summary()

    # 3. prompts
    rows = read_prompts(cfg.data, episodes=cfg.env.enabled)
    check_prompts_per_step(cfg, len(rows))
    print(f"[grpo] {len(rows)} prompts from {cfg.data.path}; model {start_model or cfg.model.preset}", flush=True)

    # 4. held-out accuracy of the starting model (once per run, also across resumes; multi-turn:
    # held-out success, measured on the rollout engines once they are up)
    episodes = cfg.env.enabled
    if cfg.eval.enabled and not episodes and "eval_accuracy_start" not in summary:
        if not start_model:
            raise ConfigError("eval: the held-out evaluation needs a model folder (model.path or init.sft_config)")
        acc = held_out_accuracy(cfg, start_model, tok_dir)
        files.write_summary({"eval_accuracy_start": acc["accuracy"], "eval_problems": acc["n"],
                             "eval_start_seconds": acc["seconds"]})
        print(f"[grpo] held-out exact match at start: {acc['accuracy']:.3f} ({acc['correct']}/{acc['n']}, "
              f"{acc['seconds']:.0f}s)", flush=True)

    # 5. actors
    t0 = time.time()
    lora = cfg.model.lora if cfg.model.finetune != "full" else None
    threads = cfg.num_threads
    placement = Placement.build(cfg.rollout, cfg.grpo)
    rollouts = RolloutGroup(cfg.model, cfg.rollout, tok_dir, seed=cfg.seed, lora=lora, placement=placement,
                            num_threads=threads)
    learners = LearnerGroup(cfg.model, resolved_grpo(cfg), logprob_temperature=cfg.rollout.temperature,
                            max_len_norm=cfg.rollout.max_tokens, seed=cfg.seed, pad_id=tok.pad_token_id or 0,
                            placement=placement, num_threads=threads, kernels=cfg.kernels)
    sync = WeightSync(learners, rollouts, cfg.rollout, lora)
    pool = None if episodes else RewardPool(
        cfg.reward.specs(), num_actors=cfg.reward.num_actors, timeout_s=cfg.reward.timeout_s,
        failure_reward=cfg.reward.failure_reward, batch_size=cfg.reward.batch_size,
        num_cpus_per_actor=cfg.reward.num_cpus, max_failure_rate=cfg.reward.max_failure_rate)
    print(f"[grpo] actors ready in {time.time() - t0:.1f}s: {cfg.rollout.num_workers} rollout "
          f"({cfg.rollout.backend}), {cfg.grpo.num_learners} learner, "
          + (f"environment {cfg.env.name} (multi-turn)" if episodes else f"{cfg.reward.num_actors} reward")
          + f"; weight sync {cfg.rollout.sync} via {sync.transport}", flush=True)

    # resume: from the newest intact checkpoint (a corrupt or torn one is named and passed over)
    stream = PromptStream(rows, cfg.seed)
    first_step = 0
    resumed: dict = {}  # the controller state of the checkpoint resumed from
    last = None
    if cfg.resume != "never":
        from kernels.training_state import newest_intact

        last = newest_intact(checkpoints(files), problem=checkpoint_problem, on_skip=lambda f, why: print(
            f"[grpo] warning: checkpoint {f} is not intact ({why}); skipped, resuming from the one before it",
            flush=True))
    if last is not None:
        with open(os.path.join(last, "controller.json")) as f:
            resumed = json.load(f)
        learners.load(last)
        first_step, stream.position = resumed["step"], resumed["prompt_position"]
        prune_checkpoints(files, cfg.keep_checkpoints, protect=last, step=first_step)
        files.truncate_metrics_after(first_step)
        sync.push(version=first_step)
        print(f"[grpo] resumed from {last} (step {first_step})", flush=True)
    if episodes and cfg.eval.enabled:
        from jobs.grpo_env import eval_rows, held_out_success

        held_rows = eval_rows(cfg)
        if "eval_success_start" not in summary and first_step == 0:
            ev = held_out_success(cfg, rollouts, held_rows)
            files.write_summary({"eval_success_start": ev["success"], "eval_problems": ev["n"],
                                 "eval_start_seconds": ev["seconds"]})
            print(f"[grpo] held-out success at start ({cfg.env.name}, greedy episodes): {ev['success']:.3f} "
                  f"({ev['correct']}/{ev['n']}, {ev['turns_mean']:.2f} turns, {ev['seconds']:.0f}s)", flush=True)
    files.start_tracking(cfg.report_to, config=cfg, start_step=first_step)  # live: each files.log_metrics

    # 6. the loop
    adv_fn = grpo_math.get_adv_est(cfg.grpo.adv_estimator)
    acc_key = accuracy_term(cfg)
    P, n = cfg.grpo.prompts_per_step, cfg.rollout.n
    dynamic = cfg.grpo.dynamic_sampling
    ahead = cfg.grpo.weights_lag_bound  # async: generations launched ahead of the learner (staleness bound)
    over = Oversampler(cfg.grpo, keep_fraction=resumed.get("keep_fraction"))

    def launch(step: int, groups: int, round_: int = 0):
        """Prompts for `groups` trained groups, over-sampled (dynamic sampling), in one generate call
        (multi-turn: one episodes call)."""
        ps = stream.take(over.prompts(groups, len(rows)))
        seed = cfg.seed * 7919 + step + 100_000 * round_
        if episodes:
            from jobs.grpo_env import env_rows

            return ps, rollouts.episodes_async(env_rows(ps), cfg.env.spec(), seed=seed,
                                               max_total_tokens=cfg.env.max_total_tokens)
        return ps, rollouts.generate_async([p["prompt"] for p in ps], seed=seed)

    def score_groups(ps: list[dict], gs: list[list]):
        if episodes:
            from jobs.grpo_env import score_episodes

            return score_episodes(gs)
        return score(pool, ps, gs)

    from collections import deque

    pending: deque = deque()  # async: (prompts, in-flight generation) of the next `ahead` steps, in order
    next_launch = first_step
    version = first_step  # the weights version the engines hold (bumped by every push)
    for step in range(first_step, max(first_step, cfg.max_steps)):
        t_step = time.perf_counter()
        timing: dict[str, float] = {}
        v_before = version
        factor = over.factor(P)

        # rollouts (async: collected from an earlier step's launch; then launches are topped up to
        # `ahead` steps: queued on the engines before this step's weight push, so their samples are
        # at most `ahead` versions old)
        t = time.perf_counter()
        if not pending:
            pending.append(launch(step, P))
            next_launch = step + 1
        prompts, refs = pending.popleft()
        groups = rollouts.collect(refs)
        split = {} if ahead else rollouts.timing()  # inside the rollout phase: wake, generation
        while len(pending) < ahead and next_launch < cfg.max_steps:
            pending.append(launch(next_launch, P))
            next_launch += 1
        timing["rollout_s"] = time.perf_counter() - t

        # rewards
        t = time.perf_counter()
        rewards, res = score_groups(prompts, groups)
        timing["reward_s"] = time.perf_counter() - t

        # advantages; dynamic sampling trains on P groups that carry a signal (over-sampled above;
        # a refill round only when a step still falls short)
        all_rewards, all_groups = list(rewards), list(groups)
        reward_results = [res]
        refill_rounds = 0
        while True:
            gid = torch.arange(len(all_groups)).repeat_interleave(n)
            keep = grpo_math.groups_with_variance(torch.tensor(all_rewards), gid).tolist()
            if not dynamic or sum(keep) >= P or refill_rounds >= cfg.grpo.max_refill_rounds:
                break
            refill_rounds += 1
            t = time.perf_counter()
            more, refs = launch(step, P - sum(keep), refill_rounds)
            extra = rollouts.collect(refs)
            timing["rollout_s"] += time.perf_counter() - t
            t = time.perf_counter()
            r2, res2 = score_groups(more, extra)
            timing["reward_s"] += time.perf_counter() - t
            all_rewards += r2
            all_groups += extra
            reward_results.append(res2)
        if dynamic:
            over.observe(sum(keep), len(all_groups))
        kept = Oversampler.select(keep, P, dynamic)
        rewards_t = torch.tensor(all_rewards).view(-1, n)                     # [G, n]
        train_rewards = rewards_t[kept].reshape(-1)
        adv = adv_fn(train_rewards, torch.arange(len(kept)).repeat_interleave(n)).tolist()
        samples = [s for i in kept for s in all_groups[i]]

        # learner update
        t = time.perf_counter()
        rollouts.sleep()  # colocated vLLM: give the GPU memory to the learner
        split["sleep_s"] = time.perf_counter() - t
        lm = learners.update(make_batch(samples, adv)) if samples else {}
        timing["update_s"] = time.perf_counter() - t

        # weight sync
        t = time.perf_counter()
        si = {"sync_s": 0.0, "sync_engine_s": 0.0}
        if samples:
            version = step + 1
            si = sync.push(version=version)
        timing["sync_s"] = time.perf_counter() - t

        # metrics of this step; the phases add up to time/step_s with time/other_s (advantages,
        # batching, bookkeeping)
        record = step_record(step + 1, all_groups, all_rewards, keep, kept, samples, train_rewards.tolist(),
                             refill_rounds, reward_results, acc_key, lm, si, timing, v_before)
        record["groups/oversample"] = factor
        if cfg.grpo.mask_truncated_completions:  # samples the learner left out of the loss
            record["samples/masked_truncated"] = sum(s.finish_reason == "length" for s in samples)
        if episodes:  # turns, tool calls and tool-error rates of every episode of the step
            from jobs.grpo_env import episode_record

            record.update(episode_record([s for g in all_groups for s in g]))
        # where the phases' time goes (parts of time/rollout_s and time/update_s, not added to the step)
        record.update({f"time/split/{k}": v for k, v in split.items()})
        if "learner_update_s" in lm:
            record["time/split/learner_s"] = lm["learner_update_s"]
        record["time/step_s"] = time.perf_counter() - t_step
        record["time/other_s"] = max(0.0, record["time/step_s"] - sum(timing.values()))
        files.log_metrics(record)
        print_step(record, cfg.max_steps)

        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(files, learners, step + 1, stream, cfg.keep_checkpoints, over.keep_fraction)

    for _, refs in pending:  # async: generations nobody will train on
        rollouts.collect(refs)

    # 7. final model and held-out accuracy
    save_checkpoint(files, learners, cfg.max_steps, stream, cfg.keep_checkpoints, over.keep_fraction)
    merged = learners.save_merged(files.path("merged"), tok_dir)
    if cfg.model.finetune != "full":
        learners.save_adapter(files.path("adapter"))
    from kernels.run_manifest import RunManifest  # what export and eval read back (run.json)

    RunManifest.for_run(cfg.output_dir, "grpo", cfg.model, seed=cfg.seed, vocab_size=None,
                        train_device="cuda" if cfg.grpo.num_gpus > 0 else "cpu",
                        tokenizer_dir=tok_dir).write(cfg.output_dir)
    end_success = None
    if episodes and cfg.eval.enabled:  # the engines hold the final weights (pushed after the last update)
        end_success = held_out_success(cfg, rollouts, held_rows)
    if pool is not None:
        pool.shutdown()
    rollouts.shutdown()
    learners.shutdown()
    metrics = files.read_metrics()
    out = {"steps": cfg.max_steps, "merged_dir": merged, "start_model": start_model,
           "reward_first": metrics[0]["reward/mean"] if metrics else None,
           "reward_last": metrics[-1]["reward/mean"] if metrics else None,
           "grpo_seconds": time.time() - t_grpo}
    if end_success is not None:
        out.update({"eval_success_end": end_success["success"], "eval_end_seconds": end_success["seconds"]})
    elif cfg.eval.enabled:
        acc = held_out_accuracy(cfg, merged, tok_dir)
        out.update({"eval_accuracy_end": acc["accuracy"], "eval_end_seconds": acc["seconds"]})
    out["report"] = files.finish()  # trackers closed; report.png of metrics.jsonl
    out["wall_seconds"] = time.time() - t_start  # this invocation: SFT warm-up (if run), GRPO, evaluations
    files.write_summary(out)
    summary = files.read_summary()
    done = f"[grpo] done: {cfg.max_steps} steps"
    if summary.get("reward_first") is not None and summary.get("reward_last") is not None:
        done += f", reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}"
    if "eval_accuracy_end" in out and "eval_accuracy_start" in summary:
        done += (f", held-out exact match {summary['eval_accuracy_start']:.3f} -> {summary['eval_accuracy_end']:.3f} "
                 f"({acc['correct']}/{acc['n']})")
    if end_success is not None and "eval_success_start" in summary:
        done += (f", held-out success {summary['eval_success_start']:.3f} -> {summary['eval_success_end']:.3f} "
                 f"({end_success['correct']}/{end_success['n']})")
    print(f"{done} in {summary['wall_seconds']:.0f}s; summary: {files.summary_path}", flush=True)
    return summary


def demo_grpo(output_dir: str, overrides: list[str] | None = None) -> dict:
    """The demo's GRPO stage: tiny-grpo.yaml as it is (its own full fine-tuning warm-up into
    OUTPUT_DIR/sft, then GRPO), with `overrides` (the demo shortens max_steps)."""
    here = os.path.dirname(os.path.abspath(__file__))
    cfg = load(GRPOJobConfig, os.path.join(here, "configs", "tiny-grpo.yaml"),
               [f"output_dir={output_dir}"] + list(overrides or []))
    return run_grpo(cfg)


def main(argv: list[str] | None = None) -> int:
    from actors.reward import RewardFailureError
    from cluster import console
    from cluster.ray_session import shutdown_ray, stop_on_signals
    from jobs.config import parse_job_args

    cfg = None
    try:
        args = parse_job_args("posttrain grpo", argv, GRPOJobConfig, description=__doc__, verbose_option=True)
        console.configure(verbose=args.verbose)
        console.setup_logging()
        cfg = load(GRPOJobConfig, args.config, args.overrides)
        if preflight_grpo(cfg):  # one line on stderr, before Ray starts or weights load
            return 2
        stop_on_signals()
        run_grpo(cfg)
    except ConfigError as e:
        console.close_all()  # an open progress bar would otherwise share the error's line
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except RewardFailureError as e:  # more than reward.max_failure_rate of a step's samples failed
        console.close_all()
        shutdown_ray()  # first: Ray's forwarded worker logs would otherwise trail the line
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (cluster.ray_session.Interrupted)
        console.close_all()
        if cfg is None:
            raise
        return report_interrupt(e, cfg)
    except BaseException:  # the traceback below the bar, not on its line
        console.close_all()
        raise
    return 0


def report_interrupt(e: KeyboardInterrupt, cfg: GRPOJobConfig) -> int:
    """The checkpoints pruned to keep_checkpoints, then one line on stderr - the last checkpoint
    saved, and how to resume - and the exit code (130 SIGINT, 143 SIGTERM)."""
    from cluster.ray_session import Interrupted, shutdown_ray

    shutdown_ray()

    name, code = (e.name, e.exit_code) if isinstance(e, Interrupted) else ("SIGINT", 130)
    files = RunFiles(cfg.output_dir)
    saved = checkpoints(files)
    if saved:  # a save cut off between its rename and the pruning: keep_checkpoints again
        prune_checkpoints(files, cfg.keep_checkpoints, protect=saved[-1], step=_ckpt_step(saved[-1]))
        saved = checkpoints(files)
    where = (f"the last checkpoint saved is step {_ckpt_step(saved[-1])} ({saved[-1]}); re-run the same command "
             f"to resume" if saved else
             "no checkpoint was saved yet (checkpoint_every sets how often); re-run the same command to start again")
    print(f"[grpo] stopped by {name}: {where}", file=sys.stderr, flush=True)
    return code



if __name__ == "__main__":
    sys.exit(main())
