"""Fused LoRA MLP block (gate/up/down + GLU activation) with a hand-written backward.

Forward (X [N, h]; gate/up W [I, h], down W [h, I]; adapters A, B; scales s):

    XA = X [A_g; A_u]^T                        [N, r_g + r_u]   one matmul for both adapters
    e  = X W_g^T + s_g XA_g B_g^T              [N, I]
    g  = X W_u^T + s_u XA_u B_u^T              [N, I]
    h  = act(e) * g                            [N, I]           (SwiGLU / GeGLU kernel)
    hA = h A_d^T                               [N, r_d]
    Y  = h W_d^T + s_d hA B_d^T                [N, h]

Saved: X, e, g, XA, hA. h is *not* saved: the backward recomputes it from e and g (one
elementwise pass), then the GLU backward writes d e and d g over e's and g's buffers.
h and dh exist only a block of rows at a time (MLP_CHUNK_ELEMENTS, ~32 MiB in bf16): with e and g
([N, I] each) they are the largest tensors of a layer, and peak memory is reached in the MLP of
the checkpointed layer being recomputed. Backward, given dY:

    dB_d = s_d dY^T hA ;  Gd = s_d dY B_d ;  dA_d = Gd^T h      (h recomputed, then dropped)
    dh   = dY W_d + Gd A_d
    de, dg = GLU'(dh, e, g)                                     (in place over e, g)
    dB_g = s_g de^T XA_g ; dB_u = s_u dg^T XA_u
    G    = [s_g de B_g, s_u dg B_u]                             [N, r_g + r_u]
    [dA_g; dA_u] = G^T X
    dX   = de W_g + dg W_u + G [A_g; A_u]

Each frozen W is fetched (NF4: dequantised) right before its matmul and released after it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.fused_lora import (_install, adapter_in, base_bias, base_weight, call_previous, compute_dtype,
                                fused_forward, lora_parts, module_mode, no_autocast, scaled_grad)
from kernels.ops.common import use_triton
from kernels.recompute import in_recompute

GLU_KINDS = ("silu", "gelu_tanh", "gelu")
MLP_CHUNK_ELEMENTS = 1 << 24  # elements of h / dh alive at once (rows x intermediate size)


def middle_rows(n_rows: int, inter: int) -> int:
    """Rows of h (and of dh) computed at a time: a multiple of 128 near MLP_CHUNK_ELEMENTS."""
    rows = max(1, MLP_CHUNK_ELEMENTS // max(inter, 1))
    if rows >= 128:
        rows = rows // 128 * 128
    return max(1, min(rows, n_rows))


# ----------------------------------------------------------------------------------------------
# GLU elementwise: the project's Triton ops on CUDA, PyTorch below otherwise
# ----------------------------------------------------------------------------------------------

def _act_and_grad(e: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (act(e), act'(e)), the same formulas as the Triton kernels."""
    e = e.float()
    if kind == "silu":
        s = torch.sigmoid(e)
        return e * s, s * (1.0 + e * (1.0 - s))
    if kind == "gelu_tanh":
        k0 = 0.7978845608028654  # sqrt(2 / pi)
        t = torch.tanh(k0 * (e + 0.044715 * e * e * e))
        return 0.5 * e * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * e * (1.0 - t * t) * k0 * (1.0 + 3 * 0.044715 * e * e)
    cdf = 0.5 * (1.0 + torch.erf(e * 0.7071067811865476))
    return e * cdf, cdf + e * torch.exp(-0.5 * e * e) * 0.3989422804014327


def glu_forward(e: torch.Tensor, g: torch.Tensor, kind: str, mode: str | None = None) -> torch.Tensor:
    """act(e) * g for contiguous e, g [N, I]."""
    if use_triton(mode, e, g):
        if kind == "silu":
            from kernels.ops.swiglu import swiglu_forward

            return swiglu_forward(e, g)
        from kernels.ops.geglu import geglu_forward

        return geglu_forward(e, g, "tanh" if kind == "gelu_tanh" else "none")
    if kind == "silu":
        return F.silu(e) * g  # what the HF MLP computes, same rounding
    return F.gelu(e, approximate="tanh" if kind == "gelu_tanh" else "none") * g


def glu_backward(dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, kind: str,
                 mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d e, d g) written over e's and g's buffers (the caller owns them)."""
    if use_triton(mode, e, g, dh):
        if kind == "silu":
            from kernels.ops.swiglu import swiglu_backward

            return swiglu_backward(dh, e, g, inplace=True)
        from kernels.ops.geglu import geglu_backward

        return geglu_backward(dh, e, g, "tanh" if kind == "gelu_tanh" else "none", inplace=True)
    act, dact = _act_and_grad(e, kind)
    dhf = dh.float()
    de = dhf * g.float() * dact
    dg = dhf * act
    e.copy_(de)
    g.copy_(dg)
    return e, g


# ----------------------------------------------------------------------------------------------
# The autograd function
# ----------------------------------------------------------------------------------------------

class LoRAMLPFunction(torch.autograd.Function):
    """apply(x, mode, kind, bases(gate, up, down), scalings(gate, up, down), unread, Ag, Bg, Au, Bu, Ad, Bd) -> Y.

    unread: Y's value will not be read (the recomputation of a layer whose MLP output only meets
    the residual add, see kernels/recompute.py): the down projection is skipped and Y is a
    broadcast zero of the right shape. The backward is the same either way (it never reads Y)."""

    @staticmethod
    def forward(ctx, x, mode, kind, bases, scalings, unread, Ag, Bg, Au, Bu, Ad, Bd):
        dt = compute_dtype(x)
        gate, up, down = bases
        sg, su, sd = scalings
        with no_autocast(x.device.type):
            X = x.reshape(-1, x.shape[-1]).to(dt)  # [..., h] -> [N, h]
            rg = Ag.shape[0]
            A_gu = torch.cat([adapter_in(Ag, dt), adapter_in(Au, dt)], 0)  # [rg + ru, h]
            Bg_, Bu_, Ad_, Bd_ = (adapter_in(t, dt) for t in (Bg, Bu, Ad, Bd))
            XA = X @ A_gu.t()  # [N, rg + ru]
            W = base_weight(gate, dt, mode)
            e = F.linear(X, W, base_bias(gate, dt))  # [N, I]
            del W
            e.addmm_(XA[:, :rg], Bg_.t(), alpha=sg)
            W = base_weight(up, dt, mode)
            g = F.linear(X, W, base_bias(up, dt))  # [N, I]
            del W
            g.addmm_(XA[:, rg:], Bu_.t(), alpha=su)
            N, rows = X.shape[0], middle_rows(X.shape[0], e.shape[1])
            hA = X.new_empty((N, Ad_.shape[0]))  # [N, rd]
            if unread:
                W = bias = None
                Y = X.new_zeros(()).expand(N, down.out_features)  # [N, h], never read
            else:
                W = base_weight(down, dt, mode)
                bias = base_bias(down, dt)
                Y = X.new_empty((N, W.shape[0]))  # [N, h]
            for r0 in range(0, N, rows):  # h by blocks of rows: [rows, I]
                r1 = min(r0 + rows, N)
                h = glu_forward(e[r0:r1], g[r0:r1], kind, mode)
                torch.mm(h, Ad_.t(), out=hA[r0:r1])
                if not unread and bias is None:
                    torch.mm(h, W.t(), out=Y[r0:r1])
                elif not unread:
                    torch.addmm(bias, h, W.t(), out=Y[r0:r1])
                del h
            del W
            if not unread:
                Y.addmm_(hA, Bd_.t(), alpha=sd)
        ctx.save_for_backward(X, e, g, XA, hA)
        # the adapters as the math used them (cast to dt; tiny): kept on ctx, so the backward
        # neither casts them again nor routes them through checkpointing's saved-tensor hooks
        ctx.adapters = (A_gu, Bg_, Bu_, Ad_, Bd_)
        ctx.grad_dtypes = (Ag.dtype, Bg.dtype, Au.dtype, Bu.dtype, Ad.dtype, Bd.dtype)
        ctx.mode, ctx.kind, ctx.bases, ctx.scalings, ctx.dt = mode, kind, bases, scalings, dt
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return Y.view(*x.shape[:-1], Y.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        X, e, g, XA, hA = ctx.saved_tensors
        A_gu, Bg, Bu, Ad, Bd = ctx.adapters
        tAg, tBg, tAu, tBu, tAd, tBd = ctx.grad_dtypes
        dt, mode, kind = ctx.dt, ctx.mode, ctx.kind
        gate, up, down = ctx.bases
        sg, su, sd = ctx.scalings
        need = ctx.needs_input_grad[:5] + ctx.needs_input_grad[6:]  # (x, mode, kind, bases, scalings, Ag, .., Bd)
        with no_autocast(X.device.type):
            dY = dY.reshape(-1, dY.shape[-1]).to(dt)  # [..., h] -> [N, h]
            # down projection
            dBd = scaled_grad(dY.t() @ hA, sd, tBd) if need[10] else None  # [h, rd]
            Gd = (dY @ Bd).mul_(sd)  # [N, rd]
            dAd = torch.zeros((Ad.shape[0], e.shape[1]), dtype=torch.float32, device=e.device) if need[9] else None
            W = base_weight(down, dt, mode)
            N, rows = X.shape[0], middle_rows(X.shape[0], e.shape[1])
            for r0 in range(0, N, rows):  # by blocks of rows, as the forward
                r1 = min(r0 + rows, N)
                e_, g_ = e[r0:r1], g[r0:r1]
                if need[9]:
                    h = glu_forward(e_, g_, kind, mode)  # recomputed [rows, I], dropped right after
                    dAd.add_(Gd[r0:r1].t() @ h)  # [rd, I], summed over blocks in fp32
                    del h
                dh = dY[r0:r1] @ W  # [rows, h] x [h, I] -> [rows, I]
                dh.addmm_(Gd[r0:r1], Ad)
                glu_backward(dh, e_, g_, kind, mode)  # GLU: d e, d g over e's and g's rows
                del dh
            del W
            de, dg = e, g
            if dAd is not None:
                dAd = dAd.to(tAd)
            rg = Bg.shape[1]
            dBg = scaled_grad(de.t() @ XA[:, :rg], sg, tBg) if need[6] else None  # [I, rg]
            dBu = scaled_grad(dg.t() @ XA[:, rg:], su, tBu) if need[8] else None  # [I, ru]
            G = torch.cat([(de @ Bg).mul_(sg), (dg @ Bu).mul_(su)], 1)  # [N, rg + ru]
            dA_gu = G.t() @ X  # [rg + ru, h]
            dAg = dA_gu[:rg].to(tAg) if need[5] else None
            dAu = dA_gu[rg:].to(tAu) if need[7] else None
            dx = None
            if need[0]:
                W = base_weight(gate, dt, mode)
                dX = de @ W  # [N, I] x [I, h] -> [N, h]
                del W
                W = base_weight(up, dt, mode)
                dX.addmm_(dg, W)
                del W
                dX.addmm_(G, A_gu)
                dx = dX.view(ctx.x_shape).to(ctx.x_dtype)
        return dx, None, None, None, None, None, dAg, dBg, dAu, dBu, dAd, dBd


def lora_mlp(x: torch.Tensor, gate, up, down, kind: str = "silu", mode: str | None = None,
             unread: bool = False) -> torch.Tensor:
    """Functional entry: the fused MLP for three LoraParts (gate, up, down). `unread`: see
    LoRAMLPFunction."""
    if kind not in GLU_KINDS:
        raise ValueError(f"lora_mlp: kind must be one of {', '.join(GLU_KINDS)}, got {kind!r}")
    return LoRAMLPFunction.apply(x, mode, kind, (gate.base, up.base, down.base),
                                 (gate.scaling, up.scaling, down.scaling), bool(unread),
                                 gate.A, gate.B, up.A, up.B, down.A, down.B)


@fused_forward
def _mlp_forward(self, x, *args, **kwargs):
    if not args and not kwargs:
        parts = [lora_parts(m) for m in (self.gate_proj, self.up_proj, self.down_proj)]
        if all(p is not None for p in parts):
            unread = self.__dict__["_fused_lora_last"] and in_recompute()
            return lora_mlp(x, *parts, kind=self.__dict__["_fused_lora_glu"], mode=module_mode(self), unread=unread)
    return call_previous(self, x, *args, **kwargs)


def install_mlp(mlp, kind: str, mode: str | None = None, last: bool = False) -> None:
    """`last`: the MLP's output meets only the residual add in its layer (no norm after it), so its
    value is not needed when the layer is recomputed for the backward."""
    _install(mlp, _mlp_forward, mode)
    object.__setattr__(mlp, "_fused_lora_glu", kind)
    object.__setattr__(mlp, "_fused_lora_last", bool(last))
