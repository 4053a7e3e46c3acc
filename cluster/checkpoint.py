"""Ray Train checkpoints: where each rank reads its checkpoint's files, which checkpoint a run
resumes from, and how many are kept. The state itself (what a checkpoint holds, how it is written
and read, whether a folder is intact) is kernels/training_state.py, shared with the GRPO learner;
its names are re-exported here for the cluster layer.

On a filesystem path (output_dir/checkpoints, or a shared mount as trainer.storage_path) the
checkpoint folders themselves are the record, not Ray's snapshot of its checkpoint manager: Ray
registers an uploaded checkpoint some time after the upload, so after a Ctrl-C, SIGTERM or a
killed worker its snapshot misses the newest folders, which it then never prunes. So the driver
resumes from the newest intact folder (`choose_resume`, a corrupt one is named and passed over),
and rank 0 prunes after every checkpoint (`prune_checkpoints`), counting every folder of every
attempt. Under a URI (s3://, gs://) Ray's snapshot and its num_to_keep stay in charge.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from typing import Callable

from kernels.training_state import (STATE_FILE, checkpoint_problem, latest_checkpoint, load_training_state,
                                    newest_intact, read_state, restore_rng, rng_state, save_training_state,
                                    trainable_state, write_state)

__all__ = ["STATE_FILE", "checkpoint_files", "checkpoint_folders", "checkpoint_problem", "choose_resume",
           "is_local_path", "latest_checkpoint", "load_training_state", "newest_intact",
           "prune_checkpoints", "read_state", "restore_rng", "rng_state", "save_training_state",
           "trainable_state", "write_state"]

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints (see module doc)


def is_local_path(path: str) -> bool:
    """A filesystem path (local or a mounted shared folder), not a URI such as s3://bucket/x."""
    return "://" not in path or path.startswith("file://")


def checkpoint_folders(root: str) -> list[str]:
    """Ray Train's checkpoint folders under `root`, oldest first. Their names carry the time they
    were written (checkpoint_2025-01-31_12-00-00.123456), so name order is write order, across
    attempts."""
    root = root[len("file://"):] if root.startswith("file://") else root
    return sorted(d for d in glob.glob(os.path.join(root, "checkpoint_*")) if os.path.isdir(d))


def _state_step(folder: str) -> int | None:
    try:
        return int(read_state(folder)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune_checkpoints(folders: list[str], keep: int, protect: tuple[str, ...] = (), current_step: int | None = None,
                      step_of: Callable[[str], int | None] = _state_step) -> list[str]:
    """Delete all but `keep` of `folders` (ordered oldest to newest, every attempt's); returns the
    deleted ones. Kept first: the folders in `protect` (the one just written, the one resumed
    from), then the newest others. Stale folders go first: those whose step does not read, or is
    above `current_step` - left by an attempt that got further, passed over at resume because they
    were not intact, and superseded now that this attempt writes its own."""
    protect_set = {os.path.abspath(p) for p in protect if p}
    protected = [f for f in folders if os.path.abspath(f) in protect_set]
    others = [f for f in reversed(folders) if os.path.abspath(f) not in protect_set]
    steps = {f: step_of(f) for f in others}
    stale = {f for f, step in steps.items() if step is None or (current_step is not None and step > current_step)}
    order = protected + [f for f in others if f not in stale] + [f for f in others if f in stale]
    doomed = order[max(keep, len(protected)):]
    for f in doomed:
        shutil.rmtree(f, ignore_errors=True)
    return sorted(doomed)


def choose_resume(root: str, keep: int, warn: Callable[[str], None] = print) -> str | None:
    """Driver side, before Ray Train starts: the newest intact checkpoint under `root` (each newer
    corrupt or torn one named by `warn` in one line and passed over), or None. Ray's snapshot is
    dropped (its view lags the uploads and would point at an older folder) and the folders are
    pruned to `keep`, the chosen one kept."""
    folders = checkpoint_folders(root)
    chosen = newest_intact(folders, on_skip=lambda f, why: warn(
        f"checkpoint {f} is not intact ({why}); skipped, resuming from the one before it"))
    snapshot = os.path.join(root, RAY_SNAPSHOT)
    if os.path.exists(snapshot):
        os.remove(snapshot)
    prune_checkpoints(folders, keep, protect=(chosen,) if chosen else (),
                      current_step=_state_step(chosen) if chosen else None)
    return chosen


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
