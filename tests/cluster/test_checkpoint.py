"""cluster.checkpoint: the DDP path's resumable state, and clear errors for checkpoints it cannot load."""
from __future__ import annotations

import os

import pytest
import torch

from cluster.checkpoint import checkpoint_files, latest_checkpoint, load_training_state, save_training_state


def _setup(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # frozen weights are not saved
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def test_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path):
    model, opt, sched = _setup(0)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    save_training_state(str(tmp_path / "c1"), model, opt, sched, {"step": 7})
    expected_draw = torch.rand(3)

    other, opt2, sched2 = _setup(1)
    state = load_training_state(str(tmp_path / "c1"), other, opt2, sched2)
    assert state == {"step": 7}
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved
    for (n, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), n
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "c1")


def test_a_deepspeed_checkpoint_is_refused_by_the_ddp_path_with_the_reason(tmp_path):
    model, opt, sched = _setup(0)
    d = tmp_path / "ds"
    save_training_state(str(d), model, opt, sched, {"step": 1})
    os.remove(d / "optimizer.pt")
    (d / "deepspeed").mkdir()
    with pytest.raises(ValueError, match="written with trainer.strategy=deepspeed"):
        load_training_state(str(d), model, opt, sched)
    (d / "deepspeed").rmdir()
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        load_training_state(str(d), model, opt, sched)
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        load_training_state(str(tmp_path), model, opt, sched)


def test_each_rank_reads_a_remote_checkpoint_from_its_own_folder(tmp_path):
    """Ray's default download folder is shared by a node's processes, and a late rank downloads into
    it again while an earlier one reads; each rank gets a folder of its own, removed after use."""
    import pyarrow.fs
    from ray.train import Checkpoint

    src = tmp_path / "ckpt"
    model, opt, sched = _setup(0)
    save_training_state(str(src), model, opt, sched, {"step": 7})
    local = Checkpoint(str(src), filesystem=pyarrow.fs.LocalFileSystem())
    with checkpoint_files(local, 0) as d:
        assert d == str(src)  # read in place, no copy

    # the same files behind a filesystem that is not the local one, as with S3 or GCS
    remote = Checkpoint("ckpt", filesystem=pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem()))
    with checkpoint_files(remote, 0) as d0, checkpoint_files(remote, 1) as d1:
        assert d0 != d1 and str(src) not in (d0, d1)
        for d in (d0, d1):
            assert sorted(os.listdir(d)) == sorted(os.listdir(src))
            m, o, s = _setup(1)
            assert load_training_state(d, m, o, s)["step"] == 7
            torch.testing.assert_close(m[1].weight, model[1].weight)
    assert not os.path.exists(d0) and not os.path.exists(d1)


# ---------------------------------------------------------------------------------------------
# Issue 21: which checkpoint a run resumes from, and how many are kept (cluster/checkpoint.py)
# ---------------------------------------------------------------------------------------------

def _ray_folders(root, steps, corrupt=()):
    """Checkpoint folders as Ray Train names them (the time written), one per step, oldest first;
    Ray's snapshot lists only the first two, as after a Ctrl-C its registration lags the uploads."""
    import json

    model, opt, sched = _setup(0)
    out = []
    for i, step in enumerate(steps):
        d = root / f"checkpoint_2026-01-01_00-00-{i:02d}.000000"
        save_training_state(str(d), model, opt, sched, {"step": step})
        if step in corrupt:
            p = d / "optimizer.pt"
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # torn write
        out.append(str(d))
    (root / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": os.path.basename(f)} for f in out[:2]]}))
    return out


def test_checkpoint_problem_names_the_torn_or_corrupt_file(tmp_path):
    from kernels.training_state import checkpoint_problem

    model, opt, sched = _setup(0)
    d = tmp_path / "c"
    save_training_state(str(d), model, opt, sched, {"step": 3})
    assert checkpoint_problem(str(d)) is None
    good = (d / "optimizer.pt").read_bytes()
    (d / "optimizer.pt").write_bytes(good[: len(good) // 2])
    assert checkpoint_problem(str(d)).startswith("optimizer.pt: not a complete archive")
    (d / "optimizer.pt").write_bytes(good)
    weights = (d / "trainable.safetensors").read_bytes()
    (d / "trainable.safetensors").write_bytes(weights[:-4])
    assert "trainable.safetensors" in checkpoint_problem(str(d)) and "truncated" in checkpoint_problem(str(d))
    (d / "trainable.safetensors").write_bytes(weights)
    (d / "trainer_state.json").write_text("{")
    assert checkpoint_problem(str(d)).startswith("trainer_state.json does not parse")
    assert checkpoint_problem(str(tmp_path / "missing")) == "no trainer_state.json"


def test_a_corrupt_newest_checkpoint_is_named_once_and_the_one_before_is_resumed(tmp_path):
    """Finding 7: a torn optimizer.pt in the newest checkpoint blocked resume with a 147-line trace
    naming no folder; now it is named in one warning line and the previous intact one is used."""
    from cluster.checkpoint import choose_resume

    root = tmp_path / "train"
    folders = _ray_folders(root, [2, 4, 6], corrupt={6})
    warnings = []
    chosen = choose_resume(str(root), keep=3, warn=warnings.append)
    assert chosen == folders[1]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert folders[2] in warnings[0] and "optimizer.pt" in warnings[0] and "skipped" in warnings[0]
    m, o, s = _setup(1)
    assert load_training_state(chosen, m, o, s)["step"] == 4
    assert not (root / "checkpoint_manager_snapshot.json").exists()  # Ray's lagging view is not used


def test_pruning_counts_every_attempts_checkpoints(tmp_path):
    """Finding 5: with keep_checkpoints=2, four folders remained after one Ctrl-C (Ray's snapshot
    knew only two of them) and every pre-emption added more. Now exactly `keep` remain, at the
    resume and after each new checkpoint."""
    from cluster.checkpoint import checkpoint_folders, choose_resume, prune_checkpoints

    root = tmp_path / "train"
    folders = _ray_folders(root, [2, 4, 6, 8])  # one attempt, cut off with 2 folders unregistered
    assert choose_resume(str(root), keep=2, warn=print) == folders[3]
    assert checkpoint_folders(str(root)) == folders[2:]
    # the next attempt writes step 10: the worker prunes with the new folder protected
    model, opt, sched = _setup(0)
    new = str(root / "checkpoint_2026-01-02_00-00-00.000000")
    save_training_state(new, model, opt, sched, {"step": 10})
    prune_checkpoints(checkpoint_folders(str(root)), 2, protect=(new,), current_step=10)
    assert checkpoint_folders(str(root)) == [folders[3], new]


def test_pruning_drops_a_skipped_corrupt_checkpoint_before_intact_ones(tmp_path):
    """A corrupt checkpoint left above the resume point is superseded: it goes before intact ones."""
    from cluster.checkpoint import checkpoint_folders, choose_resume, prune_checkpoints

    root = tmp_path / "train"
    folders = _ray_folders(root, [2, 4, 6], corrupt={6})
    assert choose_resume(str(root), keep=2, warn=lambda m: None) == folders[1]
    assert checkpoint_folders(str(root)) == folders[:2]  # the corrupt step 6 went, not step 2
    model, opt, sched = _setup(0)
    new = str(root / "checkpoint_2026-01-02_00-00-00.000000")
    save_training_state(new, model, opt, sched, {"step": 6})
    prune_checkpoints(checkpoint_folders(str(root)), 1, protect=(new,), current_step=6)
    assert checkpoint_folders(str(root)) == [new]
