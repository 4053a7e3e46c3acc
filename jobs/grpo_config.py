"""The GRPO job's configuration: one frozen dataclass per YAML section (jobs/grpo.py runs it).

Sections: data (prompts), reward, eval (held-out exact match), init (the SFT warm-up), env
(multi-turn episodes), and the
whole job (GRPOJobConfig: model, rollout, grpo, kernels and the sections above). Ranges are field
metadata (kernels/config_fields.py); the rest is checked in __post_init__ with messages that name
the field.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Literal

from actors import grpo_math
from actors.learner import GRPOConfig
from actors.rollout import RolloutConfig
from cluster.tracking import check_report_to
from kernels.config_fields import check_ranges
from kernels.model import ModelConfig
from kernels.patch import KernelsConfig


@dataclass(frozen=True)
class PromptDataConfig:
    """Where prompts come from.

    path: "builtin" (the built-in arithmetic task's train split), or data with `question` or `prompt`
      columns in any form SFT reads (cluster/readers.py): .jsonl/.json/.parquet/.txt files, folders,
      globs, URIs (s3://, gs://, hf://, file://), a datasets.save_to_disk folder, or a dataset name
      for datasets.load_dataset (`org/name`; offline from the Hugging Face cache).
    split / subset: a dataset's split (default "train") and subset (its config name; "" = its only one).
    system_prompt: a system message before each question (use the SFT run's).
    builtin_train_size: rows of the built-in train split.
    """

    path: str = "builtin"
    split: str = "train"
    subset: str = ""
    system_prompt: str = ""
    builtin_train_size: int = field(default=2000, metadata={"min": 1})

    def __post_init__(self):
        from cluster.readers import is_dataset_name, is_uri

        check_ranges(self, "data")
        if not self.path:
            raise ValueError("data.path: empty; expected 'builtin', data files, a URI or a dataset name")
        if not isinstance(self.split, str) or not self.split.strip():
            raise ValueError(f"data.split: expected a split name of the dataset (e.g. train, test), got {self.split!r}")
        if not isinstance(self.subset, str):
            raise ValueError(f"data.subset: expected a subset (config) name of the dataset or '', got {self.subset!r}")
        missing = [p for p in (q.strip() for q in self.path.split(",")) if p and not is_uri(p)
                   and not glob.has_magic(p) and not os.path.exists(os.path.expanduser(p)) and not is_dataset_name(p)]
        if self.path != "builtin" and missing:  # URIs, globs and dataset names: checked by the preflight
            raise ValueError(f"data.path: {missing[0]!r} does not exist (expected 'builtin', data files, a URI "
                             f"or a dataset name org/name)")


@dataclass(frozen=True)
class RewardConfig:
    """Reward terms (rewards/ registry names or 'module:function', with weight/kwargs/label) and
    the reward actor pool (actors/reward.py).

    max_failure_rate: a term that fails (raises, returns bad scores, times out) on more than this
      fraction of a scoring call's samples stops the run with its first error (1 = never stop).
    """

    functions: list[dict | str] = field(default_factory=lambda: ["math_answer"])
    num_actors: int = field(default=1, metadata={"min": 1})
    timeout_s: float = field(default=30.0, metadata={"gt": 0})
    failure_reward: float = 0.0
    batch_size: int = field(default=256, metadata={"min": 1})
    num_cpus: float = field(default=0.25, metadata={"min": 0})
    max_failure_rate: float = field(default=0.5, metadata={"range": (0, 1)})

    def specs(self):
        from rewards.registry import RewardSpec

        return [RewardSpec.from_config(f) for f in self.functions]

    def __post_init__(self):
        check_ranges(self, "reward")
        if not self.functions:
            raise ValueError("reward.functions: name at least one reward (e.g. math_answer)")
        try:
            self.specs()
        except Exception as e:  # noqa: BLE001 - re-raised with the key
            raise ValueError(f"reward.functions: {e}") from None


@dataclass(frozen=True)
class HeldOutEvalConfig:
    """Held-out exact-match accuracy at start and end (greedy; cluster/evaluate.py).

    data: "builtin" (the built-in task's held-out split, disjoint from the train prompts), or what
      data.path accepts (cluster/readers.py): .jsonl/.json/.parquet/.txt files, folders, globs, URIs
      (s3://, gs://, hf://, file://), a datasets.save_to_disk folder, or a dataset name for
      datasets.load_dataset (`org/name`; offline from the Hugging Face cache).
    split / subset: a dataset's split ("" = its first of validation/test/eval/valid, or its only one)
      and subset (its config name; "" = its only one); for datasets only, not files or "builtin".
    """

    enabled: bool = True
    data: str = "builtin"
    split: str = ""
    subset: str = ""
    max_problems: int = field(default=200, metadata={"min": 0, "note": "0 = all"})
    max_new_tokens: int = field(default=32, metadata={"min": 1})
    batch_size: int = field(default=64, metadata={"min": 1})
    backend: Literal["hf", "vllm"] = "hf"

    def __post_init__(self):
        from cluster.evaluate import check_eval_source

        check_ranges(self, "eval")
        check_eval_source(self.data, self.split, self.subset)


@dataclass(frozen=True)
class InitConfig:
    """The starting model when model.path is empty: run this SFT config first (jobs.sft) for
    sft_steps steps into OUTPUT_DIR/sft, then start GRPO from its merged model."""

    sft_config: str = ""
    sft_steps: int = field(default=0, metadata={"min": 0})
    sft_overrides: list[str] = field(default_factory=list)

    def sft_config_path(self) -> str:
        if os.path.isabs(self.sft_config) or os.path.exists(self.sft_config):
            return self.sft_config
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), self.sft_config)

    def __post_init__(self):
        check_ranges(self, "init")
        if self.sft_config and not os.path.isfile(self.sft_config_path()):
            raise ValueError(f"init.sft_config: {self.sft_config!r} is not a file (relative paths are "
                             f"looked up in the working directory, then in the project root)")


@dataclass(frozen=True)
class EnvConfig:
    """Multi-turn episodes instead of single completions (docs/agentic.md).

    name: "" (single-turn: each sample is one completion scored by reward.functions), or an
      environment: a registered name (calculator, code) or 'module:Class'. Each sample is then a
      whole episode (the model's turns and the tool observations, token-exact); its reward is the
      environment's final reward (reward.functions are not called) and the observation tokens
      are masked out of the loss.
    kwargs: the environment's keyword arguments (e.g. max_turns: 4, timeout_s: 5, sandbox: isolated).
    max_total_tokens: cap on an episode's tokens, prompt included (0 = none beyond
      rollout.max_tokens per turn); an episode that reaches it ends with reward 0.
    """

    name: str = ""
    kwargs: dict = field(default_factory=dict)
    max_total_tokens: int = field(default=0, metadata={"min": 0, "note": "0 = no cap"})

    @property
    def enabled(self) -> bool:
        return bool(self.name)

    def spec(self) -> dict:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    def __post_init__(self):
        import inspect

        from actors.environments import resolve_env

        check_ranges(self, "env")
        if not isinstance(self.name, str):
            raise ValueError(f"env.name: expected an environment name or 'module:Class', got {self.name!r}")
        if not isinstance(self.kwargs, dict):
            raise ValueError(f"env.kwargs: expected a mapping of keyword arguments, got {self.kwargs!r}")
        if self.max_total_tokens == 1:
            raise ValueError("env.max_total_tokens: 1 leaves no room to generate; use 0 (no cap) or more")
        if not self.name:
            if self.kwargs:
                raise ValueError("env.kwargs: set env.name too (kwargs are the environment's)")
            return
        try:
            cls = resolve_env(self.name)
            inspect.signature(cls).bind(**self.kwargs)
        except TypeError as e:
            raise ValueError(f"env.kwargs: {sorted(self.kwargs)} do not fit environment {self.name!r}: {e}") from None
        except Exception as e:  # noqa: BLE001 - re-raised with the key
            raise ValueError(f"env.name: {e}") from None


@dataclass(frozen=True)
class GRPOJobConfig:
    """The whole GRPO job.

    output_dir: everything is written here. max_steps: GRPO steps. seed: sampling and shuffling.
    resume: auto (continue from the newest intact checkpoint in output_dir; refused when the training
      config differs from the run's config.yaml) | never | force (continue even with a changed config).
    checkpoint_every / keep_checkpoints: learner + controller state every N steps; keep the last K.
    ray_num_cpus: logical CPUs of a local Ray instance (0 = the machine's, or more if the actors
      ask for more: phases alternate, so rollout and learner may share cores).
    num_threads: torch threads in each rollout/learner actor (0 = Ray's default: the actor's CPUs).
    kernels: the learner's kernels, as in SFT (kernels.patch.KernelsConfig: enabled, mode).
    report_to: live trackers of each step's metrics and of the config, any of tensorboard, mlflow,
      wandb (cluster/tracking.py; default none).
    env: multi-turn episodes against an environment (EnvConfig; default off: single-turn).
    """

    output_dir: str = "runs/grpo"
    max_steps: int = field(default=20, metadata={"min": 1})
    seed: int = 0
    resume: Literal["auto", "never", "force"] = "auto"
    checkpoint_every: int = field(default=10, metadata={"min": 0, "note": "0 = only at the end"})
    keep_checkpoints: int = field(default=2, metadata={"min": 1})
    ray_num_cpus: int = field(default=0, metadata={"min": 0, "note": "0 = the machine's"})
    num_threads: int = field(default=0, metadata={"min": 0, "note": "0 = Ray's default"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    eval: HeldOutEvalConfig = field(default_factory=HeldOutEvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)
    env: EnvConfig = field(default_factory=EnvConfig)

    def __post_init__(self):
        check_ranges(self, "")
        if not self.output_dir:
            raise ValueError("output_dir: must be set")
        check_report_to(self.report_to, installed=False)  # installed: checked by the preflight
        # the estimator says how many samples per prompt it needs (a group baseline: 2); the check
        # once compared adv_estimator with the policy-loss name "reinforce", which never matched
        need = grpo_math.min_group_size(self.grpo.adv_estimator)
        if self.rollout.n < need:
            raise ValueError(f"rollout.n: grpo.adv_estimator {self.grpo.adv_estimator!r} compares samples "
                             f"within a group; need n >= {need}, got {self.rollout.n}")
        if self.rollout.n < 2 and self.grpo.dynamic_sampling:
            raise ValueError("grpo.dynamic_sampling: drops groups whose rewards do not vary, which needs "
                             f"rollout.n >= 2 (got {self.rollout.n}); set grpo.dynamic_sampling=false")
        if self.rollout.sync == "adapter" and self.model.finetune == "full":
            raise ValueError("rollout.sync: adapter needs model.finetune lora (full fine-tuning has no adapter)")
        r = self.rollout
        if self.grpo.async_mode != "off" and r.backend == "vllm" and r.placement == "colocated" and r.sleep_level > 0:
            raise ValueError(f"grpo.async_mode {self.grpo.async_mode!r}: rollouts cannot overlap the update while "
                             f"colocated vLLM gives its GPU memory to the learner (rollout.sleep_level "
                             f"{r.sleep_level}); use rollout.placement=separate, or rollout.sleep_level=0 with "
                             f"room for both on the GPU")
        if self.rollout.backend == "vllm" and self.rollout.num_gpus == 0:
            raise ValueError("rollout.backend vllm: set rollout.num_gpus (e.g. 0.5 colocated, 1 separate)")
