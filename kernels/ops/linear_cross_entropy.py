"""Fused linear + cross-entropy: token losses from hidden states without the [N, V] logits.

loss_i = logsumexp(z_i) - z_i[target_i],  z = cap(hidden @ weight.T),  cap(a) = s * tanh(a / s)
(Gemma 2 logit soft-capping when s is given), targets == -100 contribute nothing.

The tokens are walked in chunks of C rows. For each chunk: one matmul gives its logits [C, V]
(in the weight's dtype), Triton programs (one row each on GPU) compute in fp32 each row's
log-sum-exp (online, over blocks of V), its loss, and overwrite the logits row with the gradient
d loss / d logits = (softmax(z) - onehot(target)) * cap'(a); two more matmuls turn that into
this chunk's d hidden [C, H] and its share of d weight [V, H] (accumulated in fp32). So the
gradients are finished during the forward; the backward only scales them by the incoming
gradient (and by 1 / n_targets for "mean"). Peak extra memory: one [C, V] chunk, d hidden,
and the fp32 d weight when the weight is trained (LoRA: frozen head, none).

The PyTorch path runs the same chunked scheme with torch ops (no Triton): that is what runs
on CPU in "auto" mode; tests compare both to the full-logits fp32 reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops.common import launchable, next_power_of_2, rows_per_tile, tanh, tile_elements, use_triton

IGNORE_INDEX = -100
REDUCTIONS = ("sum", "mean")
CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 64 Mi elements (256 MiB in fp32, 128 MiB in bf16)
MAX_BLOCK_V = 4096


@triton.jit
def _capped(a, softcap, HAS_SOFTCAP: tl.constexpr):
    """(z, cap'(a)) with z = softcap * tanh(a / softcap); (a, 1) without soft-capping."""
    if HAS_SOFTCAP:
        t = tanh(a / softcap)
        z = softcap * t
        dz = 1.0 - t * t
    else:
        z = a
        dz = 1.0
    return z, dz


@triton.jit
def _linear_cross_entropy_fwd_kernel(LOGITS, stride_row, TARGETS, LOSS, ENT, n_rows, n_cols, softcap, ignore_index,
                                     HAS_SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                                     COMPUTE_ENT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: row * stride > 2**31
    rmask = rows < n_rows
    target = tl.load(TARGETS + rows, mask=rmask, other=ignore_index).to(tl.int64)
    valid = rmask & (target != ignore_index)  # ignored rows load nothing and get a zero gradient
    row_ptr = LOGITS + rows[:, None] * stride_row
    cols = tl.arange(0, BLOCK_V)[None, :]
    # pass 1: online max and sum of exp over each row, in fp32
    m = tl.full([BLOCK_R], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        mask = valid[:, None] & (start + cols < n_cols)
        a = tl.load(row_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = _capped(a, softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(valid, m_new, 0.0)  # rows with nothing loaded stay finite (s = 0)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
        m = m_new
    lse = tl.where(valid, m + tl.log(tl.where(valid, s, 1.0)), 0.0)
    a_t = tl.load(LOGITS + rows * stride_row + target, mask=valid, other=0.0).to(tl.float32)
    z_t, _ = _capped(a_t, softcap, HAS_SOFTCAP)
    tl.store(LOSS + rows, tl.where(valid, lse - z_t, 0.0), mask=rmask)
    if COMPUTE_GRAD or COMPUTE_ENT:
        # pass 2: d loss / d logits = (softmax - onehot) * cap', written over the logits rows;
        # entropy = lse - sum(p * z) (a metric of the GRPO learner)
        pz = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            cmask = start + cols < n_cols
            a = tl.load(row_ptr + start + cols, mask=valid[:, None] & cmask, other=0.0).to(tl.float32)
            z, dcap = _capped(a, softcap, HAS_SOFTCAP)
            p = tl.exp(z - lse[:, None])
            if COMPUTE_ENT:
                pz += tl.sum(tl.where(valid[:, None] & cmask, p * z, 0.0), axis=1)
            if COMPUTE_GRAD:
                g = (p - tl.where(start + cols == target[:, None], 1.0, 0.0)) * dcap
                g = tl.where(valid[:, None], g, 0.0)
                tl.store(row_ptr + start + cols, g.to(LOGITS.dtype.element_ty), mask=rmask[:, None] & cmask)
        if COMPUTE_ENT:
            tl.store(ENT + rows, tl.where(valid, lse - pz, 0.0), mask=rmask)


def _rows_loss_and_grad_triton(logits: torch.Tensor, targets: torch.Tensor, softcap, compute_grad: bool,
                               entropy: torch.Tensor | None = None):
    """logits [C, V] (overwritten with d loss / d logits when compute_grad) -> losses [C] fp32;
    `entropy` [C] fp32, when given, receives each row's entropy (0 for ignored rows)."""
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        # GPU: one row per program, the vocabulary in blocks of 4096; interpreter: big tiles
        block_v = min(MAX_BLOCK_V if logits.is_cuda else tile_elements(logits.device), next_power_of_2(n_cols))
        block_r = rows_per_tile(block_v, logits.device, n_rows, gpu_tile=MAX_BLOCK_V)
        launchable(_linear_cross_entropy_fwd_kernel, logits.device)[(triton.cdiv(n_rows, block_r),)](
            logits, logits.stride(0), targets, losses, losses if entropy is None else entropy, n_rows, n_cols,
            float(softcap or 0.0), IGNORE_INDEX, HAS_SOFTCAP=bool(softcap), COMPUTE_GRAD=compute_grad,
            COMPUTE_ENT=entropy is not None, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=8)
    return losses


def _rows_loss_and_grad_torch(logits: torch.Tensor, targets: torch.Tensor, softcap, compute_grad: bool,
                              entropy: torch.Tensor | None = None):
    """The same as the Triton kernel with torch ops (fp32 per chunk)."""
    z = logits.float()  # [C, V]
    if softcap:
        t = torch.tanh(z / softcap)
        z = softcap * t
    lse = torch.logsumexp(z, dim=-1)  # [C]
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    z_t = z.gather(1, safe[:, None])[:, 0]
    losses = torch.where(valid, lse - z_t, 0.0)
    if entropy is not None:
        entropy.copy_(torch.where(valid, lse - (torch.softmax(z, -1) * z).sum(-1), 0.0))
    if compute_grad:
        g = torch.exp(z - lse[:, None])
        g[torch.arange(g.shape[0], device=g.device), safe] -= 1.0
        if softcap:
            g *= 1.0 - t * t
        g *= valid[:, None]
        logits.copy_(g)
    return losses


def default_chunk_tokens(n_tokens: int, vocab: int) -> int:
    """Rows per chunk so that a chunk's logits stay near CHUNK_ELEMENTS (a multiple of 16 rows)."""
    rows = max(16, (CHUNK_ELEMENTS // max(vocab, 1)) // 16 * 16)
    return max(1, min(n_tokens, rows))


def linear_cross_entropy_forward(hidden, weight, targets, softcap, chunk_tokens, triton_rows: bool,
                                 grad_hidden: bool, grad_weight: bool):
    """-> (loss sum fp32 scalar, number of targets (tensor), d hidden or None, d weight fp32 or None).

    The gradients are of the *summed* loss.
    """
    n_tokens, _ = hidden.shape
    vocab = weight.shape[0]
    chunk = chunk_tokens or default_chunk_tokens(n_tokens, vocab)
    rows_fn = _rows_loss_and_grad_triton if triton_rows else _rows_loss_and_grad_torch
    compute_grad = grad_hidden or grad_weight
    loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if grad_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h = hidden[start:end]  # [C, H]
        logits = h @ weight.t()  # [C, H] x [H, V] -> [C, V], weight dtype
        loss_sum += rows_fn(logits, targets[start:end], softcap, compute_grad).sum()
        if grad_hidden:  # [C, V] x [V, H] -> [C, H]
            torch.mm(logits, weight, out=d_hidden[start:end])
        if grad_weight:  # [V, C] x [C, H] -> [V, H], summed over chunks in fp32
            if d_weight.dtype == logits.dtype:
                d_weight.addmm_(logits.t(), h)
            else:
                d_weight += logits.t() @ h
    n_targets = (targets != IGNORE_INDEX).sum()
    return loss_sum, n_targets, d_hidden, d_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, reduction, chunk_tokens, triton_rows,
                grad_hidden, grad_weight):
        loss_sum, n_targets, d_hidden, d_weight = linear_cross_entropy_forward(
            hidden, weight, targets, softcap, chunk_tokens, triton_rows, grad_hidden, grad_weight)
        # the gradients live on ctx (not save_for_backward): they are neither inputs nor outputs
        scale = None
        if reduction == "mean":
            scale = 1.0 / n_targets.clamp(min=1).float()
            loss = loss_sum * scale
        else:
            loss = loss_sum
        ctx.grads = (d_hidden, d_weight, scale)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice (its gradients were precomputed "
                               "and are consumed by the first backward); recompute the loss instead")
        d_hidden, d_weight, scale = ctx.grads
        ctx.grads = None
        factor = grad_out.float() if scale is None else grad_out.float() * scale
        if d_hidden is not None:
            d_hidden = d_hidden.mul_(factor.to(d_hidden.dtype))
        if d_weight is not None:
            d_weight = d_weight.mul_(factor).to(ctx.weight_dtype)
        return d_hidden, d_weight, None, None, None, None, None, None, None


def linear_cross_entropy_reference(hidden, weight, targets, softcap=None, reduction="sum"):
    """Pure PyTorch, full logits in fp32 (what the tests compare to; memory O(N * V))."""
    logits = (hidden @ weight.t()).float()  # [N, H] x [H, V] -> [N, V]
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, reduction: str = "sum", *,
                         chunk_tokens: int | None = None, mode: str | None = None) -> torch.Tensor:
    """Cross-entropy of hidden [N, H] @ weight[V, H].T against targets [N] without [N, V] logits.

    reduction: "sum" (of token losses) or "mean" (over target tokens; 0 when there are none,
    where F.cross_entropy would give nan). targets == -100 are ignored. softcap: Gemma 2's final
    logit soft-capping. Gradients flow to hidden and, when it requires grad, to weight.
    mode: auto | triton | reference (see kernels.ops.common); both paths are chunked.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Mixed precision (fp32 weights, bf16 compute): do autocast's cast here, once, as
        # differentiable ops (the gradient flows back to the fp32 weight through them); the chunk
        # loop then runs in one dtype, with autocast off.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, softcap, reduction,
                                        chunk_tokens=chunk_tokens, mode=mode)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: expected hidden [N, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets must be [N]={hidden.shape[0]}, got {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden and weight dtypes differ ({hidden.dtype} vs {weight.dtype})")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: must be >= 1, got {chunk_tokens}")
    grad_on = torch.is_grad_enabled()
    triton_rows = use_triton(mode, hidden, weight)
    return LinearCrossEntropyFunction.apply(
        hidden, weight, targets.contiguous(), float(softcap) if softcap else None, reduction, chunk_tokens,
        triton_rows, grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
