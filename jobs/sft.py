"""Supervised fine-tuning (and, through jobs.cpt, continued pre-training) on Ray Train.

What it does, top to bottom:
  1. resolve the config (YAML + dotted overrides) and write OUTPUT_DIR/config.yaml;
  2. connect to Ray (RAY_ADDRESS, e.g. under `ray job submit`) or start a local instance;
  3. pick the tokenizer: model.tokenizer, else the model folder's, else train a small BPE locally on
     the training data (OUTPUT_DIR/tokenizer);
  4. build the Ray Data pipeline (read, detect format, chat template, tokenize in an actor pool,
     loss mask, pack) and count the steps;
  5. optionally measure held-out exact-match accuracy of the untrained model (eval_accuracy);
  6. train on Ray Train (DDP, or DeepSpeed), with checkpoints, eval loss and early stopping; rank 0
     writes OUTPUT_DIR/metrics.jsonl and sends each line live to the `report_to` trackers;
  7. save the adapter and the merged model, measure accuracy again, draw report.png, write summary.json.

Launch:
  posttrain sft jobs/configs/tiny-sft.yaml output_dir=runs/sft max_steps=40
  python -m jobs.sft jobs/configs/tiny-sft.yaml trainer.num_workers=2
  ray job submit --working-dir . -- python -m jobs.sft jobs/configs/llama-lora.yaml
--verbose (-v) shows Ray's full output on the console (cluster/console.py); by default a progress
bar per phase (plain lines when the output is not a terminal), Ray's own output in Ray's log files.
Running it again with the same output_dir resumes from the last intact checkpoint (trainer.resume=auto;
a changed training config is refused unless trainer.resume=force: docs/reliability.md). Ctrl-C or
SIGTERM ends it with one line naming the last checkpoint saved (exit code 130 / 143).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Literal

from cluster.data import DataConfig, build_datasets
from cluster.ray_session import init_ray, stop_on_signals
from cluster.run_files import RunFiles
from cluster.tracking import check_report_to
from cluster.train import TrainConfig, TrainSpec, fit
from jobs.config import ConfigError, dump_yaml, load, to_dict
from jobs.preflight import preflight_sft
from kernels.config_fields import check_ranges
from kernels.model import PRESETS, ModelConfig
from kernels.patch import KernelsConfig


@dataclass(frozen=True)
class AccuracyConfig:
    """Held-out exact-match accuracy before and after training (`#### N` answers).

    enabled: measure it; max_problems: held-out problems used; max_new_tokens: generation budget.
    """

    enabled: bool = False
    max_problems: int = field(default=200, metadata={"min": 1})
    max_new_tokens: int = field(default=32, metadata={"min": 1})

    def __post_init__(self):
        check_ranges(self, "eval_accuracy")


@dataclass(frozen=True)
class SFTJobConfig:
    """The whole SFT/CPT job. output_dir: where everything is written; max_steps: optimizer steps
    (0 = trainer.num_epochs passes over the data); seed: model init, shuffling and sampling;
    tokenizer_vocab_size: size of the locally trained tokenizer when the model brings none;
    report_to: live trackers of the metrics and the config, any of tensorboard, mlflow, wandb
    (cluster/tracking.py; default none)."""

    output_dir: str = "runs/sft"
    max_steps: int = field(default=0, metadata={"min": 0, "note": "0 = trainer.num_epochs passes"})
    seed: int = 0
    tokenizer_vocab_size: int = field(default=1024, metadata={"min": 1})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    eval_accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)

    def __post_init__(self):
        check_ranges(self, "")
        if not self.output_dir:
            raise ValueError("output_dir: must be set")
        check_report_to(self.report_to, installed=False)  # installed: checked by the preflight
        if self.model.finetune == "qlora" and not self.trainer.use_gpu:
            raise ValueError("model.finetune: qlora needs trainer.use_gpu=true (NF4 weights live on a CUDA GPU)")
        if self.trainer.strategy == "deepspeed":
            if self.model.finetune == "qlora":
                raise ValueError("model.finetune: qlora does not run under trainer.strategy=deepspeed "
                                 "(ZeRO cannot shard bitsandbytes NF4 weights); use strategy ddp")
            if self.model.gradient_checkpointing == "offload":
                raise ValueError("model.gradient_checkpointing: offload is for DDP; under deepspeed use "
                                 "true, and trainer.deepspeed.offload_optimizer/offload_params")
            if self.trainer.optimizer == "adamw_8bit" and self.trainer.deepspeed.zero_stage == 3:
                raise ValueError("trainer.optimizer: adamw_8bit does not run with ZeRO-3 sharded weights; "
                                 "use adamw")


def prepare_tokenizer(cfg: SFTJobConfig, files: RunFiles) -> str:
    """A tokenizer folder: the configured one, the model's, or one trained on the data here."""
    from kernels.tokenizer import load_tokenizer, train_tokenizer

    out = files.path("tokenizer")
    source = cfg.model.tokenizer or (cfg.model.path if cfg.model.path and
                                     os.path.exists(os.path.join(cfg.model.path, "tokenizer_config.json")) else "")
    if source:
        load_tokenizer(source).save_pretrained(out)
        return out
    if os.path.exists(os.path.join(out, "tokenizer_config.json")):
        return out  # resume: reuse the tokenizer the run was trained with
    from cluster.data_samples import tokenizer_training_texts

    from cluster import console

    texts = tokenizer_training_texts(cfg.data, seed=cfg.seed)
    t0 = time.time()
    train_tokenizer(texts, vocab_size=cfg.tokenizer_vocab_size, out_dir=out)
    console.write(f"[sft] trained a {cfg.tokenizer_vocab_size}-entry BPE tokenizer on {len(texts)} texts "
                  f"in {time.time() - t0:.1f}s -> {out}")
    return out


def model_vocab_size(cfg: SFTJobConfig, tok_len: int) -> int | None:
    """Presets keep their public vocab size unless the tokenizer needs more rows."""
    if cfg.model.path:
        return None
    preset_vocab = PRESETS[cfg.model.preset]["vocab_size"]
    return max(preset_vocab, tok_len)


def measure_accuracy(cfg: SFTJobConfig, model_dir_or_model, tokenizer, rows) -> dict | None:
    if not cfg.eval_accuracy.enabled or not rows:
        return None
    from cluster.evaluate import EvalConfig, evaluate

    ecfg = EvalConfig(max_problems=cfg.eval_accuracy.max_problems,
                      max_new_tokens=cfg.eval_accuracy.max_new_tokens,
                      system_prompt=cfg.data.system_prompt)
    return evaluate(model_dir_or_model, tokenizer, rows, ecfg)


# Keys a resumed run may change (docs/reliability.md): they do not change what the checkpoints'
# weights were trained with. Every other key - trainer.num_workers too: it sets the global batch
# and each worker's share of the data - must match config.yaml, unless trainer.resume=force.
RESUME_SAFE_KEYS = ("output_dir", "max_steps", "eval_accuracy", "trainer.num_epochs", "trainer.log_every",
                    "trainer.eval_every", "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.resume",
                    "trainer.resume_from", "trainer.max_failures", "trainer.storage_path",
                    "trainer.cpus_per_worker", "trainer.placement_strategy", "trainer.early_stopping_patience",
                    "trainer.early_stopping_min_delta", "trainer.cuda_graphs", "report_to")


def check_resume(cfg: SFTJobConfig, files: RunFiles) -> None:
    """Before anything is written: trainer.resume=never over an existing run, a resume whose
    training config differs from the run's config.yaml (unless trainer.resume=force; the differing
    keys listed), and a trainer.resume_from that is not an intact checkpoint are refused."""
    from cluster.checkpoint import checkpoint_folders, is_local_path
    from cluster.run_files import check_config_unchanged
    from cluster.train import checkpoint_root
    from jobs.config import to_dict

    tc = cfg.trainer
    root = checkpoint_root(tc, cfg.output_dir)
    resumable = bool(checkpoint_folders(root)) if is_local_path(root) else bool(files.read_metrics())
    if tc.resume_from and not resumable:
        from cluster.checkpoint import checkpoint_problem

        why = checkpoint_problem(tc.resume_from)
        if why:
            raise ConfigError(f"trainer.resume_from: {tc.resume_from!r} is not an intact checkpoint ({why})")
    if tc.resume == "never":
        if resumable or files.read_metrics():
            raise ConfigError(f"trainer.resume=never but {cfg.output_dir} already holds a run; "
                              f"choose a new output_dir or resume=auto")
        return
    if not resumable:
        return
    try:
        check_config_unchanged(files.read_config(), to_dict(cfg), RESUME_SAFE_KEYS, output_dir=cfg.output_dir,
                               force=tc.resume == "force", force_key="trainer.resume", tag="sft")
    except ValueError as e:
        raise ConfigError(str(e)) from None


# the data phase's progress bar: the stage that starts at each position (build_datasets names 1-3)
DATA_STAGES = ("tokenizer", "read", "tokenize", "pack", "materialize")


def run_sft(cfg: SFTJobConfig, task: str = "sft") -> dict:
    import torch

    from cluster import console
    from cluster.data_samples import held_out_rows
    from kernels.model import build_model
    from kernels.tokenizer import load_tokenizer

    t0 = time.time()
    files = RunFiles(cfg.output_dir)
    check_resume(cfg, files)  # before config.yaml is rewritten
    dump_yaml(cfg, files.path("config.yaml"))
    init_ray(min_cpus=cfg.trainer.num_workers * cfg.trainer.cpus_per_worker + 2)
    t_data = time.time()
    bar = console.Progress(f"[{task}] data", len(DATA_STAGES), unit="stage", lines=False, leave=False)
    bar.update(0, DATA_STAGES[0])
    try:
        tok_dir = prepare_tokenizer(cfg, files)
        tok = load_tokenizer(tok_dir)
        bundle = build_datasets(cfg.data, tok_dir, seed=cfg.seed, task=task,
                                on_stage=lambda name: bar.update(DATA_STAGES.index(name), name))
        bar.update(DATA_STAGES.index("materialize"), "materialize")
        tc = cfg.trainer
        train_ds = bundle.train.materialize()  # packed once here; workers then only read their split
        eval_ds = bundle.eval.materialize() if bundle.eval is not None else None
        n_rows = train_ds.count()
        bar.update(len(DATA_STAGES))
    finally:
        bar.close()
    stats = bundle.stats
    print(f"[{task}] data: {stats.get('rows_ok')} rows ok, {stats.get('rows_bad')} bad, "
          f"{stats.get('tokens')} tokens, {stats.get('tokens_per_s', 0):.0f} tok/s in the pipeline; "
          f"{n_rows} rows ready in {time.time() - t_data:.0f}s", flush=True)
    per_step = tc.micro_batch_size * tc.grad_accum * tc.num_workers
    steps_per_epoch = n_rows // per_step
    if steps_per_epoch == 0:
        raise ConfigError(f"data: {n_rows} training rows cannot fill one step of {per_step} rows "
                          f"(trainer.micro_batch_size x grad_accum x num_workers); use less batch or more data")
    total_steps = cfg.max_steps or steps_per_epoch * tc.num_epochs
    vocab = model_vocab_size(cfg, len(tok))

    rows = held_out_rows(cfg.data, seed=cfg.seed) if cfg.eval_accuracy.enabled else []
    acc_before = None
    if rows:
        base = build_model(cfg.model, vocab_size=vocab, seed=cfg.seed)  # LoRA starts as a no-op (B = 0)
        acc_before = measure_accuracy(cfg, base, tok, rows)
        del base
        print(f"[sft] held-out exact match before training: {acc_before['accuracy']:.3f} "
              f"({acc_before['correct']}/{acc_before['n']})", flush=True)

    datasets = ["train"] + (["eval"] if bundle.eval is not None else [])
    spec = TrainSpec(output_dir=os.path.abspath(cfg.output_dir), model=cfg.model, train=tc,
                     tokenizer_dir=os.path.abspath(tok_dir), total_steps=total_steps,
                     steps_per_epoch=steps_per_epoch, seed=cfg.seed, vocab_size=vocab,
                     pad_id=tok.pad_token_id, kernels=cfg.kernels,
                     extra={"datasets": datasets, "report_to": list(cfg.report_to), "config": to_dict(cfg)})
    result = fit(spec, train_ds, eval_ds)
    if result.error:
        raise result.error
    from kernels.run_manifest import RunManifest  # what export and eval read back (run.json)

    RunManifest.for_run(cfg.output_dir, task, cfg.model, seed=cfg.seed, vocab_size=vocab,
                        train_device="cuda" if tc.use_gpu else "cpu", tokenizer_dir=tok_dir).write(cfg.output_dir)

    metrics = files.read_metrics()
    summary = {"task": task, "steps": total_steps, "steps_per_epoch": steps_per_epoch,
               "first_loss": metrics[0]["loss"] if metrics else None,
               "last_loss": metrics[-1]["loss"] if metrics else None,
               "eval_loss_end": next((m["eval_loss"] for m in reversed(metrics) if "eval_loss" in m), None),
               "data": stats, "wall_seconds": time.time() - t0,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    if rows:
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(files.path("merged"), dtype=torch.float32)
        acc_after = measure_accuracy(cfg, merged, tok, rows)
        summary.update({"eval_accuracy_start": acc_before["accuracy"], "eval_accuracy_end": acc_after["accuracy"],
                        "eval_problems": acc_after["n"]})  # the summary line says it
    summary["report"] = files.finish()  # report.png of metrics.jsonl
    files.write_summary(summary)
    summary = files.read_summary()
    _print_summary(summary, files)
    return summary


def _print_summary(s: dict, files: RunFiles) -> None:
    """Two lines: the run's figures, and what it wrote where."""
    tag = f"[{s.get('task', 'sft')}]"
    loss = (f"loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
            if s.get("first_loss") is not None and s.get("last_loss") is not None else "no steps logged")
    print(f"{tag} done: {s.get('steps')} steps, {loss}"
          + (f", eval_loss {s['eval_loss_end']:.4f}" if s.get("eval_loss_end") is not None else "")
          + (f", held-out exact match {s['eval_accuracy_start']:.3f} -> {s['eval_accuracy_end']:.3f} "
             f"({s.get('eval_problems')} problems)" if "eval_accuracy_start" in s else ""))
    written = []
    for key in ("adapter_dir", "merged_dir", "report"):
        if s.get(key):
            rel = os.path.relpath(os.path.abspath(s[key]), files.output_dir)
            written.append(s[key] if rel.startswith("..") else rel + ("/" if os.path.isdir(s[key]) else ""))
    written += [os.path.basename(files.metrics_path), os.path.basename(files.summary_path)]
    print(f"{tag} wrote {', '.join(written)} in {files.output_dir}", flush=True)


def parse_args(argv: list[str] | None, prog: str):
    """`prog [CONFIG.yaml] [key.sub=value ...]` -> jobs.config.JobArgs (UsageError on a bad line)."""
    from jobs.config import parse_job_args

    return parse_job_args(prog, argv, SFTJobConfig, description=__doc__, verbose_option=True)


def for_task(cfg: SFTJobConfig, task: str) -> SFTJobConfig:
    """The loaded config as the task runs it: CPT reads data.format auto as raw text."""
    if task == "cpt" and cfg.data.format == "auto":
        cfg = replace(cfg, data=replace(cfg.data, format="text"))
    return cfg


def main(argv: list[str] | None = None, task: str = "sft") -> int:
    from cluster import console

    try:
        args = parse_args(argv, f"posttrain {task}")
        console.configure(verbose=args.verbose)  # before anything prints: bars, Ray's output
        console.setup_logging()
        cfg = for_task(load(SFTJobConfig, args.config, args.overrides), task)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if preflight_sft(cfg):  # one line on stderr, before Ray starts or weights load
        return 2
    stop_on_signals()
    try:
        run_sft(cfg, task=task)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (cluster.ray_session.Interrupted)
        return report_interrupt(f"[{task}]", e, cfg)
    return 0


def report_interrupt(tag: str, e: KeyboardInterrupt, cfg: SFTJobConfig) -> int:
    """With the workers stopped, the checkpoints pruned to trainer.keep_checkpoints (an upload cut
    off goes first); then one line on stderr - the last checkpoint saved, and how to resume - and
    the exit code (130 SIGINT, 143 SIGTERM)."""
    from cluster.checkpoint import choose_resume, is_local_path, read_state
    from cluster.ray_session import Interrupted, shutdown_ray
    from cluster.train import checkpoint_root

    name, code = (e.name, e.exit_code) if isinstance(e, Interrupted) else ("SIGINT", 130)
    shutdown_ray()
    root = checkpoint_root(cfg.trainer, cfg.output_dir)
    saved = None
    if is_local_path(root):
        last = choose_resume(root, cfg.trainer.keep_checkpoints, warn=lambda msg: None)
        saved = (read_state(last)["step"], last) if last else None
    where = (f"the last checkpoint saved is step {saved[0]} ({saved[1]}); re-run the same command to resume"
             if saved else "no checkpoint was saved yet (trainer.checkpoint_every sets how often); "
                           "re-run the same command to start again")
    print(f"{tag} stopped by {name}: {where}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
