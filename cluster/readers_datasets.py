"""Hugging Face datasets as sources: save_to_disk folders, dataset names and dataset repo folders.

    open_dataset(source, part)                         a "hf" or "dataset" Source -> one datasets.Dataset split
    load_table(source, part)                           the same as an Arrow table (+ "_row"), for Ray Data
    read_dataset(source, part)                         a saved, named or folder dataset -> (name, row, record)

Which split: source.split (data.split for data.path, default "train"); "" picks "train" for part 0 and, for
part 1 (an eval path), its first split of validation/test/eval/valid; a DatasetDict of one split gives that
split when none of those (or "train", asked) is there. Row = the row index in the split (1-based). A name is loaded
once per process (datasets.load_dataset; offline: the hub cache, then the datasets cache), and its errors
are one line naming the setting (a name not found, a split or a subset the dataset lacks).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np

from cluster.readers_formats import ROWS_PER_BLOCK, Record
from cluster.readers_sources import Source, _section

EVAL_SPLITS = ("validation", "test", "eval", "valid")


def _pick_split(ds, source: Source, part: int):
    """One split of a DatasetDict: source.split, else "train" (part 0) or the first eval split (part 1);
    the only split when "train" (the default) is asked for and the dict has one split of another name."""
    names, field = list(ds.keys()), source.field
    if source.split:
        if source.split in ds:
            return ds[source.split]
        if source.split == "train" and len(names) == 1:
            return ds[names[0]]
        raise ValueError(f"{_section(field)}.split: {source.split!r} is not a split of {source.path!r} "
                         f"(its splits: {', '.join(names)})")
    wanted = ("train",) if part == 0 else EVAL_SPLITS
    pick = next((n for n in wanted if n in ds), names[0] if len(names) == 1 else None)
    if pick is None:
        raise ValueError(f"{field}: {source.path!r} is a DatasetDict with splits {names}; expected a "
                         f"{' or '.join(wanted)} split")
    return ds[pick]


@functools.lru_cache(maxsize=16)
def _load_dataset_cached(path: str, subset: str, split: str, offline: bool, hub_cache: str, cache_dir: str):
    import datasets

    from kernels.hub import snapshot, split_revision

    kw = dict(name=subset or None, split=split or None, cache_dir=cache_dir)
    if os.path.isdir(path):
        return datasets.load_dataset(path, **kw)
    if offline:  # a dataset repo in the hub cache (hf download --repo-type dataset), read as a folder
        try:
            folder = snapshot(path, "dataset")
        except Exception:  # noqa: BLE001 - not there: the datasets cache is looked at next
            folder = None
        if folder:
            return datasets.load_dataset(folder, **kw)
    name, revision = split_revision(path)
    return datasets.load_dataset(name, revision=revision, **kw)


def _load_dataset(source: Source):
    """datasets.load_dataset(name or folder, subset, split=...) (one load per process and source); the
    errors in one line naming the setting: a name not found, a split or a subset the dataset lacks."""
    from kernels import hub

    try:
        return _load_dataset_cached(source.path, source.subset, source.split, hub.is_offline(), hub.hub_cache_dir(),
                                    hub.datasets_cache_dir())
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each becomes one line
        text = str(e).strip()
        first = " ".join(text.split())[:300] or type(e).__name__
        field = source.field
        section = _section(field)
        if "split" in text.lower() and isinstance(e, (ValueError, KeyError)) and source.split:
            raise ValueError(f"{section}.split: {source.split!r} is not a split of {source.path!r} ({first})") from None
        if "config" in text.lower() and isinstance(e, ValueError):
            what = (f"{source.subset!r} is not a subset of" if source.subset
                    else "'' (none given) does not name a subset of")
            raise ValueError(f"{section}.subset: {what} {source.path!r} ({first})") from None
        if not os.path.isdir(source.path) and isinstance(e, (FileNotFoundError, ConnectionError)):
            where = ("in the Hugging Face cache (offline: HF_HUB_OFFLINE=1; hub cache: "
                     f"{hub.hub_cache_dir()}, datasets cache: {hub.datasets_cache_dir()})") if hub.is_offline() else (
                     f"on the Hugging Face Hub or in its caches ({type(e).__name__}: {first})")
            raise FileNotFoundError(f"{field}: {source.path!r} is not a local file or folder, nor a dataset "
                                    f"{where}") from None
        raise ValueError(f"{field}: {source.path!r}: datasets.load_dataset failed "
                         f"({type(e).__name__}: {first})") from None


def open_dataset(source: Source, part: int = 0):
    """A "hf" (save_to_disk) or "dataset" (load_dataset) source -> its datasets.Dataset (one split)."""
    import datasets

    if source.kind == "dataset":
        ds = _load_dataset(source)
    else:
        if source.subset:
            raise ValueError(f"{_section(source.field)}.subset: {source.subset!r}: {source.path!r} is a datasets."
                             f"save_to_disk folder, which has no subsets")
        ds = datasets.load_from_disk(source.path)
    if isinstance(ds, datasets.DatasetDict):
        ds = _pick_split(ds, source, part)
    return ds


def load_table(source: Source, part: int):
    """A dataset source -> its Arrow table (+ a "_row" column)."""
    import pyarrow as pa

    table = open_dataset(source, part).with_format("arrow")[:]
    return table.append_column("_row", pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64)))


def read_dataset(source: Source, part: int = 0) -> Iterator[tuple[str, int, Record]]:
    """(name, row, record) for each row of a saved, named or folder dataset."""
    ds = open_dataset(source, part).with_format("arrow")
    for start in range(0, len(ds), ROWS_PER_BLOCK * 4):
        for k, rec in enumerate(ds[start:start + ROWS_PER_BLOCK * 4].to_pylist()):
            yield source.path, start + k + 1, rec
