"""The vLLM rollout engine (GPU). Imported lazily by actors/rollout.py: vLLM is never needed on CPU.

The engine runs in the rollout actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor parallel
1), with `WeightSyncExtension` mixed into its GPU worker (`worker_extension_cls`). New weights reach
the worker's model through `llm.collective_rpc(<extension method>)` and the model's own
`load_weights`, which accepts Hugging Face names and handles fused layers (qkv, gate_up) itself:

  update_weights  {name: tensor} through the Ray object store (CPU copy)      -> load_named
  ipc             CUDA IPC handles of the colocated learner's tensors        -> load_ipc
  broadcast       NCCL broadcast from learner rank 0 (actors/weight_sync.py) -> receive_weights
  load_adapter    LoRA tensors written to a local folder, used through a new LoRARequest

Colocated (one GPU shared with the learner): `sleep()` after generation offloads the weights
and drops the KV cache (sleep level 1); before the next generation the weights are woken first,
the new weights loaded, then the KV cache is re-allocated. CUDA graphs (rollout.enforce_eager
false, the default) survive this: sleep mode keeps the memory's virtual addresses, so the
captured graphs replay on the woken buffers.

One generate call per step takes every prompt x n (SamplingParams(n=...)); with prefix caching
on, the n samples of a prompt share its prefill; the cache is reset after each weight sync.

Logprobs: `logprobs_mode="processed_logprobs"` (after temperature), `SamplingParams(logprobs=0)`
returns the sampled token's logprob at each position.

Stops: `SamplingParams(stop_token_ids=...)` gets kernels.generation.stop_token_ids (the tokenizer's
eos, the model folder's generation_config eos ids, the chat template's end-of-turn token), and
the completion is trimmed by the same kernels.generation.trim_completion as the HF engine's.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

from actors.rollout import RolloutConfig
from kernels.engine import Completion, Engine
from kernels.generation import encode_prompts, load_generation_config, stop_token_ids, trim_completion
from kernels.model import LoraConfig, ModelConfig

# Settings under which the engine starts inside a Ray actor (devkit/README.md); setdefault only.
VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


class WeightSyncExtension:
    """Methods added to vLLM's GPU worker; called with `llm.collective_rpc(name, args=...)`."""

    def _model(self):
        return self.model_runner.model

    def load_named(self, named) -> int:
        items = list(named.items()) if isinstance(named, dict) else list(named)
        device = next(self._model().parameters()).device
        self._model().load_weights(weights=[(k, v.to(device, non_blocking=True)) for k, v in items])
        torch.cuda.synchronize(device)
        return len(items)

    def load_ipc(self, handles: dict) -> int:
        from actors.weight_sync import import_ipc

        device = next(self._model().parameters()).device
        tensors = list(import_ipc(handles, device.index))
        self._model().load_weights(weights=tensors)
        torch.cuda.synchronize(device)
        del tensors  # the learner may free its buffers once this call returns
        return len(handles)

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> bool:
        from actors.weight_sync import WeightGroup

        device = next(self._model().parameters()).device
        self._weight_group = WeightGroup(host, port, rank, world_size, backend, device=device)
        return True

    def receive_weights(self) -> int:
        n = 0
        for name, t in self._weight_group.recv_state():
            self._model().load_weights(weights=[(name, t)])
            n += 1
        return n

    def weight_checksum(self, names: list[str]) -> dict:
        """Sum of a few parameters (tests: did the weights change?)."""
        params = dict(self._model().named_parameters())
        return {n: float(params[n].float().sum()) for n in names if n in params}


class VLLMEngine(Engine):
    def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig, tokenizer_dir: str, tokenizer,
                 seed: int = 0, lora: LoraConfig | None = None):
        for k, v in VLLM_ENV.items():
            os.environ.setdefault(k, v)
        from vllm import LLM

        if not model_cfg.path:
            raise ValueError("rollout.backend vllm: model.path must be a model folder (vLLM loads weights "
                             "from disk); save a preset first (see tests/actors/test_rollout.py)")
        self.cfg, self.tok, self.lora = cfg, tokenizer, lora
        # every id that ends a completion (eos, generation config, chat template end-of-turn)
        self.stop_ids = stop_token_ids(tokenizer, load_generation_config(model_cfg.path))
        self.colocated = cfg.placement == "colocated" and cfg.sleep_level > 0
        dtype = "bfloat16" if model_cfg.dtype == "auto" else model_cfg.dtype
        kw = dict(model=model_cfg.path, tokenizer=tokenizer_dir, dtype=dtype, seed=seed,
                  gpu_memory_utilization=cfg.gpu_memory_utilization, enforce_eager=cfg.enforce_eager,
                  max_model_len=cfg.max_model_len, enable_sleep_mode=self.colocated,
                  worker_extension_cls="actors.rollout_vllm.WeightSyncExtension",
                  logprobs_mode="processed_logprobs", enable_prefix_caching=cfg.prefix_caching)
        if cfg.sync == "adapter":
            if lora is None:
                raise ValueError("rollout.sync adapter needs model.finetune lora")
            kw.update(enable_lora=True, max_lora_rank=lora.r, max_loras=1)
        self.llm = LLM(**kw)
        self.lora_request = None
        self.adapter_root = tempfile.mkdtemp(prefix="rollout-adapters-")
        self.adapter_version = 0
        self.asleep = False

    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=64, stop=None, seed=0,
                 ignore_eos=False) -> list[list[Completion]]:
        from vllm import SamplingParams

        stop = [s for s in (stop or []) if s]
        self.wake_up(None)
        # ignore_eos: vLLM still ends on stop_token_ids, so none are passed then
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_tokens, stop=stop or None, seed=seed, logprobs=0,
                                ignore_eos=ignore_eos, detokenize=bool(stop),
                                stop_token_ids=None if ignore_eos else list(self.stop_ids))
        outs = self.llm.generate([{"prompt_token_ids": p} for p in encode_prompts(self.tok, prompts)], params,
                                 lora_request=self.lora_request, use_tqdm=False)
        eos = set() if ignore_eos else set(self.stop_ids)
        rows = []
        for o in outs:
            row = []
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)]
                ids, lps, text, finish = trim_completion(self.tok, ids, lps, eos, stop)
                if c.finish_reason == "stop":  # vLLM ended it on a stop id it did not return
                    finish = "stop"
                row.append(Completion(text, ids, finish, lps))
            rows.append(row)
        return rows

    # -- weights -----------------------------------------------------------------------------

    def _rpc(self, method: str, *args):
        return self.llm.collective_rpc(method, args=args)[0]

    def _weights_changed(self) -> None:
        """Cached prompt KV blocks were computed by the old weights: drop them."""
        if self.cfg.prefix_caching and hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def load_state(self, named) -> int:
        self.wake_up(["weights"])
        count = self._rpc("load_named", list(named))
        self._weights_changed()
        return count

    def load_ipc(self, handles: dict) -> int:
        self.wake_up(["weights"])
        count = self._rpc("load_ipc", handles)
        self._weights_changed()
        return count

    def init_weight_group(self, host, port, rank, world_size, backend) -> bool:
        return self._rpc("init_weight_group", host, port, rank, world_size, backend)

    def receive_weights(self) -> int:
        self.wake_up(["weights"])
        count = self._rpc("receive_weights")
        self._weights_changed()
        return count

    def load_adapter(self, state: dict, lora: LoraConfig) -> int:
        from peft import LoraConfig as PeftLoraConfig
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        self.adapter_version += 1
        path = os.path.join(self.adapter_root, f"v{self.adapter_version}")
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "adapter_model.safetensors"))
        conf = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=lora.modules(),
                              bias="none", task_type="CAUSAL_LM").to_dict()
        conf = {k: (sorted(v) if isinstance(v, set) else v) for k, v in conf.items()}
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(conf, f, default=str)
        # a new id per version: vLLM caches adapters by id
        self.lora_request = LoRARequest(f"policy-v{self.adapter_version}", self.adapter_version, path)
        self._weights_changed()
        return len(state)

    def weight_checksum(self, names: list[str]) -> dict:
        return self._rpc("weight_checksum", names)

    # -- memory --------------------------------------------------------------------------------

    def sleep(self) -> None:
        if self.colocated and not self.asleep:
            self.llm.sleep(level=self.cfg.sleep_level)
            self.asleep = True
            self._awake: set[str] = set()

    def wake_up(self, tags: list[str] | None) -> None:
        """tags None: everything (weights, then KV cache); ["weights"]: only the weights (to load
        new ones before the KV cache takes its memory back)."""
        if not self.asleep:
            return
        want = ["weights", "kv_cache"] if tags is None else list(tags)
        todo = [t for t in want if t not in self._awake]
        if todo:
            self.llm.wake_up(tags=todo)
            self._awake.update(todo)
        if {"weights", "kv_cache"} <= self._awake:
            self.asleep = False
