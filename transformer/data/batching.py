"""Batch plans: which examples go into which row of which batch. Pure numpy.

The input pipeline first measures every training example (its source and
target length in tokens); these functions then decide, per epoch, how
examples become batches, from the lengths alone. A plan is a list of global
batches; a batch is a list of rows; a row is an array of example indices
(one index when bucketed, several when packed). Because the plan is a pure
function of (lengths, seed, epoch), every process computes the same one and
a resumed run continues it exactly from a step number.
"""

from __future__ import annotations

import numpy as np

Row = np.ndarray  # example indices, int64
Batch = list[Row]


def epoch_order(
    num_examples: int, seed: int, epoch: int, repeats: np.ndarray | None = None
) -> np.ndarray:
    """A shuffled permutation of the examples for one epoch.

    `repeats[i]` (optional) is how many times example i appears in the epoch;
    0 leaves it out (e.g. an example longer than the maximum length).
    """
    indices = np.arange(num_examples)
    if repeats is not None:
        indices = np.repeat(indices, repeats)
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(indices)


def pack(
    order: np.ndarray,
    source_lengths: np.ndarray,
    target_lengths: np.ndarray,
    row_length: int,
    rows_per_batch: int,
) -> list[Batch]:
    """First-fit packing of examples, in order, into batches of fixed-length rows.

    Each row holds whole examples whose source lengths and target lengths each
    sum to at most `row_length`. A batch keeps `rows_per_batch` rows open; an
    example that fits none of them closes the batch and opens the next. Every
    example of `order` lands in exactly one row; the last batch may have empty rows.
    """
    batches: list[Batch] = []
    rows: list[list[int]] = [[] for _ in range(rows_per_batch)]
    space_s = np.full(rows_per_batch, row_length)
    space_t = np.full(rows_per_batch, row_length)
    for i in order:
        s, t = source_lengths[i], target_lengths[i]
        if s > row_length or t > row_length:
            raise ValueError(f"example {i} ({s}, {t} tokens) is longer than a row ({row_length})")
        fits = np.flatnonzero((space_s >= s) & (space_t >= t))
        if fits.size == 0:
            batches.append([np.asarray(r, np.int64) for r in rows])
            rows = [[] for _ in range(rows_per_batch)]
            space_s[:], space_t[:] = row_length, row_length
            j = 0
        else:
            j = fits[0]
        rows[j].append(i)
        space_s[j] -= s
        space_t[j] -= t
    if any(rows):
        batches.append([np.asarray(r, np.int64) for r in rows])
    return batches


def bucket_length(length: int, boundaries: tuple[int, ...]) -> int:
    """The smallest boundary >= length; beyond the last, the next multiple of 64."""
    for b in boundaries:
        if length <= b:
            return b
    return -(-length // 64) * 64


def default_boundaries(max_len: int) -> tuple[int, ...]:
    """Padded lengths 8, 12, 16, 24, 32, 48, ... (ratio ~1.5) up to max_len."""
    bounds, b = [], 8
    while b < max_len:
        bounds.append(b)
        b = b + b // 2 if (b & (b - 1)) == 0 else b // 3 * 4  # 8,12,16,24,32,48,64,...
    return tuple(bounds) + (max_len,)


def bucket(
    order: np.ndarray,
    source_lengths: np.ndarray,
    target_lengths: np.ndarray,
    tokens_per_batch: int,
    boundaries: tuple[int, ...],
    row_multiple: int = 1,
) -> list[tuple[int, Batch]]:
    """Batches of examples of similar length under a token budget (the paper's scheme).

    An example goes to the bucket of its longer side; a bucket of padded length
    b holds floor(tokens_per_batch / b) rows, rounded down to a multiple of
    `row_multiple` (but at least `row_multiple`), so rows * b <= tokens_per_batch
    for source and target alike whenever the budget allows one row group.
    Returns (padded length, rows) per batch, in the order batches fill up.
    """
    open_rows: dict[int, list[int]] = {}
    batches: list[tuple[int, Batch]] = []
    for i in order:
        b = bucket_length(int(max(source_lengths[i], target_lengths[i])), boundaries)
        capacity = max(row_multiple, tokens_per_batch // b // row_multiple * row_multiple)
        rows = open_rows.setdefault(b, [])
        rows.append(i)
        if len(rows) == capacity:
            batches.append((b, [np.asarray([r], np.int64) for r in rows]))
            open_rows[b] = []
    for b, rows in sorted(open_rows.items()):
        if rows:
            padding = -len(rows) % row_multiple
            batches.append(
                (b, [np.asarray([r], np.int64) for r in rows] + [np.zeros(0, np.int64)] * padding)
            )
    return batches


def random_packed(rows: int, length: int, vocab: int, segments: int = 4) -> dict[str, np.ndarray]:
    """A packed batch of random ids, every row full with `segments` examples: for
    timing a step, where the content does not matter."""
    rng = np.random.default_rng(0)
    size = max(1, length // segments)
    segment = np.minimum(np.arange(length) // size, segments - 1)  # the last one takes the rest
    positions = np.broadcast_to(np.arange(length) - segment * size, (rows, length))
    segment_ids = np.broadcast_to(segment + 1, (rows, length))
    batch = {
        "inputs_positions": positions,
        "targets_positions": positions,
        "inputs_segmentation": segment_ids,
        "targets_segmentation": segment_ids,
    }
    for name in ("inputs", "targets"):
        batch[name] = rng.integers(4, vocab, (rows, length))
    return {k: np.ascontiguousarray(v, np.int32) for k, v in batch.items()}
