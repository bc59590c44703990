"""The grain pipeline on the sample corpus: content, resume, process shards, evaluation."""

import os
import types

import numpy as np
import pytest

from transformer import config
from transformer.data import DataError, datasets, pipeline, token_ids


@pytest.fixture(scope="module")
def train(ding_sample, sample_vocab, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    (workdir / "vocab.model").write_bytes(sample_vocab.proto)
    return pipeline.train_data(ding_sample, str(workdir), 350, max_len=32, seed=0)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _epoch_size(plan) -> int:
    """Batches in epoch 0: the number of the first batch that opens epoch 1."""
    n = 0
    while plan.batch(n)[0] == 0:
        n += 1
    return n


def test_batches_hold_the_corpus_text(train, ding_sample):
    batch = next(train.iterator())
    source = datasets.load_split(ding_sample, "train")
    corpus = {source[i] for i in range(len(source))}
    assert batch["inputs"].shape == (8, 32) and batch["inputs"].dtype == np.int32
    found = 0
    for r in range(8):
        for segment in range(1, batch["inputs_segmentation"][r].max() + 1):
            src = batch["inputs"][r][batch["inputs_segmentation"][r] == segment]
            tgt = batch["targets"][r][batch["targets_segmentation"][r] == segment]
            assert src[-1] == tgt[-1] == 1  # EOS ends both sides
            assert (train.vocab.decode(src), train.vocab.decode(tgt)) in corpus
            found += 1
    assert found > 8  # rows hold several examples


def test_one_epoch_covers_the_training_split_once(train):
    n = _epoch_size(train.plan)
    _, _, rows = zip(*(train.plan.batch(i) for i in range(n)), strict=True)
    placed = np.concatenate([r for batch in rows for r in batch])
    assert sorted(placed.tolist()) == list(range(train.num_examples))


def test_an_iterator_started_at_batch_n_continues_exactly(train):
    uninterrupted = _take(train.iterator(), 7)
    for expected, got in zip(uninterrupted[4:], _take(train.iterator(start=4), 3), strict=True):
        for key in expected:
            np.testing.assert_array_equal(expected[key], got[key])


def test_batches_from_prepared_ids_equal_batches_tokenized_from_text(train, ding_sample):
    source = datasets.load_split(ding_sample, "train")
    for n in (0, 3, _epoch_size(train.plan)):  # the last: epoch 1's first batch
        _, length, rows = train.plan.batch(n)
        example_ids, local = pipeline.local_rows(rows)
        pairs = pipeline.tokenize(train.vocab, source.texts(example_ids), 32)
        sides = [token_ids.Ragged.from_lists(side) for side in zip(*pairs, strict=True)]
        expected = pipeline.layout(*sides, local, length, packed=True)
        got = train.dataset[n]
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_the_split_is_tokenized_once_per_vocabulary(train, ding_sample, sample_vocab, tmp_path):
    folder = token_ids.split_dir(ding_sample, sample_vocab, "train")
    written = os.stat(folder / "de.ids.npy").st_mtime_ns
    (tmp_path / "vocab.model").write_bytes(sample_vocab.proto)
    again = pipeline.train_data(ding_sample, str(tmp_path), 350, max_len=32, seed=0)
    assert again.dataset.ids.folder == folder  # another workdir, the same vocabulary
    assert os.stat(folder / "de.ids.npy").st_mtime_ns == written
    ids = again.dataset.ids
    assert ids.source.tokens.dtype == np.uint16 and ids.num_examples == train.num_examples


def test_a_half_written_ids_folder_is_never_read(ding_sample, sample_vocab, tmp_path):
    data = ding_sample.replace(data_dir=str(tmp_path / "tfds"))
    folder = token_ids.split_dir(data, sample_vocab, "train")
    folder.mkdir(parents=True)
    (folder / "de.ids.npy").write_bytes(b"half")  # no complete.json: a crash mid-write
    source = datasets.load_split(ding_sample, "train")
    ids = token_ids.load_or_write(data, source, sample_vocab, "train")
    assert ids.num_examples == len(source) and len(ids.source) == len(source)


@pytest.mark.parametrize("damage", ["header", "short", "offsets"])
def test_a_damaged_ids_folder_is_named_with_what_to_delete(
    ding_sample, sample_vocab, tmp_path, damage
):
    data = ding_sample.replace(data_dir=str(tmp_path / "tfds"))
    source = datasets.load_split(ding_sample, "train")
    folder = token_ids.load_or_write(data, source, sample_vocab, "train").folder
    target = folder / ("de.offsets.npy" if damage == "offsets" else "de.ids.npy")
    raw = target.read_bytes()
    if damage == "header":  # once: "EOF: reading array header", a traceback
        target.write_bytes(raw[:100])
    elif damage == "short":  # once: "mmap length is greater than file size"
        target.write_bytes(raw[: len(raw) // 2])
    else:  # a whole file of another split's length
        np.save(target, np.arange(10, dtype=np.int64))
    with pytest.raises(DataError, match=r"is damaged \(.*\); delete that folder to tokenize"):
        token_ids.load_or_write(data, source, sample_vocab, "train")


def test_a_max_len_that_no_example_fits_is_a_data_error(ding_sample, sample_vocab, tmp_path):
    (tmp_path / "vocab.model").write_bytes(sample_vocab.proto)
    with pytest.raises(DataError, match="no training example fits max_len=1: raise --max_len"):
        pipeline.train_data(ding_sample, str(tmp_path), 350, max_len=1, seed=0)


def test_a_damaged_dataset_file_is_named_with_what_to_delete(ding_sample, tmp_path):
    import shutil

    built = datasets.load_split(ding_sample, "train").records.dataset_info.data_dir
    copy = tmp_path / "tfds" / "ding_de_en" / os.path.basename(built)
    shutil.copytree(built, copy)
    train = next(copy.glob("*-train.array_record*"))
    raw = bytearray(train.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    train.write_bytes(bytes(raw))
    source = datasets.load_split(ding_sample.replace(data_dir=str(tmp_path / "tfds")), "train")
    with pytest.raises(DataError, match=f"a file of {copy} is damaged .*delete that folder"):
        source.texts(range(len(source)))  # once: array_record's RuntimeError


def test_worker_processes_produce_the_batches_threads_do(train, ding_sample, tmp_path):
    (tmp_path / "vocab.model").write_bytes(train.vocab.proto)
    workers = ding_sample.replace(data_workers=2)
    spawned = pipeline.train_data(workers, str(tmp_path), 350, max_len=32, seed=0)
    assert pipeline.worker_count(workers) == 2
    for start in (0, 5):  # from the beginning and from a resumed position
        iterator = spawned.iterator(start=start)
        got = _take(iterator, 4)
        iterator.close()
        for n, batch in enumerate(got, start=start):
            for key, value in train.dataset[n].items():
                np.testing.assert_array_equal(batch[key], value)


def test_epochs_differ_and_continue_past_the_first(train):
    size = _epoch_size(train.plan)
    it = train.iterator()
    batches = _take(it, size + 1)
    assert train.plan.batch(size)[0] == 1  # batch `size` opens epoch 1
    assert not np.array_equal(batches[0]["inputs"], batches[size]["inputs"])


def test_a_plan_keeps_its_last_epochs_only_and_plans_an_earlier_one_again_alike(train):
    size = _epoch_size(train.plan)
    plan = pipeline.TrainPlan(train.plan.index, train.plan.data, 32, 0, train.plan.row_multiple)
    assert plan.batch(5 * size)[0] >= 4
    assert len(plan._epochs) == plan.KEPT_EPOCHS
    for n in (0, size - 1, size):  # epoch 0's first and last batches, epoch 1's first
        epoch, length, rows = plan.batch(n)
        assert (epoch, length) == train.plan.batch(n)[:2]
        for a, b in zip(rows, train.plan.batch(n)[2], strict=True):
            np.testing.assert_array_equal(a, b)
    assert len(plan._epochs) == plan.KEPT_EPOCHS


def test_two_processes_read_disjoint_halves(ding_sample, sample_vocab, tmp_path):
    (tmp_path / "vocab.model").write_bytes(sample_vocab.proto)
    args = dict(data=ding_sample, workdir=str(tmp_path), vocab_size=350, max_len=32, seed=0)
    single = next(pipeline.train_data(**args).iterator())
    halves = [
        next(pipeline.train_data(**args, process_index=p, process_count=2).iterator())
        for p in range(2)
    ]
    assert halves[0]["inputs"].shape == (4, 32)
    for key in single:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), single[key])
    assert not np.array_equal(halves[0]["inputs"], halves[1]["inputs"])


def test_long_training_examples_are_dropped_and_counted(ding_sample, sample_vocab, tmp_path):
    (tmp_path / "vocab.model").write_bytes(sample_vocab.proto)
    data = ding_sample.replace(max_len=8)
    short = pipeline.train_data(data, str(tmp_path), 350, max_len=8, seed=0)
    index = short.plan.index
    too_long = int(np.sum((index.source_lengths > 8) | (index.target_lengths > 8)))
    assert short.plan.dropped == too_long > 0
    batch = next(short.iterator())
    assert batch["inputs"].shape[1] == 32  # rows keep their length; examples are short


# 6 cuts both sides of every validation pair; 15 cuts only one side of some.
@pytest.mark.parametrize("max_len, one_side_cut", [(6, False), (15, True)])
def test_evaluation_keeps_every_example(ding_sample, sample_vocab, max_len, one_side_cut):
    source = datasets.load_split(ding_sample, "validation")
    batches = pipeline.eval_batches(
        source, sample_vocab, max_len=max_len, tokens_per_batch=64, row_multiple=2
    )
    # Each example once, each side cut to max_len and still EOS-terminated.
    texts = source.texts(range(len(source)))
    expected = [tuple(map(tuple, p)) for p in pipeline.tokenize(sample_vocab, texts, max_len)]
    found = []
    for b in batches:
        assert b["inputs"].shape[0] % 2 == 0 and b["inputs"].shape[1] <= max(max_len, 8)
        for src, tgt in zip(b["inputs"], b["targets"], strict=True):
            if src.any():  # not a padding row
                found.append((tuple(src[src != 0].tolist()), tuple(tgt[tgt != 0].tolist())))
    assert sorted(found) == sorted(expected)
    full = pipeline.tokenize(sample_vocab, texts, 1000)
    lengths = [sorted((len(s), len(t))) for s, t in full]
    assert any(long > max_len for _, long in lengths)
    assert any(short <= max_len < long for short, long in lengths) == one_side_cut


def test_epoch_weights_sentences_and_can_drop_later_phrase_alternatives():
    index = pipeline.ExampleIndex(
        source_lengths=np.array([3, 3, 3, 9, 3, 3]),
        target_lengths=np.array([3, 3, 3, 3, 3, 9]),
        sentence=np.array([False, False, True, True, True, False]),
        alternative=np.array([0, 1, 0, 0, 1, 2]),
    )
    data = config.DataConfig(dataset="ding_de_en", direction="de-en", sentence_repeats=4)
    assert pipeline.epoch_repeats(index, data, max_len=8).tolist() == [1, 1, 4, 0, 4, 0]
    # A phrase's later alternatives go; a sentence's alternative (a paraphrase) stays.
    data = data.replace(first_alternative_only=True)
    assert pipeline.epoch_repeats(index, data, max_len=8).tolist() == [1, 0, 4, 0, 4, 0]


def test_an_epoch_holds_each_example_as_often_as_weighted(ding_sample, sample_vocab, tmp_path):
    (tmp_path / "vocab.model").write_bytes(sample_vocab.proto)
    data = ding_sample.replace(sentence_repeats=3, first_alternative_only=True)
    weighted = pipeline.train_data(data, str(tmp_path), 350, max_len=32, seed=0)
    index, plan = weighted.plan.index, weighted.plan
    assert index.sentence.any() and (~index.sentence & (index.alternative > 0)).any()
    seen = np.concatenate([np.concatenate(plan.batch(n)[2]) for n in range(_epoch_size(plan))])
    counts = np.bincount(seen.astype(np.int64), minlength=len(index))
    fits = (index.source_lengths <= 32) & (index.target_lengths <= 32)
    expected = np.where(index.sentence, 3, index.alternative == 0) * fits
    np.testing.assert_array_equal(counts, expected)
    assert plan.dropped == int(
        np.sum(~fits)
    )  # too long; the alternatives left out are not "dropped"


# ----------------------------------------------------------------------------
# Subword regularization within the planned lengths
# ----------------------------------------------------------------------------


def test_resegmenting_keeps_the_text_and_never_lengthens_a_side(train, ding_sample):
    source = datasets.load_split(ding_sample, "train")
    texts = [source[i] for i in range(len(source))]
    planned = pipeline.tokenize(train.vocab, texts, 32)
    rng = np.random.default_rng(0)
    sampled = pipeline.resegment(train.vocab, texts, planned, 1.0, rng)
    changed = 0
    for text_pair, before, after in zip(texts, planned, sampled, strict=True):
        for text, a, b in zip(text_pair, before, after, strict=True):
            assert train.vocab.decode(b) == text and b[-1] == 1  # same text, EOS last
            assert len(b) <= len(a)  # fits where the plan put the tokenized side
            changed += a != b
    # The sample corpus has rare words with several segmentations of equal length.
    assert changed > len(texts) // 4, changed
    assert pipeline.resegment(train.vocab, texts, planned, 0.0, rng) == planned


def test_subword_sampled_batches_resume_exactly_and_differ_from_plain_ones(
    ding_sample, sample_vocab, tmp_path
):
    (tmp_path / "vocab.model").write_bytes(sample_vocab.proto)
    sampled = ding_sample.replace(subword_sampling=0.5)
    data = pipeline.train_data(sampled, str(tmp_path), 350, max_len=32, seed=0)
    plain = pipeline.train_data(ding_sample, str(tmp_path), 350, max_len=32, seed=0)
    again = pipeline.train_data(sampled, str(tmp_path), 350, max_len=32, seed=0)
    differ = 0
    for n in (0, 1, 5):
        a, b, p = data.dataset[n], again.dataset[n], plain.dataset[n]
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])  # batch n is a function of n
        # Same rows, segments and positions where the plan put them...
        np.testing.assert_array_equal(a["targets_segmentation"] > 0, a["targets"] > 0)
        differ += not all(np.array_equal(a[k], p[k]) for k in ("inputs", "targets"))
    assert differ == 3  # ...and other segmentations than the plain batches'


def test_a_process_whose_share_is_padding_rows_gets_empty_rows_with_sampling_too(
    ding_sample, sample_vocab, tmp_path
):
    (tmp_path / "vocab.model").write_bytes(sample_vocab.proto)
    sampled = ding_sample.replace(subword_sampling=0.5)
    data = pipeline.train_data(sampled, str(tmp_path), 350, max_len=32, seed=0)
    _, length, rows = data.plan.batch(0)
    # An epoch's last batch: its examples first, then rows of none.
    last = types.SimpleNamespace(
        batch=lambda n: (0, length, [*rows[:4], *[np.zeros(0, np.int64)] * 4]),
        data=data.plan.data,
        seed=data.plan.seed,
    )
    shares = [
        pipeline.TrainBatches(data.dataset.ids, last, p, 2, data.dataset.text)[0] for p in (0, 1)
    ]
    assert all(v.shape == (4, length) for share in shares for v in share.values())
    assert (shares[0]["targets"][:, 0] > 0).all()  # process 0: four rows of examples
    assert not any(v.any() for v in shares[1].values())  # process 1: padding only


def test_subword_sampled_batches_from_workers_equal_those_from_threads(
    ding_sample, sample_vocab, tmp_path
):
    (tmp_path / "vocab.model").write_bytes(sample_vocab.proto)
    sampled = ding_sample.replace(subword_sampling=0.5, data_workers=1)
    data = pipeline.train_data(sampled, str(tmp_path), 350, max_len=32, seed=0)
    iterator = data.iterator(start=2)
    batch = next(iterator)
    iterator.close()
    for key, value in data.dataset[2].items():
        np.testing.assert_array_equal(batch[key], value)


def test_subword_sampling_must_be_a_probability():
    with pytest.raises(config.ConfigError, match=r"subword_sampling must be in \[0, 1\]"):
        config.DataConfig(subword_sampling=1.5).validate()
