"""Runs that are interrupted, resumed or misconfigured (issue 21, findings 5-8 and the smaller ones),
tested on temp folders without Ray: GRPO's checkpoints (pruning across attempts, a torn save, a
corrupt newest one), the refusal of a resume with a changed training config (SFT and GRPO),
Ctrl-C / SIGTERM ending in one line with 130 / 143, and grpo.prompts_per_step against the prompt set.
The SFT checkpoint folder logic (Ray Train's) is tested in tests/cluster/test_checkpoint.py."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from kernels.training_state import save_training_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_SFT = os.path.join(ROOT, "jobs", "configs", "tiny-sft.yaml")
TINY_GRPO = os.path.join(ROOT, "jobs", "configs", "tiny-grpo.yaml")


def _sft_cfg(out, *overrides):
    from jobs.config import load
    from jobs.sft import SFTJobConfig

    return load(SFTJobConfig, TINY_SFT, [f"output_dir={out}", *overrides])


def _grpo_cfg(out, *overrides):
    from jobs.config import load
    from jobs.grpo import GRPOJobConfig

    return load(GRPOJobConfig, TINY_GRPO, [f"output_dir={out}", *overrides])


@pytest.fixture
def restore_signals():
    """Put back pytest's SIGINT/SIGTERM handlers after a test that installs the jobs' ones."""
    import cluster.ray_session as rs

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    rs._stop_handlers_on = False


# ------------------------------------------------------------------------- GRPO checkpoints

class _Learners:
    """LearnerGroup's save verb, writing the real training state of a small model."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 3)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.model(torch.randn(2, 4)).sum().backward()
        self.opt.step()

    def save(self, path):
        save_training_state(path, self.model, self.opt, None, {"step": 1})
        return path


def _grpo_checkpoints(tmp_path, steps, keep=10):
    from cluster.run_files import RunFiles
    from jobs.grpo import PromptStream, save_checkpoint

    files = RunFiles(str(tmp_path))
    stream = PromptStream([{"text": str(i)} for i in range(8)], seed=0)
    learners = _Learners()
    for step in steps:
        stream.take(2)
        save_checkpoint(files, learners, step, stream, keep)
    return files, learners, stream


def test_grpo_a_corrupt_newest_checkpoint_is_named_and_passed_over_and_later_pruned_first(tmp_path, capsys):
    """Findings 7 and 5 for GRPO: the newest checkpoint (torn optimizer.pt) made resume fail with a
    long trace; now it is named in one line and step 20 is resumed. Pruning counted folders by name,
    so with keep 2 the next save (step 25) kept the corrupt step 30 and deleted the resume point."""
    from jobs.grpo import checkpoint_problem, checkpoints, save_checkpoint
    from kernels.training_state import newest_intact

    files, learners, stream = _grpo_checkpoints(tmp_path, [10, 20, 30])
    opt = os.path.join(checkpoints(files)[-1], "optimizer.pt")
    with open(opt, "r+b") as f:
        f.truncate(os.path.getsize(opt) // 2)
    skipped = []
    last = newest_intact(checkpoints(files), problem=checkpoint_problem, on_skip=lambda f, why: skipped.append((f, why)))
    assert last.endswith("step_000020")
    assert len(skipped) == 1 and skipped[0][0].endswith("step_000030") and skipped[0][1].startswith("optimizer.pt")

    save_checkpoint(files, learners, 25, stream, keep=2)
    assert [os.path.basename(c) for c in checkpoints(files)] == ["step_000020", "step_000025"]


def test_grpo_an_interrupted_save_is_never_a_checkpoint_and_keep_counts_every_attempt(tmp_path):
    """Finding 5 for GRPO: folders of earlier attempts count toward keep_checkpoints, and a save cut
    off by Ctrl-C (written as .partial) is neither resumed from nor left behind."""
    from jobs.grpo import checkpoints, save_checkpoint

    files, learners, stream = _grpo_checkpoints(tmp_path, [10, 20, 30, 40])  # an attempt with keep 10
    os.makedirs(files.path("checkpoints", "step_000050.partial"))  # the save Ctrl-C cut off
    assert [os.path.basename(c) for c in checkpoints(files)][-1] == "step_000040"
    save_checkpoint(files, learners, 50, stream, keep=2)  # the next attempt, keep 2
    assert sorted(os.listdir(files.path("checkpoints"))) == ["step_000040", "step_000050"]


# ------------------------------------------------------------------------- changed config on resume

def test_config_changes_lists_differing_keys_and_leaves_out_the_allowed_ones():
    from cluster.run_files import config_changes

    saved = {"max_steps": 8, "trainer": {"lr": 0.003, "log_every": 1}, "eval": {"max_problems": 10}, "tags": [1]}
    new = {"max_steps": 40, "trainer": {"lr": 0.001, "log_every": 5}, "eval": {"max_problems": 99}, "tags": (1,),
           "added_later": 1}
    assert config_changes(saved, new, ("max_steps", "trainer.log_every", "eval")) == ["trainer.lr: 0.003 -> 0.001"]


def _sft_run_folder(cfg):
    """output_dir as a run that saved a checkpoint leaves it: config.yaml and a checkpoint folder."""
    from cluster.train import checkpoint_root
    from jobs.config import dump_yaml

    os.makedirs(cfg.output_dir, exist_ok=True)
    dump_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    os.makedirs(os.path.join(checkpoint_root(cfg.trainer, cfg.output_dir), "checkpoint_2026-01-01_00-00-00.000000"))


def test_sft_resume_with_a_changed_training_config_is_refused_in_one_line_exit_2(tmp_path, capsys, restore_signals):
    """Finding 8: re-running with another trainer.lr on the same output_dir silently resumed
    ("resumed from step 8") and overwrote config.yaml. Now it exits 2 naming the differing keys,
    before Ray starts; config.yaml is left as it was."""
    from jobs.sft import main

    out = str(tmp_path / "run")
    _sft_run_folder(_sft_cfg(out, "max_steps=8"))
    before = open(os.path.join(out, "config.yaml")).read()
    code = main([TINY_SFT, f"output_dir={out}", "max_steps=8", "trainer.lr=1e-3", "model.lora.r=8"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "model.lora.r: 16 -> 8" in err and "trainer.lr: 0.003 -> 0.001" in err and "trainer.resume=force" in err
    assert open(os.path.join(out, "config.yaml")).read() == before


def test_sft_harmless_keys_and_resume_force_are_accepted(tmp_path, capsys):
    from jobs.config import ConfigError
    from jobs.sft import check_resume
    from cluster.run_files import RunFiles

    out = str(tmp_path / "run")
    _sft_run_folder(_sft_cfg(out, "max_steps=8"))
    files = RunFiles(out)
    check_resume(_sft_cfg(out, "max_steps=40", "trainer.log_every=5", "trainer.checkpoint_every=4",
                          "trainer.keep_checkpoints=3", "trainer.eval_every=2", "eval_accuracy.enabled=true"), files)
    with pytest.raises(ConfigError, match="trainer.num_workers: 2 -> 1"):  # the global batch changes
        check_resume(_sft_cfg(out, "trainer.num_workers=1"), files)
    check_resume(_sft_cfg(out, "trainer.lr=1e-3", "trainer.resume=force"), files)
    assert "resume=force: resuming with a changed config (trainer.lr: 0.003 -> 0.001" in capsys.readouterr().out
    # no checkpoint yet: nothing to resume, any config starts afresh
    other = str(tmp_path / "fresh")
    os.makedirs(other)
    from jobs.config import dump_yaml

    dump_yaml(_sft_cfg(other), os.path.join(other, "config.yaml"))
    check_resume(_sft_cfg(other, "trainer.lr=1e-3"), RunFiles(other))


def test_grpo_resume_with_a_changed_training_config_is_refused(tmp_path):
    from cluster.run_files import RunFiles
    from jobs.config import ConfigError, dump_yaml
    from jobs.grpo import check_resume_config

    out = str(tmp_path / "run")
    cfg = _grpo_cfg(out)
    os.makedirs(os.path.join(out, "checkpoints", "step_000020"))
    dump_yaml(cfg, os.path.join(out, "config.yaml"))
    files = RunFiles(out)
    check_resume_config(_grpo_cfg(out, "max_steps=100", "checkpoint_every=5", "eval.max_problems=10"), files)
    with pytest.raises(ConfigError) as err:
        check_resume_config(_grpo_cfg(out, "grpo.lr=2e-3", "rollout.n=4"), files)
    assert "grpo.lr: 0.001 -> 0.002" in str(err.value) and "rollout.n: 8 -> 4" in str(err.value)
    assert "resume=force" in str(err.value) and "\n" not in str(err.value)
    check_resume_config(_grpo_cfg(out, "grpo.lr=2e-3", "resume=force"), files)


# ------------------------------------------------------------------------- Ctrl-C and SIGTERM

def test_sigint_during_training_reaches_the_job_not_ray_trains_handler(restore_signals):
    """Ray Train's own SIGINT handler (installed when fit runs on the main thread) aborted the run
    and exited 1 without a word: fit now runs on a helper thread and the signal raises Interrupted."""
    from cluster.ray_session import Interrupted, stop_on_signals
    from cluster.train import _fit_off_main_thread

    stop_on_signals()

    def fake_fit():
        time.sleep(10)

    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted) as e:
        _fit_off_main_thread(fake_fit)
    assert time.monotonic() - t0 < 5
    assert e.value.exit_code == 130 and e.value.name == "SIGINT"


def test_sigterm_and_ctrl_c_end_with_one_line_naming_the_last_checkpoint(tmp_path, capsys, restore_signals):
    from cluster.ray_session import Interrupted, stop_on_signals
    from cluster.train import checkpoint_root
    from jobs.grpo import report_interrupt as grpo_report
    from jobs.sft import report_interrupt as sft_report

    stop_on_signals()
    with pytest.raises(Interrupted) as e:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert e.value.exit_code == 143

    cfg = _sft_cfg(str(tmp_path / "sft"))
    root = checkpoint_root(cfg.trainer, cfg.output_dir)
    assert sft_report("[sft]", e.value, cfg) == 143
    assert "no checkpoint was saved yet" in capsys.readouterr().err
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_training_state(os.path.join(root, "checkpoint_2026-01-01_00-00-00.000000"), model, opt, None, {"step": 8})
    assert sft_report("[sft]", KeyboardInterrupt(), cfg) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "[sft] stopped by SIGINT: the last checkpoint saved is step 8" in err
    assert "re-run the same command to resume" in err

    gcfg = _grpo_cfg(str(tmp_path / "grpo"))
    _grpo_checkpoints(tmp_path / "grpo", [20])
    assert grpo_report(e.value, gcfg) == 143
    err = capsys.readouterr().err
    assert err.startswith("[grpo] stopped by SIGTERM: the last checkpoint saved is step 20") and err.count("\n") == 1


# ------------------------------------------------------------------------- prompts_per_step

def test_prompts_per_step_larger_than_the_prompt_set_is_an_error_naming_both(tmp_path):
    """A step took prompts_per_step prompts from a smaller set, repeating prompts within the step."""
    from jobs.config import ConfigError
    from jobs.grpo import check_prompts_per_step

    cfg = _grpo_cfg(str(tmp_path), "data.builtin_train_size=20")  # prompts_per_step 32
    with pytest.raises(ConfigError, match=r"grpo.prompts_per_step: 32 is more than the 20 prompts of "
                                          r"data.builtin_train_size"):
        check_prompts_per_step(cfg, None)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"question": "q{i}", "answer": "#### {i}"}}\n' for i in range(5)))
    cfg = _grpo_cfg(str(tmp_path), f"data.path={data}")
    with pytest.raises(ConfigError, match=r"32 is more than the 5 prompts of data.path"):
        check_prompts_per_step(cfg, 5)
    check_prompts_per_step(_grpo_cfg(str(tmp_path), "grpo.prompts_per_step=5"), 5)


def test_reward_max_failure_rate_defaults_to_half_and_is_checked(tmp_path):
    """Finding 6 (the config side; the stop itself: tests/actors/test_reward_pool.py)."""
    from jobs.config import ConfigError

    assert _grpo_cfg(str(tmp_path)).reward.max_failure_rate == 0.5
    with pytest.raises(ConfigError, match=r"reward.max_failure_rate: must be in \[0, 1\], got 2"):
        _grpo_cfg(str(tmp_path), "reward.max_failure_rate=2")


def test_sft_a_broken_resume_from_is_refused_naming_the_file(tmp_path):
    from cluster.run_files import RunFiles
    from jobs.config import ConfigError
    from jobs.sft import check_resume

    ckpt = tmp_path / "ckpt"
    model = torch.nn.Linear(2, 2)
    save_training_state(str(ckpt), model, torch.optim.AdamW(model.parameters()), None, {"step": 4})
    out = str(tmp_path / "run")
    check_resume(_sft_cfg(out, f"trainer.resume_from={ckpt}"), RunFiles(out))
    (ckpt / "optimizer.pt").write_bytes(b"torn")
    with pytest.raises(ConfigError, match=r"trainer.resume_from: .* is not an intact checkpoint \(optimizer.pt: "):
        check_resume(_sft_cfg(out, f"trainer.resume_from={ckpt}"), RunFiles(out))
