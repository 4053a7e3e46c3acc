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
from actors.rollout import RolloutConfig, RolloutWorker, trim_completion
from kernels.model import LoraConfig, ModelConfig
from kernels.tokenizer import load_tokenizer

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


def test_trim_completion_eos_and_stop(tiny_tokenizer_dir):
    tok = load_tokenizer(tiny_tokenizer_dir)
    ids = tok("12 + 3 = 15\n#### 15", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    lps = [-0.1] * (len(ids) + 3)
    got, lp, text, finish = trim_completion(tok, ids + [eos, 5, 6], lps, {eos}, [])
    assert got == ids + [eos] and len(lp) == len(got) and finish == "stop" and text == "12 + 3 = 15\n#### 15"
    got, lp, text, finish = trim_completion(tok, ids, lps[:len(ids)], {eos}, ["####"])
    assert finish == "stop" and text == "12 + 3 = 15\n" and len(got) < len(ids) and len(lp) == len(got)
    got, lp, text, finish = trim_completion(tok, ids, lps[:len(ids)], {eos}, [])
    assert finish == "length" and got == ids


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
@pytest.mark.parametrize("transport", ["object_store", "broadcast"])
def test_groups_sync_over_ray(ray_local, tiny_tokenizer_dir, transport):
    """RolloutGroup + LearnerGroup + WeightSync on local Ray: object store, or a gloo broadcast group."""
    from cluster.grpo_group import LearnerGroup, RolloutGroup, WeightSync

    rcfg = RolloutConfig(n=2, max_tokens=8, num_workers=2, num_cpus=0.25, transport=transport)
    gcfg = GRPOConfig(lr=2e-2, micro_batch_size=8, num_cpus=0.25)
    rollouts = RolloutGroup(MODEL, rcfg, tiny_tokenizer_dir, vocab_size=VOCAB, seed=0, num_threads=1)
    learners = LearnerGroup(MODEL, gcfg, vocab_size=VOCAB, seed=0, num_threads=1)
    try:
        sync = WeightSync(learners, rollouts, rcfg, MODEL.lora)
        groups = rollouts.generate(PROMPTS, seed=0)
        assert len(groups) == 3
        s = _flat(groups)
        learners.update(make_batch(s, [1.0 if i % 2 else -1.0 for i in range(len(s))]))
        info = sync.push(version=1)
        assert info["sync_transport"] == transport and info["sync_s"] > 0
        names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"]
        sums = rollouts.weight_checksum(names)
        assert sums[0] == sums[1]
        fresh = _flat(rollouts.generate(PROMPTS, seed=1))
        b = make_batch(fresh, [0.0] * len(fresh))
        assert logprob_mismatch(learners.compute_logprobs(b), b["rollout_logprobs"])["max_abs"] < 1e-4
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
