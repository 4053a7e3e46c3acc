"""Padding-free packing (pure numpy), and the numerics it must preserve: packed loss == sum of losses."""
from __future__ import annotations

import numpy as np
import pytest

from cluster.packing import (IGNORE_INDEX, first_fit, group_by_length, object_column, pack_batch, pack_sequences,
                             segments)


def _seqs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, 100, n).astype(np.int32) for n in lengths]
    labels = []
    for x in ids:
        lab = x.copy()
        lab[: len(x) // 2] = IGNORE_INDEX  # a prompt half without loss
        labels.append(lab)
    return ids, labels


def test_rows_have_max_len_and_positions_restart_per_sequence():
    lengths = [5, 3, 7, 2, 9, 4]
    ids, labels = _seqs(lengths)
    rows, st = pack_sequences(ids, labels, max_seq_len=10, pad_id=0)
    R = st["rows"]
    for k in ("input_ids", "labels", "position_ids"):
        assert rows[k].shape == (R, 10) and rows[k].dtype == np.int32
    assert st["sequences"] == 6 and st["tokens"] == sum(lengths) and st["truncated"] == 0
    # every sequence appears whole, in exactly one row, as one segment starting at position 0
    found = []
    for r in range(R):
        segs = segments(rows["position_ids"][r])
        for s, e in segs:
            assert rows["position_ids"][r, s] == 0
            np.testing.assert_array_equal(rows["position_ids"][r, s:e], np.arange(e - s))
            found.append(rows["input_ids"][r, s:e].tolist())
    for x in ids:
        assert x.tolist() in found  # never split across rows
    assert sum(len(f) for f in found) == R * 10  # sequences + one padding segment per non-full row


def test_padding_is_pad_id_with_ignored_labels_and_its_own_segment():
    ids, labels = _seqs([4, 3])
    rows, _ = pack_sequences(ids, labels, max_seq_len=12, pad_id=7)
    assert rows["input_ids"].shape == (1, 12)
    np.testing.assert_array_equal(rows["input_ids"][0, 7:], [7] * 5)
    np.testing.assert_array_equal(rows["labels"][0, 7:], [IGNORE_INDEX] * 5)
    np.testing.assert_array_equal(rows["position_ids"][0], [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4])
    # the first label of each sequence is ignored, so no token learns to predict the next sequence
    assert rows["labels"][0, 0] == IGNORE_INDEX and rows["labels"][0, 4] == IGNORE_INDEX


def test_first_fit_keeps_order_within_rows():
    assert first_fit([6, 6, 3, 4, 1], capacity=10) == [[0, 2, 4], [1, 3]]
    ids, labels = _seqs([6, 6, 3, 4, 1])
    rows, _ = pack_sequences(ids, labels, 10, 0)
    np.testing.assert_array_equal(rows["input_ids"][0, :6], ids[0])
    np.testing.assert_array_equal(rows["input_ids"][0, 6:9], ids[2])
    np.testing.assert_array_equal(rows["input_ids"][1, :6], ids[1])


def test_long_sequences_are_truncated_or_dropped():
    ids, labels = _seqs([3, 15, 4])
    rows, st = pack_sequences(ids, labels, 8, 0, truncation="truncate")
    assert st["truncated"] == 1 and st["dropped"] == 0 and st["tokens"] == 3 + 8 + 4
    assert any(rows["input_ids"][r].tolist() == ids[1][:8].tolist() for r in range(st["rows"]))
    rows, st = pack_sequences(ids, labels, 8, 0, truncation="drop")
    assert st["truncated"] == 1 and st["dropped"] == 1 and st["tokens"] == 7 and st["rows"] == 1
    with pytest.raises(ValueError, match="truncation"):
        pack_sequences(ids, labels, 8, 0, truncation="cut")


def test_pack_batch_accepts_ray_batches():
    ids, labels = _seqs([3, 3, 3])
    # object array (ragged) and 2-D array (Ray's form when every sequence has the same length)
    for col_ids, col_lab in ((object_column(ids), object_column(labels)), (np.stack(ids), np.stack(labels))):
        out = pack_batch({"input_ids": col_ids, "labels": col_lab}, max_seq_len=9, pad_id=0)
        assert out["input_ids"].shape == (1, 9)
        np.testing.assert_array_equal(out["position_ids"][0], [0, 1, 2] * 3)


def test_group_by_length_groups_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 256)
    ids = [np.zeros(n, np.int32) for n in lengths]
    batch = {"input_ids": object_column(ids), "labels": object_column(ids),
             "position_ids": object_column([np.arange(n, dtype=np.int32) for n in lengths])}
    out = group_by_length(batch, group_size=16, seed=0)
    got = np.array([len(x) for x in out["input_ids"]])
    assert sorted(got.tolist()) == sorted(lengths.tolist())
    spreads = [np.ptp(got[i:i + 16]) for i in range(0, 256, 16)]
    assert max(spreads) < 40  # random order would give spreads near 200 in every group
    assert not np.all(np.diff(got) >= 0)  # groups are shuffled, not one long sweep
    assert all(len(a) == len(b) for a, b in zip(out["input_ids"], out["position_ids"]))


def test_packed_row_loss_equals_sum_of_sequence_losses(tiny_tokenizer_dir):
    """The padding-free contract: no attention and no target across sequences (fp32)."""
    import torch

    from cluster.builtin_task import generate
    from cluster.templates import CHATML, ChatEncoder
    from kernels.loss import causal_lm_loss_sum
    from kernels.model import ModelConfig, build_model
    from kernels.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    rows, _ = generate(4, 1, seed=5)
    convs = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
             for r in rows]
    seqs = ChatEncoder(tok, CHATML).encode(convs[:2]) + ChatEncoder(tok, CHATML, train_on="all").encode(convs[2:])
    ids, labels = [s[0] for s in seqs], [s[1] for s in seqs]
    L = sum(len(x) for x in ids) + 5  # all four in one row, plus padding
    packed, st = pack_sequences(ids, labels, L, tok.pad_token_id)
    assert st["rows"] == 1

    model = build_model(ModelConfig(preset="tiny", dtype="float32"), vocab_size=len(tok)).eval()
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)[None]  # noqa: E731  [T] -> [1, T]
    with torch.no_grad():
        loss_packed, n_packed = causal_lm_loss_sum(model, t(packed["input_ids"][0]), t(packed["labels"][0]),
                                                   t(packed["position_ids"][0]))
        total, n_total = 0.0, 0
        for x, lab in zip(ids, labels):
            loss, n = causal_lm_loss_sum(model, t(x), t(lab), t(np.arange(len(x))))
            total += float(loss)
            n_total += n
    assert n_packed == n_total
    # fp32 sums of ~120 token losses (~750 in all): only accumulation-order noise (seen: 5e-5). Attention
    # leaking across sequences moves it by > 1, a target across a boundary by one token loss (~6).
    assert float(loss_packed) == pytest.approx(total, abs=1e-4, rel=1e-6)
