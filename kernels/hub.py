"""Hugging Face hub ids as users write them: `org/name` (or `org/name@revision`) -> a local folder.

    resolve_model(spec, field)       model.path: a local folder or .gguf file as it is; a hub id -> its snapshot
    resolve_tokenizer(spec, field)   model.tokenizer: the same, fetching tokenizer files only
    snapshot(repo_id, ...)           one repo (model or dataset) from the Hugging Face cache, or from the Hub
    is_hub_id / is_offline / hub_cache_dir / datasets_cache_dir

A local path always wins: "org/name" is a hub id only when no such file or folder exists here. An id
resolves through huggingface_hub.snapshot_download to the snapshot folder of one commit, so every later
reader (transformers, vLLM, Ray workers on this machine) loads the same files from disk. With
HF_HUB_OFFLINE=1 only the cache is looked at (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub);
otherwise the Hub names the revision's commit and missing files are fetched (a Hub that cannot be reached
falls back to the cache). The environment is read at each call, not when this module is imported.
"""
from __future__ import annotations

import functools
import glob
import os
import re

# what a model needs on disk (weights: safetensors; *.bin only when a repo has no safetensors)
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
TOKENIZER_FILES = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
_TRUE = {"1", "ON", "YES", "TRUE"}
# huggingface_hub's repo-id rule ([org/]name, letters, digits, - _ .), plus an optional @revision
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}(?:@[\w./-]+)?$")


def is_hub_id(text: str) -> bool:
    """`org/name`, `name` or either with `@revision`: the shape of a hub id (not whether it exists)."""
    name = str(text).split("@", 1)[0]
    return bool(_HUB_ID.match(str(text))) and ".." not in name and not name.endswith((".", "-"))


def split_revision(spec: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); no '@' -> (spec, None)."""
    repo_id, _, revision = str(spec).partition("@")
    return repo_id, revision or None


def is_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def datasets_cache_dir() -> str:
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.path.expanduser(os.environ["HF_DATASETS_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "datasets")
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)


def where() -> str:
    """Where ids were looked for, for messages: '(offline: HF_HUB_OFFLINE=1; cache: DIR)'."""
    return f"({'offline: HF_HUB_OFFLINE=1; ' if is_offline() else ''}cache: {hub_cache_dir()})"


@functools.lru_cache(maxsize=64)
def _snapshot(repo_id: str, revision: str | None, repo_type: str, patterns: tuple | None, offline: bool,
              cache_dir: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir,
                             local_files_only=offline, allow_patterns=list(patterns) if patterns else None)


def snapshot(spec: str, repo_type: str = "model", patterns: tuple | None = None) -> str:
    """The local snapshot folder of hub id `spec` (huggingface_hub errors pass through); one lookup
    per process for each id, cache and offline setting."""
    repo_id, revision = split_revision(spec)
    return _snapshot(repo_id, revision, repo_type, patterns, is_offline(), hub_cache_dir())


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [""])[0].strip()
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _not_found(e: BaseException) -> bool:
    """An id the cache (offline) or the Hub does not have, as opposed to another failure."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"LocalEntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError",
                         "HFValidationError"})


def _fetch(spec: str, field: str, what: str, patterns: tuple) -> str:
    try:
        return snapshot(spec, "model", patterns)
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds; one line names them
        source = "in the Hugging Face cache" if is_offline() else "on the Hugging Face Hub or in its cache"
        reason = "" if (is_offline() and _not_found(e)) else f": {_first_line(e)}"
        raise ValueError(f"{field}: {spec!r} is not a local folder, a .gguf file, or a {what} {source} "
                         f"{where()}{reason}") from None


def _local(spec: str) -> bool:
    return os.path.exists(os.path.expanduser(spec))


def resolve_model(spec: str, field: str = "model.path") -> str:
    """A model spec as a path transformers loads: a local folder or .gguf file (returned as given), or
    a hub id's snapshot folder (config.json and weights checked). A spec that is neither a local path
    nor shaped like a hub id is returned as given (the caller says what a path must be)."""
    if not spec or _local(spec) or not is_hub_id(spec):
        return spec
    folder = _fetch(spec, field, "model", MODEL_FILES)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"{field}: {spec!r}: its snapshot {folder} holds no config.json "
                         f"(expected a transformers model repo)")
    if not _weights(folder) and not is_offline():  # an older repo: PyTorch .bin weights only
        folder = _fetch(spec, field, "model", MODEL_FILES + ("*.bin",))
    if not _weights(folder):
        raise ValueError(f"{field}: {spec!r}: its snapshot {folder} holds no weights (*.safetensors, *.bin); fetch "
                         f"them online (without HF_HUB_OFFLINE=1) or with `hf download {split_revision(spec)[0]}`")
    return folder


def resolve_tokenizer(spec: str, field: str = "model.tokenizer") -> str:
    """A tokenizer spec as a path: a local folder or .gguf file as given, or a hub id's snapshot folder
    (tokenizer files only are fetched). Other specs are returned as given."""
    if not spec or _local(spec) or not is_hub_id(spec):
        return spec
    folder = _fetch(spec, field, "tokenizer", TOKENIZER_FILES)
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer_config.json", "tokenizer.json")):
        raise ValueError(f"{field}: {spec!r}: its snapshot {folder} holds no tokenizer "
                         f"(tokenizer_config.json / tokenizer.json)")
    return folder


def _weights(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "*.safetensors")) or glob.glob(os.path.join(folder, "*.bin")))
