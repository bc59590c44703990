"""The input pipeline: corpus -> vocabulary -> measured examples -> batches.

Training batches come from a grain MapDataset indexed by batch number: batch
n is planned from the examples' lengths (transformer/data/batching.py),
read from the TFDS data source, tokenized and laid out as arrays. Grain
threads prepare batches ahead of the training step; the iterator's state is
the next batch number, so a restored iterator yields exactly the batches an
uninterrupted run would have seen.

A batch is a dict of int32 arrays, this process's share of the rows:
  inputs, targets                     [R, L] token ids, EOS-terminated, 0-padded
  inputs_position, targets_position   [R, L] (packed only) position in its example
  inputs_segmentation, ...            [R, L] (packed only) 1, 2, ... per example, 0 on padding
Evaluation batches add `index` [R], the example index of each row (-1 for
padding rows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import sys
import threading

import grain
import numpy as np
from absl import logging
from etils import epath

from transformer.config import EOS_ID, DataConfig
from transformer.data import batching, datasets
from transformer.data.datasets import TranslationSource
from transformer.data.vocab import VOCAB_FILE, Vocabulary, load_or_train

READ_CHUNK = 20_000  # records per batched read: single reads cost ~25x more


# ----------------------------------------------------------------------------
# Reading and measuring a split
# ----------------------------------------------------------------------------


def read_texts(source: TranslationSource, indices) -> list[tuple[str, str]]:
    """(source, target) texts of the examples at `indices`, read in chunks."""
    indices = [int(i) for i in indices]
    pairs = []
    for start in range(0, len(indices), READ_CHUNK):
        chunk = indices[start : start + READ_CHUNK]
        for record in source.records.__getitems__(chunk):
            pairs.append((_text(record[source.source_lang]), _text(record[source.target_lang])))
    return pairs


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def vocabulary(data: DataConfig, workdir: str, vocab_size: int, is_chief: bool) -> Vocabulary:
    """The workdir's vocabulary, trained on a sample of the training split if missing."""

    def sample():
        source = datasets.load_split(data, "train")
        rng = np.random.default_rng(0)
        n = min(len(source), data.vocab_sample_size)
        chosen = np.sort(rng.choice(len(source), size=n, replace=False))
        logging.info("training a %d-piece vocabulary on %d sentence pairs", vocab_size, n)
        for src, tgt in read_texts(source, chosen):
            yield src
            yield tgt

    return load_or_train(epath.Path(workdir) / VOCAB_FILE, sample, vocab_size, is_chief=is_chief)


@dataclasses.dataclass(frozen=True)
class ExampleIndex:
    """Token counts (EOS included) of every example of a split, and its flags."""

    source_lengths: np.ndarray  # [num_examples] int32
    target_lengths: np.ndarray
    sentence: np.ndarray | None = None  # ding_de_en: full-sentence pairs
    alternative: np.ndarray | None = None  # ding_de_en: alternative index

    def __len__(self) -> int:
        return len(self.source_lengths)

    def fits(self, max_len: int) -> np.ndarray:
        """Examples whose source and target both have at most max_len tokens."""
        return (self.source_lengths <= max_len) & (self.target_lengths <= max_len)

    def later_phrase_alternatives(self) -> np.ndarray:
        """ding_de_en: phrases that are not their entry's first alternative."""
        return ~self.sentence & (self.alternative > 0)


def measure(source: TranslationSource, vocab: Vocabulary) -> ExampleIndex:
    """Tokenizes a whole split once to learn every example's lengths."""
    src_len, tgt_len, sentence, alternative = [], [], [], []
    for start in range(0, len(source), READ_CHUNK):
        chunk = list(range(start, min(start + READ_CHUNK, len(source))))
        records = source.records.__getitems__(chunk)
        src = vocab.encode_batch([_text(r[source.source_lang]) for r in records])
        tgt = vocab.encode_batch([_text(r[source.target_lang]) for r in records])
        src_len += [len(x) + 1 for x in src]
        tgt_len += [len(x) + 1 for x in tgt]
        sentence += [bool(r.get("sentence", False)) for r in records]
        alternative += [int(r.get("alternative", 0)) for r in records]
    has_flags = len(source) > 0 and "sentence" in source.records[0]
    return ExampleIndex(
        np.asarray(src_len, np.int32),
        np.asarray(tgt_len, np.int32),
        np.asarray(sentence, bool) if has_flags else None,
        np.asarray(alternative, np.int32) if has_flags else None,
    )


def load_or_measure(
    source: TranslationSource, vocab: Vocabulary, workdir: str, split: str, data: DataConfig
) -> ExampleIndex:
    """measure(), cached in the workdir under a name tied to the vocabulary and data."""
    key = hashlib.sha256(
        vocab.proto + f"{data.dataset}/{data.direction}/{split}/{len(source)}".encode()
    ).hexdigest()[:16]
    path = epath.Path(workdir) / f"lengths-{split}-{key}.npz"
    if path.exists():
        with path.open("rb") as f:
            arrays = dict(np.load(io.BytesIO(f.read())))
        return ExampleIndex(
            **{
                k: arrays.get(k)
                for k in ("source_lengths", "target_lengths", "sentence", "alternative")
            }
        )
    index = measure(source, vocab)
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v for k, v in dataclasses.asdict(index).items() if v is not None})
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(buffer.getvalue())
    tmp.rename(path)
    return index


# ----------------------------------------------------------------------------
# Training batches
# ----------------------------------------------------------------------------


def epoch_repeats(index: ExampleIndex, data: DataConfig, max_len: int) -> np.ndarray:
    """How often each example appears per epoch: 0 if too long, more for sentences.

    ding_de_en with first_alternative_only drops the phrases' later alternatives
    (the i-th German synonym with the i-th English one: loosely aligned); a
    sentence's alternatives are paraphrases of it and all stay.
    """
    repeats = index.fits(max_len).astype(np.int64)
    if index.sentence is not None:
        repeats = np.where(index.sentence, repeats * data.sentence_repeats, repeats)
        if data.first_alternative_only:
            repeats = np.where(index.later_phrase_alternatives(), 0, repeats)
    return repeats


class TrainPlan:
    """Global batches of every epoch, computed lazily; batch n -> (epoch, i)."""

    def __init__(
        self, index: ExampleIndex, data: DataConfig, max_len: int, seed: int, row_multiple: int
    ):
        self.index, self.data, self.seed, self.row_multiple = index, data, seed, row_multiple
        self.max_len = min(max_len, data.max_len)
        self.repeats = epoch_repeats(index, data, self.max_len)
        # Too long only: alternatives left out on purpose are not "dropped".
        self.dropped = int(np.sum(~index.fits(self.max_len)))
        if not self.repeats.any():
            raise ValueError(f"no training example fits max_len={self.max_len}")
        self._epochs: list[list] = []
        self._starts: list[int] = [0]
        self._lock = threading.Lock()

    def _plan_epoch(self, epoch: int) -> list:
        order = batching.epoch_order(len(self.index), self.seed, epoch, self.repeats)
        src, tgt = self.index.source_lengths, self.index.target_lengths
        if self.data.batching == "packed":
            return [
                (self.data.row_length, rows)
                for rows in batching.pack(
                    order, src, tgt, self.data.row_length, self.data.batch_rows
                )
            ]
        bounds = batching.default_boundaries(self.max_len)
        return batching.bucket(
            order, src, tgt, self.data.tokens_per_batch, bounds, self.row_multiple
        )

    def batch(self, n: int) -> tuple[int, int, list[np.ndarray]]:
        """(epoch, padded length, rows) of global batch n."""
        with self._lock:
            while n >= self._starts[-1]:
                epoch = len(self._epochs)
                self._epochs.append(self._plan_epoch(epoch))
                self._starts.append(self._starts[-1] + len(self._epochs[-1]))
                logging.info("planned epoch %d: %d batches", epoch, len(self._epochs[-1]))
            epoch = int(np.searchsorted(self._starts, n, side="right")) - 1
            length, rows = self._epochs[epoch][n - self._starts[epoch]]
        return epoch, length, rows

    def epoch_size(self, epoch: int) -> int:
        """Number of global batches in an epoch."""
        while len(self._starts) <= epoch + 1:
            self.batch(self._starts[-1])
        return self._starts[epoch + 1] - self._starts[epoch]


def assemble(
    pairs: list[tuple[list[int], list[int]]],
    rows: list[np.ndarray],
    example_ids: list[int],
    length: int,
    packed: bool,
) -> dict[str, np.ndarray]:
    """Lays tokenized examples out as [R, length] arrays (see the module docstring)."""
    position_of = {ex: k for k, ex in enumerate(example_ids)}
    names = ("inputs", "targets")
    out = {name: np.zeros((len(rows), length), np.int32) for name in names}
    if packed:
        for name in names:
            out[f"{name}_position"] = np.zeros((len(rows), length), np.int32)
            out[f"{name}_segmentation"] = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        offsets = [0, 0]
        for segment, ex in enumerate(row, start=1):
            for side, name in enumerate(names):
                ids = pairs[position_of[int(ex)]][side]
                start, end = offsets[side], offsets[side] + len(ids)
                out[name][r, start:end] = ids
                if packed:
                    out[f"{name}_position"][r, start:end] = np.arange(len(ids))
                    out[f"{name}_segmentation"][r, start:end] = segment
                offsets[side] = end
    return out


class TrainBatches(grain.MapDataset):
    """Batch n of the plan, this process's rows, as arrays. Infinite length."""

    def __init__(
        self,
        source: TranslationSource,
        vocab: Vocabulary,
        plan: TrainPlan,
        process_index: int,
        process_count: int,
    ):
        super().__init__()
        self.source, self.vocab, self.plan = source, vocab, plan
        self.process_index, self.process_count = process_index, process_count

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, n):
        if isinstance(n, slice):
            return self.slice(n)
        _, length, rows = self.plan.batch(int(n))
        share = len(rows) // self.process_count
        rows = rows[self.process_index * share : (self.process_index + 1) * share]
        example_ids = sorted({int(i) for row in rows for i in row})
        texts = read_texts(self.source, example_ids)
        pairs = tokenize(self.vocab, texts, self.plan.max_len)
        if self.plan.data.subword_sampling:
            # One generator per (seed, batch): batch n is the same after a resume
            # and whichever thread prepares it.
            rng = np.random.default_rng([self.plan.seed, int(n)])
            pairs = resegment(self.vocab, texts, pairs, self.plan.data.subword_sampling, rng)
        return assemble(pairs, rows, example_ids, length, self.plan.data.batching == "packed")


def tokenize(vocab: Vocabulary, texts: list[tuple[str, str]], max_len: int):
    """EOS-terminated ids of both sides, cut at max_len (EOS kept last)."""
    src = vocab.encode_batch([s for s, _ in texts])
    tgt = vocab.encode_batch([t for _, t in texts])
    return [
        (s[: max_len - 1] + [EOS_ID], t[: max_len - 1] + [EOS_ID])
        for s, t in zip(src, tgt, strict=True)
    ]


NBEST = 8  # segmentations considered by subword sampling


def resegment(
    vocab: Vocabulary,
    texts: list[tuple[str, str]],
    pairs: list[tuple[list[int], list[int]]],
    probability: float,
    rng: np.random.Generator,
) -> list[tuple[list[int], list[int]]]:
    """Subword regularization (Kudo 2018) within the planned lengths.

    Each side, with `probability`, takes one of its other n-best segmentations
    that is no longer than the tokenized one (which the batch plan measured), so
    that every row still fits; otherwise, or where none is that short, it keeps
    its tokens. The generator's draws make the choice reproducible.
    """
    out = []
    for text_pair, pair in zip(texts, pairs, strict=True):
        sides = []
        for text, ids in zip(text_pair, pair, strict=True):
            if rng.random() < probability:
                alternatives = [
                    s + [EOS_ID]
                    for s in vocab.nbest(text, NBEST)
                    if len(s) < len(ids) and s + [EOS_ID] != ids
                ]
                if alternatives:
                    ids = alternatives[rng.integers(len(alternatives))]
            sides.append(ids)
        out.append((sides[0], sides[1]))
    return out


@dataclasses.dataclass
class TrainData:
    """Everything the training loop needs from the data side."""

    vocab: Vocabulary
    plan: TrainPlan
    dataset: grain.MapDataset
    num_examples: int

    def iterator(self) -> grain.DatasetIterator:
        """Batches from 0 on, read ahead by threads; get_state/set_state resume exactly."""
        options = grain.ReadOptions(
            num_threads=self.plan.data.num_threads,
            prefetch_buffer_size=self.plan.data.prefetch_batches,
        )
        return iter(self.dataset.to_iter_dataset(options))


def train_data(
    data: DataConfig,
    workdir: str,
    vocab_size: int,
    max_len: int,
    seed: int,
    *,
    row_multiple: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> TrainData:
    """Prepares the corpus and vocabulary and returns the training batches."""
    if process_index == 0:
        datasets.prepare(data)
    vocab = vocabulary(data, workdir, vocab_size, is_chief=process_index == 0)
    source = datasets.load_split(data, "train")
    index = load_or_measure(source, vocab, workdir, "train", data)
    plan = TrainPlan(index, data, max_len, seed, row_multiple * process_count)
    if plan.dropped:
        logging.warning(
            "dropped %d of %d training examples longer than %d tokens",
            plan.dropped,
            len(index),
            plan.max_len,
        )
    if data.first_alternative_only and index.alternative is not None:
        logging.info(
            "left out %d later alternatives of phrases (first_alternative_only)",
            int(np.sum(index.later_phrase_alternatives())),
        )
    dataset = TrainBatches(source, vocab, plan, process_index, process_count)
    return TrainData(vocab, plan, dataset, len(index))


# ----------------------------------------------------------------------------
# Evaluation batches: every example, in length order, none dropped
# ----------------------------------------------------------------------------


def eval_batches(
    source: TranslationSource,
    vocab: Vocabulary,
    max_len: int,
    tokens_per_batch: int,
    row_multiple: int = 1,
    limit: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """All examples of a split (or the first `limit`), bucketed by length.

    Examples longer than max_len are cut to max_len (with a warning), never
    dropped. Padding rows have index -1.
    """
    n = len(source) if limit is None else min(limit, len(source))
    texts = read_texts(source, range(n))
    pairs = tokenize(vocab, texts, sys.maxsize)
    too_long = sum(max(len(s), len(t)) > max_len for s, t in pairs)
    if too_long:
        logging.warning("%d of %d evaluation examples cut to %d tokens", too_long, n, max_len)
        pairs = [
            (s[: max_len - 1] + s[-1:], t[: max_len - 1] + t[-1:])
            if max(len(s), len(t)) > max_len
            else (s, t)
            for s, t in pairs
        ]
    src_len = np.asarray([len(s) for s, _ in pairs])
    tgt_len = np.asarray([len(t) for _, t in pairs])
    order = np.argsort(np.maximum(src_len, tgt_len), kind="stable")
    planned = batching.bucket(
        order,
        src_len,
        tgt_len,
        tokens_per_batch,
        batching.default_boundaries(max_len),
        row_multiple,
    )
    batches = []
    for length, rows in planned:
        ids = sorted({int(i) for row in rows for i in row})
        batch = assemble([pairs[i] for i in ids], rows, ids, length, packed=False)
        batch["index"] = np.asarray([int(row[0]) if len(row) else -1 for row in rows], np.int32)
        batches.append(batch)
    return batches
