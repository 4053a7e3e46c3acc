"""One optimizer step of causal-LM training, without Ray: collation, token-normalised gradient
accumulation, optimizer and schedule construction.

Gradient accumulation is normalised by the total number of target tokens of the whole step
(all micro-batches on all workers), so 4 micro-batches of 2 give the same update as one batch
of 8 whatever the sequence lengths (a plain mean per micro-batch does not).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from kernels.loss import IGNORE_INDEX, causal_lm_loss_sum


class LossForward(nn.Module):
    """Wraps a causal LM so that DDP sees the loss computation as the module's forward
    (DDP prepares its gradient reducer in forward)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids):
        return causal_lm_loss_sum(self.model, input_ids, labels, position_ids)


def collate(rows: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """Ray Data numpy batch (columns of 1-D arrays, maybe ragged) -> right-padded [B, T] tensors.

    Padding needs no attention mask: attention is causal, so real tokens never see the padding
    that follows them, and padded labels are -100.
    """
    ids = rows["input_ids"]
    n = len(ids)
    max_len = max(len(x) for x in ids)
    out_ids = np.full((n, max_len), pad_id, dtype=np.int64)
    out_lab = np.full((n, max_len), IGNORE_INDEX, dtype=np.int64)
    out_pos = np.zeros((n, max_len), dtype=np.int64)
    for i in range(n):
        k = len(ids[i])
        out_ids[i, :k] = ids[i]
        out_lab[i, :k] = rows["labels"][i]
        out_pos[i, :k] = rows["position_ids"][i]
        out_pos[i, k:] = np.arange(max_len - k)  # padding is its own segment
    return {"input_ids": torch.from_numpy(out_ids), "labels": torch.from_numpy(out_lab),
            "position_ids": torch.from_numpy(out_pos)}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry a loss (labels shifted by one: the first label never counts)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def accumulate_step(loss_module: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]], *,
                    device: torch.device, world_size: int = 1,
                    all_reduce_sum: Callable[[float], float] = lambda x: x,
                    autocast_dtype: torch.dtype | None = None,
                    backward: Callable[[torch.Tensor], None] | None = None,
                    graph=None) -> dict[str, float]:
    """Forward/backward over micro-batches; gradients end up = d(sum of token losses)/d(theta) / N
    with N the step's target tokens over every worker. Returns loss (mean per target token over
    all workers), target tokens and input tokens. The caller clips and steps the optimizer.

    `backward(scaled_loss)` replaces `scaled_loss.backward()` (DeepSpeed's engine); then the
    reduction across workers is the engine's, not DDP's `no_sync` bookkeeping.

    `graph` (a kernels.cuda_graph.GraphedStep over the same model) runs each micro-batch's
    forward+backward as a replayed CUDA graph instead (single worker, no `backward`)."""
    local_targets = sum(target_tokens(b) for b in micro_batches)
    total_targets = all_reduce_sum(float(local_targets))
    if total_targets <= 0:
        raise ValueError("a training step has no target tokens (every label is -100): "
                         "check data.train_on and the chat template")
    # DDP averages gradients over workers; multiply by world_size so the result is a sum / N.
    scale = world_size / total_targets
    loss_sum = 0.0
    input_tokens = 0
    for i, mb in enumerate(micro_batches):
        if graph is not None:
            loss = graph({k: mb[k] for k in ("input_ids", "labels", "position_ids")}, scale)
        else:
            mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
            last = i == len(micro_batches) - 1
            sync = (contextlib.nullcontext() if last or backward is not None or not hasattr(loss_module, "no_sync")
                    else loss_module.no_sync())
            amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
                   if autocast_dtype is not None else contextlib.nullcontext())
            with sync:
                with amp:
                    loss, _ = loss_module(mb["input_ids"], mb["labels"], mb["position_ids"])
                if backward is None:
                    (loss * scale).backward()
                else:
                    backward(loss * scale)
        loss_sum += float(loss.detach())
        input_tokens += int(mb["input_ids"].numel())
    total_loss = all_reduce_sum(loss_sum)
    return {"loss": total_loss / total_targets, "target_tokens": total_targets,
            "input_tokens": all_reduce_sum(float(input_tokens))}


def param_groups(model: nn.Module, lr: float, embedding_lr: float, weight_decay: float):
    """Trainable parameters; embeddings / lm_head get their own lr (CPT)."""
    emb, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "embed_tokens" in name or "lm_head" in name:
            emb.append(p)
        elif p.ndim < 2 or "norm" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    if emb:
        groups.append({"params": emb, "weight_decay": 0.0, "lr": embedding_lr or lr})
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, kind: str, lr: float, embedding_lr: float, weight_decay: float,
                   betas=(0.9, 0.999)):
    """AdamW (or bitsandbytes' 8-bit AdamW) over the trainable parameter groups."""
    from kernels.qlora import make_optimizer as adamw

    groups = param_groups(model, lr, embedding_lr, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters (check model.finetune and model.lora.target_modules)")
    return adamw(groups, lr=lr, kind=kind, weight_decay=weight_decay, betas=betas)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Multiplier of the base lr at a step (LambdaLR): linear warmup then cosine/linear/constant."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        if schedule == "linear":
            return max(min_ratio, 1.0 - progress * (1.0 - min_ratio))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def grad_norm_and_clip(params, max_norm: float) -> float:
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.detach().float().norm() for p in params])))
