"""A reward written for another library's signature (TRL: `f(completions, **kwargs)`), for
tests/actors/test_reward_pool.py: called as fn(prompts, completions, **columns), it raises TypeError."""


def trl_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]
