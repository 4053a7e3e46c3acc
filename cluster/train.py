"""Ray Train harness: DDP workers (gloo on CPU, NCCL on GPU) training `kernels.model` models.

`fit(spec, train_ds, eval_ds)` runs a Ray Train V2 `TorchTrainer`. Each worker builds the model
from the config (same seed on every rank, so the frozen base is identical), wraps the loss in
DDP, and trains from its shard of the Ray Data datasets. Checkpoints go through
`ray.train.report` into `<output_dir>/checkpoints/train/`; a run started again with the same
output_dir resumes from the latest one (Ray restores its checkpoint manager from storage),
skipping the micro-batches the interrupted epoch had consumed, so the losses continue exactly.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from cluster.deepspeed_strategy import DeepSpeedConfig
from kernels.config_fields import check_ranges
from kernels.model import ModelConfig

log = logging.getLogger("posttrain.train")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and Ray Train settings (the `trainer:` section).

    num_workers: Ray Train workers (one per GPU when use_gpu).
    use_gpu: place workers on GPUs (bf16 autocast, NCCL); false = CPU, gloo.
    strategy: ddp | deepspeed (ZeRO-2/3 with the `deepspeed:` sub-section, see
      cluster.deepspeed_strategy.DeepSpeedConfig).
    micro_batch_size: rows per forward pass per worker.
    grad_accum: micro-batches per optimizer step (per worker).
    lr / embedding_lr: learning rate; embeddings and lm_head use embedding_lr when > 0 (CPT).
    lr_schedule: cosine | linear | constant, after warmup_steps of linear warmup; min_lr_ratio floor.
    max_grad_norm: gradient clipping (0 = off).
    num_epochs: passes over the data when the job's max_steps is 0.
    eval_every: steps between eval-loss passes (0 = only at the end, if there is an eval split).
    early_stopping_patience: stop after this many evals without improvement by early_stopping_min_delta (0 = off).
    checkpoint_every: steps between checkpoints (0 = only at the end); keep_checkpoints kept.
    resume: auto (continue from the newest intact checkpoint in output_dir; refused when the training
      config differs from the run's config.yaml) | never | force (continue even with a changed
      config; docs/reliability.md); resume_from: a checkpoint folder to start from.
    optimizer: adamw | adamw_8bit (bitsandbytes, GPU).
    max_failures: worker-group restarts from the last checkpoint before the run fails.
    storage_path: where checkpoints persist (shared filesystem or URI for multi-node); default output_dir/checkpoints.
    cpus_per_worker: CPU reservation of each worker.
    placement_strategy: PACK | SPREAD | STRICT_SPREAD (one worker per node) for the worker group.
    log_every: steps between progress lines.
    cuda_graphs: on a single CUDA worker, capture each micro-batch's forward+backward as a CUDA
        graph and replay it (kernels/cuda_graph.py); falls back to eager, with the reason in the
        start line, where unsupported (DDP/DeepSpeed, offloaded checkpointing, sliding windows).
    """

    num_workers: int = field(default=1, metadata={"min": 1})
    use_gpu: bool = False
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    micro_batch_size: int = field(default=4, metadata={"min": 1})
    grad_accum: int = field(default=1, metadata={"min": 1})
    lr: float = field(default=2e-4, metadata={"gt": 0})
    embedding_lr: float = field(default=0.0, metadata={"min": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = field(default=0, metadata={"min": 0})
    min_lr_ratio: float = field(default=0.0, metadata={"range": (0, 1)})
    max_grad_norm: float = field(default=1.0, metadata={"min": 0})
    num_epochs: int = field(default=1, metadata={"min": 1})
    eval_every: int = field(default=0, metadata={"min": 0})
    early_stopping_patience: int = field(default=0, metadata={"min": 0})
    early_stopping_min_delta: float = 0.0
    checkpoint_every: int = field(default=0, metadata={"min": 0})
    keep_checkpoints: int = field(default=2, metadata={"min": 1})
    resume: Literal["auto", "never", "force"] = "auto"
    resume_from: str = ""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    max_failures: int = field(default=0, metadata={"min": 0})
    storage_path: str = ""
    cpus_per_worker: int = field(default=1, metadata={"min": 1})
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    log_every: int = field(default=1, metadata={"min": 1})
    cuda_graphs: bool = True

    def __post_init__(self):
        check_ranges(self, "trainer")
        if self.resume_from and not os.path.isdir(self.resume_from):
            raise ValueError(f"trainer.resume_from: {self.resume_from!r} is not a folder")


@dataclass(frozen=True)
class TrainSpec:
    """Everything a worker needs (picklable)."""

    output_dir: str
    model: ModelConfig
    train: TrainConfig
    tokenizer_dir: str
    total_steps: int
    steps_per_epoch: int
    seed: int = 0
    vocab_size: int | None = None
    pad_id: int = 0
    kernels: object = None  # kernels.patch.KernelsConfig, when that module is present
    extra: dict = field(default_factory=dict)


def storage_root(spec: TrainSpec) -> str:
    return spec.train.storage_path or os.path.join(os.path.abspath(spec.output_dir), "checkpoints")


def checkpoint_root(train: TrainConfig, output_dir: str) -> str:
    """The folder of a run's Ray Train checkpoints: <storage_path or output_dir/checkpoints>/train."""
    return os.path.join(train.storage_path or os.path.join(os.path.abspath(output_dir), "checkpoints"), "train")


def fit(spec: TrainSpec, train_ds, eval_ds=None):
    """Run training on Ray Train; return the final `ray.train.Result`.

    On a filesystem storage path the resume point is chosen here, before the workers start: the
    newest intact checkpoint of any earlier attempt (a corrupt one is named and passed over), and
    the folders are pruned to keep_checkpoints; rank 0 prunes again after every checkpoint
    (cluster/checkpoint.py says why Ray's own bookkeeping is not used for either).
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster import console
    from cluster.checkpoint import RAY_SNAPSHOT, choose_resume, is_local_path

    root = checkpoint_root(spec.train, spec.output_dir)
    local = is_local_path(root)
    if local and spec.train.resume == "never":
        if os.path.exists(os.path.join(root, RAY_SNAPSHOT)):
            os.remove(os.path.join(root, RAY_SNAPSHOT))  # or Ray would resume from its snapshot
    elif local:
        chosen = choose_resume(root, spec.train.keep_checkpoints,
                               warn=lambda m: console.write(f"[train] warning: {m}"))
        if chosen:
            spec = replace(spec, train=replace(spec.train, resume_from=chosen))
    if spec.model.finetune == "full" and spec.model.dtype in ("bfloat16", "float16") \
            and spec.train.strategy != "deepspeed":  # said here, once: a worker's log line is not shown
        console.write(f"[train] warning: full fine-tuning with {spec.model.dtype} weights and no fp32 master "
                      f"copy: AdamW updates below {spec.model.dtype} resolution are lost; use model.dtype=auto "
                      f"(fp32 weights, bf16 autocast) or strategy deepspeed")

    # the progress of the steps: a bar (or ~10 lines) drawn here from metrics.jsonl; with --verbose
    # rank 0 prints a line every trainer.log_every steps instead, as before
    follow = not console.verbose()
    if follow:
        spec = replace(spec, extra={**spec.extra, "driver_progress": True})
    datasets = {"train": train_ds}
    if eval_ds is not None:
        datasets["eval"] = eval_ds
    exec_opts = ray.data.ExecutionOptions(preserve_order=True)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=spec.train.num_workers, use_gpu=spec.train.use_gpu,
                                     resources_per_worker={"CPU": spec.train.cpus_per_worker},
                                     placement_strategy=spec.train.placement_strategy),
        run_config=RunConfig(
            name="train", storage_path=storage_root(spec),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            # on a filesystem path rank 0 prunes (every attempt's folders); Ray deletes none
            checkpoint_config=CheckpointConfig(num_to_keep=None if local else spec.train.keep_checkpoints)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=exec_opts),
    )
    if not follow:
        return _fit_off_main_thread(trainer.fit)
    start = _resume_step(spec.train.resume_from) if spec.train.resume_from else 0
    bar = console.Progress("[train] step", spec.total_steps, initial=start)
    with console.follow_metrics(os.path.join(spec.output_dir, "metrics.jsonl"), bar, step_fields):
        return _fit_off_main_thread(trainer.fit)


def step_fields(record: dict, seen: dict) -> str:
    """A step's fields on the console (metrics.jsonl keys): loss, the latest eval_loss, lr, tokens/s."""
    parts = [f"loss {record['loss']:.4f}"] if isinstance(record.get("loss"), (int, float)) else []
    if isinstance(seen.get("eval_loss"), (int, float)):
        parts.append(f"eval_loss {seen['eval_loss']:.4f}")
    if isinstance(record.get("lr"), (int, float)):
        parts.append(f"lr {record['lr']:.2e}")
    if isinstance(record.get("tokens_per_s"), (int, float)):
        parts.append(f"tok/s {record['tokens_per_s']:.0f}")
    return "  ".join(parts)


def _resume_step(folder: str) -> int:
    from cluster.checkpoint import read_state

    try:
        return int(read_state(folder)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _fit_off_main_thread(run):
    """`run()` (TorchTrainer.fit) on a helper thread while the main thread waits. On the main thread
    Ray Train installs its own SIGINT handler, which aborts the run and exits 1 without a word;
    here Ctrl-C and SIGTERM reach the job's handlers (cluster.ray_session.stop_on_signals)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return run()
    out: dict = {}

    def target():
        try:
            out["result"] = run()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            out["error"] = e

    t = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)  # short waits: a signal handler runs between them
    if "error" in out:
        raise out["error"]
    return out["result"]


# ----------------------------------------------------------------------------- worker side

def _build_for_training(spec: TrainSpec, device):
    """Model with adapters, kernels patched, checkpointing set (kernels.factory); returns (model, notes)."""
    from kernels.factory import build_training_model

    return build_training_model(spec.model, kernels=spec.kernels, vocab_size=spec.vocab_size,
                                device=device, seed=spec.seed)


def _graphed_step(model, device, autocast, world: int, use_ds: bool):
    """(kernels.cuda_graph.GraphedStep or None, what the start line reports)."""
    from kernels.cuda_graph import graphed_causal_lm

    if use_ds:
        why = "DeepSpeed's engine runs the backward"
    elif world > 1:
        why = f"DDP over {world} workers (its gradient all-reduce is not captured)"
    else:
        graph, why = graphed_causal_lm(model, device, autocast)
        if graph is not None:
            return graph, "on"
    log.info("cuda graphs: off: %s", why)
    return None, f"off ({why})"


def _train_worker(config: dict):  # noqa: C901 - a linear training loop reads best in one piece
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from cluster.checkpoint import (checkpoint_files, checkpoint_folders, is_local_path, load_training_state,
                                    newest_intact, prune_checkpoints, save_training_state)
    from cluster.run_files import RunFiles
    from kernels.training import (LossForward, accumulate_step, collate, grad_norm_and_clip,
                                    lr_lambda, make_optimizer)

    spec: TrainSpec = config["spec"]
    tc = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # DeepSpeed and NCCL use the current device
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    if not tc.use_gpu:
        torch.set_num_threads(max(1, tc.cpus_per_worker))

    def all_reduce_sum(x: float) -> float:
        if world == 1 or not dist.is_initialized():
            return x
        t = torch.tensor([x], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item())

    _write_worker_info(spec.output_dir, rank)
    model, notes = _build_for_training(spec, device)
    loss_module = LossForward(model)
    use_ds = tc.strategy == "deepspeed"
    if world > 1 and not use_ds:
        ddp_kwargs = {"find_unused_parameters": False}
        if spec.model.gradient_checkpointing == "offload":
            ddp_kwargs["static_graph"] = True  # offloaded checkpointing re-enters autograd per layer
        loss_module = ray.train.torch.prepare_model(loss_module, move_to_device=False,
                                                    parallel_strategy_kwargs=ddp_kwargs)
    optimizer = make_optimizer(model, tc.optimizer, tc.lr, tc.embedding_lr, tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tc.lr_schedule, tc.warmup_steps, spec.total_steps, tc.min_lr_ratio))
    autocast = torch.bfloat16 if device.type == "cuda" else None
    engine = None
    if use_ds:
        from cluster import deepspeed_strategy as dss

        engine, ds_notes = dss.initialize(loss_module, model, optimizer, scheduler, ds=tc.deepspeed,
                                          micro_batch_size=tc.micro_batch_size, grad_accum=tc.grad_accum,
                                          world_size=world, max_grad_norm=tc.max_grad_norm,
                                          bf16=device.type == "cuda")
        notes.update(ds_notes)
        loss_module = engine
        autocast = None  # DeepSpeed holds the model in bf16 itself

    graph = None
    if tc.cuda_graphs and device.type == "cuda":
        graph, notes["cuda_graphs"] = _graphed_step(model, device, autocast, world, use_ds)

    # the model's and optimizer's Python objects live for the run: keep them out of the cyclic GC's
    # scans (at 1B sizes a step is bound by host time, and a full collection costs milliseconds)
    gc.collect()
    gc.freeze()
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best_eval": None, "evals_without_gain": 0}
    ckpt = ray.train.get_checkpoint()
    ckpt_root = checkpoint_root(tc, spec.output_dir)
    local_ckpts = is_local_path(ckpt_root)
    if ckpt is not None and local_ckpts:
        # a restart within this run (trainer.max_failures): the newest intact folder, as fit() chose
        # at the start (Ray's latest registered checkpoint can lag the uploads, or be pruned)
        resume = contextlib.nullcontext(newest_intact(checkpoint_folders(ckpt_root)) or tc.resume_from or None)
    elif ckpt is not None:
        resume = checkpoint_files(ckpt, rank)
    else:
        resume = contextlib.nullcontext(tc.resume_from or None)
    files = RunFiles(spec.output_dir) if rank == 0 else None
    with resume as resume_dir:
        if resume_dir:
            if engine is not None:
                state.update(dss.load(resume_dir, engine))
            else:
                state.update(load_training_state(resume_dir, model, optimizer, scheduler))
            if rank == 0:
                _say(f"[train] resumed from step {state['step']} "
                     f"({ckpt.path if ckpt is not None and not local_ckpts else resume_dir})")
    if files is not None:
        files.truncate_metrics_after(state["step"])
        # live tracking (the job's report_to) of every metrics.jsonl record, from rank 0
        files.start_tracking(spec.extra.get("report_to", ()), config=spec.extra.get("config"),
                             start_step=state["step"])

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if "eval" in spec.extra.get("datasets", ()) else None

    def evaluate() -> float:
        model.eval()
        loss_sum, n = 0.0, 0.0
        with torch.no_grad():
            for rows in eval_shard.iter_batches(batch_size=tc.micro_batch_size, batch_format="numpy"):
                b = {k: v.to(device) for k, v in collate(rows, spec.pad_id).items()}
                amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else _null()
                with amp:
                    loss, k = (loss_module.module if hasattr(loss_module, "module") else loss_module)(
                        b["input_ids"], b["labels"], b["position_ids"])
                loss_sum += float(loss)
                n += k
        model.train()
        total_n = all_reduce_sum(n)
        return all_reduce_sum(loss_sum) / max(total_n, 1.0)

    def report(metrics: dict, with_checkpoint: bool):
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            if engine is not None:  # every rank writes its shards; Ray merges the folders
                dss.save(tmp, engine, model, dict(state), rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                if rank == 0:
                    save_training_state(tmp, model, optimizer, scheduler, dict(state))
                ray.train.report(metrics,
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        if rank == 0 and local_ckpts:  # uploaded (the newest folder): keep keep_checkpoints of every attempt
            folders = checkpoint_folders(ckpt_root)
            prune_checkpoints(folders, tc.keep_checkpoints, protect=tuple(folders[-1:]), current_step=state["step"])

    if rank == 0:
        _say(f"[train] {world} worker(s) on {device.type}; {spec.total_steps} steps "
             f"({spec.steps_per_epoch}/epoch); notes={notes}")
    t_start = time.time()
    stop = False
    last_metrics: dict = {}
    while state["step"] < spec.total_steps and not stop:
        it = iter(train_shard.iter_batches(batch_size=tc.micro_batch_size, batch_format="numpy",
                                           drop_last=False))
        for _ in range(state["batches_in_epoch"]):  # resume mid-epoch: skip consumed micro-batches
            next(it, None)
        while state["step"] < spec.total_steps:
            t0 = time.time()
            micro = []
            for _ in range(tc.grad_accum):
                rows = next(it, None)
                if rows is None:
                    break
                micro.append(collate(rows, spec.pad_id))
            full = all_reduce_sum(1.0 if len(micro) == tc.grad_accum else 0.0) == world
            if not full:  # the epoch's tail that cannot fill a step on every worker is dropped
                break
            lr = scheduler.get_last_lr()[0]
            if engine is not None:  # DeepSpeed clips, steps the optimizer and schedule at the boundary
                stats = accumulate_step(engine, micro, device=device, world_size=world,
                                        all_reduce_sum=all_reduce_sum, autocast_dtype=autocast,
                                        backward=dss.backward(engine))
                gnorm = dss.grad_norm(engine)
            else:
                stats = accumulate_step(loss_module, micro, device=device, world_size=world,
                                        all_reduce_sum=all_reduce_sum, autocast_dtype=autocast, graph=graph)
                gnorm = grad_norm_and_clip([p for p in model.parameters() if p.requires_grad], tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batches_in_epoch"] += tc.grad_accum
            dt = time.time() - t0
            step = state["step"]
            metrics = {"step": step, "epoch": state["epoch"], "loss": stats["loss"], "lr": lr,
                       "grad_norm": gnorm, "target_tokens": stats["target_tokens"],
                       "tokens_per_s": stats["input_tokens"] / dt, "step_time_s": dt,
                       "elapsed_s": time.time() - t_start}
            if device.type == "cuda":
                metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            do_eval = eval_shard is not None and (
                (tc.eval_every and step % tc.eval_every == 0) or step == spec.total_steps)
            if do_eval:
                ev = evaluate()
                metrics["eval_loss"] = ev
                best = state["best_eval"]
                if best is None or ev < best - tc.early_stopping_min_delta:
                    state["best_eval"], state["evals_without_gain"] = ev, 0
                else:
                    state["evals_without_gain"] += 1
                if tc.early_stopping_patience and state["evals_without_gain"] >= tc.early_stopping_patience:
                    stop = True
                    metrics["early_stopped"] = True
            last_metrics = metrics
            if files is not None:
                files.log_metrics(metrics)
                # a line every log_every steps, unless the driver draws the progress (fit, from metrics.jsonl)
                if not spec.extra.get("driver_progress") and (
                        step % tc.log_every == 0 or step == spec.total_steps or stop):
                    extra = f" eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
                    _say(f"[train] step {step}/{spec.total_steps} loss {stats['loss']:.4f}{extra} "
                         f"lr {lr:.2e} grad_norm {gnorm:.3f} tok/s {metrics['tokens_per_s']:.0f}")
            is_last = step == spec.total_steps or stop
            want_ckpt = is_last or (tc.checkpoint_every and step % tc.checkpoint_every == 0)
            if want_ckpt:
                report({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, True)
            if stop:
                break
        if state["step"] < spec.total_steps and not stop:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
        if spec.steps_per_epoch == 0:
            break

    if files is not None:
        files.finish_tracking()
    # ZeRO-3: every rank takes part in gathering the sharded weights; rank 0 writes them
    gather = dss.gathered(model) if engine is not None else _null()
    with gather:
        if rank == 0:
            _save_artifacts(spec, model, notes, last_metrics, time.time() - t_start, state)


def _say(msg: str) -> None:
    """A progress line on the worker's stdout (Ray forwards it to the driver once; Ray Train's
    patched print() would also log it, so each line would show twice). The driver's console shows
    the worker's `[tag] ` lines only (cluster/ray_session.py)."""
    import sys

    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def _write_worker_info(output_dir: str, rank: int) -> None:
    """workers/rank<N>.json: pid and node of each worker (for operators and failure tests)."""
    import json

    import ray

    d = os.path.join(output_dir, "workers")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"rank{rank}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                   "time": time.time()}, f)


def _null():
    import contextlib

    return contextlib.nullcontext()


def _save_artifacts(spec: TrainSpec, model, notes: dict, last: dict, seconds: float, state: dict):
    """Adapter + merged 16-bit (32-bit on CPU, where training ran in fp32) model and tokenizer."""
    import torch

    from cluster.run_files import RunFiles
    from kernels.model import count_parameters, save_adapter, save_merged
    from kernels.tokenizer import load_tokenizer

    files = RunFiles(spec.output_dir)
    if spec.kernels is not None:
        from kernels.fused_lora import remove_fused_lora
        from kernels.patch import unpatch_model

        remove_fused_lora(model)
        unpatch_model(model)
    tok = load_tokenizer(spec.tokenizer_dir)
    out = {}
    if spec.model.finetune in ("lora", "qlora"):
        out["adapter_dir"] = save_adapter(model, files.path("adapter"))
    dtype = torch.bfloat16 if next(model.parameters()).is_cuda else torch.float32
    # (an NF4 base is dequantised before the merge: no re-quantisation loss)
    out["merged_dir"] = save_merged(model, files.path("merged"), tokenizer=tok, dtype=dtype)
    files.write_summary({"train": {**{k: v for k, v in asdict(spec.train).items()},
                                   "final_step": state["step"], "final_loss": last.get("loss"),
                                   "final_eval_loss": last.get("eval_loss"), "seconds": seconds,
                                   "parameters": count_parameters(model), "notes": notes}, **out})
