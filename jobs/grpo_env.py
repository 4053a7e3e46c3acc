"""The GRPO job's multi-turn side (env.name set; docs/agentic.md): episodes instead of single
completions, the environment's reward instead of reward functions, episode metrics, and held-out
success measured with greedy episodes on the rollout engines.

    rows = env_rows(prompts)                      # the prompt rows as the environment's reset() gets them
    rewards, res = score_episodes(groups)         # [G][n] Samples with .reward -> flat rewards, RewardResult
    record.update(episode_record(flat_samples))   # env/... metrics of a step
    held_out_success(cfg, rollouts)               # {"success", "n", "correct", "seconds"}
"""
from __future__ import annotations

import time

from actors.reward import RewardResult

ENV_TERM = "env"  # the reward term's name in metrics (reward/env/mean, accuracy)


def env_rows(prompts: list[dict]) -> list[dict]:
    """Each prompt's original data row (question, answer, messages, tests, ...), for reset()."""
    return [dict(p["row"]) for p in prompts]


def score_episodes(groups: list[list]) -> tuple[list[float], RewardResult]:
    """The environment's final reward of every episode, flattened group by group."""
    rewards = [float(s.reward) for g in groups for s in g]
    return rewards, RewardResult(per_function={ENV_TERM: list(rewards)}, total=list(rewards), failures={},
                                 timeouts={})


def episode_record(samples: list) -> dict[str, float]:
    """Per-step episode metrics: turns (mean and how many episodes ended after k turns), tool calls,
    the tool-error / timeout / malformed rates, how episodes ended, observation tokens."""
    eps = [s.episode for s in samples if getattr(s, "episode", None)]
    if not eps:
        return {}
    n = len(eps)
    calls = sum(e["tool_calls"] for e in eps)
    out = {"env/episodes": n, "env/turns_mean": sum(e["turns"] for e in eps) / n,
           "env/tool_calls_per_episode": calls / n,
           "env/tool_errors": sum(e["tool_errors"] for e in eps),
           "env/tool_error_rate": sum(e["tool_errors"] for e in eps) / calls if calls else 0.0,
           "env/tool_timeout_rate": sum(e["timeouts"] for e in eps) / calls if calls else 0.0,
           "env/malformed_rate": sum(1 for e in eps if e["malformed"]) / n,
           "env/observation_tokens_mean": sum(e["observation_tokens"] for e in eps) / n,
           "env/sampled_tokens_mean": sum(e["sampled_tokens"] for e in eps) / n}
    for k in sorted({e["turns"] for e in eps}):
        out[f"env/turns/{k}"] = sum(1 for e in eps if e["turns"] == k)
    for reason in sorted({e["finish"] for e in eps}):
        out[f"env/finish/{reason}"] = sum(1 for e in eps if e["finish"] == reason) / n
    return out


def eval_rows(cfg) -> list[dict]:
    """The held-out rows (eval.data; the built-in task's held-out split by default), eval.max_problems of them."""
    from cluster.evaluate import load_rows

    rows = load_rows(cfg.eval.data, subset=cfg.eval.subset, split=cfg.eval.split)
    return rows[:cfg.eval.max_problems] if cfg.eval.max_problems else rows


def held_out_success(cfg, rollouts, rows: list[dict]) -> dict:
    """Greedy episodes (temperature 0, one per row) on the rollout engines with the weights they
    hold: success = the share of episodes whose final reward is > 0."""
    t0 = time.time()
    groups = rollouts.collect(rollouts.episodes_async(rows, cfg.env.spec(), n=1, temperature=0.0,
                                                      max_total_tokens=cfg.env.max_total_tokens, seed=cfg.seed))
    eps = [g[0] for g in groups]
    correct = sum(1 for s in eps if s.reward > 0)
    turns = sum(s.episode["turns"] for s in eps) / max(len(eps), 1)
    return {"success": correct / max(len(eps), 1), "n": len(eps), "correct": correct, "turns_mean": turns,
            "seconds": time.time() - t0}
