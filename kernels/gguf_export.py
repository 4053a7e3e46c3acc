"""GGUF export (llama architecture), written tensor by tensor with `gguf.GGUFWriter`.

No Ray here. HF names map to GGUF names through the gguf package's tensor map; q/k projections
are reordered from the HF "rotate half" layout to the adjacent-pairs layout that GGUF llama RoPE
uses (see `permute_qk`); llama3 RoPE scaling is written as a rope_freqs tensor; the tokenizer
(byte-level BPE) goes into the file's metadata.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from kernels.merge import merged_copy
from kernels.safetensors_io import untied_state

GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")
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
    for hf_name, t in untied_state(model).items():
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
