"""Resumable training state, one format for SFT/CPT workers and the GRPO learner: trainable
weights (trainable.safetensors), optimizer + schedule + RNG (optimizer.pt, read back with
weights_only=True), counters (trainer_state.json).

Only trainable parameters are saved (the LoRA adapter, or every weight for full fine-tuning):
the frozen base is rebuilt from the config, which is deterministic. `checkpoint_problem` tells
whether a folder is intact (cheaply: headers, archive index, pickle); `newest_intact` picks the
resume point, passing over a torn or corrupt newest checkpoint. No Ray here: cluster/ adds
the Ray Train checkpoint plumbing (cluster/checkpoint.py), DeepSpeed its shards in DS_SUBDIR.
"""
from __future__ import annotations

import json
import os
import random
import struct
import zipfile
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

DS_SUBDIR = "deepspeed"  # the DeepSpeed strategy's shards (cluster/deepspeed_strategy.py)
STATE_FILE = "trainer_state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """The torch, numpy and Python random generators' states (restored by `restore_rng`), as
    tensors, numbers and lists only: `torch.load(weights_only=True)` reads them back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"rng_torch": torch.get_rng_state(),
            "rng_numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "rng_python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}


def restore_rng(saved: dict) -> None:
    torch.set_rng_state(saved["rng_torch"])
    n = saved["rng_numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = saved["rng_python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def load_tensors(path: str) -> dict:
    """torch.load with weights_only=True: tensors, numbers, strings and containers only. A
    checkpoint is data; a pickled object in it (code that would run on load) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a checkpoint file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e


def write_state(directory: str, state: dict) -> None:
    """The counters (step, epoch, ...) as trainer_state.json."""
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f, indent=2)


def save_training_state(directory: str, model, optimizer, scheduler, state: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file(trainable_state(model), os.path.join(directory, "trainable.safetensors"))
    sched = scheduler.state_dict() if scheduler is not None else {}  # LambdaLR keeps no functions (None)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": sched, **rng_state()},
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
    extra = load_tensors(os.path.join(directory, "optimizer.pt"))
    optimizer.load_state_dict(extra["optimizer"])
    if scheduler is not None:
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


def _safetensors_problem(path: str) -> str | None:
    """None when the file's header parses and its tensors end where the file ends (not truncated)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"header of {n} bytes in a file of {size}"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "header is not JSON"
    try:
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return "header lists no tensor offsets"
    if 8 + n + max(ends, default=0) != size:
        return f"{size} bytes, the header describes {8 + n + max(ends, default=0)} (truncated?)"
    return None


def _torch_file_problem(path: str) -> str | None:
    """None when a torch.save file is a complete zip archive whose pickle loads with weights_only=True.
    Cheap: the archive's index and the pickle are read, the tensors only mapped (mmap), not read."""
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"member {info.filename} runs past the end of the file (truncated?)"
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a complete archive ({e})"
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to load means not intact; the reason is reported
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"does not load ({type(e).__name__}: {first[:200]})"
    return None


def checkpoint_problem(directory: str) -> str | None:
    """None when `directory` holds a complete, readable checkpoint (trainer_state.json parses,
    trainable.safetensors' header reads and matches its size, optimizer.pt - or, for DeepSpeed,
    rng.pt and the shard folder - loads); else one phrase naming the file and what is wrong."""
    state_path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(state_path):
        return f"no {STATE_FILE}"
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} does not parse ({e})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} has no integer 'step'"
    weights = os.path.join(directory, "trainable.safetensors")
    if not os.path.isfile(weights):
        return "no trainable.safetensors"
    why = _safetensors_problem(weights)
    if why:
        return f"trainable.safetensors: {why}"
    optim = os.path.join(directory, "optimizer.pt")
    if os.path.isfile(optim):
        why = _torch_file_problem(optim)
        return f"optimizer.pt: {why}" if why else None
    shards = os.path.join(directory, DS_SUBDIR)
    if os.path.isdir(shards):  # DeepSpeed: its shards are checked by DeepSpeed itself on load
        if not os.listdir(shards):
            return f"{DS_SUBDIR}/ is empty"
        rng = os.path.join(directory, "rng.pt")
        why = _torch_file_problem(rng) if os.path.isfile(rng) else "missing"
        return f"rng.pt: {why}" if why else None
    return "no optimizer.pt"


def newest_intact(folders: Sequence[str], on_skip: Callable[[str, str], None] | None = None,
                  problem: Callable[[str], str | None] = checkpoint_problem) -> str | None:
    """The newest intact checkpoint of `folders` (ordered oldest to newest): each newer one that is
    not intact is passed to on_skip(folder, what is wrong) and passed over."""
    for folder in reversed(list(folders)):
        why = problem(folder)
        if why is None:
            return folder
        if on_skip is not None:
            on_skip(folder, why)
    return None
