"""The shared source/target SentencePiece vocabulary.

Special ids are fixed (transformer.config): PAD 0, EOS 1, BOS 2, UNK 3, all
distinct, so that padding never hides an unknown token. Text is not
normalized (identity rule) and unknown characters fall back to UTF-8 bytes,
so decode(encode(text)) == text for any text without runs of whitespace.

One model is trained per workdir on a sample of the training split; only
process 0 trains it and writes it atomically, the other processes wait for
the file.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import sentencepiece as spm
from etils import epath

from transformer.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from transformer.data import DataError
from transformer.progress import Meter, format_duration, say

VOCAB_FILE = "vocab.model"


class Vocabulary:
    """Encodes text to ids and back with a SentencePiece model."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        if not model_proto:  # which SentencePiece would take for a model with no pieces
            raise DataError(
                "not a SentencePiece model (it is empty); restore it from a copy, "
                "or train in a new --workdir"
            )
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise DataError(
                "not a SentencePiece model (it does not parse); restore it from a copy, "
                "or train in a new --workdir"
            ) from e
        ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id(), self._sp.unk_id())
        if ids != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
            raise DataError(
                f"vocabulary has special ids pad/eos/bos/unk = {ids}, expected "
                f"{(PAD_ID, EOS_ID, BOS_ID, UNK_ID)}: not one this project trained; "
                "restore the workdir's own, or train in a new --workdir"
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        try:
            return cls(epath.Path(path).read_bytes())
        except DataError as e:
            raise DataError(f"{path}: {e}") from e

    @property
    def size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without EOS."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def can_sample(self) -> bool:
        """Whether it has n-best segmentations (a unigram model; BPE has none)."""
        try:
            self._sp.nbest_encode_as_ids("a", 2)
        except RuntimeError:
            return False
        return True

    def nbest(self, text: str, n: int) -> list[list[int]]:
        """The n most probable segmentations of text, best first (unigram models)."""
        return self._sp.nbest_encode_as_ids(text, n)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, stopping at the first EOS and skipping PAD and BOS."""
        kept = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                kept.append(i)
        return self._sp.decode(kept)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """The piece strings of ids (for attention-map axes)."""
        return [self._sp.id_to_piece(int(i)) for i in ids]


def train(texts: Iterable[str], vocab_size: int, model_type: str = "unigram") -> Vocabulary:
    """Trains a SentencePiece model (unigram or bpe) on `texts` with the project's special ids."""
    model, failed = io.BytesIO(), []

    def read():  # an error reading the corpus reaches SentencePiece's caller as its own
        try:
            yield from texts
        except Exception as e:
            failed.append(e)
            raise

    try:
        _train(read(), vocab_size, model, model_type)
    except RuntimeError as e:  # SentencePiece reports bad sizes as INTERNAL errors
        if failed:
            raise failed[0] from None
        message = str(e).split("] ")[-1]
        raise DataError(f"cannot train a {vocab_size}-piece vocabulary: {message}") from e
    return Vocabulary(model.getvalue())


# The unigram trainer starts from the most frequent substrings of the sample
# and prunes them down. Its default start of 1M seeds is far more than an
# 8000-piece vocabulary needs: 12 per piece (96k) fits the demo's 600k
# sentences in 19 s instead of 30 s on a 2-core CPU, and its vocabulary cuts
# them into 1.7% fewer pieces (docs/cpu_demo.md). Large vocabularies keep the default.
SEEDS_PER_PIECE = 12
_DEFAULT_SEEDS = 1_000_000


def _train(texts: Iterable[str], vocab_size: int, model: io.BytesIO, model_type: str) -> None:
    with _fitting_progress(vocab_size, model_type):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            seed_sentencepiece_size=min(_DEFAULT_SEEDS, SEEDS_PER_PIECE * vocab_size),
            character_coverage=0.9999,
            byte_fallback=True,
            normalization_rule_name="identity",
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            bos_id=BOS_ID,
            unk_id=UNK_ID,
            shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1,
            minloglevel=0,  # its log is read for the progress, not shown
        )


# SentencePiece's unigram trainer: EM over the seed pieces, then rounds that
# each keep SHRINK of the pieces, until 1.1 x vocab_size are left.
_ROUND_ENDS = re.compile(r"EM sub_iter=1 size=(\d+)")
_SHRINK = 0.75
# Its BPE trainer logs every 100th merge; each merge adds one piece.
_MERGES = re.compile(r"Merged: freq=\d+ merges=(\d+)")


@contextlib.contextmanager
def _fitting_progress(vocab_size: int, model_type: str = "unigram"):
    """Shows SentencePiece's progress as it goes: its log (file descriptor 2) is
    read from a pipe while it trains. Unigram: its pruning rounds (once the first
    has said how many pieces are left, the number to go is known); BPE: its merges,
    one per piece, up to vocab_size."""
    read_end, write_end = os.pipe()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    follow = _follow_merges if model_type == "bpe" else _follow_rounds
    reader = threading.Thread(target=follow, args=(read_end, vocab_size), daemon=True)
    reader.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the reader sees its end
        os.close(saved)
        reader.join()


def _follow_rounds(read_end: int, vocab_size: int) -> None:
    meter = None
    with os.fdopen(read_end, errors="replace") as log:
        for line in log:
            found = _ROUND_ENDS.search(line)
            if not found:
                continue
            if meter is None:  # the rounds from this size down to 1.1 x vocab_size
                left = int(found.group(1)) / (1.1 * vocab_size)
                rounds = max(1, math.ceil(math.log(max(left, 1.0)) / -math.log(_SHRINK)))
                label = "fitting the vocabulary's pieces"
                meter = Meter(label, rounds, "rounds", first_at_once=True)
            meter.update(min(meter.done + 1, meter.total), meter.total)
    if meter is not None:  # the fit is over, whatever the estimate said
        meter.update(meter.total, meter.total)
        meter.finish()


def _follow_merges(read_end: int, vocab_size: int) -> None:
    meter = Meter("merging the vocabulary's pieces", vocab_size, "pieces")
    with os.fdopen(read_end, errors="replace") as log:
        for line in log:
            found = _MERGES.search(line)
            if found:
                meter.update(min(int(found.group(1)), vocab_size), vocab_size)
    meter.update(vocab_size, vocab_size)  # the merges end short of it by the alphabet
    meter.finish()


def install(path: epath.Path, proto: bytes) -> None:
    """Writes a vocabulary's bytes to `path` under a temporary name, then renames:
    a process waiting for the file never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(proto)
    tmp.rename(path)


def load_or_train(
    path: str | os.PathLike,
    texts: Callable[[], Iterable[str]],
    vocab_size: int,
    *,
    is_chief: bool = True,
    timeout_s: float = 3600.0,
    model_type: str = "unigram",
) -> Vocabulary:
    """The vocabulary at `path`; trained from texts() first if missing.

    Only the chief (process 0) trains and writes; it writes to a temporary
    name and renames, so a waiting process never reads half a file.
    """
    path = epath.Path(path)
    if not path.exists():
        if is_chief:
            start = time.monotonic()
            vocab = train(texts(), vocab_size, model_type)
            install(path, vocab.proto)
            say(
                f"vocabulary of {vocab_size} pieces written to {path} in "
                f"{format_duration(time.monotonic() - start)}"
            )
        else:
            _wait_for(path, timeout_s)
    vocab = Vocabulary.load(path)
    if vocab.size != vocab_size:
        raise DataError(
            f"{path} has {vocab.size} pieces but the model expects vocab_size={vocab_size}; "
            "set --vocab_size to match or use a new workdir"
        )
    return vocab


def _wait_for(path: epath.Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise DataError(
                f"timed out after {timeout_s:.0f}s waiting for process 0 to write {path}"
            )
        time.sleep(1.0)
