"""Model assembly: presets with public shapes, loading, LoRA through PEFT, saving.

No Ray here. A model comes either from `path` (a local Hugging Face folder, a .gguf file, or a
hub id resolved to its folder in the Hugging Face cache: kernels/hub.py) or from a named preset
built with random weights (`preset`): the public shapes are for benchmarks, `tiny` is for CPU
tests and the demo.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kernels.config_fields import check_ranges

# Public architecture shapes (from the models' published config.json files). Random weights.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048,
        rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "smollm2-135m": dict(  # SmolLM2-135M(-Instruct)'s shapes (the real model: ../shared/models, GGUF)
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32768,
        max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
        sliding_window=None,
    ),
    "gemma-2-2b": dict(
        model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
        max_position_embeddings=8192, rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        query_pre_attn_scalar=256, sliding_window=4096,
    ),
}

LORA_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter settings (PEFT). `target_modules` is a list of module names or "all-linear"."""

    r: int = field(default=16, metadata={"min": 1})
    alpha: int = field(default=32, metadata={"gt": 0})
    dropout: float = field(default=0.0, metadata={"min": 0, "lt": 1})
    target_modules: str | list[str] = "all-linear"

    def __post_init__(self):
        check_ranges(self, "model.lora")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError(
                f"model.lora.target_modules: expected 'all-linear' or a list of module names, "
                f"got {self.target_modules!r}")

    def modules(self) -> list[str]:
        if self.target_modules == "all-linear":
            return list(LORA_ALL_LINEAR)
        return list(self.target_modules)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train and how.

    preset: a name in PRESETS (random weights) - used when `path` is empty.
    path: a local Hugging Face model folder (config.json + safetensors), a .gguf file (its weights
        are dequantised on load), or a hub id `org/name[@revision]` (kernels.hub: resolved here, once,
        to its snapshot folder in the Hugging Face cache - fetched unless HF_HUB_OFFLINE=1); wins over preset.
    tokenizer: a local tokenizer folder, a .gguf file or a hub id (resolved as `path`, tokenizer files
        only); default: `path`, or the run's trained tokenizer.
    finetune: lora | qlora (NF4 base, GPU only) | full.
    dtype: auto (bf16 on GPU, fp32 on CPU; fp32 for full fine-tuning, computed in bf16 under
        autocast on GPU, so that optimizer updates are not rounded away) | float32 | bfloat16 | float16.
    gradient_checkpointing: true (recompute each decoder layer in backward) | "offload" (also keep the
        saved layer inputs in pinned CPU memory, copied on a side stream) | false.
    train_embeddings: also train embed_tokens and lm_head (CPT); their lr is trainer.embedding_lr.
    config_overrides: keys set on the Hugging Face config (e.g. num_hidden_layers for a smaller preset).
    """

    preset: str = "tiny"
    path: str = ""
    tokenizer: str = ""
    finetune: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    gradient_checkpointing: bool | Literal["offload"] = False
    train_embeddings: bool = False
    config_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.path and self.preset not in PRESETS:
            raise ValueError(
                f"model.preset: unknown preset {self.preset!r}; accepted: {', '.join(PRESETS)} "
                f"(or set model.path to a model folder, a .gguf file or a hub id org/name)")
        from kernels.hub import resolve_model, resolve_tokenizer

        # a hub id becomes its snapshot folder here, once: every later reader (the config.yaml written,
        # transformers, vLLM, the Ray workers) sees a local folder
        object.__setattr__(self, "path", resolve_model(self.path, "model.path"))
        object.__setattr__(self, "tokenizer", resolve_tokenizer(self.tokenizer, "model.tokenizer"))
        if self.path and not (os.path.isdir(self.path) or (is_gguf(self.path) and os.path.isfile(self.path))):
            raise ValueError(f"model.path: {self.path!r} is not a local folder (a Hugging Face model), a .gguf "
                             f"file, or a Hugging Face model id (org/name)")


def torch_dtype(cfg: ModelConfig, device: str | torch.device = "cpu") -> torch.dtype:
    """Weight dtype. auto: bf16 on GPU, fp32 on CPU - except full fine-tuning, which keeps fp32
    weights on GPU too (computed in bf16 under autocast): AdamW on bf16 weights loses every update
    smaller than bf16's resolution (at lr 1e-5 most of them), and training stalls."""
    if cfg.dtype == "auto":
        if cfg.finetune == "full":
            return torch.float32
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, cfg.dtype)


def is_gguf(path: str) -> bool:
    return str(path).lower().endswith(".gguf")


def gguf_args(path: str) -> tuple[tuple, dict]:
    """from_pretrained's arguments for a folder or a .gguf file: ((folder,), {"gguf_file": name})."""
    if is_gguf(path):
        return (os.path.dirname(os.path.abspath(path)),), {"gguf_file": os.path.basename(path)}
    return (path,), {}


def gguf_to_folder(path: str, out_dir: str, dtype: str = "bfloat16") -> str:
    """A .gguf file as a Hugging Face model folder (weights dequantised to `dtype`, its tokenizer
    beside them), written once: engines that load from disk (vLLM) and peers need a folder.
    Returns out_dir; an existing complete folder is reused."""
    from kernels.tokenizer import load_tokenizer

    if os.path.exists(os.path.join(out_dir, "config.json")) and os.path.exists(os.path.join(out_dir, "tokenizer_config.json")):
        return out_dir
    model = build_model(ModelConfig(path=path, dtype=dtype), device="cpu")
    # transformers marks a model read from GGUF as quantised and refuses to save it; its weights
    # are plain dequantised tensors by now, so it is saved as a plain model
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir + ".partial"
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    load_tokenizer(path).save_pretrained(tmp)
    if os.path.exists(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def hf_config(preset: str, **overrides):
    """The transformers config of a preset, with overrides (e.g. vocab_size=...)."""
    from transformers import AutoConfig

    kw = dict(PRESETS[preset])
    kw.update(overrides)
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def build_model(cfg: ModelConfig, *, vocab_size: int | None = None, device="cpu", seed: int = 0):
    """The base causal LM (no adapters): from `cfg.path`, or the preset with random weights."""
    from transformers import AutoModelForCausalLM

    from kernels.hub import resolve_model

    dtype = torch_dtype(cfg, device)
    if cfg.path:
        path = resolve_model(cfg.path, "model.path")  # already a folder when cfg came through __post_init__
        args, kw = gguf_args(path)
        model = AutoModelForCausalLM.from_pretrained(*args, **kw, dtype=dtype,
                                                     attn_implementation=cfg.attn_implementation)
    else:
        overrides = dict(cfg.config_overrides)
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        config = hf_config(cfg.preset, **overrides)
        config._attn_implementation = cfg.attn_implementation
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     attn_implementation=cfg.attn_implementation)
    model.to(device)
    model.config.use_cache = False
    return model


# Non-reentrant checkpointing of each decoder layer. The recomputation's shape/dtype check
# ("determinism_check") is skipped: it costs host time on every saved tensor of every layer, and
# our layers recompute deterministically (the e2e resume and kernel tests compare the numbers).
CHECKPOINT_KWARGS = {"use_reentrant": False, "determinism_check": "none"}


def has_dropout(model) -> bool:
    """Whether training `model` draws random numbers: a dropout module with p > 0 (LoRA dropout
    included) or a config dropout rate > 0 (attention dropout is functional in transformers)."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    cfg = getattr(base_model(model), "config", None)
    for k, v in (vars(cfg) if cfg is not None else {}).items():
        if ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return True
    return False


def enable_gradient_checkpointing(model) -> None:
    """Checkpoint every decoder layer of `model` (a PEFT wrapper or the HF model itself).

    Without dropout the recomputation draws no random numbers, so the RNG state is not stashed
    per layer (host time saved, and a step can be captured as a CUDA graph: reading the CUDA RNG
    state is not allowed while capturing)."""
    import functools

    from kernels.recompute import checkpoint

    kw = dict(CHECKPOINT_KWARGS, preserve_rng_state=has_dropout(model))
    m = base_model(model)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    # the same checkpoint, with its recomputation marked (kernels/recompute.py)
    for layer in m.modules():
        if getattr(layer, "gradient_checkpointing", False) and "_gradient_checkpointing_func" in layer.__dict__:
            layer._gradient_checkpointing_func = functools.partial(checkpoint, **kw)


def add_lora(model, cfg: ModelConfig):
    """Wrap with PEFT LoRA (lora/qlora) or mark every parameter trainable (full)."""
    if cfg.finetune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    modules_to_save = ["embed_tokens", "lm_head"] if cfg.train_embeddings else None
    peft_cfg = PeftLoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.modules(), bias="none", task_type="CAUSAL_LM",
        modules_to_save=modules_to_save)
    return get_peft_model(model, peft_cfg)


def base_model(model):
    """The transformers model under any PEFT wrapper."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def save_adapter(model, out_dir: str) -> str:
    """PEFT adapter (adapter_model.safetensors + adapter_config.json)."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def save_merged(model, out_dir: str, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> str:
    """A merged model folder (safetensors + config + tokenizer) that transformers and vLLM load
    directly; a PEFT model is merged on a copy, an NF4 base is dequantised first."""
    from kernels.export import write_merged16

    return write_merged16(model, tokenizer, out_dir, dtype=dtype)
