"""The SentencePiece vocabulary: distinct special ids, round trips, reuse, waiting."""

import random
import threading
import time

import pytest
from sentencepiece import sentencepiece_model_pb2

from transformer.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer.data import DataError, vocab


def test_special_ids_are_distinct(sample_vocab):
    assert len({PAD_ID, EOS_ID, BOS_ID, UNK_ID}) == 4
    assert sample_vocab.pieces([PAD_ID, EOS_ID, BOS_ID, UNK_ID]) == [
        "<pad>",
        "</s>",
        "<s>",
        "<unk>",
    ]
    assert sample_vocab.size == 350
    # An unseen character is spelled in bytes, never mapped to <unk> or padding.
    ids = sample_vocab.encode("Qüß€")
    assert UNK_ID not in ids and PAD_ID not in ids


@pytest.mark.parametrize(
    "text",
    [
        "Die Straße ist naß, öffnen Sie bitte die Tür!",
        "The old man buys a beautiful door (on a menu).",
        "„Größe“ – 10 € … ÄÖÜ äöü ß?",
        "Mixed 漢字 and emoji 😀, tab-free.",
    ],
)
def test_round_trip(sample_vocab, text):
    assert sample_vocab.decode(sample_vocab.encode(text)) == text


def test_decode_stops_at_eos_and_skips_padding(sample_vocab):
    ids = sample_vocab.encode("Der Hund")
    assert sample_vocab.decode([BOS_ID, *ids, EOS_ID, *sample_vocab.encode("sieht"), PAD_ID]) == (
        "Der Hund"
    )


def test_existing_vocabulary_is_reused(tmp_path, sample_vocab):
    path = tmp_path / vocab.VOCAB_FILE
    path.write_bytes(sample_vocab.proto)

    def must_not_train():
        raise AssertionError("trained although the file exists")

    assert vocab.load_or_train(path, must_not_train, 350).proto == sample_vocab.proto


def test_size_mismatch_is_refused(tmp_path, sample_vocab):
    path = tmp_path / vocab.VOCAB_FILE
    path.write_bytes(sample_vocab.proto)
    with pytest.raises(DataError, match="vocab_size=512"):
        vocab.load_or_train(path, lambda: [], 512)


def test_other_processes_wait_for_process_0(tmp_path, sample_vocab):
    path = tmp_path / vocab.VOCAB_FILE
    asking = threading.Event()

    def chief_writes_later():
        asking.wait(30)
        time.sleep(0.3)  # the other process finds no file and waits for it
        tmp = tmp_path / ".partial"
        tmp.write_bytes(sample_vocab.proto)
        tmp.rename(path)

    def not_process_0():
        raise AssertionError("a process other than 0 trained a vocabulary")

    writer = threading.Thread(target=chief_writes_later)
    writer.start()
    assert not path.exists()
    asking.set()
    loaded = vocab.load_or_train(path, not_process_0, 350, is_chief=False, timeout_s=30)
    writer.join()
    assert loaded.proto == sample_vocab.proto


def test_waiting_times_out_with_a_message(tmp_path):
    with pytest.raises(DataError, match="process 0"):
        vocab.load_or_train(
            tmp_path / "never.model", lambda: [], 300, is_chief=False, timeout_s=0.1
        )


def test_too_large_a_vocabulary_for_the_corpus_is_a_clear_error():
    with pytest.raises(DataError, match="cannot train a 5000-piece vocabulary"):
        vocab.train(["ein kleiner Satz", "a small sentence"] * 50, 5000)


def _train_recording_progress(monkeypatch, model_type: str):
    """A 2000-piece vocabulary of random words -> (it, its texts, the meter's updates)."""
    seen = []

    class Recording(vocab.Meter):
        def update(self, done, total):
            seen.append((done, total))
            super().update(done, total)

    monkeypatch.setattr(vocab, "Meter", Recording)
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
             for _ in range(5000)]  # fmt: skip
    texts = [" ".join(rng.choices(words, k=10)) for _ in range(20000)]
    return vocab.train(texts, 2000, model_type), texts, seen


def test_fitting_shows_sentencepieces_rounds_and_keeps_its_log_off_stderr(monkeypatch, capfd):
    """The rounds are counted from SentencePiece's own log; the first one says how
    many will follow, and that count is what then happens."""
    trained, _, seen = _train_recording_progress(monkeypatch, "unigram")
    assert trained.can_sample()
    total = seen[0][1]
    assert total > 1 and seen == [(k, total) for k in range(1, total + 1)] + [(total, total)]
    out, err = capfd.readouterr()
    assert f"fitting the vocabulary's pieces: 1/{total} rounds" in out  # at once, in a log too
    assert f"fitting the vocabulary's pieces: {total}/{total} rounds" in out
    assert "EM sub_iter" not in err and "trainer_spec" not in err
    # It started from 12 seed pieces per piece, not SentencePiece's 1M.
    spec = sentencepiece_model_pb2.ModelProto.FromString(trained.proto).trainer_spec
    assert spec.seed_sentencepiece_size == 24_000


def test_a_bpe_vocabulary_has_the_special_ids_and_shows_its_merges(monkeypatch, capfd):
    """--vocab_model=bpe (the paper's byte-pair encoding): SentencePiece's BPE
    trainer, the same special ids, and its merges as progress."""
    trained, texts, seen = _train_recording_progress(monkeypatch, "bpe")
    spec = sentencepiece_model_pb2.ModelProto.FromString(trained.proto).trainer_spec
    assert spec.model_type == spec.BPE
    assert not trained.can_sample()  # no n-best segmentations: no subword sampling
    assert trained.size == 2000
    assert trained.pieces([PAD_ID, EOS_ID, BOS_ID, UNK_ID]) == ["<pad>", "</s>", "<s>", "<unk>"]
    assert trained.decode(trained.encode(texts[0])) == texts[0]
    merges = [done for done, _ in seen[:-1]]
    assert merges and merges == sorted(merges) and all(m % 100 == 0 for m in merges)
    assert seen[-1] == (2000, 2000)
    out, err = capfd.readouterr()
    assert "merging the vocabulary's pieces: 2,000/2,000 pieces" in out
    assert "Merged: freq" not in err and "trainer_spec" not in err


def test_an_error_reading_the_texts_is_raised_as_it_was():
    """Raised inside SentencePiece's trainer, it once came out as 'cannot train a
    400-piece vocabulary: INTERNAL: DataError: ... At: <file>(<line>)'."""

    def texts():
        yield from (f"Satz {i} mit einigen Wörtern" for i in range(1000))
        raise DataError("a file of /data/ding_de_en/1.0.0 is damaged")

    with pytest.raises(DataError, match=r"^a file of /data/ding_de_en/1.0.0 is damaged$"):
        vocab.train(texts(), 400)
