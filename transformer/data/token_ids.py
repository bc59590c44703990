"""Token ids of a whole split, tokenized once per vocabulary and read by memory map.

Training reads its batches from here instead of from text: a batch is then a
few numpy gathers, with no SentencePiece and no Python loop per token, so one
producer assembles hundreds of thousands of tokens a second. The ids are
written next to the corpus, under a key of the vocabulary's bytes, so every
run with that vocabulary (any workdir, any resume) reuses them:

  <data_dir>/token_ids/<dataset>/<vocabulary key>/<split>/
    <lang>.ids.npy       [total] uint16 (int32 past 65,536 pieces): every example's
                         ids back to back, EOS-terminated
    <lang>.offsets.npy   [N + 1] int64: example i is ids[offsets[i]:offsets[i + 1]]
    sentence.npy, alternative.npy   ding_de_en only: [N] the pipeline's example flags
    complete.json        written last, so a folder without it is never read

Both languages are stored, so either direction of a corpus reads the same
files. Local folders are memory-mapped (shared by every reader process through
the page cache); remote ones (gs://) are read into memory once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from transformer.config import EOS_ID, DataConfig
from transformer.data import DataError
from transformer.data.datasets import TranslationSource, as_text
from transformer.data.vocab import Vocabulary
from transformer.progress import Meter, say

FLAGS = ("sentence", "alternative")


@dataclasses.dataclass(frozen=True)
class Ragged:
    """Token sequences back to back: sequence i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray  # [total] integer ids
    offsets: np.ndarray  # [N + 1] int64, offsets[0] == 0

    @classmethod
    def from_lists(cls, sequences: list[list[int]]) -> Ragged:
        lengths = np.fromiter((len(s) for s in sequences), np.int64, len(sequences))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = [t for s in sequences for t in s]
        return cls(np.asarray(flat, np.int32), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)


def vocabulary_key(vocab: Vocabulary) -> str:
    return hashlib.sha256(vocab.proto).hexdigest()[:16]


def split_dir(data: DataConfig, vocab: Vocabulary, split: str) -> epath.Path:
    root = epath.Path(data.data_dir or tfds.core.constants.DATA_DIR)
    name = data.dataset.replace("/", "-")
    return root / "token_ids" / name / vocabulary_key(vocab) / split


# ----------------------------------------------------------------------------
# Writing: one pass over the split
# ----------------------------------------------------------------------------


def _tokenize_split(
    source: TranslationSource, vocab: Vocabulary, split: str
) -> dict[str, np.ndarray]:
    """Every example of the split, both languages, as the files' arrays."""
    langs = (source.source_lang, source.target_lang)
    sides = {lang: [] for lang in langs}
    flags = {name: [] for name in FLAGS}
    n = len(source)
    meter = Meter(f"tokenizing the {split} split", n, "examples")
    for records in source.chunks(range(n)):
        for lang in langs:
            ids = vocab.encode_batch([as_text(r[lang]) for r in records])
            sides[lang].append(Ragged.from_lists([s + [EOS_ID] for s in ids]))
        if "sentence" in records[0]:
            flags["sentence"] += [bool(r["sentence"]) for r in records]
            flags["alternative"] += [int(r["alternative"]) for r in records]
        meter.advance(len(records))
    meter.finish()
    dtype = np.uint16 if vocab.size <= 65_536 else np.int32
    arrays = {}
    for lang, chunks in sides.items():
        arrays[f"{lang}.ids"] = np.concatenate([c.tokens for c in chunks]).astype(dtype)
        lengths = np.concatenate([c.lengths() for c in chunks] or [np.zeros(0, np.int32)])
        arrays[f"{lang}.offsets"] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    if flags["sentence"]:
        arrays["sentence"] = np.asarray(flags["sentence"], bool)
        arrays["alternative"] = np.asarray(flags["alternative"], np.int32)
    return arrays


def write(source: TranslationSource, vocab: Vocabulary, folder: epath.Path) -> None:
    """Tokenizes the split and writes its folder; a crash leaves no readable half."""
    arrays = _tokenize_split(source, vocab, folder.name)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array)
        (tmp / f"{name}.npy").write_bytes(buffer.getvalue())
    summary = {"examples": len(source), "vocabulary_size": vocab.size}
    (tmp / "complete.json").write_text(json.dumps(summary))
    if folder.exists() and not (folder / "complete.json").exists():
        folder.rmtree()  # a copy stopped half-way (rename is not atomic on every store)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: its folder is as good
        if not (folder / "complete.json").exists():
            raise
        tmp.rmtree()


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


class TokenIds:
    """A split's prepared ids in one direction; cheap to pickle (arrays open lazily)."""

    def __init__(self, folder: epath.Path, source_lang: str, target_lang: str):
        self.folder, self.source_lang, self.target_lang = folder, source_lang, target_lang
        summary = json.loads((folder / "complete.json").read_text())
        self.num_examples = int(summary["examples"])
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self):  # a worker process opens its own memory maps
        return {**self.__dict__, "_arrays": {}}

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            path = self.folder / f"{name}.npy"
            if os.path.exists(os.fspath(path)):  # local: memory-mapped
                self._arrays[name] = np.load(os.fspath(path), mmap_mode="r")
            else:
                self._arrays[name] = np.load(io.BytesIO(path.read_bytes()))
        return self._arrays[name]

    def check(self) -> None:
        """Opens every array and checks that their lengths agree; ValueError if not."""
        n = self.num_examples
        for lang in (self.source_lang, self.target_lang):
            side = self.side(lang)
            if len(side.offsets) != n + 1 or side.offsets[-1] != len(side.tokens):
                raise ValueError(f"{lang}'s ids and offsets do not hold {n:,} examples")
        if self.has_flags() and any(len(self.flag(name)) != n for name in FLAGS):
            raise ValueError(f"its example flags do not hold {n:,} examples")

    def has_flags(self) -> bool:
        return (self.folder / "sentence.npy").exists()

    def flag(self, name: str) -> np.ndarray:
        return np.asarray(self._array(name))

    def side(self, lang: str) -> Ragged:
        return Ragged(self._array(f"{lang}.ids"), self._array(f"{lang}.offsets"))

    @property
    def source(self) -> Ragged:
        return self.side(self.source_lang)

    @property
    def target(self) -> Ragged:
        return self.side(self.target_lang)


def load_or_write(
    data: DataConfig,
    source: TranslationSource,
    vocab: Vocabulary,
    split: str,
    *,
    is_chief: bool = True,
    timeout_s: float = 3600.0,
) -> TokenIds:
    """The split's ids for this vocabulary; process 0 writes them if missing, others wait."""
    folder = split_dir(data, vocab, split)
    done = folder / "complete.json"
    if not done.exists():
        if is_chief:
            say(f"tokenizing the {split} split once for this vocabulary -> {folder}")
            write(source, vocab, folder)
        else:
            deadline = time.monotonic() + timeout_s
            while not done.exists():
                if time.monotonic() > deadline:
                    raise DataError(f"timed out waiting for process 0 to write {folder}")
                time.sleep(1.0)
    try:
        ids = TokenIds(folder, source.source_lang, source.target_lang)
        ids.check()
    except (OSError, ValueError, KeyError, TypeError) as e:  # a truncated or altered file
        raise DataError(
            f"{folder} is damaged ({e}); delete that folder to tokenize the {split} split again"
        ) from e
    if ids.num_examples != len(source):
        raise DataError(
            f"{folder} holds {ids.num_examples} examples but the {split} split has "
            f"{len(source)}; delete that folder to tokenize again"
        )
    return ids
