"""Rollout: hf sampling with logprobs, the train-inference mismatch check, weight sync verbs.

GPU tests (vLLM colocated on one GPU; vLLM + learner on two GPUs with NCCL) run on the device
machine; see docs/grpo.md for the command.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from actors.learner import GRPOConfig, Learner, logprob_mismatch, make_batch
from actors.rollout import RolloutConfig, RolloutWorker
from kernels.model import LoraConfig, ModelConfig
from kernels.tokenizer import load_tokenizer
from lora_helpers import logit_hook

VOCAB = 512
MODEL = ModelConfig(preset="tiny", dtype="float32", finetune="lora", lora=LoraConfig(r=8, alpha=16))
PROMPTS = [[{"role": "user", "content": "Ava has 3 apples. Ava gets 4 more. How many apples does Ava have now?"}],
           [{"role": "user", "content": "A shop had 12 pens and sold 5. How many pens does the shop have now?"}],
           "There are 7 coins"]


@pytest.fixture(scope="module")
def worker(tiny_tokenizer_dir):
    return RolloutWorker(MODEL, RolloutConfig(n=3, max_tokens=12, batch_size=2), tiny_tokenizer_dir,
                         vocab_size=VOCAB, seed=0)


def _flat(groups):
    return [s for g in groups for s in g]


def test_generate_shapes_logprobs_finish(worker, tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    groups = worker.generate(PROMPTS, seed=1)
    assert len(groups) == 3 and all(len(g) == 3 for g in groups)
    for g in groups:
        assert len({tuple(s.prompt_token_ids) for s in g}) == 1
        for s in g:
            assert 1 <= len(s.completion_token_ids) <= 12
            assert len(s.logprobs) == len(s.completion_token_ids)
            assert all(lp <= 0 for lp in s.logprobs)
            assert s.finish_reason in ("stop", "length")
            if s.finish_reason == "length":
                assert len(s.completion_token_ids) == 12
            else:
                assert s.completion_token_ids[-1] == tok.eos_token_id
    # the chat prompt ends with the generation prompt of the template
    assert tok.decode(groups[0][0].prompt_token_ids).endswith("<|im_start|>assistant\n")
    # seeded: same seed, same samples; another seed, other samples
    again = worker.generate(PROMPTS, seed=1)
    assert [s.completion_token_ids for s in _flat(again)] == [s.completion_token_ids for s in _flat(groups)]
    other = worker.generate(PROMPTS, seed=2)
    assert [s.completion_token_ids for s in _flat(other)] != [s.completion_token_ids for s in _flat(groups)]


def test_greedy_n_copies_and_ignore_eos(worker):
    groups = worker.generate(PROMPTS[:1], n=2, temperature=0.0, seed=0)
    assert groups[0][0].completion_token_ids == groups[0][1].completion_token_ids


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_train_inference_mismatch_hf(worker, temperature):
    """The learner's logprobs of the sampled tokens equal the rollout's (fp32 CPU: ~1e-6)."""
    learner = Learner(MODEL, GRPOConfig(micro_batch_size=4), vocab_size=VOCAB, seed=0,
                      logprob_temperature=temperature)
    samples = _flat(worker.generate(PROMPTS, temperature=temperature, seed=3))
    batch = make_batch(samples, [0.0] * len(samples))
    mm = logprob_mismatch(learner.compute_logprobs(batch), batch["rollout_logprobs"])
    assert mm["tokens"] > 10
    # fp32 on CPU: left-padded KV-cached decoding vs one right-padded forward differ by round-off only
    assert mm["max_abs"] < 1e-4, mm


# trim_completion's own test lives in tests/kernels/test_generation.py (kernels.generation owns it)


@pytest.fixture(scope="module")
def im_start_eos_dir(tmp_path_factory, tiny_tokenizer_dir):
    """The trained tokenizer saved with eos <|im_start|> while its ChatML template closes each
    assistant turn with <|im_end|> (the shape of SmolLM2-135M-Instruct's tokenizer)."""
    tok = load_tokenizer(tiny_tokenizer_dir)
    tok.eos_token = "<|im_start|>"
    out = str(tmp_path_factory.mktemp("im-start-eos"))
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def im_start_worker(im_start_eos_dir):
    w = RolloutWorker(MODEL, RolloutConfig(n=2, max_tokens=6, batch_size=4), im_start_eos_dir,
                      vocab_size=VOCAB, seed=0)
    # the tiny preset's generation_config names id 2 (<|im_end|>) as eos: drop it, so that only the
    # tokenizer and its chat template tell where a completion ends
    w.engine.model.generation_config.eos_token_id = None
    return w


def _truncation_rate(samples):
    """What jobs/grpo.py reports as truncation_rate."""
    return sum(s.finish_reason == "length" for s in samples) / len(samples)


def test_rollout_stops_at_chat_template_end_of_turn(im_start_worker):
    w = im_start_worker
    im_start, im_end = w.tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert w.tok.eos_token_id == im_start
    # one batch (batch_size 4 >= 3 prompts): prefill + 1 decode step, then <|im_end|>
    with logit_hook(w.engine.model, [im_end], 1e4, after_calls=2):
        samples = _flat(w.generate(PROMPTS, seed=1))
    for s in samples:
        assert s.finish_reason == "stop", s
        assert len(s.completion_token_ids) == 3 and s.completion_token_ids[-1] == im_end
        assert len(s.logprobs) == 3 and "<|im_end|>" not in s.text
    assert _truncation_rate(samples) == 0.0


def test_rollout_length_only_at_max_tokens(im_start_worker):
    w = im_start_worker
    stops = w.tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    with logit_hook(w.engine.model, stops, -1e4):  # no stop id can be sampled
        samples = _flat(w.generate(PROMPTS, seed=1))
    assert all(s.finish_reason == "length" and len(s.completion_token_ids) == 6 == len(s.logprobs)
               for s in samples)
    assert _truncation_rate(samples) == 1.0


@pytest.fixture()
def fake_vllm(monkeypatch, tmp_path):
    """Just the vLLM API actors/rollout_vllm.VLLMEngine uses for sampling: LLM(**kw).generate and
    SamplingParams; each completion is scripted as (token_ids, finish_reason)."""
    import sys
    import types
    from types import SimpleNamespace as NS

    from actors import rollout_vllm

    seen = {"script": []}

    class SamplingParams:
        def __init__(self, **kw):
            seen["params"] = kw
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, **kw):
            seen["llm"] = kw

        def generate(self, prompts, params, lora_request=None, use_tqdm=False):
            seen["prompts"] = prompts
            outs = []
            for _ in prompts:
                outputs = [NS(index=i, token_ids=ids, finish_reason=reason,
                              logprobs=[{t: NS(logprob=-0.5)} for t in ids])
                           for i, (ids, reason) in enumerate(seen["script"][:params.n])]
                outs.append(NS(outputs=outputs))
            return outs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    for k, v in rollout_vllm.VLLM_ENV.items():  # the engine sets these; restored after the test
        monkeypatch.setenv(k, os.environ.get(k, v))
    monkeypatch.setattr(rollout_vllm.tempfile, "mkdtemp", lambda prefix="": str(tmp_path))
    return seen


def test_vllm_engine_passes_stop_token_ids(fake_vllm, im_start_eos_dir, tiny_merged_dir):
    from actors.rollout_vllm import VLLMEngine

    tok = load_tokenizer(im_start_eos_dir)
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    model_dir = tiny_merged_dir(torch.float32)  # its generation_config.json names id 2 (<|im_end|>) too
    eng = VLLMEngine(ModelConfig(path=model_dir), RolloutConfig(backend="vllm", n=3, max_tokens=4),
                     im_start_eos_dir, tok)
    fake_vllm["script"] = [([7, im_end, 9], "stop"),      # vLLM returned the stop id (and more)
                           ([7, 8], "stop"),              # vLLM ended on a stop id it did not return
                           ([7, 8, 9, 10], "length")]
    (row,) = eng.generate([[{"role": "user", "content": "1 + 2"}]], n=3, temperature=1.0, top_p=1.0,
                          max_tokens=4, stop=[], seed=0, ignore_eos=False)
    assert set(fake_vllm["params"]["stop_token_ids"]) == {im_start, im_end}
    assert fake_vllm["prompts"][0]["prompt_token_ids"] == tok.apply_chat_template(
        [{"role": "user", "content": "1 + 2"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert [(c.token_ids, c.finish_reason) for c in row] == [([7, im_end], "stop"), ([7, 8], "stop"),
                                                             ([7, 8, 9, 10], "length")]
    assert [len(c.logprobs) for c in row] == [2, 2, 4]
    eng.generate([[1, 2, 3]], n=1, temperature=0.0, top_p=1.0, max_tokens=4, stop=[], seed=0, ignore_eos=True)
    assert fake_vllm["params"]["stop_token_ids"] is None and fake_vllm["params"]["ignore_eos"] is True
    assert fake_vllm["prompts"][0]["prompt_token_ids"] == [1, 2, 3]


def test_update_weights_and_adapter_sync_make_rollout_match_learner(tiny_tokenizer_dir):
    cfg = RolloutConfig(n=2, max_tokens=10)
    merged_w = RolloutWorker(MODEL, cfg, tiny_tokenizer_dir, vocab_size=VOCAB, seed=0)
    adapter_w = RolloutWorker(MODEL, cfg, tiny_tokenizer_dir, vocab_size=VOCAB, seed=0)
    learner = Learner(MODEL, GRPOConfig(lr=2e-2, micro_batch_size=8, max_grad_norm=0), vocab_size=VOCAB, seed=0)
    s = _flat(merged_w.generate(PROMPTS, seed=4))
    learner.update(make_batch(s, [1.0 if i % 2 else -1.0 for i in range(len(s))]))
    probe = make_batch(s, [0.0] * len(s))
    new_lp = learner.compute_logprobs(probe)
    assert logprob_mismatch(new_lp, probe["rollout_logprobs"])["max_abs"] > 1e-2  # the update moved the policy

    info = merged_w.update_weights(learner.state_for_sync("merged"), version=1)
    assert info["tensors"] == 28 and merged_w.weights_version() == 1
    adapter_w.load_adapter(learner.state_for_sync("adapter"), MODEL.lora, version=1)
    for w in (merged_w, adapter_w):
        fresh = _flat(w.generate(PROMPTS, seed=5))
        assert all(x.weights_version == 1 for x in fresh)
        b = make_batch(fresh, [0.0] * len(fresh))
        assert logprob_mismatch(learner.compute_logprobs(b), b["rollout_logprobs"])["max_abs"] < 1e-4


@pytest.mark.e2e
def test_groups_sync_over_ray(ray_local, tiny_tokenizer_dir):
    """RolloutGroup + LearnerGroup + WeightSync on local Ray: an update pushed through the object
    store, then another through a gloo broadcast group (the same actors: one start-up for both)."""
    from dataclasses import replace

    from cluster.grpo_group import LearnerGroup, RolloutGroup, WeightSync

    rcfg = RolloutConfig(n=2, max_tokens=8, num_workers=2, num_cpus=0.25, transport="object_store")
    gcfg = GRPOConfig(lr=2e-2, micro_batch_size=8, num_cpus=0.25)
    rollouts = RolloutGroup(MODEL, rcfg, tiny_tokenizer_dir, vocab_size=VOCAB, seed=0, num_threads=1)
    learners = LearnerGroup(MODEL, gcfg, vocab_size=VOCAB, seed=0, num_threads=1)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"]
    try:
        before = rollouts.weight_checksum(names)[0]
        for version, transport in enumerate(("object_store", "broadcast"), start=1):
            sync = WeightSync(learners, rollouts, replace(rcfg, transport=transport), MODEL.lora)
            groups = rollouts.generate(PROMPTS, seed=version)
            assert len(groups) == 3
            s = _flat(groups)
            learners.update(make_batch(s, [1.0 if i % 2 else -1.0 for i in range(len(s))]))
            info = sync.push(version=version)
            assert info["sync_transport"] == transport and info["sync_s"] > 0
            sums = rollouts.weight_checksum(names)
            assert sums[0] == sums[1] != before  # both workers got the new weights
            before = sums[0]
            fresh = _flat(rollouts.generate(PROMPTS, seed=10 + version))
            b = make_batch(fresh, [0.0] * len(fresh))
            assert logprob_mismatch(learners.compute_logprobs(b), b["rollout_logprobs"])["max_abs"] < 1e-4, transport
    finally:
        rollouts.shutdown()
        learners.shutdown()


# ------------------------------------------------------------------------------------- GPU

def _gpu_model_dir(tmp_path_factory, tok_dir, preset="llama-3.2-1b"):
    """A random-weight preset saved as a model folder (vLLM loads from disk), with a local tokenizer."""
    from kernels.model import build_model

    out = str(tmp_path_factory.mktemp(preset))
    model = build_model(ModelConfig(preset=preset, dtype="bfloat16"), seed=0)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(tok_dir).save_pretrained(out)
    return out


def _vllm_steps(model_dir, tok_dir, rcfg: RolloutConfig, gcfg: GRPOConfig, steps: int = 5):
    """GRPO-shaped loop with random advantages: after each sync, vLLM's logprobs of its sampled
    tokens must match the learner's; prints the step-time breakdown."""
    import ray

    from cluster.grpo_group import LearnerGroup, Placement, RolloutGroup, WeightSync

    mcfg = ModelConfig(path=model_dir, tokenizer=tok_dir, finetune="lora", lora=LoraConfig(r=16, alpha=32),
                       dtype="bfloat16")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False)
    placement = Placement.build(rcfg, gcfg)
    t = time.perf_counter()
    rollouts = RolloutGroup(mcfg, rcfg, tok_dir, placement=placement)
    learners = LearnerGroup(mcfg, gcfg, logprob_temperature=rcfg.temperature, max_len_norm=rcfg.max_tokens,
                            placement=placement)
    sync = WeightSync(learners, rollouts, rcfg)
    print(f"\n[vllm-test] start {time.perf_counter() - t:.1f}s  transport={sync.transport}")
    prompts = [f"problem {i}: " + "1 + 2 = 3. " * (i % 5) for i in range(16)]
    # bf16 on both sides, different kernels (vLLM paged attention vs HF sdpa): per-token logprob
    # differences of a few 1e-2 are expected; the weight checksums prove the sync itself
    tol_mean, tol_max = 0.05, 1.0
    probe = ["model.layers.0.self_attn.o_proj.weight", "model.layers.15.mlp.down_proj.weight"]
    before = rollouts.weight_checksum(probe)[0]
    g = torch.Generator().manual_seed(0)
    rows = []
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            samples = _flat(rollouts.generate(prompts, seed=step))
            t_gen = time.perf_counter() - t0
            assert all(len(s.completion_token_ids) == rcfg.max_tokens for s in samples)  # ignore_eos
            batch = make_batch(samples, torch.randn(len(samples), generator=g).tolist())
            mm = logprob_mismatch(learners.compute_logprobs(batch), batch["rollout_logprobs"])
            rollouts.sleep()
            t1 = time.perf_counter()
            m = learners.update(batch)
            t_upd = time.perf_counter() - t1
            shift = logprob_mismatch(learners.compute_logprobs(batch), batch["rollout_logprobs"])
            info = sync.push(version=step + 1)
            tokens = sum(len(s.completion_token_ids) for s in samples)
            rows.append((step, t_gen, t_upd, info["sync_s"], mm["mean_abs"], mm["max_abs"], shift["mean_abs"]))
            print(f"[vllm-test] step {step}: generate {t_gen:.2f}s ({tokens / t_gen:.0f} tok/s)  update {t_upd:.2f}s  "
                  f"sync {info['sync_s']:.3f}s (engine {info['sync_engine_s']:.3f}s)  "
                  f"mismatch mean {mm['mean_abs']:.4f} max {mm['max_abs']:.3f}  policy shift {shift['mean_abs']:.4f}  "
                  f"loss {m['loss']:.4f}", flush=True)
            assert mm["mean_abs"] < tol_mean and mm["max_abs"] < tol_max, mm
            engine = rollouts.weight_checksum(probe)
            learner = ray.get(learners.rank0.weight_checksum.remote(probe))
            for name in probe:  # every engine holds the learner's merged weights (bf16 sums)
                assert all(e[name] == pytest.approx(learner[name], rel=1e-3, abs=1e-2) for e in engine)
        after = rollouts.weight_checksum(probe)[0]
        assert any(after[n] != before[n] for n in probe), "the syncs did not change the engine's weights"
    finally:
        rollouts.shutdown()
        learners.shutdown()
    return rows


@pytest.mark.gpu
def test_vllm_colocated_logprobs_match_after_each_sync(tmp_path_factory, tiny_tokenizer_dir):
    pytest.importorskip("vllm")
    model_dir = _gpu_model_dir(tmp_path_factory, tiny_tokenizer_dir)
    rcfg = RolloutConfig(backend="vllm", n=4, max_tokens=128, ignore_eos=True, num_gpus=0.5, num_cpus=1,
                         placement="colocated", gpu_memory_utilization=0.3, max_model_len=1024)
    gcfg = GRPOConfig(prompts_per_step=16, lr=1e-3, micro_batch_size=8, num_gpus=0.5, num_cpus=1,
                      logprob_chunk_size=2048)
    _vllm_steps(model_dir, tiny_tokenizer_dir, rcfg, gcfg, steps=int(os.environ.get("VLLM_TEST_STEPS", "6")))


@pytest.mark.gpu
def test_vllm_separate_gpus_nccl_broadcast(tmp_path_factory, tiny_tokenizer_dir):
    pytest.importorskip("vllm")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (kind nvidia-h200-x2)")
    model_dir = _gpu_model_dir(tmp_path_factory, tiny_tokenizer_dir)
    rcfg = RolloutConfig(backend="vllm", n=4, max_tokens=128, ignore_eos=True, num_gpus=1, num_cpus=1,
                         placement="separate", transport="broadcast", gpu_memory_utilization=0.5,
                         max_model_len=1024)
    gcfg = GRPOConfig(prompts_per_step=16, lr=1e-3, micro_batch_size=8, num_gpus=1, num_cpus=1,
                      logprob_chunk_size=2048)
    _vllm_steps(model_dir, tiny_tokenizer_dir, rcfg, gcfg, steps=5)
