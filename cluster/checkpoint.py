"""Resumable training state: trainable weights (safetensors), optimizer, schedule, counters, RNG.

Only trainable parameters are saved (the LoRA adapter, or every weight for full fine-tuning):
the frozen base is rebuilt from the config, which is deterministic.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "trainer_state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """The torch, numpy and Python random generators' states (restored by `restore_rng`)."""
    return {"rng_torch": torch.get_rng_state(), "rng_numpy": np.random.get_state(), "rng_python": random.getstate()}


def restore_rng(saved: dict) -> None:
    torch.set_rng_state(saved["rng_torch"])
    np.random.set_state(saved["rng_numpy"])
    random.setstate(saved["rng_python"])


def write_state(directory: str, state: dict) -> None:
    """The counters (step, epoch, ...) as trainer_state.json."""
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f, indent=2)


def save_training_state(directory: str, model, optimizer, scheduler, state: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file(trainable_state(model), os.path.join(directory, "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **rng_state()},
               os.path.join(directory, "optimizer.pt"))
    write_state(directory, state)


def read_state(directory: str) -> dict:
    path = os.path.join(directory, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory}: not a training checkpoint (no {STATE_FILE})")
    with open(path) as f:
        return json.load(f)


def load_training_state(directory: str, model, optimizer, scheduler) -> dict:
    state = read_state(directory)
    if not os.path.exists(os.path.join(directory, "optimizer.pt")):
        from cluster.deepspeed_strategy import DS_SUBDIR

        if os.path.isdir(os.path.join(directory, DS_SUBDIR)):
            raise ValueError(f"{directory}: written with trainer.strategy=deepspeed (DeepSpeed shards); "
                             f"resume it with the same strategy, ZeRO stage and number of workers")
        raise ValueError(f"{directory}: incomplete checkpoint (no optimizer.pt)")
    weights = load_file(os.path.join(directory, "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"{directory}: checkpoint has parameters this model lacks "
                         f"(first: {missing[:3]}); was it made with another model config?")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    extra = torch.load(os.path.join(directory, "optimizer.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    restore_rng(extra)
    return state


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint folder with the highest step under `root` (searched two levels down)."""
    best, best_step = None, -1
    if not os.path.isdir(root):
        return None
    for dirpath, dirnames, filenames in os.walk(root):
        if STATE_FILE in filenames:
            try:
                step = read_state(dirpath).get("step", -1)
            except (OSError, ValueError):
                continue
            if step > best_step:
                best, best_step = dirpath, step
    return best


@contextlib.contextmanager
def checkpoint_files(checkpoint, rank: int):
    """A local folder with a Ray Train checkpoint's files, for this process alone, while the block runs.

    Checkpoints on a local (or shared, mounted) filesystem are read where they are. Others are
    downloaded into a folder of this rank's own and removed afterwards: Ray's default download
    folder is shared by the processes of a node, and a rank that comes late downloads into it again
    while an earlier one is reading (a torn optimizer.pt on resume).
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    tmp = tempfile.mkdtemp(prefix=f"posttrain-resume-rank{rank}-")
    try:
        yield checkpoint.to_directory(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
