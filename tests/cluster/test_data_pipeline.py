"""The Ray Data pipeline end to end on small generated files (local Ray, CPU).

Each build starts a tokenizer actor (seconds on 2 cores), so every test checks as much as it can
of one build. Formats, templates and packing are tested without Ray in test_formats/test_packing.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from cluster.data import DataConfig, build_datasets
from cluster.packing import IGNORE_INDEX, segments

REQUIRED_STATS = ("rows_read", "rows_ok", "rows_bad", "bad_reasons", "sequences", "truncated", "tokens",
                  "target_tokens", "packed_rows", "format", "template", "seconds", "tokens_per_s")


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _chat(i):
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"{i} + {i} = {2 * i}\n#### {2 * i}"}]}


def _alpaca(i):
    return {"instruction": f"Add {i} and 1.", "input": "", "output": f"#### {i + 1}"}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "posttrain-cache"))


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from kernels.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def _rows(ds):
    return list(ds.iter_rows())


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"data.max_seq_len: must be an integer >= 8, got 0"):
        DataConfig(max_seq_len=0)
    with pytest.raises(ValueError, match=r"data.format: expected one of auto, alpaca, .*got 'csv'"):
        DataConfig(format="csv")
    with pytest.raises(ValueError, match=r"data.eval_fraction: must be in \[0, 1\), got 1.5"):
        DataConfig(eval_fraction=1.5)
    with pytest.raises(ValueError, match=r"data.eval_fraction: set data.eval_path or data.eval_fraction"):
        DataConfig(eval_path="x.jsonl", eval_fraction=0.1)
    with pytest.raises(ValueError, match=r"data.num_tokenizer_actors: must be an integer >= 1"):
        DataConfig(num_tokenizer_actors=0)
    with pytest.raises(ValueError, match=r"data.on_bad_row: expected one of skip, fail, got 'ignore'"):
        DataConfig(on_bad_row="ignore")
    with pytest.raises(ValueError, match=r"data.path: must be a non-empty path"):
        DataConfig(path=" ")


def test_missing_path_empty_file_and_empty_folder_are_clear_errors(tmp_path, tiny_tokenizer_dir):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=f"data.path: '{missing}' does not exist"):
        build_datasets(DataConfig(path=missing), tiny_tokenizer_dir)
    with pytest.raises(FileNotFoundError, match="data.path: no file matches"):
        build_datasets(DataConfig(path=str(tmp_path / "*.parquet")), tiny_tokenizer_dir)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"data.path: '{empty}': empty file, no rows to read"):
        build_datasets(DataConfig(path=str(empty)), tiny_tokenizer_dir)
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match="data.path: folder .* holds no .jsonl/.ndjson/.json/.parquet/.txt"):
        build_datasets(DataConfig(path=str(tmp_path / "folder")), tiny_tokenizer_dir)
    with pytest.raises(FileNotFoundError, match="data.eval_path: .* does not exist"):
        build_datasets(DataConfig(path=_write_jsonl(tmp_path / "ok.jsonl", [_alpaca(1)]), eval_path=missing),
                       tiny_tokenizer_dir)


def test_bad_rows_are_skipped_counted_and_named(ray_local, tmp_path, tok, tiny_tokenizer_dir, caplog):
    good = [_chat(i) for i in range(1, 9)]
    bad = [
        '{"messages": [ not json',                                                             # row 3
        {"msgs": []},                                                                         # row 5
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "x"}]},  # row 7
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},    # row 9
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},  # row 11
        '["a list", "not an object"]',                                                       # row 13
    ]
    rows = [good[0], good[1]]
    for b, g in zip(bad, good[2:]):
        rows += [b, g]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = DataConfig(path=path, max_seq_len=64, eval_fraction=0.25, system_prompt="Be brief.")
    with caplog.at_level(logging.WARNING, logger="posttrain.data"):
        bundle = build_datasets(cfg, tiny_tokenizer_dir, seed=1)
    st = bundle.stats
    assert set(REQUIRED_STATS) <= set(st)
    assert (st["rows_read"], st["rows_ok"], st["rows_bad"]) == (14, 8, 6)
    assert st["format"] == "messages" and st["template"] == "tokenizer"
    assert st["bad_reasons"] == [
        f"{path}:3: json: invalid JSON (Expecting value at column 16)",
        f"{path}:5: messages: missing",
        f"{path}:7: messages[0].content: expected a string, got int",
        f"{path}:9: messages[1].role: unknown role 'robot' (accepted: assistant, system, tool, user)",
        f"{path}:11: messages[1].content: empty assistant turn",
    ]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{path}:13: row: expected a JSON object, got list" not in st["bad_reasons"]  # only the first 5 kept
    assert f"{path}:3: json: invalid JSON" in logged and "skipped 6 bad row(s) of 14" in logged
    # eval_fraction: exactly round(0.25 * 8) = 2 of the 8 good rows are held out
    assert st["sequences"] == 6 and st["eval_sequences"] == 2
    assert st["truncated"] == 0 and st["tokens"] > 0 and 0 < st["target_tokens"] < st["tokens"]

    train, ev = _rows(bundle.train), _rows(bundle.eval)
    assert len(train) == st["packed_rows"] and len(ev) == st["eval_packed_rows"]
    seen_answers = []
    n_tokens = n_targets = 0
    for row in train + ev:
        for k in ("input_ids", "labels", "position_ids"):
            assert isinstance(row[k], np.ndarray) and row[k].dtype == np.int32 and row[k].shape == (64,)
        ids, labels, pos = row["input_ids"], row["labels"], row["position_ids"]
        for s, e in segments(pos):
            np.testing.assert_array_equal(pos[s:e], np.arange(e - s))
            assert labels[s] == IGNORE_INDEX
            if ids[s] == tok.pad_token_id:  # the padding segment
                assert np.all(ids[s:e] == tok.pad_token_id) and np.all(labels[s:e] == IGNORE_INDEX)
                continue
            n_tokens += e - s
            target = labels[s:e][labels[s:e] != IGNORE_INDEX]
            n_targets += len(target)
            text = tok.decode(ids[s:e])
            assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is")
            assert text.endswith("<|im_end|>\n")
            answer = tok.decode(target)  # loss exactly on the assistant turn
            assert answer.endswith("<|im_end|>") and "What is" not in answer and "assistant" not in answer
            seen_answers.append(answer)
    assert sorted(seen_answers) == sorted(f"{i} + {i} = {2 * i}\n#### {2 * i}<|im_end|>" for i in range(1, 9))
    assert n_tokens == st["tokens"] + st["eval_tokens"]


def test_on_bad_row_fail_raises_naming_file_row_and_field(ray_local, tmp_path, tiny_tokenizer_dir):
    path = _write_jsonl(tmp_path / "a.jsonl", [_alpaca(1), _alpaca(2), {"instruction": "x", "output": 3}])
    with pytest.raises(ValueError, match=rf"data: bad row {path}:3: output: expected a string, got int "
                                         rf"\(data.on_bad_row='fail'"):
        build_datasets(DataConfig(path=path, on_bad_row="fail", max_seq_len=64), tiny_tokenizer_dir)


def test_all_rows_bad_is_a_clear_error(ray_local, tmp_path, tiny_tokenizer_dir):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": ""}] * 3)
    with pytest.raises(ValueError, match=rf"data.path: no usable rows in '{path}': 3 bad and 0 dropped .* of 3 "
                                         rf"rows read; first problems: {path}:1: output: empty"):
        build_datasets(DataConfig(path=path, max_seq_len=64), tiny_tokenizer_dir)


def test_hf_saved_parquet_glob_and_folder_sources(ray_local, tmp_path, tok, tiny_tokenizer_dir):
    """A comma-separated list of four kinds of source, unpacked, in order; a DatasetDict as eval."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets.Dataset.from_list([_alpaca(i) for i in range(0, 3)]).save_to_disk(str(tmp_path / "hf"))
    pq.write_table(pa.Table.from_pylist([_alpaca(i) for i in range(3, 6)]), str(tmp_path / "p.parquet"))
    (tmp_path / "g").mkdir()
    _write_jsonl(tmp_path / "g" / "a.jsonl", [_alpaca(6), _alpaca(7)])
    _write_jsonl(tmp_path / "g" / "skip.txt", ["not matched by the glob"])
    (tmp_path / "f" / "sub").mkdir(parents=True)
    (tmp_path / "f" / "sub" / "b.json").write_text(json.dumps([_alpaca(8), _alpaca(9)]))
    datasets.DatasetDict({"train": datasets.Dataset.from_list([_alpaca(50)]),
                          "test": datasets.Dataset.from_list([_alpaca(60), _alpaca(61)])}
                         ).save_to_disk(str(tmp_path / "dd"))
    path = ",".join([str(tmp_path / "hf"), str(tmp_path / "p.parquet"), str(tmp_path / "g" / "*.jsonl"),
                     str(tmp_path / "f")])
    cfg = DataConfig(path=path, eval_path=str(tmp_path / "dd"), packing=False, shuffle=False,
                     group_by_length=False, chat_template="alpaca", max_seq_len=128)
    bundle = build_datasets(cfg, tiny_tokenizer_dir)
    st = bundle.stats
    assert (st["rows_read"], st["rows_bad"], st["sequences"], st["packed_rows"]) == (10, 0, 10, 0)
    assert st["format"] == "alpaca" and st["template"] == "alpaca" and st["eval_sequences"] == 2
    rows = _rows(bundle.train)
    outputs = []
    for row in rows:
        n = len(row["input_ids"])  # natural length: the trainer pads
        assert row["labels"].shape == (n,) and row["position_ids"].dtype == np.int32
        np.testing.assert_array_equal(row["position_ids"], np.arange(n))
        text = tok.decode(row["input_ids"])
        assert text.startswith("Below is an instruction") and "### Response:\n" in text
        outputs.append(tok.decode(row["labels"][row["labels"] != IGNORE_INDEX]))
    # file sources first (given order, then row order), then the saved dataset
    assert outputs == [f"#### {i + 1}<|im_end|>" for i in [3, 4, 5, 6, 7, 8, 9, 0, 1, 2]]
    ev = [tok.decode(r["labels"][r["labels"] != IGNORE_INDEX]) for r in _rows(bundle.eval)]
    assert ev == ["#### 61<|im_end|>", "#### 62<|im_end|>"]  # the DatasetDict's test split


def test_cpt_text_files_are_chunked_packed_and_fully_labelled(ray_local, tmp_path, tok, tiny_tokenizer_dir):
    long_doc = " ".join(f"Ava has {i} apples." for i in range(30))
    (tmp_path / "corpus.txt").write_text(f"Ben has 3 pens.\nHe gets 2 more.\n\n{long_doc}\n\n\nKim has 1 coin.\n")
    cfg = DataConfig(path=str(tmp_path / "corpus.txt"), max_seq_len=32, shuffle=False)
    bundle = build_datasets(cfg, tiny_tokenizer_dir, task="cpt")
    st = bundle.stats
    assert st["format"] == "text" and st["task"] == "cpt" and st["template"] == "none"
    assert (st["rows_read"], st["rows_ok"], st["chunked_documents"]) == (3, 3, 1)
    rows = _rows(bundle.train)
    assert len(rows) == st["packed_rows"]
    pieces = []
    for row in rows:
        assert row["input_ids"].shape == (32,)
        for s, e in segments(row["position_ids"]):
            ids, labels = row["input_ids"][s:e], row["labels"][s:e]
            if ids[0] == tok.pad_token_id:
                continue
            assert labels[0] == IGNORE_INDEX  # every token but the first of a sequence is a target
            np.testing.assert_array_equal(labels[1:], ids[1:])
            pieces.append(tuple(ids.tolist()))
    # each document + EOS, cut into pieces of at most 32 tokens, each piece packed whole
    expected = []
    for doc in ["Ben has 3 pens.\nHe gets 2 more.", long_doc, "Kim has 1 coin."]:
        ids = tok(doc)["input_ids"] + [tok.eos_token_id]
        expected += [tuple(ids[i:i + 32]) for i in range(0, len(ids), 32) if len(ids[i:i + 32]) > 1]
    assert sorted(pieces) == sorted(expected) and len(expected) > 4
    assert st["sequences"] == len(expected) and st["target_tokens"] == sum(len(p) - 1 for p in expected)


def test_builtin_task_unpacked_grouped_by_length(ray_local, tiny_tokenizer_dir):
    cfg = DataConfig(path="builtin", packing=False, builtin_train_size=400, builtin_eval_size=20, max_seq_len=256,
                     num_tokenizer_actors=2, max_rows=300)
    bundle = build_datasets(cfg, tiny_tokenizer_dir, seed=3)
    st = bundle.stats
    assert st["format"] == "gsm8k" and st["sequences"] == 300 and st["eval_sequences"] == 20
    assert st["rows_read"] == 300  # max_rows of the 400 written
    assert os.path.isfile(os.path.join(os.environ["POSTTRAIN_CACHE_DIR"], "builtin-400-20", "train.jsonl"))
    lengths = [len(r["input_ids"]) for r in bundle.train.iter_rows()]
    assert len(lengths) == 300 and sum(lengths) == st["tokens"]
    spread = [np.ptp(lengths[i:i + 16]) for i in range(0, 288, 16)]
    assert np.mean(spread) < 0.5 * np.ptp(lengths)  # batches of similar lengths
    assert bundle.eval.count() == 20


def test_dropped_rows_are_counted_and_named_on_the_console(ray_local, tmp_path, tiny_tokenizer_dir, caplog):
    """truncation=drop: a row longer than max_seq_len is dropped with a warning naming file:row
    (it used to vanish without a console line)."""
    long = {"instruction": "word " * 200, "input": "", "output": "1"}
    path = _write_jsonl(tmp_path / "long.jsonl", [_alpaca(1), long, _alpaca(2), _alpaca(3)])
    cfg = DataConfig(path=path, max_seq_len=64, eval_fraction=0.0, truncation="drop")
    with caplog.at_level(logging.WARNING, logger="posttrain.data"):
        bundle = build_datasets(cfg, tiny_tokenizer_dir, seed=0)
    assert bundle.stats["rows_dropped"] == 1
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1 and "dropped 1 row" in lines[0] and "long.jsonl:2" in lines[0]
