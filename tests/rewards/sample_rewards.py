"""Reward functions for tests, addressed as `tests.rewards.sample_rewards:<name>` (module:function)."""
import asyncio
import time


def constant(prompts, completions, value=1.0, **_):
    return [float(value)] * len(completions)


def length(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def raises(prompts, completions, **_):
    raise RuntimeError("boom from a reward function")


def sleeps(prompts, completions, seconds=60.0, **_):
    time.sleep(seconds)
    return [1.0] * len(completions)


def raises_on_marker(prompts, completions, **_):
    """Fails only the batches that contain the completion "bad"."""
    if "bad" in completions:
        raise ValueError("bad sample in batch")
    return [1.0] * len(completions)


def wrong_length(prompts, completions, **_):
    return [1.0] * (len(completions) + 1)


def uses_column(prompts, completions, gold=None, **_):
    return [1.0 if c == g else 0.0 for c, g in zip(completions, gold)]


async def async_contains(prompts, completions, needle="yes", **_):
    await asyncio.sleep(0.01)
    return [1.0 if needle in c else 0.0 for c in completions]


class EchoJudge:
    """A judge backend: replies with the score written in the completion after 'S='."""

    def __init__(self, suffix=""):
        self.suffix = suffix
        self.calls = []

    def generate(self, prompts, n, max_tokens, temperature):
        self.calls.append((list(prompts), n, max_tokens, temperature))
        out = []
        for p in prompts:
            tail = p.split("S=", 1)[1].split()[0] if "S=" in p else "none"
            out.append([f"Score: {tail}{self.suffix}"] * n)
        return out


class AsyncEchoJudge(EchoJudge):
    async def generate(self, prompts, n, max_tokens, temperature):
        await asyncio.sleep(0)
        return EchoJudge.generate(self, prompts, n, max_tokens, temperature)


def make_judge(suffix=""):
    return EchoJudge(suffix)


def dies(prompts, completions, **_):
    """Ends the worker process itself (as a segfault or the OOM killer would)."""
    import os
    os._exit(1)
