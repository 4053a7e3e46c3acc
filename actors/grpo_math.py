"""GRPO maths as pure tensor functions in registries. Imports only torch (no Ray, no vLLM).

Three registries, each addressed by name from the config (`grpo.adv_estimator`,
`grpo.policy_loss`, `grpo.kl_estimator`, `grpo.loss_agg`):

    ADV_ESTIMATORS   rewards [N], group ids [N] -> advantages [N]
    POLICY_LOSSES    logp, old_logp [B, T], adv [B], mask [B, T] -> per-token loss [B, T], metrics
    KL_ESTIMATORS    logp, ref_logp [B, T] -> per-token KL estimate [B, T]
    LOSS_AGGS        per-token loss [B, T], mask [B, T] -> scalar (with global normalisers)

Conventions: `mask` is 1.0 on completion tokens and 0.0 on prompt and padding; `logp[b, t]` is the
log-probability of the token at completion position t of sample b. Everything is vectorised; the
tests compare each function with a per-sample Python loop and with hand-computed numbers.

Register your own with the decorators:

    @register_policy_loss("my_loss")
    def my_loss(logp, old_logp, adv, mask, params: LossParams) -> tuple[Tensor, dict[str, Tensor]]: ...
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import math

import torch

Tensor = torch.Tensor

ADV_ESTIMATORS: dict[str, Callable] = {}
ADV_MIN_GROUP: dict[str, int] = {}  # samples per prompt an estimator needs (group baselines: 2)
POLICY_LOSSES: dict[str, Callable] = {}
KL_ESTIMATORS: dict[str, Callable] = {}
LOSS_AGGS: dict[str, Callable] = {}


def _register(table: dict[str, Callable], kind: str, name: str):
    def deco(fn):
        if name in table and table[name] is not fn:
            raise ValueError(f"{kind} {name!r} is already registered")
        table[name] = fn
        return fn
    return deco


def register_adv_est(name: str, min_group_size: int = 2):
    """Register `fn(rewards [S], group_ids [S]) -> advantages [S]`. min_group_size: the samples per
    prompt (rollout.n) it needs: 2 for a baseline computed within the group (with one sample every
    advantage would be 0), 1 for an estimator whose baseline does not come from the group."""
    if min_group_size < 1:
        raise ValueError(f"advantage estimator {name!r}: min_group_size must be >= 1, got {min_group_size}")
    ADV_MIN_GROUP[name] = min_group_size
    return _register(ADV_ESTIMATORS, "advantage estimator", name)


def min_group_size(adv_estimator: str) -> int:
    """Samples per prompt the registered estimator needs (see register_adv_est)."""
    get_adv_est(adv_estimator)  # an unknown name fails here, naming the registered ones
    return ADV_MIN_GROUP.get(adv_estimator, 2)


def register_policy_loss(name: str):
    return _register(POLICY_LOSSES, "policy loss", name)


def register_kl_estimator(name: str):
    return _register(KL_ESTIMATORS, "KL estimator", name)


def register_loss_agg(name: str):
    return _register(LOSS_AGGS, "loss aggregation", name)


def _get(table: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: {', '.join(sorted(table))}")
    return table[name]


def get_adv_est(name: str) -> Callable:
    return _get(ADV_ESTIMATORS, "advantage estimator", name)


def get_policy_loss(name: str) -> Callable:
    return _get(POLICY_LOSSES, "policy loss", name)


def get_kl_estimator(name: str) -> Callable:
    return _get(KL_ESTIMATORS, "KL estimator", name)


def get_loss_agg(name: str) -> Callable:
    return _get(LOSS_AGGS, "loss aggregation", name)


# ----------------------------------------------------------------------------------------------
# Advantages: one scalar per sample, shared by all its tokens (outcome rewards).
# ----------------------------------------------------------------------------------------------

def group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (group mean, group std (unbiased), group size), all [N] float.

    A group of size 1 has std 0 (not NaN): it carries no comparison, its advantage is 0.
    """
    rewards = rewards.double()
    n_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids, torch.ones_like(rewards))
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids, rewards)
    mean = total / count.clamp(min=1)                       # [G]
    dev2 = (rewards - mean[group_ids]) ** 2                 # [N]
    ss = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, group_ids, dev2)
    std = torch.sqrt(ss / (count - 1).clamp(min=1))         # Bessel-corrected; size 1 -> 0
    return mean[group_ids], std[group_ids], count[group_ids]


@register_adv_est("grpo")
def grpo_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """(r - group mean) / (group std + eps) (GRPO, Shao et al. 2024).

    Degenerate groups: all rewards equal (std 0) -> 0 for every member (the numerator is exactly
    0, so eps only guards the division); a group of one sample -> 0.
    """
    mean, std, count = group_stats(rewards, group_ids)
    adv = (rewards.double() - mean) / (std + eps)
    adv = torch.where((count < 2) | (std == 0), torch.zeros_like(adv), adv)
    return adv.to(torch.float32)


@register_adv_est("grpo_no_std")
def grpo_no_std_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """r - group mean, without the std division (Dr. GRPO, Liu et al. 2025: no difficulty bias)."""
    mean, _, count = group_stats(rewards, group_ids)
    adv = rewards.double() - mean
    adv = torch.where(count < 2, torch.zeros_like(adv), adv)
    return adv.to(torch.float32)


@register_adv_est("rloo")
def rloo_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """r - mean of the *other* group members (leave-one-out baseline); size-1 groups -> 0."""
    mean, _, count = group_stats(rewards, group_ids)
    k = count
    # mean of others = (k * mean - r) / (k - 1);  r - that = k / (k - 1) * (r - mean)
    adv = (k / (k - 1).clamp(min=1)) * (rewards.double() - mean)
    adv = torch.where(count < 2, torch.zeros_like(adv), adv)
    return adv.to(torch.float32)


def groups_with_variance(rewards: Tensor, group_ids: Tensor, atol: float = 1e-9) -> Tensor:
    """[G] bool: which groups have at least two different rewards (dynamic sampling keeps these)."""
    n_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    r = rewards.double()
    hi = torch.full((n_groups,), -float("inf"), dtype=torch.float64).scatter_reduce(0, group_ids, r, "amax")
    lo = torch.full((n_groups,), float("inf"), dtype=torch.float64).scatter_reduce(0, group_ids, r, "amin")
    return (hi - lo) > atol


# ----------------------------------------------------------------------------------------------
# Policy losses: per-token loss [B, T] (already zero outside the mask) + metrics.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossParams:
    """Knobs the policy losses read. eps_low/eps_high: the clip range [1 - eps_low, 1 + eps_high]
    (DAPO's decoupled "clip-higher"); GSPO uses a sequence-level ratio with much smaller values."""

    eps_low: float = 0.2
    eps_high: float = 0.2


def _clip_objective(ratio: Tensor, adv: Tensor, mask: Tensor, p: LossParams
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """-min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A), masked; clip metrics."""
    adv = adv.unsqueeze(-1) if adv.dim() == ratio.dim() - 1 else adv  # [B] -> [B, 1]
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - p.eps_low, 1.0 + p.eps_high) * adv
    loss = -torch.minimum(unclipped, clipped) * mask
    # a token is "clipped" when the clipped branch is the one taken (its gradient is zero)
    is_clipped = (clipped < unclipped).to(mask.dtype) * mask
    n = mask.sum().clamp(min=1)
    metrics = {
        "clip_frac": is_clipped.sum() / n,
        "clip_frac_low": (((ratio < 1.0 - p.eps_low) & (adv < 0)).to(mask.dtype) * mask).sum() / n,
        "clip_frac_high": (((ratio > 1.0 + p.eps_high) & (adv > 0)).to(mask.dtype) * mask).sum() / n,
        "ratio_mean": (ratio.detach() * mask).sum() / n,
    }
    return loss, metrics


@register_policy_loss("clip")
def clip_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, params: LossParams
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO token-level clipped surrogate with separate eps_low / eps_high (DAPO clip-higher)."""
    ratio = torch.exp((logp - old_logp) * mask)  # masked positions: ratio 1, loss 0
    return _clip_objective(ratio, adv, mask, params)


@register_policy_loss("gspo")
def gspo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, params: LossParams
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025): one importance ratio per sequence,
    s_i = exp(mean_t (logp - old_logp)), clipped at the sequence level.

    Written in GSPO-token form: s_i,t = sg[s_i] * exp(logp_t - sg[logp_t]), whose value is s_i at
    every token and whose gradient equals that of s_i summed per sequence, so the per-token loss
    averaged per sequence (seq-mean-token-mean) is exactly the GSPO objective.
    """
    lengths = mask.sum(-1).clamp(min=1)                                   # [B]
    log_seq_ratio = ((logp - old_logp) * mask).sum(-1) / lengths          # [B]
    token_ratio = torch.exp(log_seq_ratio.detach().unsqueeze(-1) + logp - logp.detach())  # [B, T]
    return _clip_objective(token_ratio, adv, mask, params)


@register_policy_loss("reinforce")
def reinforce_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, params: LossParams
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Unclipped importance-weighted policy gradient: -ratio * A (equals -logp * A on-policy)."""
    ratio = torch.exp((logp - old_logp) * mask)
    a = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    loss = -ratio * a * mask
    n = mask.sum().clamp(min=1)
    zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
    return loss, {"clip_frac": zero, "clip_frac_low": zero, "clip_frac_high": zero,
                  "ratio_mean": (ratio.detach() * mask).sum() / n}


# ----------------------------------------------------------------------------------------------
# KL estimators of KL(pi || pi_ref) per token, from samples of pi (Schulman 2020, "k1/k2/k3").
# ----------------------------------------------------------------------------------------------

@register_kl_estimator("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """log pi - log pi_ref: unbiased, high variance, can be negative."""
    return logp - ref_logp


@register_kl_estimator("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """0.5 (log pi - log pi_ref)^2: biased, low variance, >= 0."""
    return 0.5 * (logp - ref_logp) ** 2


@register_kl_estimator("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0 (the GRPO paper's estimator)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


# ----------------------------------------------------------------------------------------------
# Aggregation of a per-token loss into the scalar that is differentiated.
#
# The normalisers may be passed explicitly so that a loss split over micro-batches, PPO
# minibatches and data-parallel ranks sums to the loss of the whole minibatch: each part uses the
# *global* token / sequence count and the gradients are summed (not averaged) across parts.
# ----------------------------------------------------------------------------------------------

@register_loss_agg("token-mean")
def agg_token_mean(loss: Tensor, mask: Tensor, num_tokens: float | None = None,
                   num_seqs: float | None = None, max_len: int | None = None) -> Tensor:
    """sum over all tokens / number of tokens (DAPO): long answers weigh more per sequence."""
    n = mask.sum() if num_tokens is None else num_tokens
    return (loss * mask).sum() / max(float(n), 1.0)


@register_loss_agg("seq-mean-token-mean")
def agg_seq_mean_token_mean(loss: Tensor, mask: Tensor, num_tokens: float | None = None,
                            num_seqs: float | None = None, max_len: int | None = None) -> Tensor:
    """mean over sequences of (mean over the sequence's tokens) (original GRPO, GSPO)."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)   # [B]
    n = mask.shape[0] if num_seqs is None else num_seqs
    return per_seq.sum() / max(float(n), 1.0)


@register_loss_agg("seq-mean-token-sum-norm")
def agg_seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, num_tokens: float | None = None,
                                num_seqs: float | None = None, max_len: int | None = None) -> Tensor:
    """sum over all tokens / (number of sequences * a constant max length) (Dr. GRPO): no length bias."""
    if max_len is None:
        max_len = mask.shape[-1]
    n = mask.shape[0] if num_seqs is None else num_seqs
    return (loss * mask).sum() / (max(float(n), 1.0) * float(max_len))


# ----------------------------------------------------------------------------------------------
# Off-policy correction: the rollout engine's sampling distribution differs from the learner's
# (other kernels, bf16 rounding, a lagging weights version), so its samples are weighted by
# pi_old / pi_rollout (truncated importance sampling, TIS), or the tokens/sequences whose ratio
# exceeds the cap are masked out.
# ----------------------------------------------------------------------------------------------

IS_MODES = ("off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def is_weights(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, mode: str, cap: float
               ) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Detached per-token weights [.., T] of the policy loss, and their metrics.

    token_*: r_t = exp(old_t - rollout_t) per token; sequence_*: r = exp(sum_t (old_t - rollout_t))
    over the sequence's completion (the last dim), the same for all its tokens.
    *_truncate: w = min(r, cap); *_mask: w = 1 where r <= cap, else 0. off: (None, {}).
    Metrics: is_weight_mean (mean w over the mask) and is_clip_frac (fraction of tokens whose r
    exceeded the cap).
    """
    if mode == "off":
        return None, {}
    if mode not in IS_MODES:
        raise ValueError(f"importance sampling mode {mode!r}; accepted: {', '.join(IS_MODES)}")
    mask = mask.to(old_logp.dtype)
    log_r = ((old_logp - rollout_logp) * mask).detach()
    if mode.startswith("sequence"):
        log_r = log_r.sum(-1, keepdim=True).expand_as(log_r)
    # exp of a clamped log: no overflow for long sequences; the cap decides beyond it anyway
    r = torch.exp(log_r.clamp(max=math.log(cap) + 1.0))
    hit = (r > cap).to(mask.dtype)
    w = r.clamp(max=cap) if mode.endswith("truncate") else 1.0 - hit
    w = w * mask
    n = mask.sum().clamp(min=1)
    return w, {"is_weight_mean": w.sum() / n, "is_clip_frac": (hit * mask).sum() / n}


# ----------------------------------------------------------------------------------------------
# The full GRPO loss of one (micro-)batch.
# ----------------------------------------------------------------------------------------------

def grpo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
              policy_loss: str = "clip", params: LossParams = LossParams(),
              ref_logp: Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
              loss_agg: str = "token-mean", num_tokens: float | None = None,
              num_seqs: float | None = None, max_len: int | None = None, is_weight: Tensor | None = None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """policy loss (times is_weight, when given) + kl_coef * KL(pi || ref) per token, aggregated.
    Returns (loss, detached metrics).

    Metrics are token means over this batch's mask (KL is reported whenever ref_logp is given,
    even with kl_coef 0).
    """
    mask = mask.to(logp.dtype)
    per_token, metrics = get_policy_loss(policy_loss)(logp, old_logp, adv, mask, params)
    if is_weight is not None:  # off-policy correction of the policy term (is_weights)
        per_token = per_token * is_weight
    n = mask.sum().clamp(min=1)
    metrics = {k: v.detach() for k, v in metrics.items()}
    if ref_logp is not None:
        kl = get_kl_estimator(kl_estimator)(logp, ref_logp) * mask
        metrics["kl"] = (kl.detach().sum() / n)
        if kl_coef:
            per_token = per_token + kl_coef * kl
    loss = get_loss_agg(loss_agg)(per_token, mask, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    metrics["policy_loss"] = loss.detach()
    return loss, metrics
