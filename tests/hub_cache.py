"""A Hugging Face hub cache built by the tests, no network: `cache_repo(cache, "Org/Name", folder)` lays
`folder` out as the hub cache does (`models--Org--Name/snapshots/<commit>/...` + `refs/main`), its files
linked, not copied. Tests point HF_HUB_CACHE at `cache` with HF_HUB_OFFLINE=1 (tests/conftest.py sets
that) and name the repo as a user would (tests/ is on sys.path: its conftest.py lives there)."""
from __future__ import annotations

import hashlib
import os

SMOLLM2_GGUF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "shared", "models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")


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
