"""Fused LoRA projections: k adapted linears reading the same input (Q/K/V: k = 3; O or any other
single LoRA linear: k = 1), one autograd node with a hand-written backward.

Forward, for each projection i (W_i frozen [o_i, h], A_i [r_i, h], B_i [o_i, r_i], scale s_i):

    XA   = X [A_1; ...; A_k]^T                    [N, sum r]   one matmul for all adapters
    Y_i  = X W_i^T (+ bias_i) + s_i XA_i B_i^T     [N, o_i]

Saved: X and XA (and the adapter weights). Backward, given dY_i:

    dB_i = s_i dY_i^T XA_i                         [o_i, r_i]
    G_i  = s_i dY_i B_i                            [N, r_i]
    dA   = [G_1, ..., G_k]^T X                     [sum r, h]   one matmul
    dX   = sum_i dY_i W_i + [G_1, ..., G_k] [A_1; ...; A_k]    accumulated into one buffer

The attention module itself is not rewritten: its q_proj/k_proj/v_proj keep being called as the
model family's own forward does (RoPE, q/k norms, attention kernels untouched). The first of the
three called with an input computes all three outputs through one fused node and hands the
other two to their modules when they are called with the same input tensor.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from kernels.fused_lora import (_install, base_bias, base_weight, call_previous, compute_dtype, fused_forward,
                                lora_parts, module_mode, no_autocast)


class LoRAProjFunction(torch.autograd.Function):
    """apply(x, mode, bases, scalings, A_1, B_1, ..., A_k, B_k) -> (Y_1, ..., Y_k)."""

    @staticmethod
    def forward(ctx, x, mode, bases, scalings, *ab):
        dt = compute_dtype(x)
        lead = x.shape[:-1]
        with no_autocast(x.device.type):
            X = x.reshape(-1, x.shape[-1]).to(dt)  # [..., h] -> [N, h]
            As = [a.to(dt) for a in ab[0::2]]
            Bs = [b.to(dt) for b in ab[1::2]]
            ranks = [a.shape[0] for a in As]
            A_all = As[0] if len(As) == 1 else torch.cat(As, 0)  # [sum r, h]
            XA = X @ A_all.t()  # [N, h] x [h, sum r] -> [N, sum r]
            outs, off = [], 0
            for base, s, B, r in zip(bases, scalings, Bs, ranks):
                W = base_weight(base, dt, mode)
                Y = F.linear(X, W, base_bias(base, dt))  # [N, o]
                del W  # NF4: the dequantised copy dies here
                Y.addmm_(XA[:, off:off + r], B.t(), alpha=s)
                outs.append(Y.view(*lead, Y.shape[-1]))
                off += r
        ctx.save_for_backward(X, XA, *ab)
        ctx.mode, ctx.bases, ctx.scalings, ctx.ranks, ctx.dt = mode, bases, scalings, ranks, dt
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dYs):
        X, XA, *ab = ctx.saved_tensors
        dt, k = ctx.dt, len(ctx.bases)
        need_x = ctx.needs_input_grad[0]
        dA_list, dB_list, G_list = [None] * k, [None] * k, []
        dX = None
        with no_autocast(X.device.type):
            off = 0
            A_parts = []
            for i, (base, s, r) in enumerate(zip(ctx.bases, ctx.scalings, ctx.ranks)):
                A, B = ab[2 * i], ab[2 * i + 1]
                dY = dYs[i]
                if dY is None:  # this output did not reach the loss
                    off += r
                    continue
                dY = dY.reshape(-1, dY.shape[-1]).to(dt)  # [..., o] -> [N, o]
                if ctx.needs_input_grad[5 + 2 * i]:
                    dB_list[i] = (dY.t() @ XA[:, off:off + r]).mul_(s).to(B.dtype)  # [o, r]
                G = (dY @ B.to(dt)).mul_(s)  # [N, o] x [o, r] -> [N, r]
                G_list.append(G)
                A_parts.append((i, A))
                if need_x:
                    W = base_weight(base, dt, ctx.mode)
                    if dX is None:
                        dX = dY @ W  # [N, o] x [o, h] -> [N, h]
                    else:
                        dX.addmm_(dY, W)
                    del W
                off += r
            if G_list:
                G_all = G_list[0] if len(G_list) == 1 else torch.cat(G_list, 1)  # [N, sum r]
                dA_all = G_all.t() @ X  # [sum r, N] x [N, h] -> [sum r, h]
                row = 0
                for i, A in A_parts:
                    r = A.shape[0]
                    if ctx.needs_input_grad[4 + 2 * i]:
                        dA_list[i] = dA_all[row:row + r].to(A.dtype)
                    row += r
                if need_x:
                    A_cat = torch.cat([A.to(dt) for _, A in A_parts], 0) if len(A_parts) > 1 else A_parts[0][1].to(dt)
                    dX.addmm_(G_all, A_cat)  # [N, sum r] x [sum r, h]
        dx = None
        if need_x:
            dx = (dX if dX is not None else X.new_zeros(X.shape)).view(ctx.x_shape).to(ctx.x_dtype)
        grads = [dx, None, None, None]
        for i in range(k):
            grads += [dA_list[i], dB_list[i]]
        return tuple(grads)


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
