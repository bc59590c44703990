"""The input pipeline: corpus -> vocabulary -> token ids -> batches.

The training split is tokenized once per vocabulary (transformer/data/token_ids.py).
Training batches come from a grain MapDataset indexed by batch number: batch
n is planned from the examples' lengths (transformer/data/batching.py) and
laid out from the prepared ids with a few numpy gathers. Grain worker
processes (or threads, on a small host) prepare batches ahead of the training
step. Batch n depends on n alone, so the data position is a batch number and
a resumed run sees exactly the batches an uninterrupted one would have seen.

A batch is a dict of int32 arrays, this process's share of the rows:
  inputs, targets                     [R, L] token ids, EOS-terminated, 0-padded
  inputs_positions, targets_positions [R, L] (packed only) position in its example
  inputs_segmentation, ...            [R, L] (packed only) 1, 2, ... per example, 0 on padding
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading

import grain
import numpy as np
from absl import flags, logging
from etils import epath

from transformer.config import EOS_ID, DataConfig
from transformer.data import DataError, batching, datasets, token_ids
from transformer.data.datasets import TranslationSource
from transformer.data.vocab import VOCAB_FILE, Vocabulary, load_or_train
from transformer.progress import Meter, say

# ----------------------------------------------------------------------------
# The vocabulary and the examples' lengths
# ----------------------------------------------------------------------------


def vocabulary(data: DataConfig, workdir: str, vocab_size: int, is_chief: bool) -> Vocabulary:
    """The workdir's vocabulary, trained on a sample of the training split if missing."""

    def sample():
        source = datasets.load_split(data, "train")
        rng = np.random.default_rng(0)
        n = min(len(source), data.vocab_sample_size)
        chosen = np.sort(rng.choice(len(source), size=n, replace=False))
        say(
            f"training a {vocab_size}-piece SentencePiece {data.vocab_model} vocabulary on "
            f"{n:,} sampled pairs"
        )
        meter = Meter("reading the vocabulary's sample", n, "pairs")
        for records in source.chunks(chosen):
            for record in records:
                yield datasets.as_text(record[source.source_lang])
                yield datasets.as_text(record[source.target_lang])
            meter.advance(len(records))
        meter.finish()
        say("fitting the vocabulary's pieces to the sample (SentencePiece)")

    return load_or_train(
        epath.Path(workdir) / VOCAB_FILE, sample, vocab_size, is_chief=is_chief,
        model_type=data.vocab_model,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ExampleIndex:
    """Token counts (EOS included) of every example of a split, and its flags."""

    source_lengths: np.ndarray  # [num_examples] int32
    target_lengths: np.ndarray
    sentence: np.ndarray | None = None  # ding_de_en: full-sentence pairs
    alternative: np.ndarray | None = None  # ding_de_en: alternative index

    @classmethod
    def of(cls, ids: token_ids.TokenIds) -> ExampleIndex:
        flags = [ids.flag(name) for name in token_ids.FLAGS] if ids.has_flags() else []
        return cls(ids.source.lengths(), ids.target.lengths(), *flags)

    def __len__(self) -> int:
        return len(self.source_lengths)

    def fits(self, max_len: int) -> np.ndarray:
        """Examples whose source and target both have at most max_len tokens."""
        return (self.source_lengths <= max_len) & (self.target_lengths <= max_len)

    def later_phrase_alternatives(self) -> np.ndarray:
        """ding_de_en: phrases that are not their entry's first alternative."""
        return ~self.sentence & (self.alternative > 0)


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

    KEPT_EPOCHS = 2  # batches in flight may still come from the epoch before

    def __init__(
        self, index: ExampleIndex, data: DataConfig, max_len: int, seed: int, row_multiple: int
    ):
        self.index, self.data, self.seed, self.row_multiple = index, data, seed, row_multiple
        self.max_len = min(max_len, data.max_len)
        self.repeats = epoch_repeats(index, data, self.max_len)
        # Too long only: alternatives left out on purpose are not "dropped".
        self.dropped = int(np.sum(~index.fits(self.max_len)))
        if not self.repeats.any():
            raise DataError(
                f"no training example fits max_len={self.max_len}: raise --max_len "
                "(and --row_length, which must hold it)"
            )
        # The plans of the last KEPT_EPOCHS epochs reached (a resume or a long
        # run does not hold every earlier one), and where every epoch starts.
        self._epochs: dict[int, list] = {}
        self._starts: list[int] = [0]
        self._lock = threading.Lock()

    def __getstate__(self):  # a worker process plans the epochs it reaches itself
        return {**self.__dict__, "_epochs": {}, "_starts": [0], "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

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
                epoch = len(self._starts) - 1
                plan = self._keep(epoch, self._plan_epoch(epoch))
                self._starts.append(self._starts[-1] + len(plan))
                logging.info("planned epoch %d: %d batches", epoch, len(plan))
            epoch = int(np.searchsorted(self._starts, n, side="right")) - 1
            plan = self._epochs.get(epoch) or self._keep(epoch, self._plan_epoch(epoch))
            length, rows = plan[n - self._starts[epoch]]
        return epoch, length, rows

    def _keep(self, epoch: int, plan: list) -> list:
        self._epochs[epoch] = plan
        for old in sorted(self._epochs)[: -self.KEPT_EPOCHS]:
            del self._epochs[old]
        return plan


def layout(
    sources: token_ids.Ragged,
    targets: token_ids.Ragged,
    rows: list[np.ndarray],
    length: int,
    packed: bool,
) -> dict[str, np.ndarray]:
    """Lays examples out as [R, length] arrays (see the module docstring), in numpy.

    `rows[r]` holds the indices (into `sources` and `targets`) of the examples of
    row r, in order; each side of a row must fit in `length` tokens.
    """
    counts = np.fromiter((len(row) for row in rows), np.int64, len(rows))
    examples = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    row_of = np.repeat(np.arange(len(rows)), counts)  # [E]
    segment = np.arange(len(examples)) - np.repeat(np.cumsum(counts) - counts, counts) + 1
    out = {}
    for name, side in (("inputs", sources), ("targets", targets)):
        begin = side.offsets[examples]
        n = side.offsets[examples + 1] - begin  # [E] tokens of each example
        ends = np.cumsum(n)
        row_first = np.concatenate([[0], ends])[np.cumsum(counts) - counts]  # [R]
        column = ends - n - row_first[row_of]  # [E] where each example starts in its row
        position = np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - n, n)  # [tokens]
        at = (np.repeat(row_of, n), np.repeat(column, n) + position)
        out[name] = np.zeros((len(rows), length), np.int32)
        out[name][at] = side.tokens[np.repeat(begin, n) + position]
        if packed:
            out[f"{name}_positions"] = np.zeros((len(rows), length), np.int32)
            out[f"{name}_positions"][at] = position
            out[f"{name}_segmentation"] = np.zeros((len(rows), length), np.int32)
            out[f"{name}_segmentation"][at] = np.repeat(segment, n)
    return out


def local_rows(rows: list[np.ndarray]) -> tuple[list[int], list[np.ndarray]]:
    """The rows' distinct examples, sorted, and the rows as positions among them."""
    example_ids = np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
    return example_ids.tolist(), [np.searchsorted(example_ids, row) for row in rows]


class TrainBatches(grain.MapDataset):
    """Batch n of the plan, this process's rows, as arrays. Infinite length.

    Reads the prepared token ids; with subword sampling it also reads the
    batch's texts, which sampling needs. Pickled into grain's worker processes,
    it carries paths and the plan's lengths, not the corpus.
    """

    def __init__(
        self,
        ids: token_ids.TokenIds,
        plan: TrainPlan,
        process_index: int,
        process_count: int,
        text: tuple[TranslationSource, Vocabulary] | None = None,
    ):
        super().__init__()
        self.ids, self.plan, self.text = ids, plan, text
        self.process_index, self.process_count = process_index, process_count

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, n):
        if isinstance(n, slice):
            return self.slice(n)
        _, length, rows = self.plan.batch(int(n))
        share = len(rows) // self.process_count
        rows = rows[self.process_index * share : (self.process_index + 1) * share]
        packed = self.plan.data.batching == "packed"
        if not self.plan.data.subword_sampling:
            return layout(self.ids.source, self.ids.target, rows, length, packed)
        example_ids, local = local_rows(rows)
        source, vocab = self.text
        texts = source.texts(example_ids)
        pairs = [
            (self._ids(self.ids.source, i), self._ids(self.ids.target, i)) for i in example_ids
        ]
        # One generator per (seed, batch): batch n is the same after a resume
        # and whichever thread or process prepares it.
        rng = np.random.default_rng([self.plan.seed, int(n)])
        pairs = resegment(vocab, texts, pairs, self.plan.data.subword_sampling, rng)
        # A process's share may hold only padding rows (an epoch's last batch).
        sources = token_ids.Ragged.from_lists([ids for ids, _ in pairs])
        targets = token_ids.Ragged.from_lists([ids for _, ids in pairs])
        return layout(sources, targets, local, length, packed)

    @staticmethod
    def _ids(side: token_ids.Ragged, i: int) -> list[int]:
        return side.tokens[side.offsets[i] : side.offsets[i + 1]].astype(int).tolist()


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


def worker_count(data: DataConfig) -> int:
    """Batch-producing processes: data_workers, or for 0 ("auto") a quarter of the
    host's cores, at most 16: none on a 2-core host (threads in the training
    process suffice there), 16 on a TPU VM host."""
    if data.data_workers == -1:
        return 0
    return data.data_workers or min(16, (os.cpu_count() or 1) // 4)


@dataclasses.dataclass
class TrainData:
    """Everything the training loop needs from the data side."""

    vocab: Vocabulary
    plan: TrainPlan
    dataset: grain.MapDataset
    num_examples: int

    def iterator(self, start: int = 0) -> grain.DatasetIterator:
        """Batches from number `start` on, produced ahead of the training step.

        With worker_count() > 0, grain worker processes produce them, free of
        this process's GIL; otherwise threads do. Batch n is a function of n
        alone, so the position to resume from is a batch number, valid for any
        number of workers.
        """
        data = self.plan.data
        workers = worker_count(data)
        options = grain.ReadOptions(
            num_threads=data.num_threads if workers == 0 else 1,
            prefetch_buffer_size=data.prefetch_batches,
        )
        dataset = self.dataset[start:].to_iter_dataset(options)
        if workers:
            if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags
                flags.FLAGS.mark_as_parsed()  # library use (a notebook, tests): defaults
            per_worker = max(1, data.prefetch_batches // workers)
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(workers, per_worker))
        return iter(dataset)


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
    """Prepares the corpus, vocabulary and token ids and returns the training batches."""
    if process_index == 0:
        datasets.prepare(data)
    vocab = vocabulary(data, workdir, vocab_size, is_chief=process_index == 0)
    if data.subword_sampling and not vocab.can_sample():  # a BPE model from --init_from
        raise DataError(
            f"{workdir}/{VOCAB_FILE} is a BPE model, which has no n-best segmentations: "
            "--subword_sampling needs a unigram one; train without it, or in a new --workdir"
        )
    source = datasets.load_split(data, "train")
    ids = token_ids.load_or_write(data, source, vocab, "train", is_chief=process_index == 0)
    index = ExampleIndex.of(ids)
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
    text = (source, vocab) if data.subword_sampling else None
    dataset = TrainBatches(ids, plan, process_index, process_count, text)
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
) -> list[dict[str, np.ndarray]]:
    """All examples of a split, bucketed by length; padding rows are all 0.

    Examples longer than max_len are cut to max_len (with a warning), never
    dropped.
    """
    n = len(source)
    texts = source.texts(range(n))
    pairs = tokenize(vocab, texts, sys.maxsize)
    too_long = sum(max(len(s), len(t)) > max_len for s, t in pairs)
    if too_long:
        logging.warning("%d of %d evaluation examples cut to %d tokens", too_long, n, max_len)
        pairs = [  # each long side cut, EOS kept last
            tuple(ids if len(ids) <= max_len else ids[: max_len - 1] + ids[-1:] for ids in pair)
            for pair in pairs
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
    sources, targets = (token_ids.Ragged.from_lists(side) for side in zip(*pairs, strict=True))
    return [layout(sources, targets, rows, length, packed=False) for length, rows in planned]
