"""What a path given to export / eval / serve is, and its base model rebuilt.

No Ray here. A source is one of
  * a run output_dir: run.json (kernels.run_manifest: the base model, where adapter/, merged/
    and the tokenizer are) - or, for runs saved before run.json existed, config.yaml;
  * an adapter folder: adapter_config.json, whose base_model_name_or_path is a local model folder
    (or pass `base=`);
  * a model folder (config.json + weights), e.g. an earlier merged16 export.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch

from kernels.merge import bnb_available, dequantize
from kernels.run_manifest import MANIFEST_FILE, RunManifest

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class Source:
    """What to export, resolved from a path.

    kind: run | adapter | model. base_path: local HF folder of the base ("" for a preset base).
    manifest: the run's manifest (how to rebuild its base), None for adapter and model folders.
    """

    kind: str
    path: str
    adapter_dir: str = ""
    tokenizer_dir: str = ""
    base_path: str = ""
    manifest: RunManifest | None = None

    @property
    def finetune(self) -> str:
        return self.manifest.finetune if self.manifest else "lora"

    @property
    def seed(self) -> int:
        return self.manifest.seed if self.manifest else 0

    @property
    def train_on_gpu(self) -> bool:
        return bool(self.manifest and self.manifest.train_device == "cuda")


def _has_tokenizer(d: str) -> bool:
    return bool(d) and os.path.isdir(d) and any(os.path.exists(os.path.join(d, f)) for f in _TOKENIZER_FILES)


def resolve_source(path: str, base: str | None = None) -> Source:
    """Find the adapter, the base model and the tokenizer behind `path` (see the module doc)."""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"export: {path!r} does not exist (expected a run output_dir with adapter/ and tokenizer/, "
            f"an adapter folder with adapter_config.json, or a model folder with config.json)")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"export: {path!r} is a file; expected a folder")
    path = os.path.abspath(path)
    if base and not os.path.isdir(base):
        raise FileNotFoundError(f"export: base model {base!r} is not a local folder")
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        return _resolve_adapter(path, base)
    if os.path.exists(os.path.join(path, MANIFEST_FILE)) or os.path.exists(os.path.join(path, "config.yaml")):
        return _resolve_run(path, base)
    if os.path.exists(os.path.join(path, "config.json")):
        tok = path if _has_tokenizer(path) else ""
        return Source(kind="model", path=path, base_path=path, tokenizer_dir=tok)
    raise ValueError(
        f"export: {path!r} is neither a run output_dir ({MANIFEST_FILE} or config.yaml, + adapter/), an adapter "
        f"folder (adapter_config.json) nor a model folder (config.json)")


def _resolve_adapter(path: str, base: str | None) -> Source:
    with open(os.path.join(path, "adapter_config.json")) as f:
        acfg = json.load(f)
    named = acfg.get("base_model_name_or_path") or ""
    base_path = base or named
    if not base_path:
        raise ValueError(
            f"export: adapter {path!r} has no base model: adapter_config.json's base_model_name_or_path "
            f"is empty; pass --base PATH (a local model folder)")
    if not os.path.isdir(base_path):
        raise FileNotFoundError(
            f"export: the base model {base_path!r} named by {path}/adapter_config.json is not a local folder "
            f"(no downloads); pass --base PATH")
    tok = next((d for d in (path, os.path.join(os.path.dirname(path), "tokenizer"), base_path)
                if _has_tokenizer(d)), "")
    return Source(kind="adapter", path=path, adapter_dir=path, tokenizer_dir=tok, base_path=base_path)


def _resolve_run(path: str, base: str | None) -> Source:
    if os.path.exists(os.path.join(path, MANIFEST_FILE)):
        m, origin, base_field = RunManifest.read(path), MANIFEST_FILE, f"base_path in {MANIFEST_FILE}"
    else:
        m, origin, base_field = manifest_from_config_yaml(path), "config.yaml", "model.path"
    tok = m.path_of(path, m.tokenizer_dir)
    if not _has_tokenizer(tok):
        raise FileNotFoundError(f"export: run {path!r}: the tokenizer folder {tok!r} named by {origin} "
                                f"holds no tokenizer")
    adapter = m.path_of(path, m.adapter_dir)
    if not adapter or not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        # full fine-tuning saves a whole model folder instead of an adapter
        merged = m.path_of(path, m.merged_dir)
        if merged and os.path.exists(os.path.join(merged, "config.json")):
            return Source(kind="model", path=merged, base_path=merged, tokenizer_dir=tok, manifest=m)
        raise FileNotFoundError(
            f"export: run {path!r} has no adapter/ (adapter_config.json) nor merged/ model folder; "
            f"has the run finished and saved its result?")
    base_path = base or m.base_path
    if base_path and not os.path.isdir(base_path):
        raise FileNotFoundError(f"export: the run's base model {base_path!r} ({base_field}) is not a local folder")
    return Source(kind="run", path=path, adapter_dir=adapter, tokenizer_dir=tok, base_path=base_path, manifest=m)


def manifest_from_config_yaml(path: str) -> RunManifest:
    """The manifest of a run folder saved before run.json existed, from its config.yaml.

    Legacy fallback, the only place that reads the jobs' YAML keys (model.*, seed, trainer.use_gpu):
    new runs write run.json. Unlike run.json it cannot know the vocab size training used for a
    preset (vocab_size None: load_base applies the SFT job's rule) nor the task (cpt reads as sft).
    """
    import yaml

    with open(os.path.join(path, "config.yaml")) as f:
        conf = yaml.safe_load(f) or {}
    mconf = dict(conf.get("model") or {})
    tok = next((d for d in (os.path.join(path, "tokenizer"), mconf.get("tokenizer", ""), mconf.get("path", ""))
                if _has_tokenizer(d)), "")
    if not tok:
        raise FileNotFoundError(f"export: run {path!r} has no tokenizer/ folder and its model names no tokenizer")
    adapter = os.path.join(path, "adapter")
    merged = next((os.path.join(path, n) for n in ("merged", "model")
                   if os.path.exists(os.path.join(path, n, "config.json"))), "")
    if not mconf.get("path") and not mconf.get("preset"):
        raise ValueError(f"export: run {path!r}: config.yaml names no base model (model.path or model.preset)")
    lora = dict(mconf.get("lora") or {})
    trainer = conf.get("trainer") or {}
    targets = lora.get("target_modules", "all-linear")
    try:
        return RunManifest(
            task="grpo" if "grpo" in conf or "rollout" in conf else "sft",
            finetune=mconf.get("finetune", "lora"), preset=mconf.get("preset") or "",
            base_path=mconf.get("path") or "", dtype=mconf.get("dtype", "auto"),
            lora_r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32),
            lora_targets=targets if isinstance(targets, str) else tuple(targets),
            config_overrides=dict(mconf.get("config_overrides") or {}), vocab_size=None,
            seed=int(conf.get("seed", trainer.get("seed", 0)) or 0),
            train_device="cuda" if trainer.get("use_gpu", False) else "cpu",
            adapter_dir=adapter if os.path.isdir(adapter) else "", merged_dir=merged, tokenizer_dir=tok)
    except ValueError as e:
        raise ValueError(f"export: {os.path.join(path, 'config.yaml')}: {e}") from None


# ----------------------------------------------------------------------------- loading

def load_tokenizer_for(src: Source):
    from kernels.tokenizer import load_tokenizer

    if not src.tokenizer_dir:
        raise FileNotFoundError(f"export: no tokenizer found for {src.path!r} (looked in the folder, "
                                f"a sibling tokenizer/ and the base model)")
    return load_tokenizer(src.tokenizer_dir)


def _vocab_size(m: RunManifest, tokenizer_len: int | None) -> int:
    """The embedding rows of a preset base: as recorded, else (config.yaml runs) the SFT job's
    rule: the preset's vocab_size unless the tokenizer needs more rows."""
    if m.vocab_size is not None:
        return m.vocab_size
    from kernels.model import PRESETS

    vocab = PRESETS[m.preset]["vocab_size"]
    return max(vocab, tokenizer_len) if tokenizer_len is not None else vocab


def load_base(src: Source, tokenizer_len: int | None = None):
    """The base model the adapter was trained on, in float32 on the CPU.

    lora/full: the base folder loaded, or the preset rebuilt as training built it (build_model
    with the run's seed, dtype and vocab size, on the device type it trained on - CPU and CUDA
    random streams differ). qlora: rebuilt with kernels.qlora.build_qlora_model (NF4) on CUDA and
    dequantised, i.e. exactly the weights the adapter saw; without CUDA a 16-bit base folder is
    used with a warning.
    """
    from transformers import AutoModelForCausalLM

    from kernels.model import build_model

    m = src.manifest
    if src.finetune == "qlora":
        if torch.cuda.is_available() and bnb_available():
            from kernels.qlora import build_qlora_model

            cfg = m.model_config(path=src.base_path)
            vocab = None if src.base_path else _vocab_size(m, tokenizer_len)
            model = build_qlora_model(cfg, vocab_size=vocab, device="cuda", seed=m.seed)
            return dequantize(model).to("cpu", torch.float32)
        if not src.base_path:
            raise RuntimeError("export: this QLoRA run trained on a preset (random NF4) base, which can only be "
                               "rebuilt on a CUDA GPU with bitsandbytes")
        warnings.warn("export: a QLoRA adapter is merged into the 16-bit base weights (no CUDA/bitsandbytes "
                      "to rebuild the NF4 base it was trained on); outputs differ slightly from training")
    if src.base_path:
        model = AutoModelForCausalLM.from_pretrained(src.base_path, dtype=torch.float32)
        return dequantize(model).float()
    if m is None:
        raise ValueError(f"export: {src.path!r} names no base model folder")
    device = "cpu"
    if src.train_on_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("export: this run trained a preset (random weights) on a GPU; its base can only "
                               "be rebuilt identically on a CUDA machine (CPU and CUDA random streams differ)")
        device = "cuda"
    cfg = m.model_config(path="", finetune="lora")
    model = build_model(cfg, vocab_size=_vocab_size(m, tokenizer_len), device=device, seed=m.seed)
    return model.to("cpu", torch.float32)


def load_for_inference(path: str, base: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) ready for generation from a run dir, adapter folder or model folder.

    A merged4 folder (config.json with a quantization_config) loads its NF4 weights as saved, on CUDA.
    An adapter is kept on its base (PEFT), not merged.
    """
    from kernels.safetensors_io import _is_quantized_folder, load_merged4

    src = resolve_source(path, base)
    tok = load_tokenizer_for(src)
    if src.kind == "model":
        if _is_quantized_folder(src.base_path):
            return load_merged4(src.base_path, device=device if device != "cpu" else "cuda"), tok
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src.base_path, dtype=dtype or torch.float32)
        return model.to(device).eval(), tok
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(src, len(tok)), src.adapter_dir, is_trainable=False)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), tok
