"""Rewards written in TRL's style, addressed as `tests.actors.trl_style_reward:<name>` or by the
names they register: every reward function is called with keywords (prompts=, completions=,
each dataset column, completion_lengths=, the spec's kwargs), so these work as they are."""
from rewards import register


def trl_reward(completions, **kwargs):
    """TRL's `f(completions, **kwargs)`: prompts and the columns arrive in kwargs."""
    assert "prompts" in kwargs
    return [float(len(c)) for c in completions]


@register("test_trl_exact")
def exact(prompts, completions, answer, **kwargs):
    """A required column parameter, and a spec kwarg through **kwargs."""
    bonus = kwargs.get("bonus", 0.0)
    return [1.0 + bonus if c == a else 0.0 for c, a in zip(completions, answer)]


def lengths(prompts, completions, completion_lengths, answer=None, scale=1.0):
    """No **kwargs: named parameters only (works while the batch has no other columns)."""
    return [scale * n for n in completion_lengths]


def completions_only(completions):
    """No **kwargs and no prompts: cannot take the call."""
    return [0.0] * len(completions)


def positional_only(prompts, completions, /, **kwargs):
    return [0.0] * len(completions)


def old_positional(p, c, **kwargs):
    """Written for a positional call: prompts= and completions= land in kwargs, p and c get nothing."""
    return [0.0] * len(c)
