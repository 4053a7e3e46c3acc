"""Export a trained result: adapter copy, merged 16-bit (sharded safetensors), merged 4-bit (NF4), GGUF.

No Ray here. This module is the entry point (`export`) and the names callers import; the work
lives in one file per concern:
  kernels/export_source.py   what a path is (run folder via run.json, adapter, model folder),
                             its base model rebuilt, load_for_inference
  kernels/run_manifest.py    OUTPUT_DIR/run.json, written by the training jobs
  kernels/merge.py           the merge maths (merged_lora_state), dequantising, merged models
  kernels/safetensors_io.py  sharded safetensors, merged16 / merged4 folders
  kernels/gguf_export.py     the GGUF writer (llama architecture)

Merging happens in float32 and is cast once to the output dtype. A quantised base (bitsandbytes
4-bit) is dequantised before the LoRA delta is added, so nothing is re-quantised except by the
merged4 format itself.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from kernels.export_source import (Source, _has_tokenizer, load_base, load_for_inference, load_tokenizer_for,
                                   manifest_from_config_yaml, resolve_source)
from kernels.gguf_export import GGUF_ARCHS, GGUF_TYPES, llama3_rope_factors, permute_qk, unpermute_qk, write_gguf
from kernels.merge import dequantize, load_merged, merge_adapter, merged_copy, merged_lora_state
from kernels.run_manifest import MANIFEST_FILE, RunManifest
from kernels.safetensors_io import (MERGED4_ERROR, _require_merged4, load_merged4, parse_size,
                                    write_merged4, write_merged16, write_sharded_safetensors)

__all__ = [
    "FORMATS", "GGUF_ARCHS", "GGUF_TYPES", "MANIFEST_FILE", "MERGED4_ERROR", "RunManifest", "Source",
    "default_output", "dequantize", "export", "llama3_rope_factors", "load_base", "load_for_inference",
    "load_merged", "load_merged4", "load_tokenizer_for", "manifest_from_config_yaml", "merge_adapter",
    "merged_copy", "merged_lora_state", "parse_size", "permute_qk", "resolve_source", "unpermute_qk",
    "write_gguf", "write_merged4", "write_merged16", "write_sharded_safetensors",
]

FORMATS = ("adapter", "merged16", "merged4", "gguf")


def default_output(src: Source, fmt: str, gguf_type: str = "f16") -> str:
    root = src.path if src.kind == "run" else os.path.dirname(src.path.rstrip("/"))
    stem = os.path.basename(src.path.rstrip("/"))
    return {"adapter": os.path.join(root, "export-adapter"), "merged16": os.path.join(root, "merged"),
            "merged4": os.path.join(root, "merged4"),
            "gguf": os.path.join(root, f"{stem}-{gguf_type}.gguf")}[fmt]


def export(path: str, fmt: str, out: str = "", *, base: str | None = None, gguf_type: str = "f16",
           dtype: str = "bfloat16", max_shard_size: int | str = "5GB") -> str:
    """Export `path` (run dir, adapter folder or model folder) as `fmt`; return the output path."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not accepted; expected one of {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type {gguf_type!r} is not accepted; expected one of {', '.join(GGUF_TYPES)}")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype {dtype!r} is not accepted; expected bfloat16, float16 or float32")
    parse_size(max_shard_size)
    if fmt == "merged4":
        _require_merged4()  # fail before the (slow) merge
    src = resolve_source(path, base)
    out = out or default_output(src, fmt, gguf_type)
    if fmt == "adapter":
        if not src.adapter_dir:
            raise ValueError(f"export: {path!r} is a model folder, it has no adapter to export")
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(src.adapter_dir):
            p = os.path.join(src.adapter_dir, f)
            if os.path.isfile(p):
                shutil.copy2(p, os.path.join(out, f))
        if src.tokenizer_dir and not _has_tokenizer(out):
            load_tokenizer_for(src).save_pretrained(out)
        if src.base_path and os.path.isdir(src.base_path):
            _set_adapter_base(out, src.base_path)
        return out
    model, tok = load_merged(src)
    if fmt == "merged16":
        return write_merged16(model, tok, out, dtype=getattr(torch, dtype), max_shard_size=max_shard_size)
    if fmt == "merged4":
        return write_merged4(model, tok, out, max_shard_size=max_shard_size)
    if not out.endswith(".gguf"):
        out = os.path.join(out, f"model-{gguf_type}.gguf")
    return write_gguf(model, tok, out, gguf_type=gguf_type)


def _set_adapter_base(adapter_dir: str, base_path: str) -> None:
    p = os.path.join(adapter_dir, "adapter_config.json")
    with open(p) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = os.path.abspath(base_path)
    with open(p, "w") as f:
        json.dump(acfg, f, indent=2)
