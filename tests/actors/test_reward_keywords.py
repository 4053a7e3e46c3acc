"""Issue 17: reward functions are called with keywords (prompts=, completions=, every dataset
column by name, completion_lengths=, the spec's kwargs), so TRL-style functions work, registered
by name or as `module:function` from YAML; a signature that cannot take the call is refused with
the term and the parameter named, when the pool is built or before a scoring call runs a task."""
import pytest
import yaml

from actors.reward import RewardPool
from rewards import RewardSignatureError, RewardSpec, call_reward, check_signature, combine

MOD = "tests.actors.trl_style_reward"


def test_trl_style_functions_in_the_pool_by_path_and_by_registered_name(ray_local):
    from rewards import resolve
    from tests.actors import trl_style_reward            # registers test_trl_exact, in the driver only

    assert resolve("test_trl_exact") is trl_style_reward.exact

    config = yaml.safe_load(f"""
functions:
  - {MOD}:trl_reward
  - {{name: test_trl_exact, weight: 2.0, kwargs: {{bonus: 0.5}}}}
  - {{name: "{MOD}:exact", label: exact_by_path}}
  - {MOD}:lengths
""")
    with RewardPool(config["functions"], num_actors=1, batch_size=2) as pool:
        res = pool.score(["p"] * 3, ["7", "no", "12"],
                         {"answer": ["7", "8", "12"], "completion_lengths": [1, 1, 2]})
    assert res.per_function[f"{MOD}:trl_reward"] == [1.0, 2.0, 2.0]
    assert res.per_function["test_trl_exact"] == [1.5, 0.0, 1.5]
    assert res.per_function["exact_by_path"] == [1.0, 0.0, 1.0]
    assert res.per_function[f"{MOD}:lengths"] == [1.0, 1.0, 2.0]
    assert sum(res.failures.values()) == 0, res.errors


def test_builtins_and_combine_take_keywords():
    ws = combine([f"{MOD}:trl_reward", "math_answer", RewardSpec("overlong_penalty", kwargs={"max_len": 3})])
    per, _ = ws.detailed(["q", "q"], ["#### 5", "4"], answer=["5", "5"], completion_lengths=[2, 4])
    assert per == {f"{MOD}:trl_reward": [6.0, 1.0], "math_answer": [1.0, 0.0], "overlong_penalty": [0.0, -1.0]}
    assert call_reward(lambda completions, **kw: [float(kw["prompts"] == ["q"])], ["q"], ["c"]) == [1.0]


@pytest.mark.parametrize("fn, kwargs, columns, match", [
    ("positional_only", {}, None, "reward 'x': parameter 'prompts' is positional-only"),
    ("completions_only", {}, None, "reward 'x': takes no parameter 'prompts' .*add 'prompts' or \\*\\*kwargs"),
    ("old_positional", {}, ["answer"], "reward 'x': parameter 'p' gets no value: .*name its first parameters prompts"),
    ("lengths", {"scal": 2}, None, "reward 'x': takes no parameter 'scal' \\(a kwarg of the reward spec\\)"),
    ("lengths", {}, ["completion_lengths", "gold"], "reward 'x': takes no parameter 'gold' \\(a dataset column\\)"),
    ("lengths", {}, [], "reward 'x': parameter 'completion_lengths' gets no value: .*give it a default"),
    ("exact", {}, ["completion_lengths"], "reward 'x': parameter 'answer' gets no value: .*completion_lengths"),
])
def test_signature_errors_name_the_function_and_the_parameter(fn, kwargs, columns, match):
    import tests.actors.trl_style_reward as m

    with pytest.raises(RewardSignatureError, match=match):
        check_signature(getattr(m, fn), "x", kwargs, columns)
    assert issubclass(RewardSignatureError, TypeError) and issubclass(RewardSignatureError, ValueError)


def test_pool_refuses_a_bad_signature_before_any_task(ray_local):
    with pytest.raises(RewardSignatureError, match=f"reward '{MOD}:completions_only': takes no parameter 'prompts'"):
        RewardPool([f"{MOD}:completions_only"], num_actors=1)            # at build: no actor started
    with pytest.raises(RewardSignatureError, match="takes no parameter 'gold'"):
        RewardPool([f"{MOD}:lengths"], num_actors=1, columns=["gold", "completion_lengths"])
    with RewardPool([f"{MOD}:exact"], num_actors=1) as pool:             # answer: a column to come
        with pytest.raises(RewardSignatureError, match=f"reward '{MOD}:exact': parameter 'answer' gets no value"):
            pool.score(["p"], ["c"], {"gold": ["c"]})
        with pytest.raises(ValueError, match="named 'prompts' clashes"):
            pool.score(["p"], ["c"], {"answer": ["c"], "prompts": ["p"]})
        assert pool.score(["p"], ["c"], {"answer": ["c"]}).total == [1.0]
    with RewardPool([f"{MOD}:lengths"], num_actors=1) as pool:           # no **kwargs: every column named
        with pytest.raises(RewardSignatureError, match="takes no parameter 'gold'"):
            pool.score(["p"], ["c"], {"gold": ["c"], "completion_lengths": [1]})
