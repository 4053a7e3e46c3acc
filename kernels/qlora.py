"""QLoRA: a base model whose linear layers are stored in NF4 (bitsandbytes), plus the optimizers.

    model = build_qlora_model(cfg, vocab_size=..., device="cuda")   # NF4 + double quantisation
    model = add_lora(model, cfg)                                     # PEFT wraps the Linear4bit layers
    apply_fused_lora(model)                                          # fused path dequantises W per matmul
    opt = make_optimizer(trainable_params, lr=2e-4, kind="adamw_8bit")

Every nn.Linear of the decoder becomes a bitsandbytes `Linear4bit` (NF4, blocksize 64, absmax
double-quantised, compute dtype bf16); the embeddings, norms and lm_head stay in bf16, as in
the QLoRA paper's recipe. The bf16 weights are quantised one layer at a time on the GPU and
freed, so the peak is the bf16 model (built or loaded once), not two copies.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from kernels.model import ModelConfig, build_model, torch_dtype

log = logging.getLogger(__name__)

QLORA_HELP = ("model.finetune=qlora needs a CUDA GPU and bitsandbytes; use model.finetune=lora on this "
              "machine, or run on a GPU machine with bitsandbytes installed (pip install bitsandbytes)")
OPTIMIZERS = ("adamw", "adamw_8bit")
KEEP_DENSE = ("lm_head",)  # quantising the output head costs accuracy for little memory


def _require_bitsandbytes(what: str):
    try:
        import bitsandbytes as bnb  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        raise RuntimeError(f"{what}: bitsandbytes is not importable ({type(e).__name__}: {e})") from e
    return bnb


def check_qlora_available(device: str | torch.device = "cuda") -> None:
    """Raise a clear error when QLoRA cannot run here (no CUDA device, or no bitsandbytes)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        where = "no CUDA device is available" if not torch.cuda.is_available() else f"device is {dev}"
        raise RuntimeError(f"{QLORA_HELP} ({where})")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        raise RuntimeError(f"{QLORA_HELP} (bitsandbytes: {type(e).__name__}: {e})") from e


def quantize_linears_nf4(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                         double_quant: bool = True, keep_dense: tuple[str, ...] = KEEP_DENSE) -> int:
    """Replace every nn.Linear (except names in keep_dense) by a frozen bitsandbytes Linear4bit in
    place, quantising on the weight's CUDA device. Returns the number of layers replaced."""
    bnb = _require_bitsandbytes("quantize_linears_nf4")
    targets = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if type(child) is nn.Linear and child_name not in keep_dense:
                targets.append((parent, child_name, child))
    n = len(targets)
    while targets:  # pop as we go: each bf16 weight is freed as soon as it is quantised
        parent, child_name, child = targets.pop()
        w = child.weight.data
        if w.device.type != "cuda":
            raise RuntimeError(f"quantize_linears_nf4: {child_name} is on {w.device}; {QLORA_HELP}")
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type="nf4", quant_storage=torch.uint8, device="meta")
        q.weight = bnb.nn.Params4bit(w.to(compute_dtype), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type="nf4",
                                     quant_storage=torch.uint8, module=q).to(w.device)  # quantises
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child_name, q)
        del child, w, q
    torch.cuda.empty_cache()
    return n


def build_qlora_model(cfg: ModelConfig, vocab_size: int | None = None, device: str | torch.device = "cuda",
                      seed: int = 0, blocksize: int = 64):
    """The base causal LM with NF4 (double-quantised) linear layers and bf16 everything else.

    Same sources as build_model: cfg.path (a local HF folder) or cfg.preset with random weights.
    Apply LoRA afterwards with kernels.model.add_lora (PEFT then wraps the Linear4bit layers).
    """
    check_qlora_available(device)
    dtype = torch_dtype(cfg, device)
    if dtype == torch.float32:
        dtype = torch.bfloat16  # 4-bit bases compute in 16-bit; fp32 would only cost memory
    model = build_model(replace(cfg, dtype=str(dtype).replace("torch.", "")), vocab_size=vocab_size,
                        device=device, seed=seed)
    n = quantize_linears_nf4(model, compute_dtype=dtype, blocksize=blocksize, double_quant=True)
    for p in model.parameters():
        p.requires_grad_(False)
    # PEFT dispatches its 4-bit LoRA layer only for models flagged like transformers' bnb loader does
    model.is_loaded_in_4bit = True
    log.info("qlora: %d linear layers stored as NF4 (blocksize %d, double-quantised absmax), compute %s",
             n, blocksize, dtype)
    return model


def make_optimizer(params, lr: float, kind: str = "adamw", weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
    """AdamW over `params` (tensors or param-group dicts).

    kind "adamw": torch.optim.AdamW (fused kernel when every parameter is a CUDA float tensor);
    "adamw_8bit": bitsandbytes' AdamW8bit (8-bit blockwise moments; tensors under 4096 elements
    keep 32-bit moments), for any finetune mode.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"trainer.optimizer: expected one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    params = list(params)
    if not params:
        raise ValueError("make_optimizer: no parameters to optimise (is anything trainable?)")
    if kind == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:
            raise RuntimeError(f"trainer.optimizer=adamw_8bit needs bitsandbytes "
                               f"({type(e).__name__}: {e}); use trainer.optimizer=adamw") from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(t.is_cuda and t.is_floating_point() for t in tensors)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused or None)
