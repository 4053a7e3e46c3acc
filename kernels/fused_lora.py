"""Fused LoRA: hand-written autograd for the MLP block, Q/K/V together and every other LoRA linear.

    n = apply_fused_lora(peft_model)     # number of fused blocks; 0 (and a logged reason) if not possible
    remove_fused_lora(peft_model)        # back to PEFT's own forward

What a block computes (W frozen, possibly NF4; A [r, in], B [out, r] trainable; s = alpha / r):

    y = x W^T + s (x A^T) B^T          (+ the base layer's frozen bias, if any)

PEFT evaluates that as separate modules: the base linear, then lora_A and lora_B on an input cast
to the adapters' fp32 dtype, so autograd keeps an fp32 copy of x per adapted linear and sums six
[tokens, hidden] gradients for Q/K/V. The fused functions here keep one x per group (plus the
tiny [tokens, r] products x A^T), compute in the activation dtype, accumulate input gradients
into one buffer, recompute cheap things (the GLU product) in the backward, and dequantise NF4
weights right before each matmul and drop them right after it (never cached).

Conversion is per instance and reversible: the `forward` of the patched modules (the MLP, and
the PEFT LoRA linears) is replaced by a bound method; `remove_fused_lora` restores what was
there. At every call the patched forward checks that the fused path still applies (adapters
enabled and not merged, one active adapter, no DoRA) and otherwise calls the previous forward,
so `with model.disable_adapter():` (GRPO's reference model) and merging keep working.

Where the fused path is not used at all: LoRA dropout > 0, LoRA bias, DoRA, fan_in_fan_out
layers, trainable base weights. Files: this one holds the shared pieces and the public API;
fused_lora_attn.py the projection functions (Q/K/V, O, any single linear), fused_lora_mlp.py
the MLP block.
"""
from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from kernels.nf4 import dequantize_bnb_weight, is_4bit_weight

log = logging.getLogger(__name__)

_PREV = "_fused_lora_prev_forward"  # (had an instance-level forward, that forward)
_MODE = "_fused_lora_mode"


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------

def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the fused math runs in: autocast's when it is on for x's device, else x's."""
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


_NO_CONTEXT = contextlib.nullcontext()


def no_autocast(device_type: str):
    """The fused functions cast explicitly; autocast must not re-cast their in-place matmuls.
    (A no-op context when autocast is off: the common case costs nothing per call.)"""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


# ----------------------------------------------------------------------------------------------
# Adapter weights in the compute dtype, cast once per optimizer step
# ----------------------------------------------------------------------------------------------
# fp32 adapters under bf16 compute are cast at every use: forward, the checkpointed recomputation,
# every micro-batch. A cast is a kernel plus host work, and at 1B sizes the step is bound by host
# time, so the cast is kept on the parameter and reused while the parameter is unchanged. Changes
# seen: any torch optimizer's step (a global post-step hook bumps _STEP; bitsandbytes' optimizers
# write through raw pointers, which no version counter sees), in-place ops (the version counter),
# a new storage (data_ptr). Not seen: writes through `p.data` outside an optimizer step.

_CAST = "_fused_lora_cast"
_STEP = [0]


def _optimizer_stepped(*_args, **_kwargs) -> None:
    _STEP[0] += 1


register_optimizer_step_post_hook(_optimizer_stepped)


_UNCACHED = [0]  # > 0 inside uncached_adapter_casts()


@contextlib.contextmanager
def uncached_adapter_casts():
    """Cast adapters afresh at every use, neither reading nor filling the cache. For CUDA graph
    capture: a replayed graph must cast the current weights itself (a cached cast is a tensor the
    optimizer step does not update), and a cast made during capture lives in the graph's memory."""
    _UNCACHED[0] += 1
    try:
        yield
    finally:
        _UNCACHED[0] -= 1


def adapter_in(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Adapter weight `p` in `dtype` (itself when it already is; else a cached, detached cast)."""
    if p.dtype == dtype:
        return p
    if _UNCACHED[0]:
        return p.detach().to(dtype)
    key = (dtype, _STEP[0], p._version, p.data_ptr())
    cached = p.__dict__.get(_CAST)
    if cached is not None and cached[0] == key:
        return cached[1]
    t = p.detach().to(dtype)
    p.__dict__[_CAST] = (key, t)
    return t


def base_weight(linear: nn.Module, dtype: torch.dtype, mode: str | None = None) -> torch.Tensor:
    """The frozen [out, in] weight of a base linear in `dtype`; NF4 weights are dequantised here.

    The result lives only as long as the caller holds it: callers `del` it after the matmul.
    """
    w = linear.weight
    if is_4bit_weight(w):
        return dequantize_bnb_weight(w, dtype=dtype, mode=mode)
    return w if w.dtype == dtype else w.to(dtype)


def base_bias(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    b = getattr(linear, "bias", None)
    if b is None:
        return None
    return b if b.dtype == dtype else b.to(dtype)


def stacked_base_weight(linears, dtype: torch.dtype, mode: str | None = None) -> torch.Tensor:
    """The frozen weights of several base linears reading the same input, stacked by rows into one
    [sum out, in] matrix in `dtype` (one GEMM instead of several); NF4 weights are dequantised
    straight into their rows. A fresh buffer the caller drops after its matmul."""
    if len(linears) == 1:
        return base_weight(linears[0], dtype, mode)
    ws = [lin.weight for lin in linears]
    if not any(is_4bit_weight(w) for w in ws):
        return torch.cat([w if w.dtype == dtype else w.to(dtype) for w in ws], 0)
    out = torch.empty((sum(lin.out_features for lin in linears), linears[0].in_features), dtype=dtype,
                      device=ws[0].device)
    row = 0
    for lin, w in zip(linears, ws):
        block = out[row:row + lin.out_features]  # contiguous rows
        if is_4bit_weight(w):
            dequantize_bnb_weight(w, dtype=dtype, mode=mode, out=block)
        else:
            block.copy_(w)
        row += lin.out_features
    return out


def stacked_base_bias(linears, dtype: torch.dtype) -> torch.Tensor | None:
    """Their biases stacked the same way (zeros for a linear without one); None if none has one."""
    bs = [base_bias(lin, dtype) for lin in linears]
    if all(b is None for b in bs):
        return None
    if len(bs) == 1:
        return bs[0]
    return torch.cat([b if b is not None else torch.zeros(lin.out_features, dtype=dtype, device=lin.weight.device)
                      for b, lin in zip(bs, linears)])


def scaled_grad(m: torch.Tensor, s: float, dtype: torch.dtype) -> torch.Tensor:
    """s * m as a contiguous gradient of `dtype`: one multiply that writes the parameter's dtype
    directly (fp32 adapters under bf16 compute: no rounding to bf16 first, no separate cast).
    `m` may be a block of a larger product."""
    if m.dtype == dtype:
        return m.mul_(s) if m.is_contiguous() else m.mul(s)
    return torch.mul(m, s, out=torch.empty(m.shape, dtype=dtype, device=m.device))


@dataclass
class LoraParts:
    """One adapted linear as the fused functions see it (the active adapter only)."""

    base: nn.Module  # nn.Linear or bitsandbytes Linear4bit (frozen)
    A: torch.Tensor  # [r, in]  lora_A weight (trainable)
    B: torch.Tensor  # [out, r] lora_B weight (trainable)
    scaling: float


def _is_lora_linear(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, LoraLayer) and hasattr(module, "base_layer") and isinstance(
        module.get_base_layer(), nn.Linear)


def static_reason(module: nn.Module) -> str | None:
    """Why this LoRA linear can never take the fused path (None: it can)."""
    base = module.get_base_layer()
    if getattr(module, "fan_in_fan_out", False):
        return f"{type(module).__name__} stores its weight transposed (fan_in_fan_out)"
    w = base.weight
    if not is_4bit_weight(w) and not torch.is_floating_point(w):
        return f"base weight of dtype {w.dtype} (only dense float and bitsandbytes 4-bit are fused)"
    if is_4bit_weight(w) and w.quant_state.quant_type not in ("nf4", "fp4"):
        return f"4-bit quant_type {w.quant_state.quant_type!r}"
    if w.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return "the base weight is trainable (fused LoRA only trains A and B)"
    for name, drop in module.lora_dropout.items():
        if not isinstance(drop, nn.Identity) and getattr(drop, "p", 0.0) > 0:
            return f"LoRA dropout {drop.p} > 0 on adapter {name!r} (fused LoRA needs dropout 0)"
    for name, lb in module.lora_B.items():
        if getattr(lb, "bias", None) is not None:
            return f"adapter {name!r} has a LoRA bias (lora_bias=True)"
    if getattr(module, "lora_variant", None):
        return f"adapter variant {sorted(module.lora_variant)} (DoRA or another variant)"
    if any(getattr(module, "use_dora", {}).values()):
        return "DoRA"
    return None


_PARTS = "_fused_lora_parts"  # per module: (state key, LoraParts, objects the key names) of the last call


def _parts_key(module: nn.Module):
    """What lora_parts depends on, read from plain attributes (PEFT's properties and Module.__getattr__
    cost microseconds per call, and every fused forward asks)."""
    active = module._active_adapter
    name = active if isinstance(active, str) else (active[0] if len(active) == 1 else None)
    if name is None:
        return None, None
    a = module._modules["lora_A"]._modules.get(name)
    b = module._modules["lora_B"]._modules.get(name)
    drop = module._modules["lora_dropout"]._modules.get(name)
    # objects by id: the cache holds them, so their ids cannot be reused while it lives
    return name, (module._disable_adapters, name, len(module.merged_adapters),
                  id(a._parameters.get("weight")) if a is not None else None,
                  id(b._parameters.get("weight")) if b is not None else None,
                  id(module._modules.get("base_layer")), id(drop), getattr(drop, "p", None),
                  module.scaling.get(name), name in getattr(module, "lora_variant", ()))


def lora_parts(module: nn.Module) -> LoraParts | None:
    """The fused view of a LoRA linear right now, or None when this call must take PEFT's path.
    Cached on the module while the adapter state it was built from is unchanged (same active
    adapter, enable/merge state, adapter weight objects, dropout module and scaling)."""
    name, key = _parts_key(module)
    cached = module.__dict__.get(_PARTS)
    if cached is not None and key is not None and cached[0] == key:
        return cached[1]
    parts = _lora_parts_uncached(module)
    if key is not None:  # the objects named in the key are kept too, so that their ids stay theirs
        keep = (module._modules["lora_dropout"]._modules.get(name), module._modules.get("base_layer"),
                module._modules["lora_A"]._modules.get(name), module._modules["lora_B"]._modules.get(name))
        object.__setattr__(module, _PARTS, (key, parts, keep))
    return parts


def _lora_parts_uncached(module: nn.Module) -> LoraParts | None:
    if module.disable_adapters or module.merged:
        return None
    active = module.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    drop = module.lora_dropout[name]
    if not isinstance(drop, nn.Identity) and getattr(drop, "p", 0.0) > 0:
        return None
    return LoraParts(module.get_base_layer(), module.lora_A[name].weight, module.lora_B[name].weight,
                     float(module.scaling[name]))


def call_previous(module: nn.Module, *args, **kwargs):
    """The forward that was in place before fused LoRA patched `module`."""
    had, prev = getattr(module, _PREV)
    if had:
        return prev(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def _install(module: nn.Module, fn, mode: str | None) -> None:
    """Replace module.forward by `fn` bound to it, remembering what was there (deepcopy-safe)."""
    if _PREV in module.__dict__:
        raise RuntimeError(f"fused LoRA is already applied to {type(module).__name__}")
    had = "forward" in module.__dict__
    object.__setattr__(module, _PREV, (had, module.__dict__.get("forward")))
    object.__setattr__(module, _MODE, mode)
    object.__setattr__(module, "forward", types.MethodType(fn, module))


def _uninstall(module: nn.Module) -> bool:
    if _PREV not in module.__dict__:
        return False
    had, prev = module.__dict__.pop(_PREV)
    module.__dict__.pop(_MODE, None)
    for attr in ("_fused_lora_qkv", "_fused_lora_glu", "_fused_lora_last", _PARTS):
        module.__dict__.pop(attr, None)
    cur = module.__dict__.get("forward")
    if getattr(getattr(cur, "__func__", None), "_fused_lora", False):
        # ours is still in place: put back what was there. (If something patched over us since,
        # e.g. patch_model after apply_fused_lora, leave its forward alone.)
        module.__dict__.pop("forward", None)
        if had:
            object.__setattr__(module, "forward", prev)
    return True


def fused_forward(fn):
    """Mark a function as a fused-LoRA forward (remove_fused_lora only undoes its own)."""
    fn._fused_lora = True
    return fn


def module_mode(module: nn.Module) -> str | None:
    return module.__dict__.get(_MODE)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

GLU_ACTIVATIONS = {
    # class name of the HF activation module -> our GLU kind
    "SiLU": "silu", "SiLUActivation": "silu",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
    "GELUActivation": "gelu",
}


def _glu_kind(mlp: nn.Module) -> str | None:
    act = getattr(mlp, "act_fn", None)
    if act is None:
        return None
    kind = GLU_ACTIVATIONS.get(type(act).__name__)
    if kind == "gelu" and getattr(act, "act", None) not in (None, nn.functional.gelu):
        return None  # GELUActivation wrapping something other than exact erf GELU
    return kind


def apply_fused_lora(model: nn.Module, mode: str | None = None) -> int:
    """Route a PEFT LoRA model's MLP blocks, Q/K/V groups and other LoRA linears through the fused
    functions. Returns the number of fused blocks (0 with a logged warning when the model cannot
    take the fused path: then nothing is changed). `mode` is the kernels switch
    (auto | triton | reference) for the GLU and NF4 kernels used inside.
    """
    from kernels.fused_lora_attn import install_qkv, install_single
    from kernels.fused_lora_mlp import install_mlp

    lora = [(n, m) for n, m in model.named_modules() if _is_lora_linear(m)]
    if not lora:
        log.warning("fused LoRA: not applied: the model has no LoRA linear layers (PEFT's path stays)")
        return 0
    for name, m in lora:
        reason = static_reason(m)
        if reason is not None:
            log.warning("fused LoRA: not applied: %s: %s; the model keeps PEFT's path", name, reason)
            return 0
    if fused_lora_applied(model):
        raise RuntimeError("fused LoRA is already applied to this model (call remove_fused_lora first)")

    grouped: set[int] = set()
    blocks = {"mlp": 0, "qkv": 0, "single": 0}
    # MLPs whose output meets only the residual add: layers with an `mlp` and no norm after it
    # (Gemma 2/3 normalise the MLP output: its value is read in their backward)
    last = {id(layer.mlp) for layer in model.modules() if isinstance(getattr(layer, "mlp", None), nn.Module)
            and hasattr(layer, "self_attn") and not hasattr(layer, "post_feedforward_layernorm")}
    for name, mod in model.named_modules():
        mlp = [getattr(mod, k, None) for k in ("gate_proj", "up_proj", "down_proj")]
        if all(k is not None and _is_lora_linear(k) for k in mlp) and callable(getattr(mod, "act_fn", None)):
            kind = _glu_kind(mod)
            if kind is None:
                log.info("fused LoRA: %s: activation %s has no fused GLU; its linears are fused one by one",
                         name, type(mod.act_fn).__name__)
            else:
                install_mlp(mod, kind, mode, last=id(mod) in last)
                grouped.update(id(k) for k in mlp)
                blocks["mlp"] += 1
        qkv = [getattr(mod, k, None) for k in ("q_proj", "k_proj", "v_proj")]
        if all(k is not None and _is_lora_linear(k) for k in qkv):
            install_qkv(qkv, mode)
            grouped.update(id(k) for k in qkv)
            blocks["qkv"] += 1
    for name, m in lora:
        if id(m) not in grouped:  # o_proj, and any adapted linear outside a full group
            install_single(m, mode)
            blocks["single"] += 1
    total = sum(blocks.values())
    log.info("fused LoRA: %d blocks (%d MLP, %d Q/K/V, %d single linears)", total, blocks["mlp"],
             blocks["qkv"], blocks["single"])
    return total


def remove_fused_lora(model: nn.Module) -> int:
    """Undo apply_fused_lora: every patched module gets its previous forward back. Returns the
    number of modules restored."""
    n = 0
    for _, m in model.named_modules():
        n += int(_uninstall(m))
    return n


def fused_lora_applied(model: nn.Module) -> bool:
    return any(_PREV in m.__dict__ for m in model.modules())


def fused_reads(model: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
    """(module, modules whose weights its fused forward reads) for every fused module: an MLP
    reads gate/up/down, each of q/k/v reads the whole group, a single linear reads itself. Weight
    sharding (ZeRO-3) needs this, since those weights are read without their owners' forward."""
    out = []
    for m in model.modules():
        d = m.__dict__
        if _PREV not in d:
            continue
        if "_fused_lora_glu" in d:
            reads = [m.gate_proj, m.up_proj, m.down_proj]
        elif "_fused_lora_qkv" in d:
            reads = list(d["_fused_lora_qkv"].mods)
        else:
            reads = [m]
        out.append((m, reads))
    return out
