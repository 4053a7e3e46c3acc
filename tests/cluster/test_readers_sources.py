"""data.path beyond local files (cluster/readers.py): datasets (saved with `datasets`, a dataset repo
folder, a dataset name from a test-built Hugging Face cache) with data.split / data.subset, and URIs
read through pyarrow / fsspec filesystems (file://, memory://; no real object store). Offline."""
from __future__ import annotations

import gzip
import json
import os

import pytest

from cluster import readers
from cluster.data import DataConfig
from hub_cache import cache_repo, go_offline, write_dataset_repo

def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _rows(tag, n=2):
    return [{"question": f"{tag} {i}", "answer": f"#### {i}"} for i in range(n)]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    return go_offline(monkeypatch, str(tmp_path / "hub"), str(tmp_path / "datasets-cache"))


@pytest.fixture
def repo(tmp_path):
    """A dataset repo folder without a script: README.md declares subsets easy/hard, each train/test."""
    return write_dataset_repo(tmp_path / "arith", lambda subset, split: _rows(f"{subset}-{split}"))


def _questions(rows):
    return [r["question"] for r in rows]


def test_saved_dataset_dict_split(tmp_path, offline):
    import datasets

    folder = str(tmp_path / "saved")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows("tr")),
                          "test": datasets.Dataset.from_list(_rows("te", 3))}).save_to_disk(folder)
    assert _questions(readers.read_rows(folder)) == ["tr 0", "tr 1"]
    assert _questions(readers.read_rows(folder, split="test")) == ["te 0", "te 1", "te 2"]
    assert _questions(readers.read_rows(folder, part=1)) == ["te 0", "te 1", "te 2"]  # an eval path: its eval split
    with pytest.raises(ValueError, match=r"^data.split: 'dev' is not a split of '.*saved' \(its splits: train, test\)"):
        readers.read_rows(folder, split="dev")
    with pytest.raises(ValueError, match=r"^data.subset: 'x': '.*saved' is a datasets.save_to_disk folder"):
        readers.read_rows(folder, subset="x", split="train")


def test_dataset_repo_folder_and_name_from_the_hub_cache(repo, offline):
    assert _questions(readers.read_rows(repo, subset="hard", split="test")) == ["hard-test 0", "hard-test 1"]
    with pytest.raises(ValueError, match=r"^data.subset: '' \(none given\) does not name a subset of "):
        readers.read_rows(repo, split="train")
    cache_repo(offline, "Org/Arith", repo, repo_type="dataset")
    assert _questions(readers.read_rows("Org/Arith", subset="easy", split="train")) == ["easy-train 0", "easy-train 1"]
    (src,) = readers.resolve_sources("Org/Arith", subset="easy", split="test")
    assert src == readers.Source("dataset", "Org/Arith", "easy", "test", "data.path")
    assert readers.columns_of(src) == ({"question", "answer"}, 2, "")
    with pytest.raises(FileNotFoundError) as e:
        readers.read_rows("Org/Missing")
    assert str(e.value).startswith("data.path: 'Org/Missing' is not a local file or folder, nor a dataset in the "
                                   "Hugging Face cache (offline: HF_HUB_OFFLINE=1; hub cache: ")
    # a plain folder of files is files, unless a split or a subset is asked for (then load_dataset: by file name)
    plain = os.path.join(repo, "easy")
    assert len(readers.read_rows(plain)) == 4
    assert _questions(readers.read_rows(plain, split="test")) == ["easy-test 0", "easy-test 1"]


def test_split_or_subset_with_files_only_is_an_error(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", _rows("a"))
    for kw, setting in ((dict(split="test"), "data.split: 'test'"),
                        (dict(subset="main", split="train"), "data.subset: 'main'")):
        with pytest.raises(ValueError, match=rf"^{setting} is for dataset names, dataset folders and saved datasets; "
                                             rf"data.path '.*a.jsonl' names files only$"):
            readers.resolve_sources(f, **kw)
    assert readers.read_rows(f, split="train") == _rows("a")
    assert DataConfig(path="Org/Name", split="test", subset="main").subset == "main"
    with pytest.raises(ValueError, match="data.subset: expected a subset"):
        DataConfig(subset=3)


def test_file_uris_read_like_local_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "d"
    _jsonl(d / "b.jsonl", _rows("b"))
    _jsonl(d / "sub" / "c.jsonl", _rows("c"))
    _jsonl(d / ".hidden" / "h.jsonl", _rows("h"))
    pq.write_table(pa.Table.from_pylist(_rows("p")), d / "a.parquet")
    with gzip.open(d / "z.json.gz", "wt") as f:
        json.dump(_rows("z"), f)
    uri = f"file://{d}"
    assert readers.read_rows(uri) == readers.read_rows(str(d))  # same files, same order
    assert _questions(readers.read_rows(f"{uri}/*.jsonl")) == ["b 0", "b 1"]
    assert _questions(readers.read_rows(f"{uri}/**/*.jsonl")) == ["b 0", "b 1", "c 0", "c 1"]
    assert _questions(readers.read_rows(f"{uri}/z.json.gz")) == ["z 0", "z 1"]
    assert [s.path for s in readers.resolve_sources(f"{uri}/a.parquet,{d / 'b.jsonl'}")] == [f"{uri}/a.parquet",
                                                                                          str(d / "b.jsonl")]
    with pytest.raises(FileNotFoundError, match=rf"^data.eval_path: '{uri}/nope.jsonl' does not exist$"):
        readers.resolve_sources(f"{uri}/nope.jsonl", "data.eval_path")
    with pytest.raises(FileNotFoundError, match=r"^data.path: no file matches 'file://.*/\*.csv'$"):
        readers.resolve_sources(f"{uri}/*.csv")
    with pytest.raises(ValueError, match=r"^data.path: 'zzz://x/a.jsonl': no filesystem reads zzz:// URIs"):
        readers.resolve_sources("zzz://x/a.jsonl")


def test_fsspec_uri_and_a_saved_dataset_at_a_uri(tmp_path):
    import datasets
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/posttrain-test/p.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in _rows("m")))
    try:
        assert _questions(readers.read_rows("memory://posttrain-test/p.jsonl")) == ["m 0", "m 1"]
        assert _questions(readers.read_rows("memory://posttrain-test")) == ["m 0", "m 1"]
    finally:
        fs.rm("/posttrain-test", recursive=True)
    datasets.Dataset.from_list(_rows("s")).save_to_disk(str(tmp_path / "saved"))
    (src,) = readers.resolve_sources(f"file://{tmp_path}/saved")
    assert src.kind == "hf" and _questions(readers.read_rows(f"file://{tmp_path}/saved")) == ["s 0", "s 1"]


def test_ray_reads_uris_and_dataset_names_like_plain_python(ray_local, tmp_path, repo, offline):
    _jsonl(tmp_path / "u" / "a.jsonl", _rows("u"))
    path = f"file://{tmp_path / 'u'},{repo}"
    sources = readers.resolve_sources(path, subset="hard", split="test")
    got = [(r["_src"], r["_row"], json.loads(r["_json"])) for r in readers.read_sources(sources, part=0).take_all()]
    assert got == list(readers.iter_records(sources))
    assert [(src, rec["question"]) for src, _, rec in got] == [
        (f"file://{tmp_path / 'u' / 'a.jsonl'}", "u 0"), (f"file://{tmp_path / 'u' / 'a.jsonl'}", "u 1"),
        (repo, "hard-test 0"), (repo, "hard-test 1")]
