"""kernels/export.py and jobs/export.py: merged16 (sharded) reloads and generates like adapter-on-base,
GGUF reads back equal (f16) or within q8_0 error, q/k permutation matches GGUF RoPE, bad inputs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml

from kernels import export as ex
from kernels.generation import generate_completions
from kernels.model import PRESETS, ModelConfig, add_lora, build_model, save_adapter
from kernels.tokenizer import load_tokenizer
from lora_helpers import quantize_nf4_on_cpu, randomise_lora

PROMPTS = ["Ava has 3 apples. Ava gets 4 more. How many apples does Ava have now?",
           "A shop had 9 cards and sold 2. How many cards does the shop have now?", "1 + 2 ="]


def _base(peft_model):
    """The base model without adapters (the run's preset base, rebuilt)."""
    vocab = peft_model.get_base_model().config.vocab_size
    return build_model(ModelConfig(preset="tiny", dtype="float32"), vocab_size=vocab, seed=7)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A finished run's folder as SFT writes it: config.yaml, adapter/, tokenizer/ (preset base)."""
    root = tmp_path_factory.mktemp("run")
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.save_pretrained(str(root / "tokenizer"))
    cfg = ModelConfig(preset="tiny", dtype="float32")
    vocab = max(PRESETS["tiny"]["vocab_size"], len(tok))  # the SFT job's rule for presets
    model = add_lora(build_model(cfg, vocab_size=vocab, seed=7), cfg)
    randomise_lora(model)
    save_adapter(model, str(root / "adapter"))
    conf = {"output_dir": str(root), "seed": 7,
            "model": {"preset": "tiny", "path": "", "finetune": "lora", "dtype": "auto",
                      "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
                      "config_overrides": {}}}
    (root / "config.yaml").write_text(yaml.safe_dump(conf))
    model.eval()
    return str(root), model, tok


def test_resolve_run(run_dir):
    root, _, _ = run_dir
    src = ex.resolve_source(root)
    assert src.kind == "run" and src.adapter_dir.endswith("adapter") and src.tokenizer_dir.endswith("tokenizer")
    assert src.base_path == "" and src.seed == 7 and src.finetune == "lora"


def test_merged16_generates_like_adapter_on_base(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    root, peft_model, tok = run_dir
    out = ex.export(root, "merged16", str(tmp_path / "m32"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = generate_completions(peft_model, tok, PROMPTS, max_new_tokens=12)
    got = generate_completions(merged, tok, PROMPTS, max_new_tokens=12)
    assert [r[0].token_ids for r in got] == [r[0].token_ids for r in ref]
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        # fp32 merge vs fp32 unmerged forward: only summation-order differences
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
    # bf16 export (the default) keeps the greedy tokens on this model
    out16 = ex.export(root, "merged16", str(tmp_path / "m16"))
    m16 = AutoModelForCausalLM.from_pretrained(out16)
    assert next(m16.parameters()).dtype == torch.bfloat16
    assert json.loads(open(os.path.join(out16, "config.json")).read())["dtype"] == "bfloat16"
    assert load_tokenizer(out16).get_vocab() == tok.get_vocab()


def test_merged16_sharding_index_and_reload(run_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    root, peft_model, tok = run_dir
    out = ex.export(root, "merged16", str(tmp_path / "sharded"), dtype="float32", max_shard_size="300KB")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    total = 0
    for f in shards:
        with safe_open(os.path.join(out, f), "pt") as sf:
            size = sum(sf.get_tensor(k).numel() * 4 for k in sf.keys())
            assert set(sf.keys()) == {k for k, v in index["weight_map"].items() if v == f}
        total += size
    assert index["metadata"]["total_size"] == total
    assert "lm_head.weight" not in index["weight_map"]  # tied to embed_tokens: stored once
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)
    # exporting again with one shard removes the stale shards and the index
    ex.export(root, "merged16", out, dtype="float32", max_shard_size="1GB")
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]


def test_parse_size():
    assert ex.parse_size("5GB") == 5 * 10**9
    assert ex.parse_size("2GiB") == 2 * 2**30
    assert ex.parse_size("500mb") == 500 * 10**6
    assert ex.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="max_shard_size"):
        ex.parse_size("lots")


def test_adapter_folder_with_local_base(run_dir, tmp_path):
    root, peft_model, tok = run_dir
    base_dir = tmp_path / "base"
    _base(peft_model).save_pretrained(str(base_dir))
    # an adapter exported to a new place names the base we pass; then it resolves on its own
    adapter = ex.export(root, "adapter", str(tmp_path / "adapter"), base=str(base_dir))
    assert os.path.exists(os.path.join(adapter, "adapter_model.safetensors"))
    acfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert acfg["base_model_name_or_path"] == str(base_dir)
    src = ex.resolve_source(adapter)
    assert src.kind == "adapter" and src.base_path == str(base_dir) and src.tokenizer_dir == adapter
    model, _ = ex.load_merged(src)
    ids = tok(PROMPTS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- GGUF

def _rope_half(x, pos, theta):
    """HF llama RoPE: rotate the pairs (x[i], x[i + d/2]). x: [H, d]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * cos + rot * sin


def _rope_pairs(x, pos, theta):
    """GGUF llama RoPE (ggml 'normal' mode): rotate the adjacent pairs (x[2i], x[2i + 1]). x: [H, d]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * inv
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * ang.cos() - b * ang.sin()
    out[..., 1::2] = a * ang.sin() + b * ang.cos()
    return out


def test_permute_qk_matches_gguf_rope():
    torch.manual_seed(0)
    n_heads, d, hidden = 3, 8, 10
    w = torch.randn(n_heads * d, hidden, dtype=torch.float64)
    x = torch.randn(hidden, dtype=torch.float64)
    wp = ex.permute_qk(w, n_heads)
    for pos in (0, 1, 5, 37):
        hf = _rope_half((w @ x).view(n_heads, d), pos, 10000.0)            # [H, d], HF order
        gg = _rope_pairs((wp @ x).view(n_heads, d), pos, 10000.0)          # [H, d], GGUF order
        # the same rotated vector, rows reordered per head the way permute_qk reorders weight rows
        torch.testing.assert_close(gg.reshape(-1, 1), ex.permute_qk(hf.reshape(-1, 1), n_heads))
    torch.testing.assert_close(ex.unpermute_qk(wp, n_heads), w)
    # attention scores q.k are the same in both layouts
    wk = torch.randn(n_heads * d, hidden, dtype=torch.float64)
    y = torch.randn(hidden, dtype=torch.float64)
    s_hf = (_rope_half((w @ x).view(n_heads, d), 3, 1e4) * _rope_half((wk @ y).view(n_heads, d), 9, 1e4)).sum(-1)
    s_gg = (_rope_pairs((wp @ x).view(n_heads, d), 3, 1e4)
            * _rope_pairs((ex.permute_qk(wk, n_heads) @ y).view(n_heads, d), 9, 1e4)).sum(-1)
    torch.testing.assert_close(s_hf, s_gg)


def _expected_tensors(model):
    """GGUF name -> the source tensor in GGUF layout (q/k permuted), from the merged model."""
    import gguf

    cfg = model.config
    nmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.float()
        if name.endswith("q_proj.weight"):
            t = ex.permute_qk(t, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            t = ex.permute_qk(t, cfg.num_key_value_heads)
        out[nmap.get_name(name, try_suffixes=(".weight",))] = t.numpy()
    return out


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_gguf_f16_reads_back_equal(run_dir, tmp_path):
    import gguf

    root, peft_model, tok = run_dir
    path = ex.export(root, "gguf", str(tmp_path / "m.gguf"), gguf_type="f16")
    merged, _ = ex.load_merged(ex.resolve_source(root))
    expected = _expected_tensors(merged)
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(expected)  # every tensor, output.weight absent (tied embeddings)
    for name, t in got.items():
        src = expected[name]
        if src.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(t.data).reshape(src.shape), src)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(np.asarray(t.data).reshape(src.shape), src.astype(np.float16))
    cfg = merged.config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == cfg.num_hidden_layers
    assert _field(reader, "llama.embedding_length") == cfg.hidden_size
    assert _field(reader, "llama.feed_forward_length") == cfg.intermediate_size
    assert _field(reader, "llama.attention.head_count") == cfg.num_attention_heads
    assert _field(reader, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert _field(reader, "llama.rope.dimension_count") == cfg.head_dim
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size  # padded to the embedding rows
    vocab = tok.get_vocab()
    assert all(tokens[i] == s for s, i in vocab.items())
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert len(_field(reader, "tokenizer.ggml.merges")) > 0
    assert "<|im_start|>" in _field(reader, "tokenizer.chat_template")


def test_gguf_q8_0_within_quantisation_error(run_dir, tmp_path):
    import gguf
    from gguf.quants import dequantize

    root, _, _ = run_dir
    path = ex.export(root, "gguf", str(tmp_path), gguf_type="q8_0")
    assert path.endswith("model-q8_0.gguf")
    merged, _ = ex.load_merged(ex.resolve_source(root))
    expected = _expected_tensors(merged)
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == len(expected)
    for t in reader.tensors:
        src = expected[t.name]
        if src.ndim == 1:
            np.testing.assert_array_equal(np.asarray(t.data).reshape(src.shape), src)
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        deq = dequantize(np.asarray(t.data), t.tensor_type).reshape(src.shape)
        # q8_0: blocks of 32 share one f16 scale = absmax / 127; rounding error <= scale / 2
        # (+ the scale's own f16 rounding, relative 2^-11 of absmax)
        blocks = np.abs(src.reshape(-1, 32)).max(axis=1, keepdims=True)
        bound = blocks / 127 * 0.5 + blocks * 2.0 ** -10 + 1e-8
        assert np.all(np.abs(deq.reshape(-1, 32) - src.reshape(-1, 32)) <= bound), t.name
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_gguf_llama3_rope_untied_head_dim(tiny_tokenizer_dir, tmp_path):
    """A llama-3-shaped model: llama3 RoPE factors tensor, separate output.weight, explicit head_dim."""
    import gguf
    from transformers import AutoModelForCausalLM

    from kernels.model import hf_config

    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = hf_config("llama-3.2-1b", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=len(tok) + 5,
                    tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    path = ex.write_gguf(model, tok, str(tmp_path / "l3.gguf"), gguf_type="bf16")
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    assert "output.weight" in got and "rope_freqs.weight" in got
    factors = np.asarray(got["rope_freqs.weight"].data)
    assert factors.shape == (16,) and factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(32.0)
    torch.testing.assert_close(torch.from_numpy(factors.copy()), ex.llama3_rope_factors(cfg))
    assert _field(reader, "llama.attention.key_length") == 32
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(500000.0)
    assert got["blk.0.ffn_gate.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    deq = gguf.quants.dequantize(np.asarray(got["output.weight"].data), gguf.GGMLQuantizationType.BF16)
    ref = model.lm_head.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(deq.reshape(ref.shape), ref)


def test_gguf_rejects_other_architectures(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from kernels.model import hf_config

    cfg = hf_config("qwen2.5-0.5b", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, vocab_size=600)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="model_type 'qwen2' is not supported"):
        ex.write_gguf(model, None, str(tmp_path / "q.gguf"))
    with pytest.raises(ValueError, match="gguf_type"):
        ex.write_gguf(model, None, str(tmp_path / "q.gguf"), gguf_type="q4_k")


# ----------------------------------------------------------------------------- bad inputs, CLI

def test_missing_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ex.export(str(tmp_path / "nope"), "merged16")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a run output_dir"):
        ex.export(str(tmp_path / "empty"), "merged16")


def test_adapter_without_base(run_dir):
    root, _, _ = run_dir
    # a preset-built adapter names no base model
    with pytest.raises(ValueError, match="has no base model.*pass --base"):
        ex.resolve_source(os.path.join(root, "adapter"))


def test_adapter_naming_missing_base(run_dir, tmp_path):
    root, _, _ = run_dir
    import shutil

    ad = tmp_path / "ad"
    shutil.copytree(os.path.join(root, "adapter"), ad)
    acfg = json.load(open(ad / "adapter_config.json"))
    acfg["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (ad / "adapter_config.json").write_text(json.dumps(acfg))
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        ex.resolve_source(str(ad))


def test_run_without_adapter(tmp_path, tiny_tokenizer_dir):
    import shutil

    (tmp_path / "config.yaml").write_text("model: {preset: tiny}\n")
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="has no adapter/"):
        ex.resolve_source(str(tmp_path))


def test_unknown_format_and_options(run_dir):
    root, _, _ = run_dir
    with pytest.raises(ValueError, match="export format 'onnx' is not accepted; expected one of adapter, merged16"):
        ex.export(root, "onnx")
    with pytest.raises(ValueError, match="gguf_type 'q4' is not accepted"):
        ex.export(root, "gguf", gguf_type="q4")
    with pytest.raises(ValueError, match="dtype 'int8' is not accepted"):
        ex.export(root, "merged16", dtype="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_merged4_on_cpu_says_why(run_dir):
    root, _, _ = run_dir
    with pytest.raises(RuntimeError, match="merged4 needs a CUDA GPU and bitsandbytes"):
        ex.export(root, "merged4")


def test_cli(run_dir, tmp_path, capsys):
    from jobs.export import main

    root, _, _ = run_dir
    assert main([root, "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 0
    assert os.path.getsize(tmp_path / "x.gguf") > 0
    assert main([root, "--format", "onnx"]) == 2
    assert "export format 'onnx' is not accepted" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--format", "merged16"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "jobs.export", "--help"], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--gguf-type" in r.stdout


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_merged4_roundtrip_gpu(run_dir, tmp_path):
    """merged4 loads back as NF4 without quantising again, generates, and trains with a new adapter."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    root, peft_model, tok = run_dir
    out = ex.export(root, "merged4", str(tmp_path / "m4"))
    model = ex.load_merged4(out)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no NF4 layers"
    saved = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            saved.update(load_file(os.path.join(out, f)))
    name = "model.layers.0.self_attn.q_proj.weight"
    loaded = dict(model.named_parameters())[name]
    assert torch.equal(loaded.data.cpu().view(torch.uint8).flatten(), saved[name].view(torch.uint8).flatten())
    # the NF4 weights are the merged weights quantised once (checked before any forward)
    _check_merged4_weights(peft_model, model, "cuda")
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"].cuda()
    try:
        with torch.no_grad():
            ref = peft_model.cuda()(ids).logits.float()
    finally:
        peft_model.cpu()  # the module's fixture: leave it where the other tests expect it
    _check_merged4_logits(model, out, ids, ref)
    assert generate_completions(model, tok, PROMPTS[:1], max_new_tokens=4)[0][0].token_ids
    # training: a fresh adapter on the NF4 base takes a step
    train = add_lora(ex.load_merged4(out, for_training=True), ModelConfig(preset="tiny", finetune="qlora"))
    loss = train(ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None for n, p in train.named_parameters() if "lora_" in n)


@pytest.mark.gpu
def test_qlora_run_export_gpu(tiny_tokenizer_dir, tmp_path):
    """A QLoRA run (kernels.qlora NF4 base on CUDA): export rebuilds the same NF4 base, dequantises
    it and merges; the merged weights are exactly dequant(W) + B A scale."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    from kernels.qlora import build_qlora_model

    tok = load_tokenizer(tiny_tokenizer_dir)
    root = tmp_path / "qrun"
    tok.save_pretrained(str(root / "tokenizer"))
    cfg = ModelConfig(preset="tiny", finetune="qlora")
    vocab = max(PRESETS["tiny"]["vocab_size"], len(tok))
    model = add_lora(build_qlora_model(cfg, vocab_size=vocab, device="cuda", seed=3), cfg)
    randomise_lora(model)
    save_adapter(model, str(root / "adapter"))
    (root / "config.yaml").write_text(yaml.safe_dump(
        {"seed": 3, "trainer": {"use_gpu": True}, "model": {"preset": "tiny", "finetune": "qlora"}}))
    model.eval()
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"].cuda()
    with torch.no_grad():
        ref = model(ids).logits.float().cpu()
    out = ex.export(str(root), "merged16", str(tmp_path / "merged"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).cuda()
    with torch.no_grad():
        got = merged(ids).logits.float().cpu()
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)  # the reference computes in bf16
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.base_layer.weight
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    want = F.dequantize_4bit(w.data, w.quant_state).float() + (b @ a) * layer.scaling["default"]
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight.detach(), want, atol=1e-5, rtol=0)


def _check_merged4_weights(peft_model, m4, device):
    """Every adapted linear of `m4` (a merged4 model, before its first forward: bitsandbytes' CPU
    backend repacks weights then) holds NF4(bf16(W + s B A)): blocksize 64, double-quantised absmax,
    quantised once. Measured against the inherent error of that format, not a fixed logits bound: a
    wrong or missing merge moves a weight by |s B A| (here ~8x the NF4 error), quantising twice
    (e.g. an NF4 base + delta, re-quantised) adds a second NF4 error (~1.4x), another blocksize changes
    the absmax of every block."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    n = 0
    for name, mod in peft_model.named_modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "base_layer")):
            continue
        a, b = mod.lora_A["default"].weight.detach().float().cpu(), mod.lora_B["default"].weight.detach().float().cpu()
        want = mod.base_layer.weight.detach().float().cpu() + (b @ a) * mod.scaling["default"]  # fp32 merge
        layer = m4.get_submodule(name.replace("base_model.model.", "", 1))
        assert isinstance(layer, bnb.nn.Linear4bit), name
        qs = layer.weight.quant_state
        assert (qs.quant_type, qs.blocksize, qs.nested) == ("nf4", 64, True), (name, qs.quant_type, qs.blocksize)
        got = F.dequantize_4bit(layer.weight.data, qs).float().cpu()
        q, qs1 = F.quantize_4bit(want.to(device=device, dtype=torch.bfloat16), blocksize=64, compress_statistics=True,
                                 quant_type="nf4", quant_storage=torch.uint8)
        once = F.dequantize_4bit(q, qs1).float().cpu()  # the format's own error budget for this weight
        budget, err, off = (once - want).norm().item(), (got - want).norm().item(), (got - once).norm().item()
        # identical in practice (same quantiser, same bf16 input); the slack admits a few codes flipped by
        # a 1-ulp fp32 difference in the merge order (a flip moves one weight by one NF4 step)
        assert off <= 0.1 * budget and err <= 1.02 * budget, (name, err, budget, off)
        n += 1
    assert n, "no LoRA layers found"


def _check_merged4_logits(m4, out, ids, ref, device="cuda"):
    """The NF4 model computes what its stored weights compute: against those weights dequantised and
    run in fp32 only its bf16 compute differs (2**-9 relative per rounding, ~1e-2 over the tiny model,
    i.e. cosine ~0.9999; a model running other weights - e.g. re-quantised on load - lands near the
    NF4 error, ~0.98). The distance to base + adapter (`ref`) is then the NF4 error of the merged
    weights, whose exactness _check_merged4_weights asserts; it is printed, not bounded by a constant
    (random tiny weights: cosine ~0.98, the format's error, not a bug)."""
    cos = torch.nn.functional.cosine_similarity
    with torch.no_grad():
        got = m4(ids).logits.float()
        exact = ex.dequantize(ex.load_merged4(out, device=device)).float()(ids).logits.float()
    c_exact = cos(exact.flatten(), got.flatten(), dim=0).item()
    print(f"\n[merged4] logits cosine: vs its dequantised weights in fp32 {c_exact:.6f}, "
          f"vs base + adapter {cos(ref.flatten(), got.flatten(), dim=0).item():.4f} "
          f"(fp32 dequantised weights vs base + adapter {cos(ref.flatten(), exact.flatten(), dim=0).item():.4f})")
    assert c_exact > 0.999, c_exact


def _bnb_cpu_nf4():
    """bitsandbytes able to quantise NF4 on the CPU (0.46+), or None."""
    try:
        import bitsandbytes as bnb

        p = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, blocksize=64, quant_type="nf4",
                              compress_statistics=True, quant_storage=torch.uint8)._quantize("cpu")
        return bnb if p.quant_state is not None else None
    except Exception:
        return None


def test_merge_into_nf4_base_dequantises_first():
    """A PEFT model on a 4-bit base (as kernels.qlora builds it) merges into dequant(W) + delta,
    exactly, without re-quantising; the caller's model is untouched."""
    import copy

    bnb = _bnb_cpu_nf4()
    if bnb is None:
        pytest.skip("bitsandbytes cannot quantise NF4 on this CPU")
    import bitsandbytes.functional as F
    from torch import nn

    cfg = ModelConfig(preset="tiny", dtype="float32")
    model = build_model(cfg, vocab_size=300, seed=0)
    quantize_nf4_on_cpu(model)  # what kernels.qlora.quantize_linears_nf4 does, on the CPU
    pm = add_lora(model, cfg)
    randomise_lora(pm)
    layer = pm.base_model.model.model.layers[1].mlp.down_proj
    packed = layer.base_layer.weight.data.clone()
    merged = ex.merged_copy(pm)
    m_layer = merged.model.layers[1].mlp.down_proj
    assert type(m_layer) is nn.Linear and m_layer.weight.dtype == torch.float32
    base = F.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state).float()
    want = base + layer.get_delta_weight("default").float()
    assert torch.equal(m_layer.weight.detach(), want.detach())
    assert torch.equal(layer.base_layer.weight.data, packed)  # the caller's model is as it was
    assert "quantization_config" not in merged.config.to_dict() and not getattr(merged, "is_loaded_in_4bit", False)
    # PEFT's own merge writes the sum back into 4 bits: that is the loss avoided here
    requant = copy.deepcopy(pm).merge_and_unload().model.layers[1].mlp.down_proj
    lossy = F.dequantize_4bit(requant.weight.data, requant.weight.quant_state).float()
    assert (lossy - want).abs().max() > 1e-3


def test_merged4_roundtrip_on_bitsandbytes_cpu_backend(tiny_tokenizer_dir, tmp_path):
    """The merged4 code path end to end on bitsandbytes' CPU backend (the CLI still asks for CUDA):
    NF4 once, reloaded as saved (no second quantisation), generates, trains a new adapter."""
    if _bnb_cpu_nf4() is None:
        pytest.skip("bitsandbytes cannot quantise NF4 on this CPU")
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    tok = load_tokenizer(tiny_tokenizer_dir)
    # widths that are multiples of the 64-element NF4 block (the CPU backend's packing needs it)
    cfg = ModelConfig(preset="tiny", dtype="float32", config_overrides={"intermediate_size": 384})
    model = add_lora(build_model(cfg, vocab_size=512, seed=0), cfg)
    randomise_lora(model)
    out = ex.write_merged4(model, tok, str(tmp_path / "m4"), device="cpu")
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    saved = load_file(os.path.join(out, "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert saved[name].dtype == torch.uint8  # stored packed, 2 weights per byte
    m4 = ex.load_merged4(out, device="cpu")
    layer = m4.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert torch.equal(layer.weight.data.flatten(), saved[name].flatten())  # loaded as saved
    _check_merged4_weights(model, m4, "cpu")
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        ref = model(ids).logits.float()
    _check_merged4_logits(m4, out, ids, ref, device="cpu")
    assert generate_completions(m4, tok, PROMPTS[:1], max_new_tokens=3)[0][0].token_ids
    # a merged4 base takes a new adapter and a training step
    train = add_lora(ex.load_merged4(out, device="cpu", for_training=True), cfg)
    train.train()
    train(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in train.named_parameters() if "lora_A" in n)
    # merging into it again dequantises (bitsandbytes' values) instead of quantising twice
    dense = ex.dequantize(ex.load_merged4(out, device="cpu"))
    assert type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert "quantization_config" not in dense.config.to_dict()


# ----------------------------------------------------------------------------- llama-3.2-1b shape

@pytest.fixture(scope="module")
def llama1b_run(tmp_path_factory, tiny_tokenizer_dir):
    """A run folder for the llama-3.2-1b preset (random weights, seed 0) with a random LoRA adapter."""
    import time

    root = tmp_path_factory.mktemp("llama1b")
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.save_pretrained(str(root / "tokenizer"))
    cfg = ModelConfig(preset="llama-3.2-1b", dtype="float32")
    t0 = time.time()
    model = add_lora(build_model(cfg, vocab_size=PRESETS["llama-3.2-1b"]["vocab_size"], seed=0), cfg)
    randomise_lora(model)
    save_adapter(model, str(root / "adapter"))
    del model
    (root / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "model": {"preset": "llama-3.2-1b", "finetune": "lora"}}))
    print(f"\n[llama-3.2-1b] run folder built in {time.time() - t0:.1f}s")
    return str(root)


@pytest.mark.slow
@pytest.mark.gpu  # needs no GPU, but ~10 GiB of RAM and minutes of CPU: run on the device machine
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_llama1b_gguf_export_timing(llama1b_run, tmp_path, gguf_type):
    import time

    import gguf

    t0 = time.time()
    path = ex.export(llama1b_run, "gguf", str(tmp_path / f"l1b-{gguf_type}.gguf"), gguf_type=gguf_type)
    dt = time.time() - t0
    size = os.path.getsize(path)
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == 2 + 16 * 9 + 1  # embd, norm, 16 x 9 per block, rope_freqs (tied: no output)
    print(f"\n[llama-3.2-1b] gguf {gguf_type}: {dt:.1f}s, {size / 2**30:.2f} GiB")


@pytest.mark.gpu
def test_llama1b_merged4_export_timing(llama1b_run, tmp_path):
    import time

    t0 = time.time()
    out = ex.export(llama1b_run, "merged4", str(tmp_path / "m4"))
    dt = time.time() - t0
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    t1 = time.time()
    model = ex.load_merged4(out)
    load_s = time.time() - t1
    tok = load_tokenizer(out)
    texts = generate_completions(model, tok, PROMPTS[:2], max_new_tokens=8)
    assert all(r[0].token_ids for r in texts)
    print(f"\n[llama-3.2-1b] merged4: export {dt:.1f}s, {size / 2**30:.2f} GiB, reload {load_s:.1f}s")


def test_gguf_to_folder_loads_like_the_gguf(smollm2_folder):
    """A real .gguf file (SmolLM2-135M-Instruct, Q4_1) becomes a model folder (what vLLM and the
    GRPO job load): the same logits as transformers reading the .gguf itself, the same tokenizer
    beside it, and a second call reuses the folder."""
    from hub_cache import SMOLLM2_GGUF
    from kernels.model import gguf_to_folder

    out = smollm2_folder  # gguf_to_folder(SMOLLM2_GGUF, ..., dtype="float32"), once per session
    assert os.path.exists(os.path.join(out, "config.json")) and os.path.exists(os.path.join(out, "tokenizer_config.json"))
    direct = build_model(ModelConfig(path=SMOLLM2_GGUF, dtype="float32")).eval()
    folder = build_model(ModelConfig(path=out, dtype="float32")).eval()
    tok_dir, tok_gguf = load_tokenizer(out), load_tokenizer(SMOLLM2_GGUF)
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    ids = tok_dir.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok_gguf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(folder(input_ids=x).logits, direct(input_ids=x).logits)
    stamp = os.path.getmtime(os.path.join(out, "config.json"))
    assert gguf_to_folder(SMOLLM2_GGUF, out) == out and os.path.getmtime(os.path.join(out, "config.json")) == stamp
