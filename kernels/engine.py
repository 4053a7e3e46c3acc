"""The one small interface of the in-process inference engines: HF generate
(kernels.generation.HFGenerator, the rollout's HF engine) and vLLM (actors/rollout_vllm.py).

    outs = engine.generate(prompts, n=4, temperature=1.0, top_p=1.0, max_tokens=64, stop=["\\n\\n"], seed=0)
    c = outs[0][0]; c.text, c.token_ids, c.logprobs, c.finish_reason

Prompts are strings, chat message lists (rendered with the chat template) or token ids. Every
engine stops on kernels.generation_text.stop_token_ids; finish_reason is "stop" when a
completion ended on one of them or on a stop string, "length" when it reached max_tokens.
Weight-sync and memory verbs have defaults here, so callers never probe engines with hasattr.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    """One sampled continuation of one prompt. logprobs[i] belongs to token_ids[i] (empty when
    the caller did not ask for them)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (a stop id or a stop string) | "length"
    logprobs: list[float] = field(default_factory=list)

    def copy(self) -> "Completion":
        return Completion(self.text, list(self.token_ids), self.finish_reason, list(self.logprobs))


class Engine:
    """Base of the engines: `generate` is theirs; the other verbs default to "not supported"
    (weights) or "nothing to do" (memory)."""

    def generate(self, prompts: list, n: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_tokens: int = 64, stop: list[str] | None = None, seed: int = 0,
                 ignore_eos: bool = False) -> list[list[Completion]]:
        """n completions per prompt, in prompt order."""
        raise NotImplementedError

    def load_state(self, named) -> int:
        """Copy merged tensors [(name, tensor)] into the model; returns how many."""
        raise NotImplementedError(f"{type(self).__name__}: loading merged weights is not supported")

    def load_ipc(self, handles: dict) -> int:
        raise NotImplementedError(f"{type(self).__name__}: CUDA IPC weight sync needs the vllm backend on a GPU")

    def load_adapter(self, state: dict, lora) -> int:
        raise NotImplementedError(f"{type(self).__name__}: loading a LoRA adapter is not supported")

    def weight_checksum(self, names: list[str]) -> dict[str, float]:
        """Sum of each named parameter (tests: did a sync reach the engine?)."""
        raise NotImplementedError(f"{type(self).__name__}: weight_checksum is not supported")

    def sleep(self) -> None:
        """Release accelerator memory between generations (colocated vLLM); nothing by default."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Undo sleep(); nothing by default."""
