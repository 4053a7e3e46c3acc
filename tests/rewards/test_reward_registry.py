"""Registry: names, module:function paths, specs and the weighted combination."""
import subprocess
import sys

import pytest

import rewards
from rewards import RewardSpec, UnknownRewardError, combine, register, registered_names, resolve
from rewards.combine import call_reward

BUILTINS = {"math_answer", "format", "overlong_penalty", "code_execution", "reward_model", "llm_judge"}


def test_builtins_are_registered_and_resolve_by_name():
    assert BUILTINS <= set(registered_names())
    from rewards.math import math_answer
    assert resolve("math_answer") is math_answer


def test_module_function_paths():
    from tests.rewards import sample_rewards
    assert resolve("tests.rewards.sample_rewards:constant") is sample_rewards.constant
    assert resolve("tests.rewards.sample_rewards:EchoJudge.generate") is sample_rewards.EchoJudge.generate
    assert resolve(sample_rewards.length) is sample_rewards.length   # a callable passes through


@pytest.mark.parametrize("spec, match", [
    ("no_such_reward", r"unknown reward 'no_such_reward'; registered names: .*code_execution.*math_answer"),
    ("tests.rewards.sample_rewards:missing", "has no attribute 'missing'"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("tests.rewards.sample_rewards:", "must look like 'package.module:function'"),
])
def test_resolve_errors_say_what_is_wrong(spec, match):
    with pytest.raises(UnknownRewardError, match=match):
        resolve(spec)


def test_register_decorator_and_name_clash():
    @register("test_registry_brevity")
    def brevity(prompts, completions, **_):
        return [-len(c) / 10 for c in completions]

    assert resolve("test_registry_brevity") is brevity
    register("test_registry_brevity")(brevity)  # the same function again is fine

    with pytest.raises(ValueError, match="already taken"):
        @register("test_registry_brevity")
        def other(prompts, completions, **_):
            return [0.0]
    with pytest.raises(ValueError, match="without ':'"):
        register("a:b")


def test_reward_spec_validation_names_the_field():
    s = RewardSpec("math_answer", 2, {"correct": 1.0})
    assert (s.weight, s.key, s.kwargs) == (2.0, "math_answer", {"correct": 1.0})
    assert RewardSpec("format", label="fmt").key == "fmt"
    for args, match in [(("",), "name_or_path"), (("m:",), "name_or_path"), (("x", "1"), "weight"),
                        (("x", float("nan")), "weight"), (("x", True), "weight"), (("x", 1.0, [1]), "kwargs"),
                        (("x", 1.0, {"a-b": 1}), "kwargs"), (("x", 1.0, {}, ""), "label")]:
        with pytest.raises(ValueError, match=f"RewardSpec.{match}"):
            RewardSpec(*args)
    with pytest.raises(AttributeError):
        s.weight = 3.0  # frozen


def test_reward_spec_from_config():
    assert RewardSpec.from_config("format") == RewardSpec("format")
    s = RewardSpec.from_config({"name": "overlong_penalty", "weight": -0.5, "kwargs": {"max_len": 9}})
    assert s == RewardSpec("overlong_penalty", -0.5, {"max_len": 9})
    assert RewardSpec.from_config({"name_or_path": "format"}).name_or_path == "format"
    with pytest.raises(ValueError, match=r"unknown keys \['wieght'\]"):
        RewardSpec.from_config({"name": "format", "wieght": 1})
    with pytest.raises(ValueError, match="missing 'name'"):
        RewardSpec.from_config({"weight": 1})


def test_weighted_combination_sync_and_async():
    ws = combine([
        RewardSpec("tests.rewards.sample_rewards:length", 0.5),
        RewardSpec("tests.rewards.sample_rewards:async_contains", 2.0, {"needle": "y"}),
        {"name": "tests.rewards.sample_rewards:uses_column", "weight": -1.0},
    ])
    per, total = ws.detailed(["p", "p"], ["yy", "n"], gold=["yy", "x"])
    assert per == {"tests.rewards.sample_rewards:length": [2.0, 1.0],
                   "tests.rewards.sample_rewards:async_contains": [1.0, 0.0],
                   "tests.rewards.sample_rewards:uses_column": [1.0, 0.0]}
    assert total == pytest.approx([0.5 * 2 + 2 * 1 - 1, 0.5 * 1])
    assert ws(["p"], ["y"], gold=["y"]) == pytest.approx([0.5 + 2 - 1])


def test_combination_rejects_duplicates_and_bad_scores():
    with pytest.raises(ValueError, match="appear twice"):
        combine(["format", "format"])
    combine(["format", RewardSpec("format", label="format_hash", kwargs={"style": "hash"})])
    with pytest.raises(ValueError, match="returned 3 scores for 2 samples"):
        call_reward(resolve("tests.rewards.sample_rewards:wrong_length"), ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match=r"kwargs \['gold'\] clash with dataset columns"):
        call_reward(resolve("tests.rewards.sample_rewards:uses_column"), ["a"], ["a"], {"gold": ["a"]}, {"gold": 1})


def test_rewards_package_is_pure_python():
    """rewards/ imports no torch, no Ray and nothing else of the project."""
    code = ("import sys, rewards, rewards.math, rewards.code, rewards.model_based; rewards.registered_names(); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'ray', 'transformers', 'kernels', 'actors', 'cluster', 'jobs')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert rewards.__all__
