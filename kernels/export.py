"""Export a trained result: adapter copy, merged 16-bit (sharded safetensors), merged 4-bit (NF4), GGUF.

No Ray here. The source is one of
  * a run output_dir: config.yaml (the resolved run config, naming the base model in `model.path`
    or `model.preset`), adapter/ (PEFT) and tokenizer/;
  * an adapter folder: adapter_config.json, whose base_model_name_or_path is a local model folder
    (or pass `base=`);
  * a model folder (config.json + weights), e.g. an earlier merged16 export - for gguf / merged4.

Merging happens in float32 on the CPU and is cast once to the output dtype. A quantised base
(bitsandbytes 4/8-bit) is dequantised before the LoRA delta is added, so no rounding of the base
is done twice and nothing is re-quantised except by the merged4 format itself.

GGUF (llama architecture) is written tensor by tensor with `gguf.GGUFWriter`: HF names map to
GGUF names through the gguf package's tensor map; q/k projections are reordered from the
HF "rotate half" layout to the adjacent-pairs layout that GGUF llama RoPE uses (see `permute_qk`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMATS = ("adapter", "merged16", "merged4", "gguf")
GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")
MERGED4_ERROR = "merged4 needs a CUDA GPU and bitsandbytes"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# ----------------------------------------------------------------------------- source resolution

@dataclass(frozen=True)
class Source:
    """What to export, resolved from a path.

    kind: run | adapter | model. base_path: local HF folder of the base ("" for a preset base).
    model_config: the run's `model:` section (preset, config_overrides, finetune...) or {}.
    """

    kind: str
    path: str
    adapter_dir: str = ""
    tokenizer_dir: str = ""
    base_path: str = ""
    model_config: dict | None = None
    seed: int = 0
    train_on_gpu: bool = False

    @property
    def finetune(self) -> str:
        return (self.model_config or {}).get("finetune", "lora")


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
    if os.path.exists(os.path.join(path, "config.yaml")):
        return _resolve_run(path, base)
    if os.path.exists(os.path.join(path, "config.json")):
        tok = path if _has_tokenizer(path) else ""
        return Source(kind="model", path=path, base_path=path, tokenizer_dir=tok)
    raise ValueError(
        f"export: {path!r} is neither a run output_dir (config.yaml + adapter/), an adapter folder "
        f"(adapter_config.json) nor a model folder (config.json)")


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
    import yaml

    with open(os.path.join(path, "config.yaml")) as f:
        conf = yaml.safe_load(f) or {}
    mconf = dict(conf.get("model") or {})
    seed = conf.get("seed", (conf.get("trainer") or {}).get("seed", 0))
    adapter = os.path.join(path, "adapter")
    tok = next((d for d in (os.path.join(path, "tokenizer"), mconf.get("tokenizer", ""), mconf.get("path", ""))
                if _has_tokenizer(d)), "")
    if not tok:
        raise FileNotFoundError(f"export: run {path!r} has no tokenizer/ folder and its model names no tokenizer")
    if not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        # full fine-tuning saves a whole model folder instead of an adapter
        for name in ("merged", "model"):
            d = os.path.join(path, name)
            if os.path.exists(os.path.join(d, "config.json")):
                return Source(kind="model", path=d, base_path=d, tokenizer_dir=tok, model_config=mconf, seed=seed)
        raise FileNotFoundError(
            f"export: run {path!r} has no adapter/ (adapter_config.json) nor merged/ model folder; "
            f"has the run finished and saved its result?")
    base_path = base or mconf.get("path", "")
    if base_path and not os.path.isdir(base_path):
        raise FileNotFoundError(f"export: the run's base model {base_path!r} (model.path) is not a local folder")
    if not base_path and not mconf.get("preset"):
        raise ValueError(f"export: run {path!r}: config.yaml names no base model (model.path or model.preset)")
    return Source(kind="run", path=path, adapter_dir=adapter, tokenizer_dir=tok, base_path=base_path,
                  model_config=mconf, seed=int(seed or 0),
                  train_on_gpu=bool((conf.get("trainer") or {}).get("use_gpu", False)))


# ----------------------------------------------------------------------------- loading and merging

def load_tokenizer_for(src: Source):
    from kernels.tokenizer import load_tokenizer

    if not src.tokenizer_dir:
        raise FileNotFoundError(f"export: no tokenizer found for {src.path!r} (looked in the folder, "
                                f"a sibling tokenizer/ and the base model)")
    return load_tokenizer(src.tokenizer_dir)


def _model_config(mconf: dict, **kw):
    from kernels.model import LoraConfig, ModelConfig

    known = {f.name for f in fields(ModelConfig)}
    args = {k: v for k, v in mconf.items() if k in known}
    if isinstance(args.get("lora"), dict):
        args["lora"] = LoraConfig(**args["lora"])
    args.update(kw)
    return ModelConfig(**args)


def _preset_vocab(cfg, tokenizer_len: int | None) -> int:
    """The SFT job's rule for presets: the preset's vocab_size unless the tokenizer needs more rows."""
    from kernels.model import PRESETS

    vocab = PRESETS[cfg.preset]["vocab_size"]
    return max(vocab, tokenizer_len) if tokenizer_len is not None else vocab


def load_base(src: Source, tokenizer_len: int | None = None):
    """The base model the adapter was trained on, in float32 on the CPU.

    lora/full: `model.path` loaded from its folder, or the preset rebuilt as training built it
    (build_model with the run's seed and dtype, on the device type it trained on - CPU and CUDA
    random streams differ). qlora: rebuilt with kernels.qlora.build_qlora_model (NF4) on CUDA and
    dequantised, i.e. exactly the weights the adapter saw; without CUDA a 16-bit `model.path` base
    is used with a warning.
    """
    from transformers import AutoModelForCausalLM

    from kernels.model import build_model

    mconf = src.model_config or {}
    if src.finetune == "qlora":
        if torch.cuda.is_available() and _bnb_available():
            from kernels.qlora import build_qlora_model

            cfg = _model_config(mconf, path=src.base_path)
            vocab = None if src.base_path else _preset_vocab(cfg, tokenizer_len)
            model = build_qlora_model(cfg, vocab_size=vocab, device="cuda", seed=src.seed)
            return dequantize(model).to("cpu", torch.float32)
        if not src.base_path:
            raise RuntimeError("export: this QLoRA run trained on a preset (random NF4) base, which can only be "
                               "rebuilt on a CUDA GPU with bitsandbytes")
        warnings.warn("export: a QLoRA adapter is merged into the 16-bit base weights (no CUDA/bitsandbytes "
                      "to rebuild the NF4 base it was trained on); outputs differ slightly from training")
    if src.base_path:
        model = AutoModelForCausalLM.from_pretrained(src.base_path, dtype=torch.float32)
        return dequantize(model).float()
    device = "cpu"
    if src.train_on_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("export: this run trained a preset (random weights) on a GPU; its base can only "
                               "be rebuilt identically on a CUDA machine (CPU and CUDA random streams differ)")
        device = "cuda"
    cfg = _model_config(mconf, path="", finetune="lora")
    model = build_model(cfg, vocab_size=_preset_vocab(cfg, tokenizer_len), device=device, seed=src.seed)
    return model.to("cpu", torch.float32)


def _bnb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _is_4bit(module) -> bool:
    w = getattr(module, "weight", None)
    return w is not None and getattr(w, "quant_state", None) is not None and getattr(w, "bnb_quantized", True)


def dequantize(model, dtype: torch.dtype = torch.float32):
    """A model with bitsandbytes-quantised layers -> the same model with dense nn.Linear layers.

    Covers transformers-loaded bnb models (merged4 folders, `model.dequantize()`) and the
    project's QLoRA bases (kernels.qlora: Linear4bit swapped in place, dequantised with
    kernels.nf4). Dense models come back unchanged.
    """
    from torch import nn

    if getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize()
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if _is_4bit(child)]
    if targets:
        from kernels.nf4 import dequantize_bnb_weight

        for parent, name, child in targets:
            # bitsandbytes itself (the format's reference) dequantises: a one-off, speed does not matter
            w = dequantize_bnb_weight(child.weight, dtype=dtype, impl="bnb")  # [out, in], a fresh tensor
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


def merged_copy(model):
    """A merged float32 copy of a PeftModel (the caller's model is left as it is); a plain model
    as it is, or a dequantised copy when it is quantised.

    A quantised base is dequantised before the delta is added (PEFT's own merge into a 4-bit
    layer would re-quantise the sum)."""
    import copy

    from peft import PeftModel

    has_4bit = any(_is_4bit(m) for m in model.modules())
    if not isinstance(model, PeftModel):
        quantized = has_4bit or getattr(model, "hf_quantizer", None) is not None
        return dequantize(copy.deepcopy(model)) if quantized else model
    if not has_4bit:
        return copy.deepcopy(model).float().merge_and_unload()
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        model.save_pretrained(tmp)
        names = [n for n in os.listdir(tmp) if os.path.isdir(os.path.join(tmp, n))]
        adapter_dir = tmp if os.path.exists(os.path.join(tmp, "adapter_config.json")) else os.path.join(tmp, names[0])
        base = copy.deepcopy(model).unload()
        return merge_adapter(base, adapter_dir)


def merge_adapter(base, adapter_dir: str):
    """Base + PEFT adapter -> a plain transformers model with the LoRA delta added (float32)."""
    from peft import PeftModel

    base = dequantize(base).float()
    peft_model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    return peft_model.merge_and_unload()


def load_merged(src: Source, tokenizer=None):
    """The merged float32 model (and tokenizer) of a source."""
    tokenizer = tokenizer or load_tokenizer_for(src)
    if src.kind == "model":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src.base_path, dtype=torch.float32)
        return dequantize(model).float(), tokenizer
    base = load_base(src, len(tokenizer))
    return merge_adapter(base, src.adapter_dir), tokenizer


def load_for_inference(path: str, base: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) ready for generation from a run dir, adapter folder or model folder.

    A merged4 folder (config.json with a quantization_config) loads its NF4 weights as saved, on CUDA.
    An adapter is kept on its base (PEFT), not merged.
    """
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


def _untied_state(model) -> dict[str, torch.Tensor]:
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
    write_sharded_safetensors(_untied_state(model), out_dir, max_shard_size, dtype)
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
    if not cuda_ok or not _bnb_available():
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


# ----------------------------------------------------------------------------- GGUF

GGUF_ARCHS = {"llama": "llama", "mistral": "llama"}


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k projection rows from HF "rotate half" order to adjacent-pairs order, per head.

    HF llama rotates the pair (x[i], x[i + d/2]) of each head; GGUF llama RoPE rotates the pair
    (x[2i], x[2i + 1]). So row 2i of a head takes HF row i and row 2i + 1 takes HF row i + d/2:
    [H * d, in] -> [H, 2, d/2, in] -> swap the two middle axes -> [H * d, in].
    """
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_qk."""
    rows = w.shape[0]
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def llama3_rope_factors(config) -> torch.Tensor:
    """Per-frequency divisors [head_dim / 2] that turn the plain RoPE frequencies into llama3's."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, _ = _rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled.double()).float()


def _gguf_types(gguf_type: str):
    from gguf import GGMLQuantizationType as Q, LlamaFileType as F

    return {"f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "f32": (Q.F32, F.ALL_F32)}[gguf_type]


def _encode_tensor(t: torch.Tensor, qtype) -> np.ndarray:
    """A float tensor -> the numpy array written for it (f32 / f16 values, or quantised bytes)."""
    from gguf import GGMLQuantizationType as Q, quants

    data = t.detach().to("cpu", torch.float32).numpy()
    st = _stored_type(t, qtype)
    if st == Q.F32:
        return data.astype(np.float32)
    if st == Q.F16:
        return data.astype(np.float16)
    return quants.quantize(data, st)


def _tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ValueError(f"gguf: the tokenizer is {model.get('type')}"
                         f"{' with byte_fallback' if model.get('byte_fallback') else ''}; "
                         f"only byte-level BPE tokenizers are written (tokenizer.ggml.model 'gpt2')")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"gguf: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}")
    id_to_tok = {i: s for s, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        s = id_to_tok.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif s in added:
            tokens.append(s)
            types.append(gguf.TokenType.CONTROL if added[s].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(s)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                        (writer.add_eos_token_id, tokenizer.eos_token_id),
                        (writer.add_pad_token_id, tokenizer.pad_token_id),
                        (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if tid is not None:
            setter(int(tid))
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp names pre-tokenizers; the llama-3 split regex is 'llama-bpe', anything else 'default'."""
    text = json.dumps(spec.get("pre_tokenizer"))
    return "llama-bpe" if r"(?i:'s|'t|'re|'ve|'m|'ll|'d)" in text and r"\\p{N}{1,3}" in text else "default"


def write_gguf(model, tokenizer, out_path: str, gguf_type: str = "f16", name: str = "") -> str:
    """One GGUF file (llama architecture) with weights in `gguf_type` (1-D norms stay f32)."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type: {gguf_type!r} is not accepted; expected one of {', '.join(GGUF_TYPES)}")
    model = merged_copy(model)
    cfg = model.config
    if cfg.model_type not in GGUF_ARCHS:
        raise ValueError(f"gguf: model_type {cfg.model_type!r} is not supported; "
                         f"supported: {', '.join(GGUF_ARCHS)} (llama architecture)")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("gguf: llama models with attention/MLP biases are not supported")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ValueError(f"gguf: hidden_act {cfg.hidden_act!r} is not supported (llama uses silu)")
    n_layers, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    vocab = cfg.vocab_size
    theta, rope = _rope(cfg)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"gguf: rope_type {rope_type!r} is not supported (default, linear, llama3)")
    qtype, ftype = _gguf_types(gguf_type)

    # the tensors in writing order: (gguf name, torch tensor, transform)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    plan: list[tuple[str, torch.Tensor]] = []
    if rope_type == "llama3":
        plan.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(cfg)))
    for hf_name, t in _untied_state(model).items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        g = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise ValueError(f"gguf: no GGUF name for tensor {hf_name!r}")
        if hf_name.endswith("self_attn.q_proj.weight"):
            t = permute_qk(t, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            t = permute_qk(t, n_kv)
        plan.append((g, t))

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    writer = gguf.GGUFWriter(out_path, "llama")
    writer.add_name(name or os.path.splitext(os.path.basename(out_path))[0])
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(n_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    if head_dim != cfg.hidden_size // n_head:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(int(vocab))
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        _tokenizer_metadata(writer, tokenizer, vocab)

    # two passes: tensor infos first (shapes and sizes only), then the data one tensor at a time,
    # so that only one converted tensor is in memory at once
    for g, t in plan:
        shape, raw = _planned(t, qtype)
        writer.add_tensor_info(g, shape, np.dtype(np.uint8) if raw is not None else np.dtype(_np_dtype(t, qtype)),
                               _nbytes(t, qtype), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for g, t in plan:
        writer.write_tensor_data(_encode_tensor(t, qtype))
    writer.close()
    return out_path


def _stored_type(t: torch.Tensor, qtype):
    """The ggml type a tensor is stored as (mirrors _encode_tensor)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    if t.ndim == 1 or qtype == Q.F32:
        return Q.F32
    if qtype == Q.F16:
        return Q.F16
    if t.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def _np_dtype(t, qtype):
    from gguf import GGMLQuantizationType as Q

    return np.float32 if _stored_type(t, qtype) == Q.F32 else np.float16


def _planned(t: torch.Tensor, qtype):
    """(shape to declare, raw ggml type or None) for add_tensor_info."""
    from gguf import GGMLQuantizationType as Q, quant_shape_to_byte_shape

    st = _stored_type(t, qtype)
    if st in (Q.F32, Q.F16):
        return tuple(t.shape), None
    return quant_shape_to_byte_shape(tuple(t.shape), st), st


def _nbytes(t: torch.Tensor, qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[_stored_type(t, qtype)]
    return t.numel() // block * size


# ----------------------------------------------------------------------------- one entry point

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
