"""The model factory: one function turns a model spec into a ready model for training.

    model, notes = build_training_model(model_cfg, kernels=KernelsConfig(), device=device, seed=0)

Used by the SFT/CPT Ray Train worker (cluster/train.py), the GRPO learner (actors/learner.py) and
the benchmark's "ours" contender (jobs/bench_worker.py), so RL and SFT train the same model:

1. the base weights (kernels.model.build_model: a preset with random weights, a local Hugging
   Face folder or a .gguf file), NF4-quantised for finetune=qlora (kernels.qlora; on a machine
   without CUDA or bitsandbytes that raises the clear error, whichever job asked);
2. LoRA through PEFT (kernels.model.add_lora) or every weight trainable (full);
3. the Triton kernels patched in (kernels.patch) and the LoRA blocks fused (kernels.fused_lora);
4. gradient checkpointing (per layer, or with offloaded saved inputs);
5. train mode.

`notes` says what was done (kernels, fused blocks, checkpointing) for the run's start line.
"""
from __future__ import annotations

import torch

from kernels.model import ModelConfig, add_lora, build_model, enable_gradient_checkpointing


def build_base(cfg: ModelConfig, *, vocab_size: int | None = None, device="cpu", seed: int = 0):
    """The base causal LM for `cfg.finetune`: NF4 linears for qlora, bf16 weights for LoRA on CUDA."""
    device = torch.device(device)
    if cfg.finetune == "qlora":
        from kernels.qlora import build_qlora_model  # raises a clear error on CPU / without bitsandbytes

        return build_qlora_model(cfg, vocab_size=vocab_size, device=device, seed=seed)
    model = build_model(cfg, vocab_size=vocab_size, device=device, seed=seed)
    if cfg.finetune == "lora" and device.type == "cuda" and cfg.dtype == "auto":
        model.to(torch.bfloat16)
    return model


def build_training_model(cfg: ModelConfig, *, kernels=None, vocab_size: int | None = None, device="cpu",
                         seed: int = 0, gradient_checkpointing=None, trainable: bool = True):
    """(model ready to train, notes). See the module docstring.

    kernels: a kernels.patch.KernelsConfig; with enabled=False the model is still marked, so the
        loss takes the plain full-logits path; None leaves the model unpatched (Hugging Face modules,
        the fused cross-entropy in its default mode).
    gradient_checkpointing: overrides cfg.gradient_checkpointing when not None.
    trainable: False builds a frozen copy (a full fine-tuning run's reference policy): no adapters,
        no checkpointing, eval mode, no gradients.
    """
    notes: dict = {}
    model = build_base(cfg, vocab_size=vocab_size, device=device, seed=seed)
    if trainable:
        model = add_lora(model, cfg)
    if kernels is not None:
        from kernels.patch import patch_model

        patch_model(model, kernels)
        notes["kernels"] = "patched" if kernels.enabled else "off"
    if not trainable:
        return model.eval().requires_grad_(False), notes
    if kernels is not None and kernels.enabled and cfg.finetune != "full":
        from kernels.fused_lora import apply_fused_lora

        notes["fused_lora_blocks"] = apply_fused_lora(model, mode=kernels.mode)
    mode = cfg.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    if mode == "offload":
        from kernels.offload import enable_offloaded_checkpointing

        notes["offloaded_checkpointing_layers"] = enable_offloaded_checkpointing(model)
    elif mode:
        enable_gradient_checkpointing(model)
        notes["gradient_checkpointing"] = True
    model.train()
    return model, notes
