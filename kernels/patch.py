"""Patching Hugging Face model families with the Triton ops, and its exact inverse.

    model = patch_model(model, KernelsConfig(mode="auto"))   # in place; returns the model
    unpatch_model(model)                                     # back to the original forwards

What gets patched (per module instance, never the class; no subclassing of HF models):
  - RMSNorm modules: forward -> kernels.ops.rms_norm (Llama form, or Gemma's 1 + w form);
  - the gated MLP: forward -> down_proj(swiglu | geglu(gate_proj(x), up_proj(x)));
  - attention: forward -> the class's own forward function, re-created with its module
    globals' `apply_rotary_pos_emb` bound to kernels.ops.rope. Everything else in the attention
    (q/k norms, softcapping, sliding windows, the attention backend) is HF's code unchanged.
  - the loss: not a module. The trainer never computes model(...).logits; kernels/loss.py calls
    `linear_cross_entropy` (exported here) on the decoder's hidden states and the lm_head weight,
    in the mode recorded by patch_model.

Each patch stores what the instance had before (its own `forward` attribute or none), so
`unpatch_model` restores the instances exactly. Works through a PEFT wrapper (the HF model
under it is patched; LoRA layers keep running inside the patched forwards) and with gradient
checkpointing (the ops are ordinary autograd Functions, re-run on recomputation).
"""
from __future__ import annotations

import functools
import os
import types
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from kernels.ops.common import ENV_VAR, MODES, resolve_mode
from kernels.ops.geglu import geglu
from kernels.ops.linear_cross_entropy import linear_cross_entropy
from kernels.ops.rms_norm import rms_norm
from kernels.ops.rope import rope
from kernels.ops.swiglu import swiglu

__all__ = ["KernelsConfig", "FamilySpec", "FAMILIES", "patch_model", "unpatch_model", "is_patched",
           "kernels_config", "linear_cross_entropy"]

_STATE_ATTR = "_posttrain_kernels"
_MISSING = object()


@dataclass(frozen=True)
class KernelsConfig:
    """Which kernels run.

    enabled: patch the model and fuse the loss; False keeps Hugging Face's modules and the
      plain full-logits loss everywhere.
    mode: auto (Triton on CUDA tensors, PyTorch on CPU tensors) | triton (always Triton; on CPU
      through Triton's interpreter, TRITON_INTERPRET=1 - for tests) | reference (always PyTorch).
      The environment variable POSTTRAIN_KERNELS=auto|triton|reference overrides it.
    """

    enabled: bool = True
    mode: Literal["auto", "triton", "reference"] = "auto"

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"kernels.enabled: expected true or false, got {self.enabled!r}")
        if self.mode not in MODES:
            raise ValueError(f"kernels.mode: expected one of {', '.join(MODES)}, got {self.mode!r}")
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env not in MODES:
            raise ValueError(f"{ENV_VAR} (overrides kernels.mode): expected one of {', '.join(MODES)}, got {env!r}")

    @property
    def resolved_mode(self) -> str:
        """The mode in force: POSTTRAIN_KERNELS if set, else `mode`."""
        return resolve_mode(self.mode)


@dataclass(frozen=True)
class FamilySpec:
    """What to patch in one model family (matched by module class name: no HF imports here).

    norms: RMSNorm classes (decoder norms, final norm, and q/k norms where the family has them).
    gemma_norm: the norms compute (x * rstd * (1 + w)) in fp32, else w * (x * rstd).to(dtype).
    mlps: gated MLP classes with gate_proj / up_proj / down_proj.
    attentions: attention classes whose forward calls the module-level apply_rotary_pos_emb.
    activation: the config attribute that names the MLP activation.
    """

    norms: tuple[str, ...]
    gemma_norm: bool
    mlps: tuple[str, ...]
    attentions: tuple[str, ...]
    activation: str = "hidden_act"


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec(("LlamaRMSNorm",), False, ("LlamaMLP",), ("LlamaAttention",)),
    "mistral": FamilySpec(("MistralRMSNorm",), False, ("MistralMLP",), ("MistralAttention",)),
    "qwen2": FamilySpec(("Qwen2RMSNorm",), False, ("Qwen2MLP",), ("Qwen2Attention",)),
    "qwen3": FamilySpec(("Qwen3RMSNorm",), False, ("Qwen3MLP",), ("Qwen3Attention",)),
    "gemma2": FamilySpec(("Gemma2RMSNorm",), True, ("Gemma2MLP",), ("Gemma2Attention",), "hidden_activation"),
    "gemma3_text": FamilySpec(("Gemma3RMSNorm",), True, ("Gemma3MLP",), ("Gemma3Attention",),
                              "hidden_activation"),
}

# HF activation name -> the GLU op that fuses it: "silu" (SwiGLU) or a GeGLU approximation
_GLU_OF_ACTIVATION = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh",
                      "gelu": "none"}


@dataclass
class _PatchState:
    cfg: KernelsConfig
    family: str | None
    saved: list  # [(module, previous instance `forward` or _MISSING)]


# ---- the patched forwards (module-level functions bound with functools.partial: picklable names)

def _rms_norm_forward(module, hidden_states, *, eps, gemma, mode):
    return rms_norm(hidden_states, module.weight, eps, gemma, mode=mode)


def _glu_mlp_forward(module, x, *, glu, mode):
    gate, up = module.gate_proj(x), module.up_proj(x)
    # gate and up are this forward's own intermediates: their buffers can take the gradients
    if glu == "silu":
        h = swiglu(gate, up, inplace_backward=True, mode=mode)
    else:
        h = geglu(gate, up, approximate=glu, inplace_backward=True, mode=mode)
    return module.down_proj(h)


def _fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, mode):
    return rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, mode=mode)


_ROPE_FORWARDS: dict[tuple[type, str], types.FunctionType] = {}


def _attention_forward_with_rope(cls: type, mode: str):
    """cls.forward re-created with `apply_rotary_pos_emb` resolved to the fused op (or None)."""
    key = (cls, mode)
    if key in _ROPE_FORWARDS:
        return _ROPE_FORWARDS[key]
    fn = cls.forward
    if not isinstance(fn, types.FunctionType) or hasattr(fn, "__wrapped__") \
            or "apply_rotary_pos_emb" not in fn.__code__.co_names:
        return None  # decorated or not calling the module-level function: leave it alone
    scope = dict(fn.__globals__)  # a copy of the modeling module's globals, one name changed
    scope["apply_rotary_pos_emb"] = functools.partial(_fused_apply_rotary_pos_emb, mode=mode)
    new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    _ROPE_FORWARDS[key] = new
    return new


def _set_forward(module: torch.nn.Module, forward, saved: list) -> None:
    saved.append((module, module.__dict__.get("forward", _MISSING)))
    module.forward = forward  # an instance attribute shadows the class's forward


def _hf_model(model):
    from kernels.model import base_model

    return base_model(model)


def kernels_config(model) -> KernelsConfig | None:
    """The KernelsConfig the model was patched with (None if patch_model never ran on it)."""
    state = _hf_model(model).__dict__.get(_STATE_ATTR)
    return state.cfg if state is not None else None


def is_patched(model) -> bool:
    state = _hf_model(model).__dict__.get(_STATE_ATTR)
    return state is not None and bool(state.saved)


def patch_model(model, cfg: KernelsConfig = KernelsConfig()):
    """Swap in the Triton ops on this model instance (PEFT-wrapped or not); returns the model.

    Idempotent: patching again with the same config does nothing; with another config the
    previous patch is undone first. Families not in FAMILIES are left as they are (a warning);
    their loss still goes through the fused cross-entropy.
    """
    hf = _hf_model(model)
    state = hf.__dict__.get(_STATE_ATTR)
    if state is not None:
        if state.cfg == cfg:
            return model
        unpatch_model(model)
    family = getattr(hf.config, "model_type", None)
    state = _PatchState(cfg=cfg, family=family, saved=[])
    if cfg.enabled:
        spec = FAMILIES.get(family)
        if spec is None:
            warnings.warn(f"kernels: no patch for model family {family!r} (known: {', '.join(FAMILIES)}); "
                          "its modules stay as they are", stacklevel=2)
        else:
            _patch_modules(hf, spec, cfg.resolved_mode, state.saved)
    hf.__dict__[_STATE_ATTR] = state
    return model


def _patch_modules(hf, spec: FamilySpec, mode: str, saved: list) -> None:
    act = getattr(hf.config, spec.activation, None)
    glu = _GLU_OF_ACTIVATION.get(act)
    if glu is None:
        warnings.warn(f"kernels: activation {act!r} has no fused GLU; the MLP stays as it is", stacklevel=3)
    for module in hf.modules():
        name = type(module).__name__
        if name in spec.norms:
            eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps
            fwd = functools.partial(_rms_norm_forward, eps=float(eps), gemma=spec.gemma_norm, mode=mode)
            _set_forward(module, types.MethodType(fwd, module), saved)
        elif name in spec.mlps and glu is not None:
            fwd = functools.partial(_glu_mlp_forward, glu=glu, mode=mode)
            _set_forward(module, types.MethodType(fwd, module), saved)
        elif name in spec.attentions:
            fwd = _attention_forward_with_rope(type(module), mode)
            if fwd is None:
                warnings.warn(f"kernels: {name}.forward does not call apply_rotary_pos_emb as expected; "
                              "RoPE stays unfused", stacklevel=3)
            else:
                _set_forward(module, types.MethodType(fwd, module), saved)


def unpatch_model(model):
    """Undo patch_model exactly (instance forwards as they were); returns the model."""
    hf = _hf_model(model)
    state = hf.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return model
    for module, previous in reversed(state.saved):
        if previous is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous
    return model
