"""The GRPO learner: policy/reference logprobs (chunked), the GRPO loss, optimizer steps, weights out.

    learner = Learner(model_cfg, grpo_cfg, logprob_temperature=1.0)   # ray.remote(...) in cluster/
    metrics = learner.update(batch)        # batch: make_batch(samples, advantages)
    state = learner.state_for_sync("merged")   # or "adapter"
    learner.save(dir); learner.load(dir)

The model is the SFT worker's (kernels.factory.build_training_model: Triton kernels, fused LoRA,
NF4 for qlora, gradient checkpointing), trained on the same padding-free packed rows: each
micro-batch's sequences (prompt + completion) are laid end to end in rows of `pack_tokens` tokens
with positions restarting per sequence (actors/learner_batch.py). Logprobs never build the
[tokens, V] logits: the decoder's hidden states of completion positions only are gathered to
[N, H] and the head runs through the fused "linear -> log-softmax -> gather" op
(kernels/ops/linear_logprobs.py), or the chunked reference where the head is trained
(kernels/logprobs.py). With one optimizer step per batch the old policy is the current one, so no
separate old-logprob pass is made.

Reference logprobs: LoRA -> the same model inside PEFT's `disable_adapter()` (no second copy);
full fine-tuning -> a frozen copy made at start. Only computed when kl_coef > 0 or log_kl is on.

Several learners form one torch.distributed group (gloo on CPU, NCCL on GPU); each takes a shard of
every minibatch and gradients are summed with an explicit all-reduce (the DDP maths, without
DDP's wrapper, because the forward is not a plain `model(...)` call). Loss normalisers (tokens,
sequences) are global across micro-batches and ranks, so the result does not depend on the split.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from actors import grpo_math as gm
from actors.learner_batch import (batch_size, collate, loss_tokens, make_batch, micro_batches, pack_micro_batch,
                                  select, shard)
from kernels.config_fields import check_ranges
from kernels.logprobs import chunked_logprobs, packed_logprobs, sequence_logprobs
from kernels.model import ModelConfig
from kernels.training import grad_norm_and_clip

__all__ = ["GRPOConfig", "Learner", "batch_size", "chunked_logprobs", "collate", "logprob_mismatch",
           "make_batch", "packed_logprobs", "select", "sequence_logprobs", "shard"]


@dataclass(frozen=True)
class GRPOConfig:
    """The GRPO algorithm and the learner's optimisation.

    prompts_per_step: prompts whose groups make one training batch (after dynamic sampling).
    adv_estimator: grpo | grpo_no_std | rloo (actors/grpo_math.py registry).
    policy_loss: clip (token ratio, PPO/GRPO/DAPO) | gspo (sequence ratio) | reinforce (no clip).
    loss_agg: token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr. GRPO).
    eps_low / eps_high: clip range [1 - eps_low, 1 + eps_high].
    kl_coef / kl_estimator: KL(pi || ref) penalty in the loss (0 = none) and its estimator k1|k2|k3.
    log_kl: compute the reference logprobs to report KL even when kl_coef is 0.
    lr, weight_decay, betas, warmup_steps, max_grad_norm: AdamW, linear warmup then constant.
    ppo_epochs / num_minibatches: optimizer steps per batch = ppo_epochs * num_minibatches.
    micro_batch_size / micro_batch_tokens: a forward/backward takes at most this many sequences and,
      when micro_batch_tokens > 0, at most this many prompt + completion tokens (gradient
      accumulation within a minibatch; the loss does not depend on the split).
    pack_tokens: tokens per packed row (sequences laid end to end, positions restarting); a longer
      sequence gets a row of its own; 0 = the micro-batch's longest sequence (rows no longer than
      needed: attention in a packed row costs (row length)^2).
    logprob_chunk_size: rows of hidden states per lm_head chunk (the reference head path).
    old_logprobs: learner (recompute with the pre-update policy) | rollout (the engine's logprobs:
      true behaviour policy, includes train/inference mismatch).
    max_len_norm: the constant of seq-mean-token-sum-norm (0 = rollout.max_tokens).
    dynamic_sampling: drop the groups whose rewards are all equal (DAPO); a step over-samples
      prompts in its one generate call and trains on prompts_per_step groups that vary
      (jobs/grpo_sampling.py).
    oversample: prompts generated per step = ceil(prompts_per_step x factor), factor >= this.
    adaptive_oversample: raise the factor to 1.15 / (the fraction of groups kept so far, a moving
      average), at most max_oversample.
    max_refill_rounds: extra serial rounds of prompts when a step still has fewer groups with a
      signal than prompts_per_step (a fallback; each costs a generate call).
    async_mode: off | one_step | bounded. one_step: the rollout of step k+1 overlaps the update of
      step k (samples one weight version old); bounded: rollouts run up to max_weights_lag steps
      ahead of the learner (samples at most that many versions old). Both log weights_lag and the
      train-inference mismatch every step; is_correction auto corrects them.
    max_weights_lag: the staleness bound of async_mode bounded (versions; >= 1).
    mask_truncated_completions: completions cut at rollout.max_tokens (finish reason "length") add
      nothing to the loss, its normalisers or the metrics (DAPO's overlong filtering).
    is_correction: off-policy correction against the rollout engine's logprobs (grpo_math.is_weights):
      off | token_truncate | token_mask | sequence_truncate | sequence_mask; auto (the job's
      default) = token_truncate with vLLM rollouts or an async mode, off with the hf engine in sync
      mode (the learner's own maths, the samples' own policy).
    is_cap: the cap C of the importance ratio pi_old / pi_rollout (truncate: min(r, C); mask: r > C
      drops the token or sequence).
    cuda_graphs: on a GPU, each micro-batch's forward + backward is one replayed CUDA graph (the
      batch packed into fixed-shape micro-batches: actors/learner_graph.py), as in SFT; off, or
      where a graph cannot be used (policy_loss gspo, an unsupported model), the eager path.
    num_learners, num_cpus, num_gpus: learner actors and their resources.
    """

    prompts_per_step: int = field(default=16, metadata={"min": 1})
    adv_estimator: str = "grpo"
    policy_loss: str = "clip"
    loss_agg: str = "token-mean"
    eps_low: float = field(default=0.2, metadata={"min": 0, "lt": 1})
    eps_high: float = field(default=0.28, metadata={"min": 0})
    kl_coef: float = field(default=0.0, metadata={"min": 0})
    kl_estimator: str = "k3"
    log_kl: bool = True
    lr: float = field(default=1e-5, metadata={"gt": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = field(default=0, metadata={"min": 0})
    max_grad_norm: float = field(default=1.0, metadata={"min": 0})
    ppo_epochs: int = field(default=1, metadata={"min": 1})
    num_minibatches: int = field(default=1, metadata={"min": 1})
    micro_batch_size: int = field(default=64, metadata={"min": 1})
    micro_batch_tokens: int = field(default=16384, metadata={"min": 0, "note": "0 = no token limit"})
    pack_tokens: int = field(default=0, metadata={"min": 0, "note": "0 = the micro-batch's longest sequence"})
    logprob_chunk_size: int = field(default=1024, metadata={"min": 1})
    old_logprobs: Literal["learner", "rollout"] = "learner"
    max_len_norm: int = field(default=0, metadata={"min": 0, "note": "0 = rollout.max_tokens"})
    dynamic_sampling: bool = True
    oversample: float = field(default=1.0, metadata={"min": 1})
    adaptive_oversample: bool = True
    max_oversample: float = field(default=4.0, metadata={"min": 1})
    max_refill_rounds: int = field(default=1, metadata={"min": 0})
    async_mode: Literal["off", "one_step", "bounded"] = "off"
    max_weights_lag: int = field(default=2, metadata={"min": 1})
    mask_truncated_completions: bool = False
    is_correction: Literal["auto", "off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "auto"
    is_cap: float = field(default=2.0, metadata={"gt": 1})
    cuda_graphs: bool = True
    num_learners: int = field(default=1, metadata={"min": 1})
    num_cpus: float = field(default=1.0, metadata={"min": 0})
    num_gpus: float = field(default=0.0, metadata={"min": 0})

    def __post_init__(self):
        check_ranges(self, "grpo")
        for key, table in (("adv_estimator", gm.ADV_ESTIMATORS), ("policy_loss", gm.POLICY_LOSSES),
                           ("loss_agg", gm.LOSS_AGGS), ("kl_estimator", gm.KL_ESTIMATORS)):
            if getattr(self, key) not in table:
                raise ValueError(f"grpo.{key}: unknown {getattr(self, key)!r}; accepted: {', '.join(sorted(table))}")
        if len(self.betas) != 2:
            raise ValueError(f"grpo.betas: expected two numbers, got {self.betas}")
        if self.num_minibatches > self.prompts_per_step:
            raise ValueError(f"grpo.num_minibatches ({self.num_minibatches}) cannot exceed "
                             f"grpo.prompts_per_step ({self.prompts_per_step})")

    @property
    def weights_lag_bound(self) -> int:
        """How many steps ahead rollouts are launched: 0 (sync), 1 (one_step) or max_weights_lag."""
        return {"off": 0, "one_step": 1}.get(self.async_mode, self.max_weights_lag)

    @property
    def needs_ref(self) -> bool:
        return self.kl_coef > 0 or self.log_kl


# ----------------------------------------------------------------------------------------------
# The learner actor.
# ----------------------------------------------------------------------------------------------

class Learner:
    """One learner rank. Verbs: update, compute_logprobs, state_for_sync, send_weights, save, load."""

    def __init__(self, model_cfg: ModelConfig, cfg: GRPOConfig, *, vocab_size: int | None = None,
                 logprob_temperature: float = 1.0, max_len_norm: int = 64, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0, num_threads: int = 0, kernels=None):
        """kernels: a kernels.patch.KernelsConfig (default: the Triton kernels on, as in SFT)."""
        from kernels.factory import build_training_model
        from kernels.model import torch_dtype
        from kernels.patch import KernelsConfig
        from kernels.training import lr_lambda, make_optimizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model_cfg, self.cfg = model_cfg, cfg
        self.rank, self.world_size = rank, world_size
        self.temperature = logprob_temperature if logprob_temperature > 0 else 1.0
        self.max_len_norm = cfg.max_len_norm or max_len_norm
        # "auto" is the job's to resolve (it knows the rollout engine); a learner built alone: off
        self.is_mode = "off" if cfg.is_correction == "auto" else cfg.is_correction
        self.pad_id = pad_id
        # a Ray actor sees only its own GPU(s): index 0 of CUDA_VISIBLE_DEVICES
        self.device = (torch.device("cuda", 0) if cfg.num_gpus > 0 and torch.cuda.is_available()
                       else torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        kernels = KernelsConfig() if kernels is None else kernels
        self.model, self.notes = build_training_model(model_cfg, kernels=kernels, vocab_size=vocab_size,
                                                      device=self.device, seed=seed)
        self.is_lora = model_cfg.finetune in ("lora", "qlora")
        # full fine-tuning: a frozen copy is the reference (LoRA: the adapter is switched off instead)
        self.ref_model = None
        if not self.is_lora and cfg.needs_ref:
            self.ref_model, _ = build_training_model(model_cfg, kernels=kernels, vocab_size=vocab_size,
                                                     device=self.device, seed=seed, trainable=False)
        # fp32 weights on a GPU (full fine-tuning) compute in bf16 under autocast, as in SFT
        fp32_on_gpu = self.device.type == "cuda" and torch_dtype(model_cfg, self.device) == torch.float32
        self.autocast = torch.bfloat16 if fp32_on_gpu else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # the training core SFT uses (kernels/training.py): AdamW over the same parameter groups (no
        # weight decay on norms and biases), linear warmup then a constant lr, clipping
        self.opt = make_optimizer(self.model, "adamw", cfg.lr, 0.0, cfg.weight_decay, betas=tuple(cfg.betas))
        self._schedule = lr_lambda("constant", cfg.warmup_steps, 0)
        self.step = 0
        self.group = None  # broadcast WeightGroup (rank 0 only)
        self._keepalive = None  # tensors whose CUDA IPC handles are out
        # fixed-shape micro-batches replayed as CUDA graphs (GPU); else the eager packed path
        from actors.learner_graph import FixedShapeLoss, unsupported

        why = unsupported(cfg, self.model, self.device, model_cfg.finetune)
        self.fixed = FixedShapeLoss(self) if why is None else None
        self.notes["learner_cuda_graphs"] = "on" if why is None else f"off ({why})"

    # -- distributed ---------------------------------------------------------------------

    def address(self) -> tuple[str, int]:
        from actors.weight_sync import free_port, node_ip

        return node_ip(), free_port()

    def init_distributed(self, host: str, port: int) -> bool:
        if self.world_size == 1:
            return True
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                world_size=self.world_size)
        # every rank starts from rank 0's weights (LoRA init is random)
        for p in self.model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, 0)
        return True

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def _all_reduce_grads(self, bucket_bytes: int = 32 << 20) -> None:
        """Sum gradients over ranks, a flat bucket at a time (DDP's reduction, done explicitly)."""
        if self.world_size == 1:
            return
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        bucket, size = [], 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                off = 0
                for b in bucket:
                    b.copy_(flat[off:off + b.numel()].view_as(b))
                    off += b.numel()
                bucket, size = [], 0

    # -- logprobs ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reference(self):
        """The reference policy: the frozen copy, or this model with its adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
        elif self.is_lora:
            with self.model.disable_adapter():
                yield self.model
        else:
            raise RuntimeError("no reference model (full fine-tuning with kl_coef 0 and log_kl off)")

    def _micro_batches(self, batch: dict):
        """(indices, packed tensors on the device) per micro-batch."""
        for idx in micro_batches(batch, self.cfg.micro_batch_size, self.cfg.micro_batch_tokens):
            t = pack_micro_batch(select(batch, idx), self.pad_id, self.cfg.pack_tokens)
            yield idx, {k: v.to(self.device, non_blocking=True) for k, v in t.items()}

    def _amp(self):
        return torch.autocast("cuda", dtype=self.autocast) if self.autocast else contextlib.nullcontext()

    @torch.no_grad()
    def compute_logprobs(self, batch: dict, which: Literal["policy", "reference"] = "policy") -> list[list[float]]:
        """Per-sample completion logprobs (no grad), for old/ref logprobs and the mismatch check."""
        out: list[list[float] | None] = [None] * batch_size(batch)
        was = self.model.training
        self.model.eval()
        try:
            ctx = self._reference() if which == "reference" else contextlib.nullcontext(self.model)
            with ctx as model, self._amp():
                for idx, t in self._micro_batches(batch):
                    lp, _ = packed_logprobs(model, t, self.temperature, self.cfg.logprob_chunk_size, entropy=False)
                    lp = lp.cpu()
                    for r, i in enumerate(idx):  # every completion position (observations too)
                        out[i] = lp[r, :len(batch["completion_ids"][i])].tolist()
        finally:
            self.model.train(was)
        return out  # type: ignore[return-value]

    # -- update --------------------------------------------------------------------------

    def _lr(self) -> float:
        return self.cfg.lr * self._schedule(self.step)

    def update(self, batch: dict) -> dict:
        """ppo_epochs x num_minibatches optimizer steps on this rank's shard; metrics averaged over
        steps (and ranks). `batch` is this rank's shard (LearnerGroup shards the global batch)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if cfg.mask_truncated_completions and "truncated" in batch:
            batch = select(batch, [i for i, t in enumerate(batch["truncated"]) if not t])
        n = batch_size(batch)
        need_old = cfg.old_logprobs == "learner" and cfg.ppo_epochs * cfg.num_minibatches > 1
        if need_old:
            batch = dict(batch, old_logprobs=self.compute_logprobs(batch, "policy"))
        elif cfg.old_logprobs == "rollout":
            batch = dict(batch, old_logprobs=batch["rollout_logprobs"])
        if cfg.needs_ref:
            batch = dict(batch, ref_logprobs=self.compute_logprobs(batch, "reference"))
        t_prep = time.perf_counter() - t0
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}

        def add(k, v, w=1.0):
            sums[k] = sums.get(k, 0.0) + float(v) * w
            weights[k] = weights.get(k, 0.0) + w

        gen = torch.Generator().manual_seed(1000 + self.step)
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=gen).tolist() if epoch > 0 else list(range(n))
            for mb in range(cfg.num_minibatches):
                idx = perm[mb::cfg.num_minibatches]
                part = select(batch, idx)
                stats = self._optimizer_step(part)
                for k, (v, w) in stats.items():
                    add(k, v, w)
        metrics = {k: sums[k] / max(weights[k], 1e-12) for k in sums}
        if self.world_size > 1:  # mean over ranks
            keys = sorted(metrics)
            t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
            self._all_reduce(t)
            metrics = {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}
            metrics["loss"] = metrics.get("loss", 0.0) * self.world_size  # shares of one global loss add up
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics.update({"learner_prep_s": t_prep, "learner_update_s": time.perf_counter() - t0,
                        "learner_tokens": float(sum(len(p) + len(c) for p, c in
                                                    zip(batch["prompt_ids"], batch["completion_ids"]))),
                        "optimizer_steps": self.step, "lr": self._lr()})
        return metrics

    def _optimizer_step(self, part: dict) -> dict[str, tuple[float, float]]:
        cfg = self.cfg
        n_local = batch_size(part)
        counts = torch.tensor([float(loss_tokens(part)), float(n_local)],
                              dtype=torch.float64, device=self.device)
        self._all_reduce(counts)  # global normalisers: the split over ranks/micro-batches is invisible
        num_tokens, num_seqs = float(counts[0]), float(counts[1])
        for g in self.opt.param_groups:
            g["lr"] = self._lr()
        self.opt.zero_grad(set_to_none=True)
        params = gm.LossParams(eps_low=cfg.eps_low, eps_high=cfg.eps_high)
        stats: dict[str, tuple[float, float]] = {}
        tok_w_total = 0.0
        # metrics stay on the device until the step ends: no host sync between micro-batches, so
        # the next micro-batch's forward is queued while this one's backward runs
        acc: dict[str, torch.Tensor] = {}
        if self.fixed is not None and n_local:
            acc, tok_w_total = self.fixed.accumulate(part, num_tokens, num_seqs)
        for idx, t in self._micro_batches(part) if n_local and self.fixed is None else []:
            sub = select(part, idx)
            with self._amp():
                lp, ent = packed_logprobs(self.model, t, self.temperature, cfg.logprob_chunk_size)
            mask = t["mask"]
            old = self._padded(sub, "old_logprobs", mask) if "old_logprobs" in sub else lp.detach()
            ref = self._padded(sub, "ref_logprobs", mask) if "ref_logprobs" in sub else None
            isw, is_m = gm.is_weights(old, t["rollout_logprobs"], mask, self.is_mode, cfg.is_cap)
            loss, m = gm.grpo_loss(lp, old, t["advantages"], mask, policy_loss=cfg.policy_loss,
                                   params=params, ref_logp=ref, kl_coef=cfg.kl_coef,
                                   kl_estimator=cfg.kl_estimator, loss_agg=cfg.loss_agg,
                                   num_tokens=num_tokens, num_seqs=num_seqs, max_len=self.max_len_norm,
                                   is_weight=isw)
            m.update(is_m)
            loss.backward()
            w = float(loss_tokens(sub))  # = mask.sum(), counted on the host
            tok_w_total += w
            m["entropy"] = (ent * mask).sum() / max(w, 1.0)
            m["mismatch_kl"] = gm.kl_k3(t["rollout_logprobs"], lp.detach()).mul(mask).sum() / max(w, 1.0)
            for k, v in m.items():
                if k != "policy_loss":
                    acc[k] = acc.get(k, 0.0) + v.detach().double() * w
            acc["loss"] = acc.get("loss", 0.0) + loss.detach().double()
        self._all_reduce_grads()
        grad_norm = grad_norm_and_clip(self.params, cfg.max_grad_norm)
        self.opt.step()
        self.step += 1
        for k, v in acc.items():
            if k == "loss":
                stats[k] = (float(v), 1.0)  # already globally normalised: the sum is this rank's share
            else:
                stats[k] = (float(v) / max(tok_w_total, 1e-12), tok_w_total)
        stats["grad_norm"] = (float(grad_norm), 1.0)
        return stats

    def _padded(self, sub: dict, key: str, mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(mask.shape, dtype=torch.float32)
        for b, row in enumerate(sub[key]):
            out[b, :len(row)] = torch.tensor(row, dtype=torch.float32)
        return out.to(mask.device)

    # -- weights out ---------------------------------------------------------------------

    @torch.no_grad()
    def merged_state(self, dtype: torch.dtype | None = None, only_changed: bool = True) -> dict[str, torch.Tensor]:
        """Weights under the names of the plain HF model, LoRA folded in (W + scale * B @ A; an NF4
        base dequantised first): kernels.merge.merged_lora_state, the one merge.

        only_changed: LoRA -> just the adapted layers (and modules_to_save); full -> everything.
        """
        from kernels.merge import merged_lora_state

        return merged_lora_state(self.model, dtype, only_changed)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def state_for_sync(self, kind: Literal["merged", "adapter"] = "merged", dtype: str | None = None,
                       transport: Literal["object_store", "ipc"] = "object_store", full: bool = False) -> dict:
        """Weights for the rollout engines: merged HF-named tensors, or PEFT adapter tensors.

        object_store -> CPU tensors; ipc -> CUDA IPC handles (kept alive until the next call).
        full: every tensor even when only LoRA layers changed (an engine that dropped its weights).
        """
        if kind == "adapter":
            if not self.is_lora:
                raise ValueError("rollout.sync: adapter needs model.finetune lora/qlora")
            return self.adapter_state()
        state = self.merged_state(getattr(torch, dtype) if dtype else None, only_changed=not full)
        if transport == "ipc":
            from actors.weight_sync import export_ipc

            self._keepalive = {k: v.contiguous() for k, v in state.items()}
            return export_ipc(self._keepalive)
        return {k: v.cpu().contiguous() for k, v in state.items()}

    def init_weight_group(self, host: str, port: int, world_size: int, backend: str) -> bool:
        from actors.weight_sync import WeightGroup

        self.group = WeightGroup(host, port, 0, world_size, backend)
        return True

    def send_weights(self, dtype: str | None = None, full: bool = False) -> dict:
        """Broadcast merged weights to the rollout workers (which run receive_weights at the same time)."""
        if self.group is None:
            raise RuntimeError("send_weights: call init_weight_group first")
        t0 = time.perf_counter()
        state = self.merged_state(getattr(torch, dtype) if dtype else None, only_changed=not full)
        sent = self.group.send_state(state)
        return {"bytes": sent, "seconds": time.perf_counter() - t0}

    def weight_checksum(self, names: list[str]) -> dict[str, float]:
        """Sum of each merged weight (tests compare it with the rollout engine's)."""
        state = self.merged_state(only_changed=False)
        return {n: float(state[n].float().sum()) for n in names if n in state}

    # -- checkpoints ---------------------------------------------------------------------

    def save(self, path: str) -> str:
        """Trainable weights + optimizer + RNG + step, in the SFT checkpoint format
        (kernels/training_state.py); rank 0 writes (all ranks hold the same state)."""
        from kernels.training_state import save_training_state

        if self.rank == 0:
            save_training_state(path, self.model, self.opt, None, {"step": self.step})
        return path

    def load(self, path: str) -> int:
        from kernels.training_state import load_training_state

        self.step = int(load_training_state(path, self.model, self.opt, None)["step"])
        return self.step

    def save_merged(self, path: str, tokenizer_dir: str | None = None) -> str:
        """A merged model folder (for evaluation and serving), float32 on CPU runs."""
        from kernels.model import save_merged
        from kernels.tokenizer import load_tokenizer

        if self.rank != 0:
            return path
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        return save_merged(self.model, path, tokenizer=tok, dtype=dtype)

    def save_adapter(self, path: str) -> str:
        from kernels.model import save_adapter

        if self.rank == 0 and self.is_lora:
            save_adapter(self.model, path)
        return path


def logprob_mismatch(a: list[list[float]], b: list[list[float]]) -> dict[str, float]:
    """Max and mean |a - b| over all tokens of two per-sample logprob lists."""
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    if not diffs:
        return {"max_abs": 0.0, "mean_abs": 0.0, "tokens": 0}
    return {"max_abs": max(diffs), "mean_abs": sum(diffs) / len(diffs), "tokens": len(diffs)}

