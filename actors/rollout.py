"""Rollout: sample completions with per-token logprobs; receive new weights from the learner.

    worker = RolloutWorker(model_cfg, rollout_cfg, tokenizer_dir)       # ray.remote(...) in cluster/
    groups = worker.generate(prompts, n=8, temperature=1.0, max_tokens=64, seed=0)
    s = groups[0][0]; s.prompt_token_ids, s.completion_token_ids, s.logprobs, s.text, s.finish_reason
    worker.update_weights({name: tensor})        # merged weights (full names of the HF model)
    worker.load_adapter(adapter_state, lora_cfg)  # LoRA adapter-only sync

Backends: `hf` (transformers `generate`, CPU and tests; this file) and `vllm` (GPU;
actors/rollout_vllm.py, imported lazily). Prompts are plain strings or chat message lists (rendered
with the tokenizer's chat template and a generation prompt, like SFT and evaluation). Both
engines implement kernels.engine.Engine and stop on kernels.generation.stop_token_ids (eos, the
generation config's eos ids, the chat template's end-of-turn token).

Logprob convention (both backends, and what the learner recomputes): the log-probability of the
sampled token under softmax(logits / temperature) over the full vocabulary (temperature 0 -> 1),
i.e. before top-p truncation. With top_p = 1 this is exactly the sampling distribution.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from kernels.config_fields import check_ranges
from kernels.engine import Engine
from kernels.generation import HFGenerator, Prompt, encode_prompts
from kernels.model import LoraConfig, ModelConfig


@dataclass(frozen=True)
class RolloutConfig:
    """Rollout engines and sampling.

    backend: hf (transformers generate; CPU) | vllm (GPU).
    num_workers: rollout actors (each holds a full copy of the model); prompts are split among them.
    n: samples per prompt (the GRPO group size). temperature, top_p, max_tokens, stop: sampling.
    batch_size: hf only: prompts per generate call (each expands to n rows).
    num_cpus / num_gpus: resources of each worker (vllm colocated: a fraction, e.g. 0.5).
    placement: colocated (rollout i shares GPU i with learner i; vLLM sleeps during the update) |
      separate (rollouts on their own GPUs).
    sync: merged (full weights; LoRA merged on the learner) | adapter (LoRA tensors only; the engine
      applies the adapter) .
    transport: auto (object_store on CPU, ipc when colocated on GPU, broadcast when separate) |
      object_store | ipc | broadcast.
    gpu_memory_utilization, max_model_len, sleep_level: vLLM engine settings.
    enforce_eager: vLLM without CUDA graphs (slower decoding; faster start). Default false.
    prefix_caching: vLLM prefix caching (shares a prompt's prefill among its n samples; reset
      after each weight sync).
    ignore_eos: generate exactly max_tokens tokens (benchmarks, fixed-length tests).
    """

    backend: Literal["hf", "vllm"] = "hf"
    num_workers: int = field(default=1, metadata={"min": 1})
    n: int = field(default=8, metadata={"min": 1, "note": "samples per prompt"})
    temperature: float = field(default=1.0, metadata={"min": 0})
    top_p: float = field(default=1.0, metadata={"gt": 0, "max": 1})
    max_tokens: int = field(default=64, metadata={"min": 1})
    stop: list[str] = field(default_factory=list)
    batch_size: int = field(default=64, metadata={"min": 1})
    num_cpus: float = field(default=1.0, metadata={"min": 0})
    num_gpus: float = field(default=0.0, metadata={"min": 0})
    placement: Literal["colocated", "separate"] = "colocated"
    sync: Literal["merged", "adapter"] = "merged"
    transport: Literal["auto", "object_store", "ipc", "broadcast"] = "auto"
    gpu_memory_utilization: float = field(default=0.4, metadata={"gt": 0, "max": 1})
    enforce_eager: bool = False
    prefix_caching: bool = True
    max_model_len: int = field(default=2048, metadata={"min": 1})
    sleep_level: int = 1
    ignore_eos: bool = False

    def __post_init__(self):
        check_ranges(self, "rollout")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"rollout.sleep_level: expected 0 (never sleep), 1 or 2, got {self.sleep_level}")
        if self.backend == "hf" and self.transport == "ipc":
            raise ValueError("rollout.transport: ipc needs the vllm backend on a GPU")

    def resolved_transport(self) -> str:
        if self.transport != "auto":
            return self.transport
        if self.backend == "hf" or self.num_gpus == 0:
            return "object_store"
        return "ipc" if self.placement == "colocated" else "broadcast"


@dataclass
class Sample:
    """One completion. logprobs[i] belongs to completion_token_ids[i] (see the module doc)."""

    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (a stop token id or a stop string) | "length" (max_tokens reached)
    weights_version: int = 0
    # multi-turn episodes only (RolloutWorker.episodes): the completion is every turn after the
    # prompt, observations included; loss_mask is 1 on the tokens the engine sampled, 0 on the
    # observations; reward is the environment's; episode holds the trajectory's counts
    loss_mask: list[int] | None = None
    reward: float | None = None
    episode: dict | None = None


class HFEngine(HFGenerator):
    """transformers generate with per-token logprobs (kernels.generation), on CPU (or one GPU);
    the model comes from the model factory, weights arrive merged or as a LoRA adapter."""

    def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig, tokenizer, vocab_size: int | None,
                 seed: int, lora: LoraConfig | None):
        from kernels.model import build_model

        self.cfg = cfg
        self.device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        model = build_model(model_cfg, vocab_size=vocab_size, device=self.device, seed=seed)
        model.eval()
        model.config.use_cache = True
        super().__init__(model, tokenizer, batch_size=cfg.batch_size, logprobs=True)
        self.lora = lora
        self.peft = None  # PEFT wrapper, created on the first adapter sync

    @property
    def active(self):
        return self.peft if self.peft is not None else self.model

    def load_state(self, named) -> int:
        """Copy merged tensors into the model by name; returns how many were loaded."""
        params = self.model.state_dict(keep_vars=True)  # includes tied names (lm_head.weight)
        count = 0
        for name, t in named:
            if name not in params:
                raise KeyError(f"weight sync: the rollout model has no tensor {name!r}")
            params[name].data.copy_(t.to(params[name].device, params[name].dtype))
            count += 1
        if self.peft is not None:  # merged weights replace any adapter
            self.peft = None
        return count

    def load_adapter(self, state: dict, lora: LoraConfig) -> int:
        from peft import set_peft_model_state_dict

        from kernels.model import add_lora

        if self.peft is None:
            self.peft = add_lora(self.model, ModelConfig(preset="tiny", finetune="lora", lora=lora))
            self.peft.eval()
        set_peft_model_state_dict(self.peft, state)
        return len(state)


class RolloutWorker:
    """The rollout actor (wrapped with ray.remote by cluster/grpo_group.py). Thin: a few verbs."""

    def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig, tokenizer_dir: str,
                 vocab_size: int | None = None, seed: int = 0, worker_index: int = 0,
                 lora: LoraConfig | None = None, num_threads: int = 0):
        from kernels.tokenizer import load_tokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.cfg, self.index = cfg, worker_index
        self.tok = load_tokenizer(tokenizer_dir)
        self.version = 0
        self.engine: Engine
        if cfg.backend == "vllm":
            from actors.rollout_vllm import VLLMEngine

            self.engine = VLLMEngine(model_cfg, cfg, tokenizer_dir, self.tok, seed=seed, lora=lora)
        else:
            self.engine = HFEngine(model_cfg, cfg, self.tok, vocab_size, seed, lora)
        self.group = None  # broadcast WeightGroup (hf backend; vLLM keeps its own in the worker)

    # -- sampling ------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], n: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, max_tokens: int | None = None, stop: list[str] | None = None,
                 seed: int = 0) -> list[list[Sample]]:
        """n samples per prompt, in prompt order: [[Sample] * n] * len(prompts)."""
        c = self.cfg
        n = c.n if n is None else n
        temperature = c.temperature if temperature is None else temperature
        top_p = c.top_p if top_p is None else top_p
        max_tokens = c.max_tokens if max_tokens is None else max_tokens
        stop = list(c.stop if stop is None else stop)
        prompt_ids = encode_prompts(self.tok, prompts)
        t0 = time.perf_counter()
        self.engine.wake_up(None)  # colocated vLLM: weights and KV cache back (no-op otherwise)
        t1 = time.perf_counter()
        rows = self.engine.generate(prompt_ids, n, temperature, top_p, max_tokens, stop,
                                    seed + 1_000_003 * self.index, c.ignore_eos)
        self.last_timing = {"wake_s": t1 - t0, "engine_s": time.perf_counter() - t1}
        return [[Sample(p, x.token_ids, x.logprobs, x.text, x.finish_reason, self.version) for x in row]
                for p, row in zip(prompt_ids, rows)]

    def episodes(self, rows: list[dict], env: dict, n: int | None = None, temperature: float | None = None,
                 max_tokens: int | None = None, max_total_tokens: int = 0, seed: int = 0) -> list[list[Sample]]:
        """n multi-turn episodes per row against environment `env` ({name, kwargs}; actors/multiturn.py),
        token-exact: [[Sample] * n] * len(rows), each Sample one whole trajectory (see Sample)."""
        from actors.multiturn import ChatTurns, EpisodeConfig, run_episodes

        c = self.cfg
        if getattr(self, "turns", None) is None:
            self.turns = ChatTurns(self.tok)
        ecfg = EpisodeConfig(n=c.n if n is None else n, max_tokens=c.max_tokens if max_tokens is None else max_tokens,
                             max_total_tokens=max_total_tokens or None,
                             temperature=c.temperature if temperature is None else temperature, top_p=c.top_p,
                             seed=seed + 1_000_003 * self.index)
        t0 = time.perf_counter()
        self.engine.wake_up(None)
        t1 = time.perf_counter()
        trajs = run_episodes(self.engine, self.turns, env, rows, ecfg)
        self.last_timing = {"wake_s": t1 - t0, "engine_s": time.perf_counter() - t1}
        return [[self._episode_sample(t) for t in row] for row in trajs]

    def _episode_sample(self, t) -> Sample:
        model_turns = [m["content"] for m in t.messages if m.get("role") == "assistant"]
        return Sample(t.prompt_token_ids, t.completion_token_ids, t.completion_logprobs,
                      model_turns[-1] if model_turns else "",
                      "length" if t.finish_reason == "max_total_tokens" else "stop", self.version,
                      loss_mask=t.completion_loss_mask, reward=t.reward,
                      episode={"turns": t.turns, "finish": t.finish_reason, "tool_calls": t.tool_calls,
                               "tool_errors": t.tool_errors, "timeouts": t.timeouts, "malformed": t.malformed,
                               "sampled_tokens": sum(t.loss_mask),
                               "observation_tokens": sum(t.observation_tokens_per_turn)})

    # -- weight sync ---------------------------------------------------------------------

    def update_weights(self, named: dict | list, version: int | None = None) -> dict:
        """Merged weights by name ({name: tensor} or [(name, tensor)]), through the object store."""
        t0 = time.perf_counter()
        items = named.items() if isinstance(named, dict) else named
        count = self.engine.load_state(items)
        self.version = self.version + 1 if version is None else version
        return {"tensors": count, "seconds": time.perf_counter() - t0}

    def update_weights_ipc(self, handles: dict, version: int | None = None) -> dict:
        """Colocated GPU: rebuild the learner's tensors from CUDA IPC handles and load them."""
        t0 = time.perf_counter()
        count = self.engine.load_ipc(handles)
        self.version = self.version + 1 if version is None else version
        return {"tensors": count, "seconds": time.perf_counter() - t0}

    def load_adapter(self, state: dict, lora: LoraConfig, version: int | None = None) -> dict:
        """LoRA adapter-only sync: PEFT-named adapter tensors (get_peft_model_state_dict)."""
        t0 = time.perf_counter()
        count = self.engine.load_adapter(state, lora)
        self.version = self.version + 1 if version is None else version
        return {"tensors": count, "seconds": time.perf_counter() - t0}

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> bool:
        """Join the learner's broadcast group (blocks until all ranks join)."""
        if self.cfg.backend == "vllm":
            return self.engine.init_weight_group(host, port, rank, world_size, backend)
        from actors.weight_sync import WeightGroup

        self.group = WeightGroup(host, port, rank, world_size, backend)
        return True

    def receive_weights(self, version: int | None = None) -> dict:
        """Receive a broadcast of merged weights from the learner (runs with its send_weights)."""
        t0 = time.perf_counter()
        if self.cfg.backend == "vllm":
            count = self.engine.receive_weights()
        else:
            if self.group is None:
                raise RuntimeError("receive_weights: call init_weight_group first")
            count = self.engine.load_state(self.group.recv_state())
        self.version = self.version + 1 if version is None else version
        return {"tensors": count, "seconds": time.perf_counter() - t0}

    # -- memory (vLLM colocated) ---------------------------------------------------------

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine.wake_up(tags)

    def weights_version(self) -> int:
        return self.version

    def timing(self) -> dict:
        """Seconds of the last generate call: waking the engine, and the engine's generation."""
        return dict(getattr(self, "last_timing", {}))

    def weight_checksum(self, names: list[str]) -> dict[str, float]:
        """Sum of each named parameter (tests: did a sync reach the engine?)."""
        return self.engine.weight_checksum(names)
