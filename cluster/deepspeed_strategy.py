"""DeepSpeed ZeRO-2/3 for the Ray Train worker loop (`trainer.strategy: deepspeed`).

The worker builds the model, optimizer and schedule exactly as for DDP and hands them to
`deepspeed.initialize` over the process group Ray Train already set up. What changes:

- gradients: the loop's token-normalised scaling is kept (`engine.backward(..., scale_wrt_gas=False)`),
  ZeRO averages over ranks like DDP does, and `engine.step()` after every micro-batch lets
  DeepSpeed reduce, clip (`gradient_clipping` = trainer.max_grad_norm) and step at the boundary;
- ZeRO-3 shards every weight. Code that reads a weight outside its module's own forward is told
  to DeepSpeed: the fused cross-entropy reads `lm_head.weight` from the loss wrapper (registered
  as an external parameter there, so it is gathered for the loss forward and backward), and each
  fused LoRA module (MLP, q/k/v, single linear) gets the weights its fused forward reads
  registered the same way (`kernels.fused_lora.fused_reads`). (ZeRO-3 "leaf" modules would not
  do: HF calls attention with keyword arguments, so a leaf's backward hook fires too early.)
- checkpoints: `deepspeed/` holds DeepSpeed's resumable shards (one per rank, same world size to
  resume), beside the consolidated 16-bit `trainable.safetensors` that the DDP path also writes.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Literal

from kernels.config_fields import check_ranges
from kernels.training_state import DS_SUBDIR

DS_TAG = "state"


@dataclass(frozen=True)
class DeepSpeedConfig:
    """The `trainer.deepspeed:` section (used when trainer.strategy is deepspeed).

    zero_stage: 2 (optimizer state and gradients sharded) | 3 (weights sharded too).
    offload_optimizer: keep optimizer state (and the fp32 master weights) in CPU memory.
    offload_params: ZeRO-3 only: keep the sharded weights in CPU memory between uses.
    overlap_comm: overlap gradient reduction with the backward pass.
    reduce_bucket_size: elements per gradient-reduction bucket.
    stage3_prefetch_bucket_size / stage3_param_persistence_threshold: ZeRO-3 weight prefetch size
      and the size under which a weight is kept whole on every rank (norms, small LoRA factors).
    """

    zero_stage: Literal[2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = True
    reduce_bucket_size: int = field(default=50_000_000, metadata={"min": 1})
    stage3_prefetch_bucket_size: int = field(default=50_000_000, metadata={"min": 1})
    stage3_param_persistence_threshold: int = field(default=100_000, metadata={"min": 0})

    def __post_init__(self):
        check_ranges(self, "trainer.deepspeed")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("trainer.deepspeed.offload_params: needs zero_stage 3 (ZeRO-2 keeps whole "
                             "weights on every GPU)")


def ds_config(ds: DeepSpeedConfig, *, micro_batch_size: int, grad_accum: int, world_size: int,
              max_grad_norm: float, bf16: bool) -> dict:
    """The DeepSpeed JSON config for one run."""
    zero: dict = {"stage": ds.zero_stage, "overlap_comm": ds.overlap_comm,
                  "contiguous_gradients": True, "reduce_bucket_size": ds.reduce_bucket_size}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
                     "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold,
                     # checkpoints gather the weights themselves (consolidated safetensors)
                     "stage3_gather_16bit_weights_on_model_save": False})
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": float(max_grad_norm),
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": zero,
        # the optimizer is ours (torch AdamW / bitsandbytes); DeepSpeed's CPU Adam would need a
        # compiled extension on every node
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def prepare_for_zero3(loss_module, model) -> dict:
    """Tell ZeRO-3 about weights our kernels read outside their owners' forward (see module doc)."""
    import deepspeed

    from kernels.fused_lora import fused_reads
    from kernels.model import base_model

    register = deepspeed.zero.register_external_parameter
    register(loss_module, base_model(model).lm_head.weight)
    n = 0
    for module, reads in fused_reads(model):
        for owner in reads:
            for p in owner.parameters():
                register(module, p)
                n += 1
    return {"zero3_external_params": n + 1}


def initialize(loss_module, model, optimizer, scheduler, *, ds: DeepSpeedConfig, micro_batch_size: int,
               grad_accum: int, world_size: int, max_grad_norm: float, bf16: bool):
    """deepspeed.initialize on the existing process group; returns (engine, notes)."""
    import deepspeed

    notes = {"deepspeed_zero_stage": ds.zero_stage}
    if ds.zero_stage == 3:
        notes.update(prepare_for_zero3(loss_module, model))
    cfg = ds_config(ds, micro_batch_size=micro_batch_size, grad_accum=grad_accum, world_size=world_size,
                    max_grad_norm=max_grad_norm, bf16=bf16)
    engine, _, _, _ = deepspeed.initialize(model=loss_module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=cfg, dist_init_required=False)
    return engine, notes


def backward(engine):
    """The per-micro-batch backward for `cluster.train_step.accumulate_step`: our scaling is
    already in the loss, and DeepSpeed counts micro-batches through step()."""
    def run(loss) -> None:
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
    return run


def grad_norm(engine) -> float:
    g = engine.get_global_grad_norm()
    return float(g) if g is not None else 0.0


def gathered(model, params=None):
    """Context in which ZeRO-3-sharded weights are whole on every rank (read only); a no-op for
    weights that are not sharded. Every rank must enter it."""
    params = list(model.parameters()) if params is None else list(params)
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save(directory: str, engine, model, state: dict, rank: int) -> None:
    """Resumable shards (every rank) + consolidated trainable weights and counters (rank 0)."""
    import torch
    from safetensors.torch import save_file

    from kernels.training_state import rng_state, trainable_state, write_state

    os.makedirs(directory, exist_ok=True)
    engine.save_checkpoint(os.path.join(directory, DS_SUBDIR), tag=DS_TAG, save_latest=False,
                           exclude_frozen_parameters=True)
    with gathered(model, [p for p in model.parameters() if p.requires_grad]):
        if rank == 0:
            save_file(trainable_state(model), os.path.join(directory, "trainable.safetensors"))
    if rank == 0:
        torch.save(rng_state(), os.path.join(directory, "rng.pt"))
        write_state(directory, state)


def load(directory: str, engine) -> dict:
    """Restore weights, optimizer and schedule from `save`'s shards; returns the counters."""
    from kernels.training_state import load_tensors, read_state, restore_rng

    state = read_state(directory)
    shards = os.path.join(directory, DS_SUBDIR)
    if not os.path.isdir(shards):
        raise ValueError(f"{directory}: no {DS_SUBDIR}/ shards; it was not written with "
                         f"trainer.strategy=deepspeed (resume it with the strategy that wrote it)")
    path, _ = engine.load_checkpoint(shards, tag=DS_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"{shards}: DeepSpeed could not load these shards (written by another "
                         f"number of workers or ZeRO stage?)")
    restore_rng(load_tensors(os.path.join(directory, "rng.pt")))
    return state
