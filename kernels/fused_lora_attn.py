"""Fused LoRA projections: k adapted linears reading the same input (Q/K/V: k = 3; O or any other
single LoRA linear: k = 1), one autograd node with a hand-written backward.

Forward (W_i frozen [o_i, h], A_i [r_i, h], B_i [o_i, r_i], scale s_i), as three matmuls
whatever k is:

    W    = [W_1; ...; W_k]                          [sum o, h]   frozen rows stacked (NF4: dequantised into them)
    Bd   = blockdiag(B_1, ..., B_k)                 [sum o, sum r]  (s_i folded in when they differ)
    XA   = X [A_1; ...; A_k]^T                      [N, sum r]
    Y    = X W^T (+ stacked biases) + s XA Bd^T     [N, sum o]   Y_i = its columns o_i

Saved: X and XA (the adapters, cast, ride on ctx). Backward, given dY = [dY_1, ..., dY_k]:

    dB_i = s_i (dY^T XA)_ii                         diagonal blocks of one [sum o, sum r] product
    G    = s dY Bd                                  [N, sum r]   = [s_i dY_i B_i]
    dA   = G^T X                                    [sum r, h]
    dX   = dY W + G [A_1; ...; A_k]

One GEMM per product instead of one per projection: the host issues a third of the calls
(the training step is bound by how fast the host issues kernels at 1B sizes), and the GPU runs
one wide matmul instead of a wide one and two narrow ones. The stacked W is a transient copy
(dequantised NF4 is one anyway).

The attention module itself is not rewritten: its q_proj/k_proj/v_proj keep being called as the
model family's own forward does (RoPE, q/k norms, attention kernels untouched). The first of the
three called with an input computes all three outputs through one fused node and hands the
other two to their modules when they are called with the same input tensor. The outputs are
column blocks of one buffer (views; the families' .view/.transpose work on them).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from kernels.fused_lora import (_install, adapter_in, call_previous, compute_dtype, fused_forward, lora_parts,
                                module_mode, no_autocast, scaled_grad, stacked_base_bias, stacked_base_weight)


class LoRAProjFunction(torch.autograd.Function):
    """apply(x, mode, bases, scalings, A_1, B_1, ..., A_k, B_k) -> (Y_1, ..., Y_k)."""

    @staticmethod
    def forward(ctx, x, mode, bases, scalings, *ab):
        dt = compute_dtype(x)
        lead = x.shape[:-1]
        k = len(bases)
        with no_autocast(x.device.type):
            X = x.reshape(-1, x.shape[-1]).to(dt)  # [..., h] -> [N, h]
            As = [adapter_in(a, dt) for a in ab[0::2]]
            Bs = [adapter_in(b, dt) for b in ab[1::2]]
            A_all = As[0] if k == 1 else torch.cat(As, 0)  # [sum r, h]
            same = all(s == scalings[0] for s in scalings)
            alpha = scalings[0] if same else 1.0
            if k == 1:
                B_all = Bs[0]
            else:  # [sum o, sum r]
                B_all = torch.block_diag(*(Bs if same else [b * s for b, s in zip(Bs, scalings)]))
            XA = F.linear(X, A_all)  # [N, sum r]
            W = stacked_base_weight(bases, dt, mode)
            Y = F.linear(X, W, stacked_base_bias(bases, dt))  # [N, sum o]
            del W  # the stacked / dequantised copy dies here
            Y.addmm_(XA, B_all.t(), alpha=alpha)
        dims = [b.shape[0] for b in Bs]
        outs = (Y,) if k == 1 else Y.split(dims, dim=1)
        ctx.save_for_backward(X, XA)
        # the adapters as the math used them (cast to dt; tiny): kept on ctx, so the backward
        # neither casts them again nor routes them through checkpointing's saved-tensor hooks
        ctx.A_all, ctx.B_all, ctx.alpha = A_all, B_all, alpha
        ctx.grad_dtypes = [t.dtype for t in ab]
        ctx.ranks, ctx.dims = [a.shape[0] for a in As], dims
        ctx.mode, ctx.bases, ctx.scalings, ctx.dt = mode, bases, scalings, dt
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return tuple(o.view(*lead, o.shape[-1]) for o in outs)

    @staticmethod
    def backward(ctx, *dYs):
        X, XA = ctx.saved_tensors
        dt, k, tdt, need = ctx.dt, len(ctx.bases), ctx.grad_dtypes, ctx.needs_input_grad
        with no_autocast(X.device.type):
            rows = [d.reshape(-1, o) if d is not None else X.new_zeros(X.shape[0], o, dtype=dt)
                    for d, o in zip(dYs, ctx.dims)]
            dY = (rows[0] if k == 1 else torch.cat(rows, 1)).to(dt)  # [N, sum o]
            del rows
            grads = [None] * (2 * k)
            if any(need[5 + 2 * i] for i in range(k)):
                dB_all = dY.t() @ XA  # [sum o, sum r]: block (i, i) is dY_i^T XA_i
                o0 = r0 = 0
                for i, (o, r, s) in enumerate(zip(ctx.dims, ctx.ranks, ctx.scalings)):
                    if need[5 + 2 * i]:
                        grads[2 * i + 1] = scaled_grad(dB_all[o0:o0 + o, r0:r0 + r], s, tdt[2 * i + 1])
                    o0, r0 = o0 + o, r0 + r
                del dB_all
            G = dY @ ctx.B_all  # [N, sum r] = [dY_i B_i] (times s_i when folded into B)
            if ctx.alpha != 1.0:
                G.mul_(ctx.alpha)
            if any(need[4 + 2 * i] for i in range(k)):
                dA_all = G.t() @ X  # [sum r, h]
                r0 = 0
                for i, r in enumerate(ctx.ranks):
                    if need[4 + 2 * i]:
                        grads[2 * i] = dA_all[r0:r0 + r].to(tdt[2 * i])
                    r0 += r
            dx = None
            if need[0]:
                W = stacked_base_weight(ctx.bases, dt, ctx.mode)
                dX = dY @ W  # [N, sum o] x [sum o, h] -> [N, h]
                del W
                dX.addmm_(G, ctx.A_all)  # [N, sum r] x [sum r, h]
                dx = dX.view(ctx.x_shape).to(ctx.x_dtype)
        return (dx, None, None, None, *grads)


def lora_projections(x: torch.Tensor, parts: list, mode: str | None = None) -> tuple[torch.Tensor, ...]:
    """Functional entry: Y_i for each LoraParts in `parts`, all reading x."""
    ab = []
    for p in parts:
        ab += [p.A, p.B]
    return LoRAProjFunction.apply(x, mode, tuple(p.base for p in parts), tuple(p.scaling for p in parts), *ab)


# ----------------------------------------------------------------------------------------------
# Installation on PEFT modules
# ----------------------------------------------------------------------------------------------

class _QKVGroup:
    """Shared by q_proj, k_proj and v_proj of one attention module: computes the three outputs on
    the first call and hands out the other two on the calls that follow with the same input."""

    def __init__(self, mods):
        self.mods = tuple(mods)
        self._x = None  # weakref to the input the pending outputs belong to
        self._pending: list = [None, None, None]

    def __deepcopy__(self, memo):  # a copied model gets its own group, with nothing pending
        import copy

        new = _QKVGroup(())
        memo[id(self)] = new
        new.mods = tuple(copy.deepcopy(m, memo) for m in self.mods)
        return new

    def take(self, idx: int, x: torch.Tensor):
        if self._x is not None and self._x() is x and self._pending[idx] is not None:
            out = self._pending[idx]
            self._pending[idx] = None
            if all(p is None for p in self._pending):
                self._x = None
            return out
        parts = [lora_parts(m) for m in self.mods]
        if any(p is None for p in parts):
            self._x, self._pending = None, [None, None, None]
            return None
        outs = lora_projections(x, parts, module_mode(self.mods[idx]))
        self._x = weakref.ref(x)
        self._pending = list(outs)
        self._pending[idx] = None
        return outs[idx]


@fused_forward
def _qkv_forward(self, x, *args, **kwargs):
    group = self.__dict__["_fused_lora_qkv"]
    if not args and not kwargs:
        idx = group.mods.index(self)
        out = group.take(idx, x)
        if out is not None:
            return out
    return call_previous(self, x, *args, **kwargs)


@fused_forward
def _single_forward(self, x, *args, **kwargs):
    if not args and not kwargs:
        p = lora_parts(self)
        if p is not None:
            return lora_projections(x, [p], module_mode(self))[0]
    return call_previous(self, x, *args, **kwargs)


def install_qkv(mods, mode: str | None = None) -> None:
    group = _QKVGroup(mods)
    for m in mods:
        _install(m, _qkv_forward, mode)
        object.__setattr__(m, "_fused_lora_qkv", group)


def install_single(module, mode: str | None = None) -> None:
    _install(module, _single_forward, mode)
