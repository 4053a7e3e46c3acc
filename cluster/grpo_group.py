"""Placing the GRPO actors on Ray and fanning work out to them.

    placement = Placement.build(rollout_cfg, grpo_cfg)        # GPU bundles when colocated
    rollouts = RolloutGroup(model_cfg, rollout_cfg, tok_dir, placement=placement, ...)
    learners = LearnerGroup(model_cfg, grpo_cfg, placement=placement, ...)
    sync = WeightSync(learners, rollouts, rollout_cfg, lora)
    groups = rollouts.generate(prompts, seed=step)        # [[Sample] * n] per prompt
    metrics = learners.update(batch)
    info = sync.push(version=step)

Placement: on CPU the actors are plain Ray actors with `num_cpus`. On GPU, colocated mode makes
one placement group with a bundle {GPU: 1, CPU: ...} per learner; rollout worker i and learner i
share bundle i (each asks a fraction of the GPU, e.g. 0.5). Separate mode gives each actor its own
GPU(s) with no placement group.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learner import GRPOConfig, Learner, batch_size, shard
from actors.rollout import RolloutConfig, RolloutWorker, Sample
from kernels.model import LoraConfig, ModelConfig


@dataclass
class Placement:
    """Where actors go: a placement group (colocated GPU mode) or None (Ray picks)."""

    pg: object | None = None

    @classmethod
    def build(cls, rollout: RolloutConfig, grpo: GRPOConfig, timeout_s: float = 600.0) -> "Placement":
        if not (rollout.backend == "vllm" and rollout.placement == "colocated" and rollout.num_gpus > 0):
            return cls(None)
        if rollout.num_workers != grpo.num_learners:
            raise ValueError(f"colocated placement pairs rollout worker i with learner i: rollout.num_workers "
                             f"({rollout.num_workers}) must equal grpo.num_learners ({grpo.num_learners})")
        if rollout.num_gpus + grpo.num_gpus > 1.0 + 1e-9:
            raise ValueError(f"colocated placement: rollout.num_gpus + grpo.num_gpus must be <= 1 "
                             f"(they share one GPU), got {rollout.num_gpus} + {grpo.num_gpus}")
        bundles = [{"GPU": 1.0, "CPU": rollout.num_cpus + grpo.num_cpus} for _ in range(grpo.num_learners)]
        pg = placement_group(bundles, strategy="PACK")
        ray.get(pg.ready(), timeout=timeout_s)
        return cls(pg)

    def options(self, index: int) -> dict:
        if self.pg is None:
            return {}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=index)}


def _env(backend: str) -> dict:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if backend == "vllm":
        from actors.rollout_vllm import VLLM_ENV

        env.update(VLLM_ENV)
    return {"env_vars": env}


class RolloutGroup:
    """`num_workers` RolloutWorker actors; prompts are split into contiguous slices, one per worker."""

    def __init__(self, model_cfg: ModelConfig, cfg: RolloutConfig, tokenizer_dir: str, *,
                 vocab_size: int | None = None, seed: int = 0, lora: LoraConfig | None = None,
                 placement: Placement | None = None, num_threads: int = 0):
        self.cfg = cfg
        placement = placement or Placement()
        actor = ray.remote(RolloutWorker)
        self.workers = [
            actor.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, runtime_env=_env(cfg.backend),
                          **placement.options(i)).remote(
                model_cfg, cfg, tokenizer_dir, vocab_size=vocab_size, seed=seed, worker_index=i,
                lora=lora, num_threads=num_threads)
            for i in range(cfg.num_workers)]
        ray.get([w.weights_version.remote() for w in self.workers])  # surface start-up errors here

    @property
    def sleeps(self) -> bool:
        """Whether the engines release GPU memory between generations (vLLM colocated)."""
        c = self.cfg
        return c.backend == "vllm" and c.placement == "colocated" and c.sleep_level > 0

    def _split(self, method: str, items: list, *args, **kwargs) -> list[tuple[object, int]]:
        """Contiguous slices of `items`, one per worker, each sent to worker.<method>(slice, *args,
        **kwargs); [(ObjectRef, slice length)] for `collect`."""
        k = len(self.workers)
        size = -(-len(items) // k) if items else 0
        pending = []
        for i, w in enumerate(self.workers):
            part = items[i * size:(i + 1) * size]
            if part:
                pending.append((getattr(w, method).remote(part, *args, **kwargs), len(part)))
        return pending

    def generate_async(self, prompts: list, seed: int = 0, **sampling) -> list[tuple[object, int]]:
        """Start generation; returns [(ObjectRef, number of prompts)] for `collect`."""
        return self._split("generate", prompts, seed=seed, **sampling)

    def episodes_async(self, rows: list[dict], env: dict, seed: int = 0, **options) -> list[tuple[object, int]]:
        """Start multi-turn episodes (RolloutWorker.episodes), rows split as in generate_async."""
        return self._split("episodes", rows, env, seed=seed, **options)

    @staticmethod
    def collect(pending: list[tuple[object, int]]) -> list[list[Sample]]:
        out: list[list[Sample]] = []
        for part in ray.get([ref for ref, _ in pending]):
            out.extend(part)
        return out

    def generate(self, prompts: list, seed: int = 0, **sampling) -> list[list[Sample]]:
        return self.collect(self.generate_async(prompts, seed=seed, **sampling))

    def sleep(self) -> None:
        if self.sleeps:
            ray.get([w.sleep.remote() for w in self.workers])

    def wake_up(self) -> None:
        if self.sleeps:
            ray.get([w.wake_up.remote() for w in self.workers])

    def weight_checksum(self, names: list[str]) -> list[dict]:
        return ray.get([w.weight_checksum.remote(names) for w in self.workers])

    def timing(self) -> dict:
        """The slowest worker's split of its last generate call (wake_s, engine_s)."""
        parts = [t for t in ray.get([w.timing.remote() for w in self.workers]) if t]
        return {k: max(t[k] for t in parts) for k in parts[0]} if parts else {}

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []


class LearnerGroup:
    """`grpo.num_learners` Learner actors in one torch.distributed group; rank 0 speaks for all."""

    def __init__(self, model_cfg: ModelConfig, cfg: GRPOConfig, *, vocab_size: int | None = None,
                 logprob_temperature: float = 1.0, max_len_norm: int = 64, seed: int = 0, pad_id: int = 0,
                 placement: Placement | None = None, num_threads: int = 0, kernels=None):
        self.cfg = cfg
        placement = placement or Placement()
        actor = ray.remote(Learner)
        n = cfg.num_learners
        self.actors = [
            actor.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, runtime_env=_env("hf"),
                          **placement.options(r)).remote(
                model_cfg, cfg, vocab_size=vocab_size, logprob_temperature=logprob_temperature,
                max_len_norm=max_len_norm, seed=seed, rank=r, world_size=n, pad_id=pad_id,
                num_threads=num_threads, kernels=kernels)
            for r in range(n)]
        host, port = ray.get(self.actors[0].address.remote())
        ray.get([a.init_distributed.remote(host, port) for a in self.actors])

    @property
    def rank0(self):
        return self.actors[0]

    def update(self, batch: dict) -> dict:
        """Shard the batch over the ranks, update, return rank 0's (rank-averaged) metrics."""
        n = len(self.actors)
        if batch_size(batch) < n:
            raise ValueError(f"learner update: {batch_size(batch)} samples for {n} learners")
        results = ray.get([a.update.remote(shard(batch, r, n)) for r, a in enumerate(self.actors)])
        return results[0]

    def compute_logprobs(self, batch: dict, which: str = "policy") -> list[list[float]]:
        return ray.get(self.rank0.compute_logprobs.remote(batch, which))

    def save(self, path: str) -> str:
        return ray.get(self.rank0.save.remote(path))

    def load(self, path: str) -> int:
        steps = ray.get([a.load.remote(path) for a in self.actors])
        return steps[0]

    def save_merged(self, path: str, tokenizer_dir: str | None = None) -> str:
        return ray.get(self.rank0.save_merged.remote(path, tokenizer_dir))

    def save_adapter(self, path: str) -> str:
        return ray.get(self.rank0.save_adapter.remote(path))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


class WeightSync:
    """learner rank 0 -> every rollout worker, by the configured transport (actors/weight_sync.py)."""

    def __init__(self, learners: LearnerGroup, rollouts: RolloutGroup, cfg: RolloutConfig,
                 lora: LoraConfig | None = None, dtype: str | None = None):
        self.learners, self.rollouts, self.cfg, self.lora = learners, rollouts, cfg, lora
        self.kind = cfg.sync
        self.transport = cfg.resolved_transport()
        # engines that dropped their weights in sleep level 2 need every tensor back
        self.full = rollouts.sleeps and cfg.sleep_level == 2
        self.dtype = dtype
        if self.kind == "adapter" and self.transport == "broadcast":
            self.transport = "object_store"  # adapters are small: the object store is enough
        if self.transport == "ipc" and cfg.num_workers != learners.cfg.num_learners:
            raise ValueError("rollout.transport ipc needs one rollout worker per learner (colocated)")
        if self.transport == "broadcast":
            backend = "nccl" if cfg.num_gpus > 0 else "gloo"
            host, port = ray.get(learners.rank0.address.remote())
            world = 1 + len(rollouts.workers)
            ray.get([learners.rank0.init_weight_group.remote(host, port, world, backend)]
                    + [w.init_weight_group.remote(host, port, 1 + i, world, backend)
                       for i, w in enumerate(rollouts.workers)])

    def push(self, version: int) -> dict:
        """Send the learner's current weights; returns {"sync_s", "sync_engine_s", "transport"}."""
        t0 = time.perf_counter()
        workers, learner = self.rollouts.workers, self.learners.rank0
        if self.kind == "adapter":
            state = learner.state_for_sync.remote("adapter")
            infos = ray.get([w.load_adapter.remote(state, self.lora, version) for w in workers])
        elif self.transport == "object_store":
            state = learner.state_for_sync.remote("merged", self.dtype, "object_store", self.full)
            infos = ray.get([w.update_weights.remote(state, version) for w in workers])
        elif self.transport == "ipc":
            # learner i exports handles for the rollout worker on its own GPU
            refs = [a.state_for_sync.remote("merged", self.dtype, "ipc", self.full) for a in self.learners.actors]
            infos = ray.get([w.update_weights_ipc.remote(h, version) for w, h in zip(workers, refs)])
        else:
            send = learner.send_weights.remote(self.dtype, self.full)
            infos = ray.get([w.receive_weights.remote(version) for w in workers])
            ray.get(send)
        self.rollouts.wake_up()  # colocated vLLM: KV cache back after the weights
        return {"sync_s": time.perf_counter() - t0,
                "sync_engine_s": max(i["seconds"] for i in infos), "sync_transport": self.transport}
