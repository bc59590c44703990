"""Text in, text out: batching by length, long inputs, order preserved.

`Translator.translate(texts)` encodes every distinct text, sorts by length, decodes
batches under a token budget with beam search (transformer/decoding.py), and
returns one translation per input text, in input order. An empty text gives an
empty translation. A text longer than the model's maximum length is split at
sentence ends (else at spaces, else anywhere) into pieces that fit, which are
translated separately and joined.

With `mbr=N` (not in the paper) each source's translation is chosen among the
beam's N best outputs by minimum Bayes risk (Kumar & Byrne, 2004): the one with
the highest mean chrF against all N, each standing in for a reference, so the
consensus of the list wins over an outlier that happens to score highest.
With `mbr_samples=M` as well, the stand-in references are M outputs drawn from
the model by epsilon sampling (Freitag et al., 2023) instead: the mean over
them estimates a candidate's expected chrF under the model, which the beam's
N best, all near its mode, estimate with a bias. The draws are fixed by `mbr_seed`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu
from sacrebleu.metrics.helpers import extract_all_char_ngrams
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from transformer import decoding, sharding
from transformer.architecture import Model
from transformer.config import EOS_ID, DecodeConfig
from transformer.data.batching import bucket, default_boundaries
from transformer.data.vocab import Vocabulary

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


@dataclasses.dataclass
class Translator:
    model: Model
    params: Any
    vocab: Vocabulary
    decode: DecodeConfig = DecodeConfig()
    _: dataclasses.KW_ONLY
    tokens_per_batch: int = 4096  # source tokens (padded) per decoding batch
    mesh: Mesh | None = None
    on_split: Callable[[int, int], None] | None = None  # (text index, pieces) when split
    on_progress: Callable[[int, int], None] | None = None  # (pieces done, of) per batch

    def __post_init__(self):
        self.decode.validate()

    @property
    def max_source_tokens(self) -> int:
        return self.model.config.max_len - 1  # room for EOS

    def translate(self, texts: list[str]) -> list[str]:
        """One translation per text, in order."""
        pieces, owner = [], []
        for i, text in enumerate(texts):
            parts = split_long(text, self.vocab, self.max_source_tokens)
            if len(parts) > 1 and self.on_split is not None:
                self.on_split(i, len(parts))
            pieces += parts
            owner += [i] * len(parts)
        unique = list(dict.fromkeys(pieces))  # repeated lines are translated once
        done = dict(zip(unique, self._translate_pieces(unique), strict=True))
        translated = [done[p] for p in pieces]
        joined: list[list[str]] = [[] for _ in texts]
        for i, out in zip(owner, translated, strict=True):
            if out:
                joined[i].append(out)
        return [" ".join(parts) for parts in joined]

    def _translate_pieces(self, texts: list[str]) -> list[str]:
        ids = [
            self.vocab.encode(t)[: self.max_source_tokens] + [EOS_ID] if t.strip() else []
            for t in texts
        ]
        out = [""] * len(texts)
        done, total = 0, sum(1 for x in ids if x)
        for number, (batch_indices, batch) in enumerate(self._batches(ids)):
            texts_out = self._translate_batch(batch, number, len(batch_indices))
            for i, text in zip(batch_indices, texts_out, strict=True):
                out[i] = text
            done += len(batch_indices)
            if self.on_progress is not None:
                self.on_progress(done, total)
        return out

    def _translate_batch(self, batch: np.ndarray, number: int, real: int) -> list[str]:
        """[R, S] ids -> a translation of each of the first `real` rows (the rest pad)."""
        if not self.decode.mbr:
            return [self.vocab.decode(row) for row in self._decode(batch)[:real]]
        tokens, scores = self._decode(batch)
        drawn = self._sample(batch, number) if self.decode.mbr_samples else None
        samples = [None] * real if drawn is None else drawn[:real]
        chosen = []
        for rows, row_scores, references in zip(tokens[:real], scores[:real], samples, strict=True):
            candidates = [self.vocab.decode(r) for r in rows[row_scores > decoding.NEG_INF / 2]]
            if references is not None:
                references = [self.vocab.decode(r) for r in references]
            chosen.append(candidates[minimum_bayes_risk(candidates, references)])
        return chosen

    def _batches(self, ids: list[list[int]]) -> Iterator[tuple[list[int], np.ndarray]]:
        """(text indices, [R, S] ids): texts of one length bucket per batch, R x S within
        the token budget, shortest buckets first."""
        lengths = np.asarray([len(x) for x in ids])
        order = np.asarray([i for i in np.argsort(lengths, kind="stable") if ids[i]], np.int64)
        planned = bucket(
            order, lengths, lengths, self.tokens_per_batch,
            default_boundaries(self.model.config.max_len), _row_multiple(self.mesh),
        )  # fmt: skip
        for length, rows in sorted(planned, key=lambda batch: batch[0]):
            chosen = [int(row[0]) for row in rows if len(row)]
            batch = np.zeros((len(rows), length), np.int32)
            for r, i in enumerate(chosen):
                batch[r, : len(ids[i])] = ids[i]
            yield chosen, batch

    def _decode(self, batch: np.ndarray) -> Any:
        return self._on_device(
            lambda inputs: decoding.translate(self.model, self.params, inputs, self.decode), batch
        )

    def _sample(self, batch: np.ndarray, number: int) -> np.ndarray:
        """[R, mbr_samples, L] sampled outputs; the draws depend on mbr_seed and the batch number.

        The batch's sources are sampled a chunk at a time, each chunk as many
        decoder rows (sources x samples) as the beam search's (sources x beams):
        32 samples of a whole batch at once would be 4x the memory of a beam of 8.
        """
        multiple = _row_multiple(self.mesh)
        d = self.decode
        rows = d.beam_size * len(batch) // d.mbr_samples // multiple * multiple
        rows = min(max(multiple, rows), len(batch))
        drawn = []
        batch_key = jax.random.fold_in(jax.random.key(d.mbr_seed), number)
        for chunk, start in enumerate(range(0, len(batch), rows)):
            sources = batch[start : start + rows]
            part = np.zeros((rows, batch.shape[1]), batch.dtype)  # one shape: one compilation
            part[: len(sources)] = sources
            key = jax.random.fold_in(batch_key, chunk)
            sample = functools.partial(decoding.sample, self.model, self.params, key=key, decode=d)
            drawn.append(self._on_device(sample, part)[: len(sources)])
        return np.concatenate(drawn)

    def _on_device(self, function: Callable[[jax.Array], Any], batch: np.ndarray) -> Any:
        """function(batch placed on the mesh's devices), gathered back as numpy arrays."""
        if self.mesh is None:
            inputs = jnp.asarray(batch)
        else:
            inputs = sharding.global_batch(self.mesh, batch, process_local=False)
        out = function(inputs)
        if self.mesh is not None and jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
        return jax.tree_util.tree_map(np.asarray, out)


def _row_multiple(mesh: Mesh | None) -> int:
    if mesh is None:
        return 1
    return mesh.shape["data"] * mesh.shape["fsdp"]


def split_long(text: str, vocab: Vocabulary, max_tokens: int) -> list[str]:
    """Pieces of `text` of at most max_tokens tokens each: at sentence ends, spaces, or anywhere."""
    if len(vocab.encode(text)) <= max_tokens:
        return [text]
    for pattern in (_SENTENCE_END, re.compile(r"\s+")):
        parts = [p for p in pattern.split(text) if p]
        if len(parts) > 1:
            return _group(parts, vocab, max_tokens)
    half = len(text) // 2  # no space at all: cut the characters in halves
    return split_long(text[:half], vocab, max_tokens) + split_long(text[half:], vocab, max_tokens)


def _group(parts: list[str], vocab: Vocabulary, max_tokens: int) -> list[str]:
    """Joins consecutive parts while they fit; splits parts that alone are too long."""
    pieces, current = [], ""
    for part in parts:
        candidate = f"{current} {part}" if current else part
        if len(vocab.encode(candidate)) <= max_tokens:
            current = candidate
            continue
        if current:
            pieces.append(current)
        if len(vocab.encode(part)) <= max_tokens:
            current = part
        else:
            pieces += split_long(part, vocab, max_tokens)
            current = ""
    if current:
        pieces.append(current)
    return pieces


def minimum_bayes_risk(candidates: list[str], references: list[str] | None = None) -> int:
    """Index of the candidate with the highest mean chrF against the references
    (stand-ins: samples of the model's outputs; by default the candidates themselves).

    The scores are sacreBLEU's sentence chrF; each distinct string's character
    n-grams are counted once rather than once per pair (8 x 32 pairs a sentence
    in the demo).
    """
    references = candidates if references is None else references
    unique = list(dict.fromkeys(candidates))
    if len(unique) == 1:
        return 0
    chrf = sacrebleu.metrics.CHRF()
    grams = {
        text: extract_all_char_ngrams(text, chrf.char_order, chrf.whitespace)
        for text in {*unique, *references}
    }

    def score(hypothesis: str, reference: str) -> float:
        pairs = zip(grams[hypothesis], grams[reference], strict=True)
        stats = [x for h, r in pairs for x in chrf._get_match_statistics(h, r)]
        return chrf._compute_f_score(stats)

    expected = [sum(score(h, other) for other in references) for h in unique]
    return candidates.index(unique[int(np.argmax(expected))])
