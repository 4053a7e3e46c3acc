"""cluster/readers.py: one reader per format, the same records in Ray Data and in plain Python;
bad bytes are named bad rows everywhere; each file of a path keeps its own format."""
from __future__ import annotations

import gzip
import json
import logging

import pytest

from cluster import readers
from cluster.data import DataConfig, build_datasets
from cluster.data_samples import held_out_rows, tokenizer_training_texts
from cluster.formats import RowError

BAD_LINE = b'{"instruction":"caf\xe9","input":"","output":"1"}\n'  # \xe9 is the 20th byte of the line


def _alpaca(i):
    return {"instruction": f"Add {i} and 1.", "input": "", "output": f"#### {i + 1}"}


def _chat(i):
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"{2 * i}"}]}


def _jsonl(path, rows, tail: bytes = b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + tail)
    return str(path)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "posttrain-cache"))


def _records(path):
    return [(row, rec if not isinstance(rec, RowError) else f"ERR {rec}") for _, row, rec in readers.read_file(path)]


# ----------------------------------------------------------------------------- per-format readers, no Ray

def test_json_rule_list_wrapper_record_and_json_lines(tmp_path):
    a, b = _alpaca(1), _alpaca(2)
    (tmp_path / "list.json").write_text(json.dumps([a, b], indent=2))
    (tmp_path / "data.json").write_text(json.dumps({"data": [a, b]}))
    (tmp_path / "train.json.gz").write_bytes(gzip.compress(json.dumps({"train": [a, b]}).encode()))
    (tmp_path / "one.json").write_text(json.dumps(_chat(3)))  # {"messages": [...]} is one record, not a wrapper
    (tmp_path / "two.json").write_text(json.dumps({"data": [a], "meta": {"v": 1}}))  # not a lone list: one record
    (tmp_path / "lines.json").write_text(json.dumps(a) + "\n\n" + json.dumps(b) + "\n")
    for name in ("list.json", "data.json", "train.json.gz"):
        assert _records(str(tmp_path / name)) == [(1, a), (2, b)], name
    assert _records(str(tmp_path / "one.json")) == [(1, _chat(3))]
    assert _records(str(tmp_path / "two.json")) == [(1, {"data": [a], "meta": {"v": 1}})]
    assert _records(str(tmp_path / "lines.json")) == [(1, a), (3, b)]  # JSON lines: row = line number
    (tmp_path / "broken.json").write_text('[\n  {"instruction": "x",\n  "output" 1}\n]\n')
    [(row, err)] = _records(str(tmp_path / "broken.json"))
    assert row == 3 and err.startswith("ERR json: invalid JSON (Expecting ':' delimiter at line 3 column 12)")


def test_txt_documents_and_jsonl_rows(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"Ben has 3 pens.\r\nHe gets 2.\n\n\nKim \xff has 1.\n\nEnd.")
    assert _records(str(tmp_path / "c.txt")) == [
        (1, {"text": "Ben has 3 pens.\nHe gets 2."}),
        (5, "ERR text: not valid UTF-8 at byte 5 of line 5 (invalid start byte)"),
        (7, {"text": "End."})]
    p = _jsonl(tmp_path / "a.jsonl.gz", [], gzip.compress(b'\xef\xbb\xbf{"a": 1}\n\n[1]\n{"a": \n' + BAD_LINE +
                                                          b'{"q": "\\udce9"}\n'))
    assert _records(p) == [(1, {"a": 1}), (3, [1]), (4, "ERR json: invalid JSON (Expecting value at column 6)"),
                           (5, "ERR line: not valid UTF-8 at byte 20 (invalid continuation byte)"),
                           (6, "ERR q: not valid Unicode: lone surrogate \\udce9 at character 1")]
    (tmp_path / "bad.json").write_bytes(b'[{"instruction": "ok", "output": "1"}, {"instruction": "caf\xe9", '
                                        b'"output": "2"}]')
    assert _records(str(tmp_path / "bad.json"))[1] == (2, "ERR instruction: not valid UTF-8 at byte 4 of this string")


def test_unreadable_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"x.jsonl.gz: cannot read this .jsonl file"):
        readers.read_rows(str(tmp_path / "x.jsonl.gz"))


def test_plain_reads_skip_count_or_fail_on_a_non_utf8_row(tmp_path, caplog):
    """The tokenizer-training sample and the held-out rows read through the same readers."""
    path = _jsonl(tmp_path / "a.jsonl", [_alpaca(i) for i in range(3)], BAD_LINE + json.dumps(_alpaca(9)).encode())
    reason = f"{path}:4: line: not valid UTF-8 at byte 20 (invalid continuation byte)"
    st: dict = {}
    with caplog.at_level(logging.WARNING, logger="posttrain.data"):
        texts = tokenizer_training_texts(DataConfig(path=path), stats=st)
    assert (st["rows_read"], st["rows_ok"], st["rows_bad"], st["bad_reasons"]) == (5, 4, 1, [reason])
    assert "Add 9 and 1." in texts and not any("caf" in t for t in texts)
    assert reason in caplog.text and "skipped 1 bad row(s) of 5" in caplog.text
    msg = rf"data: bad row {reason} \(data.on_bad_row='fail'"
    with pytest.raises(ValueError, match=msg.replace("(invalid", r"\(invalid").replace("byte)", r"byte\)")):
        tokenizer_training_texts(DataConfig(path=path, on_bad_row="fail"))
    gsm = _jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "#### 2"}], BAD_LINE)
    with pytest.raises(ValueError, match=rf"data: bad row {gsm}:2: line: not valid UTF-8 at byte 20"):
        held_out_rows(DataConfig(path=path, eval_path=gsm, on_bad_row="fail"))
    assert held_out_rows(DataConfig(path=path, eval_path=gsm)) == [{"question": "1+1?", "answer": "#### 2"}]


def test_undetectable_file_fails_before_reading_naming_file_and_columns(tmp_path, tiny_tokenizer_dir):
    good = _jsonl(tmp_path / "good.jsonl", [_alpaca(1)])
    odd = _jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(ValueError, match=rf"data.format: cannot detect the format of '{odd}' \(in data.path\) "
                                         rf"from its columns \(bar, foo\)"):
        build_datasets(DataConfig(path=f"{good},{odd}"), tiny_tokenizer_dir)  # no Ray started for this


# ----------------------------------------------------------------------------- Ray Data path

def test_ray_path_and_plain_path_read_the_same_records(ray_local, tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"train": [_alpaca(1), _chat(2), _alpaca(3)]}))
    (tmp_path / "c.txt").write_bytes(b"First doc\nline two\n\n\nSecond \xff doc\n\nThird doc\n")
    _jsonl(tmp_path / "m.jsonl", [_chat(4)], BAD_LINE + b"[1, 2]\n")
    path = ",".join(str(tmp_path / n) for n in ("w.json", "c.txt", "m.jsonl"))
    sources = readers.resolve_sources(path)
    got = [(r["_src"], r["_row"], json.loads(r["_json"]) if r["_json"] else r["_err"])
           for r in readers.read_sources(sources, part=0).take_all()]
    plain = [(src, row, rec if not isinstance(rec, RowError) else str(rec))
             for src, row, rec in readers.iter_records(sources)]
    assert got == plain and len(got) == 9
    assert [row for src, row, _ in got if src.endswith("c.txt")] == [1, 5, 7]
    st: dict = {}
    rows = readers.read_rows(path, stats=st)
    assert rows == [rec for _, _, rec in plain if isinstance(rec, dict)] and len(rows) == 6
    assert st["bad_reasons"] == [f"{tmp_path / 'c.txt'}:5: text: not valid UTF-8 at byte 8 of line 5 "
                                 f"(invalid start byte)",
                                 f"{tmp_path / 'm.jsonl'}:2: line: not valid UTF-8 at byte 20 "
                                 f"(invalid continuation byte)",
                                 f"{tmp_path / 'm.jsonl'}:3: row: expected a JSON object, got list"]


def test_pipeline_skips_or_fails_on_a_non_utf8_row(ray_local, tmp_path, tiny_tokenizer_dir):
    path = _jsonl(tmp_path / "a.jsonl", [_alpaca(i) for i in range(6)], BAD_LINE)
    reason = f"{path}:7: line: not valid UTF-8 at byte 20 (invalid continuation byte)"
    st = build_datasets(DataConfig(path=path, max_seq_len=64), tiny_tokenizer_dir).stats
    assert (st["rows_read"], st["rows_ok"], st["rows_bad"], st["bad_reasons"]) == (7, 6, 1, [reason])
    with pytest.raises(ValueError, match=rf"data: bad row {path}:7: line: not valid UTF-8 at byte 20 "
                                         rf"\(invalid continuation byte\) \(data.on_bad_row='fail'"):
        build_datasets(DataConfig(path=path, max_seq_len=64, on_bad_row="fail"), tiny_tokenizer_dir)


def test_mixed_formats_in_one_path_keep_every_row(ray_local, tmp_path, tiny_tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([_alpaca(i) for i in range(30)]), str(tmp_path / "good.parquet"))
    msgs = _jsonl(tmp_path / "msgs.jsonl", [_chat(i) for i in range(15)])
    cfg = DataConfig(path=f"{tmp_path / 'good.parquet'},{msgs}", max_seq_len=128, packing=False, shuffle=False,
                     group_by_length=False)
    st = build_datasets(cfg, tiny_tokenizer_dir).stats
    assert (st["rows_read"], st["rows_ok"], st["rows_bad"], st["sequences"]) == (45, 45, 0, 45)
    assert st["format"] == "alpaca+messages"
    assert st["formats"] == {str(tmp_path / "good.parquet"): "alpaca", msgs: "messages"}
