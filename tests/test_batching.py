"""Batch plans: packing and token budgets lose nothing, duplicate nothing, fit their limits."""

import numpy as np
import pytest

from transformer.data import batching, pipeline, token_ids


@pytest.fixture
def lengths():
    rng = np.random.default_rng(0)
    return rng.integers(1, 30, 500), rng.integers(1, 30, 500)


def test_epoch_order_is_a_seeded_permutation_with_repeats():
    a = batching.epoch_order(10, seed=1, epoch=0)
    assert sorted(a) == list(range(10))
    np.testing.assert_array_equal(a, batching.epoch_order(10, seed=1, epoch=0))
    assert not np.array_equal(a, batching.epoch_order(10, seed=1, epoch=1))
    repeats = np.array([0, 1, 2, 1, 0, 1, 1, 1, 3, 1])
    b = batching.epoch_order(10, seed=1, epoch=0, repeats=repeats)
    assert np.bincount(b, minlength=10).tolist() == repeats.tolist()


def test_packing_places_every_example_once_within_the_row_length(lengths):
    src, tgt = lengths
    order = batching.epoch_order(len(src), seed=0, epoch=0)
    batches = batching.pack(order, src, tgt, row_length=64, rows_per_batch=8)
    placed = np.concatenate([row for batch in batches for row in batch])
    assert sorted(placed.tolist()) == list(range(len(src)))
    for batch in batches:
        assert len(batch) == 8
        for row in batch:
            assert src[row].sum() <= 64 and tgt[row].sum() <= 64
    # First fit into open rows keeps rows well filled.
    fill = tgt.sum() / (len(batches) * 8 * 64)
    assert fill > 0.75


def test_packing_rejects_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="longer than a row"):
        batching.pack(np.array([0]), np.array([70]), np.array([5]), 64, 4)


def test_packed_arrays_have_right_segments_and_positions():
    pairs = [([5, 6, 1], [7, 1]), ([8, 1], [9, 10, 11, 1]), ([12, 13, 14, 1], [15, 1])]
    sides = [token_ids.Ragged.from_lists(side) for side in zip(*pairs, strict=True)]
    # An empty (padding) row first, then examples 0 and 1 in one row, 2 in the next.
    rows = [np.zeros(0, np.int64), np.array([0, 1]), np.array([2])]
    out = pipeline.layout(*sides, rows, length=8, packed=True)
    np.testing.assert_array_equal(
        out["inputs"], [[0] * 8, [5, 6, 1, 8, 1, 0, 0, 0], [12, 13, 14, 1, 0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(out["targets"][1], [7, 1, 9, 10, 11, 1, 0, 0])
    np.testing.assert_array_equal(out["inputs_segmentation"][1], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(out["inputs_positions"][1], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["targets_positions"][1], [0, 1, 0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(out["targets_segmentation"][2], [1, 1, 0, 0, 0, 0, 0, 0])
    assert not out["targets_segmentation"][0].any()


def test_rows_of_one_example_are_laid_out_without_segments():
    sides = [token_ids.Ragged.from_lists(s) for s in ([[3, 1], [4, 5, 1]], [[6, 1], [7, 1]])]
    out = pipeline.layout(*sides, [np.array([1]), np.array([0])], length=4, packed=False)
    assert sorted(out) == ["inputs", "targets"]
    np.testing.assert_array_equal(out["inputs"], [[4, 5, 1, 0], [3, 1, 0, 0]])
    np.testing.assert_array_equal(out["targets"], [[7, 1, 0, 0], [6, 1, 0, 0]])


def test_token_budget_is_never_exceeded_and_every_example_appears_once(lengths):
    src, tgt = lengths
    order = batching.epoch_order(len(src), seed=3, epoch=0)
    bounds = batching.default_boundaries(32)
    batches = batching.bucket(
        order, src, tgt, tokens_per_batch=200, boundaries=bounds, row_multiple=2
    )
    seen = []
    for length, rows in batches:
        assert len(rows) * length <= 200
        assert len(rows) % 2 == 0
        for row in rows:
            seen += row.tolist()
            if len(row):
                assert max(src[row[0]], tgt[row[0]]) <= length
    assert sorted(seen) == list(range(len(src)))


def test_bucket_boundaries():
    assert batching.default_boundaries(64) == (8, 12, 16, 24, 32, 48, 64)
    assert batching.bucket_length(13, (8, 12, 16)) == 16
    assert batching.bucket_length(70, (8, 12, 16)) == 128
