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
With `mbr_sample_candidates` the samples are candidates too, each judged against
the other samples; `mbr_utility="chrf++"` adds word 1- and 2-grams to the
measure of agreement, and `mbr_beta` sets its balance of recall and precision.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from sacrebleu.metrics.helpers import extract_all_char_ngrams, extract_word_ngrams

from transformer import decoding, sharding
from transformer.architecture import Model
from transformer.config import EOS_ID, DecodeConfig
from transformer.data.batching import bucket_length, default_boundaries
from transformer.data.vocab import Vocabulary

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


# On a CPU the sampler runs fastest in small chunks, whose [rows, vocab] log-probs
# stay in the caches (docs/performance.md): about 256 decoder rows, against the
# beam's rows (about 2,000 in the demo) elsewhere.
CPU_SAMPLE_ROWS = 256


@dataclasses.dataclass
class Translator:
    model: Model
    params: Any
    vocab: Vocabulary
    decode: DecodeConfig = DecodeConfig()
    _: dataclasses.KW_ONLY
    tokens_per_batch: int = 4096  # source tokens (padded) per decoding batch
    min_bucket_texts: int = 32  # a length bucket of fewer texts joins the next (plan_batches)
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
        planned = list(self._batches(ids))
        with self._compiling_ahead([batch for _, batch in planned]) as compiled:
            for number, (batch_indices, batch) in enumerate(planned):
                compiled(number)
                texts_out = self._translate_batch(batch, len(batch_indices))
                for i, text in zip(batch_indices, texts_out, strict=True):
                    out[i] = text
                done += len(batch_indices)
                if self.on_progress is not None:
                    self.on_progress(done, total)
        return out

    @contextlib.contextmanager
    def _compiling_ahead(self, batches: list[np.ndarray]):
        """Yields wait(n), which returns once batch n's programs are compiled.

        A background thread compiles the programs of every batch shape in turn,
        so that XLA compiles the next shapes while a batch decodes (on a 2-core
        CPU each shape costs seconds of compilation, most of which the
        decoding then hides). On several processes the calls compile as usual:
        a thread of its own must not reorder their collectives.
        """
        if jax.process_count() > 1:
            yield lambda number: None
            return
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")
        shapes: dict[tuple[int, ...], concurrent.futures.Future] = {}
        context = _callers_context()
        for batch in batches:
            if batch.shape not in shapes:
                shapes[batch.shape] = pool.submit(self._compile_quietly, batch, context)
        try:
            yield lambda number: concurrent.futures.wait([shapes[batches[number].shape]])
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _compile_quietly(self, batch: np.ndarray, context) -> None:
        """Compiles batch's programs under the caller's `context`; a failure is left
        for the call itself to meet (and report) when it compiles them again."""
        compile_ahead = functools.partial(decoding.compile_ahead, self.model, self.params)
        try:
            with context():
                self._on_device(lambda inputs: compile_ahead(inputs, self.decode), batch)
                if self.decode.mbr and self.decode.mbr_samples:
                    rows = self._sample_rows(len(batch))
                    sources = np.zeros((rows, batch.shape[1]), batch.dtype)
                    self._on_device(lambda x: compile_ahead(x, self.decode, sampler=True), sources)
        except Exception:  # the real call raises it where it belongs
            pass

    def _translate_batch(self, batch: np.ndarray, real: int) -> list[str]:
        """[R, S] ids -> a translation of each of the first `real` rows (the rest pad)."""
        if not self.decode.mbr:
            return [self.vocab.decode(row) for row in self._decode(batch)[:real]]
        tokens, scores = self._decode(batch)
        drawn = self._sample(batch) if self.decode.mbr_samples else None
        samples = [None] * real if drawn is None else drawn[:real]
        word_order = {"chrf": 0, "chrf++": 2}[self.decode.mbr_utility]
        compete = self.decode.mbr_sample_candidates and drawn is not None
        chosen = []
        for rows, row_scores, references in zip(tokens[:real], scores[:real], samples, strict=True):
            candidates = [self.vocab.decode(r) for r in rows[row_scores > decoding.NEG_INF / 2]]
            if references is not None:
                references = [self.vocab.decode(r) for r in references]
            best = minimum_bayes_risk(
                candidates, references, word_order=word_order, beta=self.decode.mbr_beta,
                references_compete=compete,
            )  # fmt: skip
            chosen.append([*candidates, *(references or [])][best])
        return chosen

    def _batches(self, ids: list[list[int]]) -> Iterator[tuple[list[int], np.ndarray]]:
        """(text indices, [R, S] ids) per batch, shortest first (`plan_batches`);
        rows past the texts are empty."""
        lengths = np.asarray([len(x) for x in ids])
        planned = plan_batches(
            lengths, self.tokens_per_batch, default_boundaries(self.model.config.max_len),
            _row_multiple(self.mesh), self.min_bucket_texts,
        )  # fmt: skip
        for length, rows, chosen in planned:
            batch = np.zeros((rows, length), np.int32)
            for r, i in enumerate(chosen):
                batch[r, : len(ids[i])] = ids[i]
            yield chosen, batch

    def _decode(self, batch: np.ndarray) -> Any:
        return self._on_device(
            lambda inputs: decoding.translate(self.model, self.params, inputs, self.decode), batch
        )

    def _sample(self, batch: np.ndarray) -> np.ndarray:
        """[R, mbr_samples, L] sampled outputs; a sentence's draws depend on mbr_seed
        and the sentence alone (`decoding.source_keys`), not on its batch or chunk.

        The batch's sources are sampled a chunk at a time (`_sample_rows`), each
        chunk no more decoder rows (sources x samples) than the beam search's
        (sources x beams): 32 samples of a whole batch at once would be 4x the
        memory of a beam of 8.
        """
        d = self.decode
        rows = self._sample_rows(len(batch))
        key = jax.random.key(d.mbr_seed)
        sample = functools.partial(decoding.sample, self.model, self.params, key=key, decode=d)
        drawn = []
        for start in range(0, len(batch), rows):
            sources = batch[start : start + rows]
            part = np.zeros((rows, batch.shape[1]), batch.dtype)  # one shape: one compilation
            part[: len(sources)] = sources
            drawn.append(self._on_device(sample, part)[: len(sources)])
        return np.concatenate(drawn)

    def _sample_rows(self, batch_rows: int) -> int:
        """Sources per sampling chunk: sources x samples about the beam's rows
        (sources x beams), and on a CPU at most about CPU_SAMPLE_ROWS."""
        multiple = _row_multiple(self.mesh)
        d = self.decode
        budget = d.beam_size * batch_rows
        if jax.default_backend() == "cpu":
            budget = min(budget, CPU_SAMPLE_ROWS)
        rows = budget // d.mbr_samples // multiple * multiple
        return min(max(multiple, rows), batch_rows)

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


def plan_batches(
    lengths: np.ndarray,
    tokens_per_batch: int,
    boundaries: tuple[int, ...],
    row_multiple: int = 1,
    min_texts: int = 32,
) -> list[tuple[int, int, list[int]]]:
    """(padded length S, rows R, text indices) per batch, shortest first; texts of
    length 0 are left out.

    Texts go to the bucket of their length (`boundaries`); a bucket of fewer than
    min_texts texts joins the next longer one: each batch shape costs a
    compilation of the search and of the sampler (about 4 s on a 2-core CPU),
    more than decoding a few dozen sentences at a longer padded length. A
    bucket that needs k batches under the budget (R x S <= tokens_per_batch) is
    cut into k batches of equal R, so that all its batches share one shape and
    one compilation. R is a multiple of row_multiple (the devices a batch is split over).
    """
    order = [int(i) for i in np.argsort(lengths, kind="stable") if lengths[i] > 0]
    buckets: dict[int, list[int]] = {}
    for i in order:
        buckets.setdefault(bucket_length(int(lengths[i]), boundaries), []).append(i)
    plan, carried = [], []
    padded_lengths = sorted(buckets)
    for n, length in enumerate(padded_lengths):
        texts = carried + buckets[length]
        if len(texts) < min_texts and n + 1 < len(padded_lengths):
            carried = texts
            continue
        carried = []
        capacity = max(row_multiple, tokens_per_batch // length // row_multiple * row_multiple)
        count = -(-len(texts) // capacity)
        rows = -(-len(texts) // count)
        rows = -(-rows // row_multiple) * row_multiple
        plan += [(length, rows, texts[j * rows : (j + 1) * rows]) for j in range(count)]
    return plan


def _callers_context() -> Callable[[], contextlib.AbstractContextManager]:
    """The thread-local settings that tracing reads besides the arguments: the
    mesh of `jax.set_mesh` (part of jit's cache key: a program compiled without
    it would not be found by a call made under it) and Flax's logical axis
    rules. Returns a function that enters them in another thread."""
    mesh, rules = jax.sharding.get_mesh(), nn.get_logical_axis_rules()

    @contextlib.contextmanager
    def enter():
        with contextlib.ExitStack() as stack:
            if not mesh.empty:
                stack.enter_context(jax.set_mesh(mesh))
            stack.enter_context(nn.logical_axis_rules(rules))
            yield

    return enter


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


def minimum_bayes_risk(
    candidates: list[str],
    references: list[str] | None = None,
    *,
    word_order: int = 0,
    beta: float = 2.0,
    references_compete: bool = False,
) -> int:
    """Index of the text with the highest mean chrF against the references
    (stand-ins: samples of the model's outputs; by default the candidates themselves).

    With `references_compete`, the references are candidates too, after
    `candidates` (the index counts into both): each is judged against the other
    references, leaving itself out, which it would match perfectly. A text
    that is also among `candidates` is judged as one of them, against all.
    `word_order=2` is chrF++ (word 1- and 2-grams as well as characters);
    `beta` weighs recall against precision, as chrF's.
    """
    references = candidates if references is None else references
    pool = [*candidates, *references] if references_compete else candidates
    unique = list(dict.fromkeys(pool))
    if len(unique) == 1:
        return 0
    distinct = list(dict.fromkeys(references))
    scores = sentence_chrf_matrix(unique, distinct, word_order, beta)
    weights = collections.Counter(references)
    total = scores @ np.asarray([weights[r] for r in distinct], np.float64)
    count = np.full(len(unique), len(references), np.float64)
    beam = set(candidates)
    for i, text in enumerate(unique):
        if text not in beam:  # a reference competing: leave itself out
            total[i] -= scores[i, distinct.index(text)]
            count[i] -= 1
    return pool.index(unique[int(np.argmax(total / count))])


def sentence_chrf_matrix(
    hypotheses: list[str], references: list[str], word_order: int = 0, beta: float = 2.0
):
    """[H, R] float64: sacreBLEU's sentence chrF (chrF++ with word_order=2) of each
    hypothesis against each reference, as CHRF(word_order, beta).sentence_score computes it.

    Vectorized over the pairs (MBR scores 40 x 32 of them per sentence in the
    demo): the texts' n-gram counts per order form a matrix C [texts, n-grams],
    and the matched n-grams of every pair, sum over g of min(C[a, g], C[b, g]),
    are sum over k >= 1 of (C >= k) (C >= k)^T, a few small matrix products.
    """
    chrf = sacrebleu.metrics.CHRF(word_order=word_order, beta=beta)
    texts = list(dict.fromkeys([*hypotheses, *references]))
    per_text = [_ngrams(chrf, t) for t in texts]
    orders = chrf.char_order + word_order
    size = np.zeros((len(texts), orders))
    matched = np.zeros((len(texts), len(texts), orders))
    for order in range(orders):
        columns: dict = {}
        cells = [
            (row, columns.setdefault(gram, len(columns)), n)
            for row, grams in enumerate(per_text)
            for gram, n in grams[order].items()
        ]
        counts = np.zeros((len(texts), max(1, len(columns))), np.float32)
        if cells:
            rows, cols, values = zip(*cells, strict=True)
            counts[list(rows), list(cols)] = values
        size[:, order] = counts.sum(1)
        for k in range(1, int(counts.max()) + 1):
            at_least = (counts >= k).astype(np.float32)
            matched[:, :, order] += at_least @ at_least.T
    index = {t: i for i, t in enumerate(texts)}
    h = np.asarray([index[t] for t in hypotheses])
    r = np.asarray([index[t] for t in references])
    match = matched[h[:, None], r[None, :]]  # [H, R, orders]
    n_ref = np.broadcast_to(size[r][None], match.shape)
    n_hyp = np.where(n_ref > 0, size[h][:, None], 0)  # as sacreBLEU: no reference n-grams, no hits
    counted = (n_hyp > 0) & (n_ref > 0)  # its effective-order average
    orders_counted = counted.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(counted, match / n_hyp, 0).sum(-1) / orders_counted
        recall = np.where(counted, match / n_ref, 0).sum(-1) / orders_counted
        beta2 = chrf.beta**2
        f = 100 * (1 + beta2) * precision * recall / (beta2 * precision + recall)
    return np.where((orders_counted > 0) & (precision + recall > 0), f, 0.0)


def _ngrams(chrf: sacrebleu.metrics.CHRF, text: str) -> list[collections.Counter]:
    """The character n-grams of each order, then the word n-grams, as sacreBLEU counts them."""
    grams = extract_all_char_ngrams(text, chrf.char_order, chrf.whitespace)
    if chrf.word_order:
        words = chrf._remove_punctuation(text)
        grams += [extract_word_ngrams(words, n) for n in range(1, chrf.word_order + 1)]
    return grams
