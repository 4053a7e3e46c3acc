"""Reward functions and their registry. Pure Python: no torch, no Ray, nothing of the project.

    from rewards import RewardSpec, resolve, register, combine
    fn = resolve("math_answer")                  # or "my_pkg.my_mod:my_fn"
    fn(prompts=prompts, completions=completions, answer=answers)   # -> list[float]; keywords only

Built-ins: math_answer, format, overlong_penalty, code_execution, reward_model, llm_judge.
Answer helpers for evaluation live in `rewards.math` (extract_answer, normalize_number,
answers_equal).
"""
from .combine import WeightedSum, acall_reward, call_reward, combine
from .registry import (RewardSignatureError, RewardSpec, UnknownRewardError, check_signature, register,
                       registered_names, resolve)

__all__ = ["RewardSignatureError", "RewardSpec", "UnknownRewardError", "WeightedSum", "acall_reward", "call_reward",
           "check_signature", "combine", "register", "registered_names", "resolve"]
