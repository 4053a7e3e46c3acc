"""Model folders on disk: sharded safetensors, merged 16-bit folders, merged 4-bit (NF4) folders.

No Ray here. `write_merged16` writes what transformers and vLLM load directly (merging a PeftModel
on a copy first, kernels.merge); `write_merged4` quantises such a folder once to bitsandbytes NF4
and `load_merged4` reads it back as saved.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile

import torch

from kernels.merge import bnb_available, merged_copy

log = logging.getLogger(__name__)

MERGED4_ERROR = "merged4 needs a CUDA GPU and bitsandbytes"


# ----------------------------------------------------------------------------- merged 16-bit

def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000000 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size: {size!r} is not a size (e.g. 5GB, 500MB, 2GiB or a byte count)")
    num, unit = float(m.group(1)), (m.group(2) or "B")
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(num * base ** power)


def untied_state(model) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied tensors (lm_head tied to embed_tokens)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out[name] = t
    return out


def write_sharded_safetensors(state: dict[str, torch.Tensor], out_dir: str, max_shard_size: int | str = "5GB",
                              dtype: torch.dtype | None = None) -> list[str]:
    """Write tensors into safetensors shards of at most max_shard_size (a tensor larger than
    that gets a shard of its own) plus model.safetensors.index.json when there is more than one."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, t in state.items():
        nbytes = t.numel() * (dtype.itemsize if (dtype is not None and t.is_floating_point()) else t.element_size())
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += nbytes
    os.makedirs(out_dir, exist_ok=True)
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, names in zip(files, shards):
        tensors = {}
        for name in names:
            t = state[name].detach().to("cpu")
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            tensors[name] = t.contiguous()
            weight_map[name] = fname
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return [os.path.join(out_dir, f) for f in files]


def write_merged16(model, tokenizer, out_dir: str, dtype: torch.dtype = torch.bfloat16,
                   max_shard_size: int | str = "5GB") -> str:
    """A merged model folder (sharded safetensors + config + tokenizer) for transformers and vLLM."""
    model = merged_copy(model)  # a PeftModel is merged on a copy: the caller's adapter stays intact
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # an earlier export with another shard count
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, stale))
    write_sharded_safetensors(untied_state(model), out_dir, max_shard_size, dtype)
    config = model.config
    config.use_cache = True
    config.dtype = dtype
    config.save_pretrained(out_dir)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(out_dir)
        except ValueError as e:  # an invalid generation config is not worth failing the export
            log.warning("export: generation_config not saved: %s", e)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- merged 4-bit (NF4)

def _require_merged4(device: str = "cuda"):
    """merged4 is a GPU format. device="cpu" is for tests: bitsandbytes >= 0.46 also has a CPU backend."""
    cuda_ok = torch.cuda.is_available() or not str(device).startswith("cuda")
    if not cuda_ok or not bnb_available():
        raise RuntimeError(f"{MERGED4_ERROR} (pip install 'ray-posttrain[gpu]' on a GPU machine)")


def write_merged4(model, tokenizer, out_dir: str, max_shard_size: int | str = "5GB",
                  compute_dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> str:
    """Merged model quantised once to bitsandbytes NF4 (double quant, blocksize 64, lm_head and
    embeddings kept in compute_dtype) and saved pre-quantised (config.json gets a quantization_config)."""
    _require_merged4(device)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory(prefix="merged16-") as tmp:
        write_merged16(model, tokenizer, tmp, dtype=compute_dtype, max_shard_size="100GB")
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8)
        # quantised while loading: the 16-bit weights go to `device` one tensor at a time
        qmodel = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qcfg, device_map={"": device})
        os.makedirs(out_dir, exist_ok=True)
        qmodel.save_pretrained(out_dir, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _is_quantized_folder(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(cfg):
        return False
    with open(cfg) as f:
        return "quantization_config" in json.load(f)


def load_merged4(path: str, device: str = "cuda", for_training: bool = False):
    """A merged4 folder back as an NF4 model (weights as saved: no second quantisation).

    for_training: freeze the base and prepare it for adapters (peft.prepare_model_for_kbit_training);
    then add LoRA with kernels.model.add_lora.
    """
    _require_merged4(device)
    from transformers import AutoModelForCausalLM

    if not _is_quantized_folder(path):
        raise ValueError(f"load_merged4: {path!r} is not a merged4 folder (config.json has no quantization_config)")
    model = AutoModelForCausalLM.from_pretrained(path, device_map={"": device})
    if for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model.eval()
    return model
