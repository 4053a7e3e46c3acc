"""A Hugging Face hub cache built by the tests, no network: `cache_repo(cache, "Org/Name", folder)` lays
`folder` out as the hub cache does (`models--Org--Name/snapshots/<commit>/...` + `refs/main`), its files
linked, not copied. Tests point HF_HUB_CACHE at `cache` with HF_HUB_OFFLINE=1 (tests/conftest.py sets
that) and name the repo as a user would (tests/ is on sys.path: its conftest.py lives there)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

# ../shared beside the checkout; POSTTRAIN_SMOLLM2_GGUF names another copy (the GPU machine gets
# the file in parts, joined where the command puts it)
SMOLLM2_GGUF = os.environ.get("POSTTRAIN_SMOLLM2_GGUF") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "shared", "models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")


def go_offline(monkeypatch, hub_cache: str, datasets_cache: str) -> str:
    """This test's Hugging Face hub cache and datasets cache, offline (nothing is fetched); the hub cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", hub_cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", datasets_cache)
    return hub_cache


# a dataset repo without a loading script: README.md declares two subsets, each with two splits
DATASET_README = """---
configs:
- config_name: easy
  data_files:
  - {split: train, path: easy/train.jsonl}
  - {split: test, path: easy/test.jsonl}
- config_name: hard
  data_files:
  - {split: train, path: hard/train.jsonl}
  - {split: test, path: hard/test.jsonl}
---
Arithmetic in two subsets, each with a train and a test split.
"""


def write_dataset_repo(folder, rows: Callable[[str, str], list[dict]]) -> str:
    """DATASET_README and SUBSET/SPLIT.jsonl files under `folder`, rows(subset, split) in each."""
    for subset in ("easy", "hard"):
        os.makedirs(os.path.join(folder, subset), exist_ok=True)
        for split in ("train", "test"):
            with open(os.path.join(folder, subset, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows(subset, split))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(DATASET_README)
    return str(folder)


def cache_repo(cache_dir: str, repo_id: str, folder: str, repo_type: str = "model") -> str:
    """Add `folder` (every file under it) to the hub cache `cache_dir` as `repo_id` at branch main;
    returns the snapshot folder."""
    kind = {"model": "models", "dataset": "datasets"}[repo_type]
    root = os.path.join(cache_dir, f"{kind}--{repo_id.replace('/', '--')}")
    commit = hashlib.sha1(f"{repo_type}:{repo_id}".encode()).hexdigest()
    snap = os.path.join(root, "snapshots", commit)
    for base, _, files in os.walk(folder):
        for name in files:
            src = os.path.join(base, name)
            dst = os.path.join(snap, os.path.relpath(src, folder))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.path.abspath(src), dst)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    return snap
