"""The one merge/load module: LoRA deltas folded into base weights, quantised bases dequantised.

No Ray here. `merged_lora_state` is the merge maths (W + scale * B @ A per adapted layer, NF4
bases dequantised first, modules_to_save included) and everything else is built on it:
  * the GRPO learner syncs `merged_lora_state(model, dtype)` to the rollout engines;
  * `merged_copy` / `merge_adapter` / `load_merged` give a plain transformers model with those
    weights, for export (merged16, merged4, GGUF) and evaluation.
A quantised base is never re-quantised here: PEFT's own merge into a 4-bit layer would write
dequant(W) + delta back into 4 bits (a second rounding); the sum stays dense.
"""
from __future__ import annotations

import copy
import importlib.util
import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kernels.export_source import Source


def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _is_4bit(module) -> bool:
    w = getattr(module, "weight", None)
    return w is not None and getattr(w, "quant_state", None) is not None and getattr(w, "bnb_quantized", True)


def _dense_weight(module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of a linear layer as a dense tensor: bitsandbytes' own dequantisation of a
    4-bit layer (the format's reference; a one-off, speed does not matter), else the weight."""
    if _is_4bit(module):
        from kernels.nf4 import dequantize_bnb_weight

        return dequantize_bnb_weight(module.weight, dtype=dtype, impl="bnb")  # [out, in], a fresh tensor
    w = module.weight.detach()
    return w if dtype is None else w.to(dtype)


def dequantize(model, dtype: torch.dtype = torch.float32):
    """A model with bitsandbytes-quantised layers -> the same model with dense nn.Linear layers.

    Covers transformers-loaded bnb models (merged4 folders, `model.dequantize()`) and the
    project's QLoRA bases (kernels.qlora: Linear4bit swapped in place). Dense models come back
    unchanged.
    """
    from torch import nn

    if getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize()
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if _is_4bit(child)]
    for parent, name, child in targets:
        w = _dense_weight(child, dtype)
        dense = nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if child.bias is not None:
                dense.bias.copy_(child.bias.to(dtype))
        dense.weight.requires_grad_(False)
        setattr(parent, name, dense)
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except AttributeError:  # a read-only property on some versions
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def merged_lora_state(model, dtype: torch.dtype | None = None, only_changed: bool = True) -> dict[str, torch.Tensor]:
    """Weights under the names of the plain HF model with the LoRA deltas folded in.

    Per adapted layer: W + sum over active adapters of scale * B @ A (PEFT's get_delta_weight),
    summed in float32 and cast once to `dtype` (default: the base weight's dtype; a 4-bit base
    is dequantised to its original dtype first). modules_to_save (trainable embeddings / head)
    come under their plain names. only_changed: just those tensors; else every tensor of the
    model (other 4-bit layers dequantised), as in `merge_and_unload().state_dict()`.
    A model without adapters gives its whole state (plain names, 4-bit layers dequantised).
    The model is not modified; tensors stay on its device, and those with nothing added or cast
    are detached views of its live weights (clone them to keep a snapshot).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    if not any(isinstance(m, LoraLayer) for m in inner.modules()):
        only_changed = False  # no adapters: every tensor is "the" weights
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    out: dict[str, torch.Tensor] = {}
    owned: list[str] = []  # modules whose tensors are written here, not copied from the state dict
    with torch.no_grad():
        for name, module in inner.named_modules():
            if owned and name.startswith(owned[-1] + "."):
                continue  # inside a layer handled already (a LoRA layer's base_layer, lora_A, ...)
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                active = [a for a in module.active_adapters if a in module.lora_A
                          and a not in getattr(module, "merged_adapters", ())]  # merged ones are in W already
                if any(getattr(module, "use_dora", {}).get(a, False) for a in active):
                    raise NotImplementedError(f"merged_lora_state: {name} uses DoRA, which is not W + B A")
                w = _dense_weight(base)
                merged = w.float()
                for a in active:
                    merged = merged + module.get_delta_weight(a).float()
                out[f"{name}.weight"] = merged.to(dtype or w.dtype)
            elif _is_4bit(module):
                if not only_changed:
                    out[f"{name}.weight"] = cast(_dense_weight(module))
            else:
                continue
            owned.append(name)
            bias = getattr(module.get_base_layer() if isinstance(module, LoraLayer) else module, "bias", None)
            if bias is not None and not only_changed:
                out[f"{name}.bias"] = cast(bias.detach())
        active_adapter = getattr(model, "active_adapter", "default")
        active_adapter = active_adapter if isinstance(active_adapter, str) else "default"
        trained = {k for k, p in inner.named_parameters() if p.requires_grad and ".lora_" not in k}
        owned_prefixes = tuple(f"{n}." for n in owned)
        for raw, v in inner.state_dict(keep_vars=True).items():
            if raw.startswith(owned_prefixes) or ".lora_" in raw or "original_module" in raw:
                continue
            m = re.search(r"\.modules_to_save\.([^.]+)\.", raw)
            if m and m.group(1) != active_adapter:
                continue
            key = raw.replace(m.group(0), ".") if m else raw
            # modules_to_save changed; the rest only when every tensor is asked for
            if m or raw in trained or (not only_changed and key not in out):
                out[key] = cast(v.detach())
    return out


def _load_merged_weights(model, state: dict[str, torch.Tensor]) -> None:
    """Copy merged tensors into a plain model in place (tied tensors get the value once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for k, v in state.items():
            target = params.get(k, buffers.get(k))
            if target is None:
                raise KeyError(f"merge: the merged tensor {k!r} has no place in the plain model")
            target.copy_(v.to(target.device, target.dtype))
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if (getattr(model.config, "tie_word_embeddings", False) and inp is not None and outp is not None
            and inp.weight.data_ptr() != outp.weight.data_ptr()):
        # trained embeddings and head (modules_to_save) are two tensors now: saved and reloaded
        # as tied, the head would be replaced by the embeddings
        model.config.tie_word_embeddings = False


def merged_copy(model):
    """A merged float32 copy of a PeftModel (the caller's model is left as it is); a plain model
    as it is, or a dequantised copy when it is quantised."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        quantized = any(_is_4bit(m) for m in model.modules()) or getattr(model, "hf_quantizer", None) is not None
        return dequantize(copy.deepcopy(model)) if quantized else model
    work = copy.deepcopy(model)
    for n, p in work.named_parameters():
        if ".lora_" in n:  # B @ A in float32, whatever the training dtype
            p.data = p.data.float()
    state = merged_lora_state(work, torch.float32, only_changed=True)
    plain = dequantize(work.unload()).float()  # adapters dropped, base dense float32
    _load_merged_weights(plain, state)
    return plain


def merge_adapter(base, adapter_dir: str):
    """Base + PEFT adapter folder -> a plain transformers model with the LoRA delta added (float32)."""
    from peft import PeftModel

    base = dequantize(base).float()
    peft_model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    state = merged_lora_state(peft_model, torch.float32, only_changed=True)
    plain = peft_model.unload()
    _load_merged_weights(plain, state)
    return plain


def load_merged(src: Source, tokenizer=None):
    """The merged float32 model (and tokenizer) of a source (kernels.export_source.resolve_source)."""
    from kernels.export_source import load_base, load_tokenizer_for

    tokenizer = tokenizer or load_tokenizer_for(src)
    if src.kind == "model":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src.base_path, dtype=torch.float32)
        return dequantize(model).float(), tokenizer
    base = load_base(src, len(tokenizer))
    return merge_adapter(base, src.adapter_dir), tokenizer
