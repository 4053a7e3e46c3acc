"""The learner's micro-batch as one replayed CUDA graph (GPU), as the SFT step does.

    fixed = FixedShapeLoss(learner)            # None-safe: FixedShapeLoss.unsupported(...) says why not
    acc, tok_w = fixed.accumulate(part, num_tokens, num_seqs)   # gradients in p.grad, metric sums

Why: a small model's update is bound by the host issuing kernels one by one (measured on an H200,
SmolLM2-135M's shape: our SFT step, replayed as a graph, at 259k tokens/s; the eager learner at
59k). A graph needs every micro-batch to have the same shapes, so the batch is packed into
`rows x row_len` micro-batches (actors.learner_batch.pack_fixed) and everything the loss reads is
a per-position tensor of that layout: the head runs at every position (prompt positions too,
masked out) instead of gathering the completion positions, whose number varies.

The loss is the learner's (actors.grpo_math policy loss, KL, token weights): loss_fn returns the
micro-batch's un-normalised sum  sum_t mask_t * weight_t * (policy_t + kl_coef * kl_t)  and the
normaliser of grpo.loss_agg is the graph's `scale` (1 / tokens, 1 / sequences, or 1 / (sequences
x max_len)), so one graph serves every step. Supported: policy_loss clip or reinforce (token-level
ratios; gspo's sequence ratio is not), any loss_agg, KL against reference logprobs, token-level
off-policy correction (is_correction token_*; sequence_* stays eager); LoRA and full
fine-tuning (QLoRA stays eager until its graphs have run on a GPU). Without a GPU
(or when kernels.cuda_graph.GraphedStep cannot capture) the same loss runs eagerly.
"""
from __future__ import annotations

import torch

from actors import grpo_math as gm
from actors.learner_batch import fixed_row_length, loss_tokens, pack_fixed

TOKEN_LEVEL_LOSSES = ("clip", "reinforce")


def unsupported(cfg, model, device: torch.device, finetune: str = "lora") -> str | None:
    """Why the learner cannot use fixed-shape graphs (None: it can)."""
    if not cfg.cuda_graphs:
        return "grpo.cuda_graphs is false"
    if finetune == "qlora":  # the QLoRA learner's GPU test ran on the eager path only
        return "model.finetune qlora (the learner's graphs with NF4 weights are not verified on a GPU yet)"
    if cfg.is_correction.startswith("sequence"):
        return f"is_correction {cfg.is_correction!r} (a sequence-level weight; graphs take token-level ones)"
    if cfg.policy_loss not in TOKEN_LEVEL_LOSSES:
        return f"policy_loss {cfg.policy_loss!r} (a sequence-level ratio; graphs take {', '.join(TOKEN_LEVEL_LOSSES)})"
    from kernels.cuda_graph import unsupported_reason

    return unsupported_reason(model, device)


class FixedShapeLoss:
    """The learner's loss over fixed-shape micro-batches, replayed as a CUDA graph when
    `graphs` (else eager: the reference the tests compare with the learner's own path)."""

    def __init__(self, learner, graphs: bool = True):
        self.l = learner
        self.cfg = learner.cfg
        self.params = gm.LossParams(eps_low=self.cfg.eps_low, eps_high=self.cfg.eps_high)
        self.metrics: dict[str, torch.Tensor] = {}
        self.step = None
        if graphs:
            from kernels.cuda_graph import GraphedStep

            self.step = GraphedStep(self.loss_fn, learner.params, model=learner.model, device=learner.device,
                                    autocast_dtype=learner.autocast, max_graphs=6)

    # the summed loss of one micro-batch; its metrics are left in self.metrics (graph outputs
    # when replayed: read them before the next call)
    def loss_fn(self, input_ids, position_ids, targets, mask, adv, weight, rollout_logprobs,
                old_logprobs=None, ref_logprobs=None):
        from kernels.logprobs import token_logprobs
        from kernels.model import base_model

        cfg, model = self.cfg, self.l.model
        hidden = base_model(model).model(input_ids=input_ids, position_ids=position_ids,
                                         use_cache=False).last_hidden_state
        lp, ent = token_logprobs(model, hidden.reshape(-1, hidden.shape[-1]), targets, self.l.temperature,
                                 cfg.logprob_chunk_size)
        lp = lp.float().unsqueeze(0)                                        # [1, T]
        m1 = mask.unsqueeze(0)
        old = old_logprobs.unsqueeze(0) if old_logprobs is not None else lp.detach()
        per_token, metrics = gm.get_policy_loss(cfg.policy_loss)(lp, old, adv.unsqueeze(0), m1, self.params)
        isw, is_m = gm.is_weights(old, rollout_logprobs.unsqueeze(0), m1, self.l.is_mode, cfg.is_cap)
        if isw is not None:
            per_token = per_token * isw
            metrics.update(is_m)
        n = mask.sum().clamp(min=1)
        if ref_logprobs is not None:
            kl = gm.get_kl_estimator(cfg.kl_estimator)(lp, ref_logprobs.unsqueeze(0)) * m1
            metrics["kl"] = kl.detach().sum() / n
            if cfg.kl_coef:
                per_token = per_token + cfg.kl_coef * kl
        metrics["entropy"] = (ent.float() * mask).sum() / n
        metrics["mismatch_kl"] = (gm.kl_k3(rollout_logprobs, lp.detach()[0]) * mask).sum() / n
        self.metrics = {k: v.detach() for k, v in metrics.items()}
        return (per_token * m1 * weight.unsqueeze(0)).sum()

    def scale(self, num_tokens: float, num_seqs: float) -> float:
        agg = self.cfg.loss_agg
        if agg == "token-mean":
            return 1.0 / max(num_tokens, 1.0)
        if agg == "seq-mean-token-mean":
            return 1.0 / max(num_seqs, 1.0)
        return 1.0 / (max(num_seqs, 1.0) * float(self.l.max_len_norm))  # seq-mean-token-sum-norm

    def shape(self, part: dict) -> tuple[int, int]:
        """(rows, row_len): rows of the longest sequence rounded up (or grpo.pack_tokens), as many
        as grpo.micro_batch_tokens holds."""
        row_len = max(self.cfg.pack_tokens, fixed_row_length(part))
        return max(1, (self.cfg.micro_batch_tokens or row_len) // row_len), row_len

    def accumulate(self, part: dict, num_tokens: float, num_seqs: float
                   ) -> tuple[dict[str, torch.Tensor], float]:
        """Forward + backward of every micro-batch of `part` (gradients add into p.grad); the
        metric sums weighted by each micro-batch's completion tokens, and their total."""
        rows, row_len = self.shape(part)
        scale = self.scale(num_tokens, num_seqs)
        acc: dict[str, torch.Tensor] = {}
        tok_w = 0.0
        for idx, t in pack_fixed(part, self.l.pad_id, rows, row_len, self.cfg.micro_batch_size, self.cfg.loss_agg):
            if self.step is not None:
                loss = self.step(t, scale)
            else:
                dev = {k: v.to(self.l.device, non_blocking=True) for k, v in t.items()}
                with self.l._amp():
                    loss = self.loss_fn(**dev)
                (loss * scale).backward()
                loss = loss.detach()
            w = float(loss_tokens(part, idx))
            tok_w += w
            for k, v in self.metrics.items():
                acc[k] = acc.get(k, 0.0) + v.double() * w
            acc["loss"] = acc.get("loss", 0.0) + loss.double() * scale
        return acc, tok_w
