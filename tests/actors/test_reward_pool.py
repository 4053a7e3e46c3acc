"""RewardPool on a local Ray: parallel scoring, failure and timeout isolation, async terms,
weighted totals, the reward-model actor, and the stop when a term fails on most samples
(max_failure_rate; the isolation tests set it to 1 = never stop)."""
import time

import pytest

from actors.reward import RewardFailureError, RewardPool, RewardResult
from rewards import RewardSpec, UnknownRewardError

FNS = "tests.rewards.sample_rewards"


@pytest.fixture
def make_pool(ray_local):
    pools = []

    def make(specs, **kw):
        pool = RewardPool(specs, **kw)
        pools.append(pool)
        return pool

    yield make
    for p in pools:  # free the actors for the other tests of the session
        p.shutdown()


def test_weighted_total_async_terms_and_builtins(make_pool):
    pool = make_pool([
        RewardSpec("math_answer", 1.0),
        RewardSpec("format", 0.5, {"style": "hash"}),
        RewardSpec(f"{FNS}:async_contains", 2.0, {"needle": "5"}),
        RewardSpec(f"{FNS}:length", -0.1, label="len"),
        RewardSpec("code_execution", 0.0, {"timeout_s": 5.0}),  # weight 0: logged, not in the total
    ], num_actors=2, batch_size=2, timeout_s=20.0)
    comps = ["2+3\n#### 5", "#### 4", "it is 7", "so\n#### 10", "5"]
    res = pool.score(["q"] * 5, comps, {"answer": ["#### 5", "#### 4", "#### 7", "#### 1", "#### 5"],
                                        "tests": [["assert True"]] * 5})
    assert isinstance(res, RewardResult)
    assert res.per_function["math_answer"] == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert res.per_function["format"] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert res.per_function[f"{FNS}:async_contains"] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert res.per_function["len"] == [float(len(c)) for c in comps]
    # each completion run as Python in the sandbox: "it is 7" does not parse, "so" is an unknown name
    assert res.per_function["code_execution"] == [1.0, 1.0, 0.0, 0.0, 1.0]
    expected = [m + 0.5 * f + 2 * a - 0.1 * n for m, f, a, n in
                zip(*(res.per_function[k] for k in ["math_answer", "format", f"{FNS}:async_contains", "len"]))]
    assert res.total == pytest.approx(expected)
    assert sum(res.failures.values()) == sum(res.timeouts.values()) == 0 and res.errors == []


def test_a_raising_function_yields_the_failure_reward_and_is_counted(make_pool, caplog):
    pool = make_pool([RewardSpec(f"{FNS}:raises"), RewardSpec(f"{FNS}:constant", 2.0, {"value": 1.5}),
                      RewardSpec(f"{FNS}:raises_on_marker", label="marker"), RewardSpec(f"{FNS}:wrong_length")],
                     num_actors=2, failure_reward=-1.0, batch_size=2, max_failure_rate=1.0)
    with caplog.at_level("WARNING", logger="actors.reward"):
        res = pool.score(["p"] * 5, ["a", "b", "bad", "c", "d"])
    assert res.per_function[f"{FNS}:raises"] == [-1.0] * 5
    assert res.per_function["marker"] == [1.0, 1.0, -1.0, -1.0, 1.0]  # only the batch holding "bad" fails
    assert res.per_function[f"{FNS}:wrong_length"] == [-1.0] * 5
    assert res.failures == {f"{FNS}:raises": 5, f"{FNS}:constant": 0, "marker": 2, f"{FNS}:wrong_length": 5}
    assert res.total == pytest.approx([-1 + 3 + 1 - 1] * 2 + [-1 + 3 - 1 - 1] * 2 + [-1 + 3 + 1 - 1])
    assert any("RuntimeError: boom from a reward function" in e for e in res.errors)
    assert len(res.errors) <= 5
    assert "boom" in caplog.text


def test_a_hung_function_times_out_and_the_pool_goes_on(make_pool):
    pool = make_pool([RewardSpec(f"{FNS}:sleeps", kwargs={"seconds": 60}), RewardSpec(f"{FNS}:constant")],
                     num_actors=2, timeout_s=1.0, failure_reward=0.25, max_failure_rate=1.0)
    for round_ in range(2):  # the second round also waits for the replacement actor to start
        t0 = time.monotonic()
        res = pool.score(["p"] * 3, ["a", "b", "c"])
        elapsed = time.monotonic() - t0
        assert elapsed < (1.0 + 4.0 if round_ == 0 else 30.0), elapsed  # about the timeout, not the 60 s sleep
        assert res.per_function[f"{FNS}:sleeps"] == [0.25] * 3
        assert res.per_function[f"{FNS}:constant"] == [1.0] * 3
        assert res.timeouts[f"{FNS}:sleeps"] == 3 and res.failures[f"{FNS}:sleeps"] == 0
        assert "timed out after 1s" in res.errors[0]


def test_a_dead_actor_is_replaced(make_pool):
    pool = make_pool([RewardSpec(f"{FNS}:dies"), RewardSpec(f"{FNS}:constant")], num_actors=1, failure_reward=-2.0,
                     max_failure_rate=1.0)
    for _ in range(2):
        res = pool.score(["p"] * 2, ["a", "b"])
        assert res.per_function[f"{FNS}:dies"] == [-2.0, -2.0] and res.failures[f"{FNS}:dies"] == 2
        assert res.per_function[f"{FNS}:constant"] == [1.0, 1.0]
        assert "actor died" in res.errors[0]


def test_pool_validates_specs_and_columns(make_pool):
    with pytest.raises(UnknownRewardError, match="registered names: .*math_answer"):
        RewardPool(["no_such_reward"])
    with pytest.raises(ValueError, match="appear twice"):
        RewardPool(["format", "format"])
    with pytest.raises(ValueError, match="num_actors"):
        RewardPool(["format"], num_actors=0)
    with pytest.raises(ValueError, match="kwargs.path"):
        RewardPool(["reward_model"])
    with pytest.raises(ValueError, match=r"unknown reward-model kwargs \['paht'\]"):
        RewardPool([RewardSpec("reward_model", kwargs={"paht": "/x"})])
    pool = make_pool(["format"], num_actors=1)
    with pytest.raises(ValueError, match="column 'answer' must be a list with one entry per sample"):
        pool.score(["p", "p"], ["a", "b"], {"answer": ["x"]})
    assert pool.score([], []).total == []


def test_reward_model_actor_scores_like_the_model(make_pool, tiny_tokenizer_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=pad)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(tmp_path / "rm")

    prompts, comps = ["Ava has 3 apples.", "Ben has 2 pens."] * 2, ["#### 3", "He has 2", "4", "#### 20 pens"]
    with torch.inference_mode():  # one at a time: no padding involved
        want = [model(**tok(p + c, return_tensors="pt")).logits[0, 0].item() for p, c in zip(prompts, comps)]

    rm_kwargs = {"path": str(tmp_path / "rm"), "tokenizer_path": tiny_tokenizer_dir, "batch_size": 3}
    pool = make_pool([RewardSpec("reward_model", 2.0, rm_kwargs)], timeout_s=60.0)  # no function terms: no workers
    res = pool.score(prompts, comps)
    assert res.per_function["reward_model"] == pytest.approx(want, abs=1e-4)  # batched with padding == unbatched
    assert res.total == pytest.approx([2 * w for w in want], abs=1e-4)
    assert res.failures["reward_model"] == 0


def test_a_reward_that_fails_on_most_samples_stops_with_its_first_error_and_the_signature(make_pool):
    """Issue 21, finding 6: a reward that raised on every batch let the run go on training on
    failure_reward. Now a term failing on more than max_failure_rate (default 0.5) of a call's
    samples stops, naming the error and how reward functions are called."""
    pool = make_pool([RewardSpec(f"{FNS}:raises"), RewardSpec(f"{FNS}:constant")], num_actors=1, batch_size=2)
    with pytest.raises(RewardFailureError) as err:
        pool.score(["p"] * 4, ["a", "b", "c", "d"])
    msg = str(err.value)
    assert "\n" not in msg
    assert f"'{FNS}:raises' failed on 4 of 4 samples" in msg
    assert "reward.max_failure_rate=0.5" in msg and "RuntimeError: boom" in msg
    assert "fn(prompts=, completions=, <dataset columns>=, completion_lengths=, <spec kwargs>=)" in msg

    # at or below the rate the failures stay isolated and counted (2 of 5 samples fail here)
    ok = make_pool([RewardSpec(f"{FNS}:raises_on_marker", label="marker")], num_actors=1, batch_size=2)
    res = ok.score(["p"] * 5, ["a", "b", "bad", "c", "d"])
    assert res.failures["marker"] == 2
    with pytest.raises(ValueError, match="max_failure_rate must be in"):
        RewardPool(["format"], max_failure_rate=1.5)
