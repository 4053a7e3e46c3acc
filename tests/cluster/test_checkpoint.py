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
