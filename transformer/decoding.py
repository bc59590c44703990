"""Greedy decoding and beam search over the cached decoder.

The search itself (`beam_search`, `greedy_search`) knows nothing about the
model: it calls `step_fn(cache, tokens [B*W, 1], step) -> (log_probs [B*W, V],
cache)` once per output position (beam search also takes `Logits` in place of
log_probs: the logits, of which it normalises only the k it keeps)
and `reorder_fn(cache, index [B*W])` when beams change places. That keeps it
testable with a scoring function written by hand, and `translate` plugs the
model into it (the Transformer, or the LSTM baseline of transformer/rnn.py:
both have `encode`, `init_cache`, `decode_step`).

What the paper's decoder needs, and how it is done here:

- Beam size 4 and the length penalty lp(len) = ((5 + len) / 6)^alpha with
  alpha = 0.6 (from Wu et al., 2016): a finished hypothesis scores
  log P(y) / lp(|y|), EOS included in the length.
- At most source length + 50 output tokens per sentence, never more than the
  model's max_len: at a sentence's last allowed position only EOS may follow.
- A hypothesis ends when EOS is among the W best candidates of a step (so that
  beam size 1 is exactly greedy decoding).
- Early stop: log-probabilities only fall as a hypothesis grows and lp grows
  with length, so a live beam can reach at best log P / lp(its max length).
  A sentence is done once that bound of its best live beam is no better than
  its best finished hypothesis (the n-th best, when n are asked for), or once W
  hypotheses have ended (a full beam); the loop ends when every sentence is done.
- Not in the paper, off by default: no_repeat_ngram = n > 0 bans every token
  that would repeat an n-gram of subword pieces within a hypothesis, which
  stops a half-trained model's loops ("by by by by") at a high length penalty.
- Not in the paper: `decode_n_best` returns the n best finished hypotheses of
  each sentence with their scores, and `decode_samples` outputs drawn from the
  model by epsilon sampling, for minimum Bayes risk selection
  (transformer/translation.py).
- The cache: the decoder's self-attention keys/values grow by one position per
  step, each written into the row of the hypothesis that computed it, and are
  never copied: when beams change places, only a small lineage table [B, W, L]
  of beam indices follows them (`reorder_cache`), and attention reads keys and
  values through it. The encoder-decoder keys/values are projected once per
  source sentence, at source batch size, and read by all of its beams
  (transformer/attention.py). The LSTM baseline's cache is its state per
  hypothesis row, which does move with its beam (`reorder_cache`).
  The cache is sized to what the batch needs: min(S + max_extra, max_len).
- Not in the paper, and no change to any output: once at most 1/8 of a batch's
  sentences are still searching (or of its rows still sampling), they are
  gathered with their cache into a batch of that size, so that a batch's few
  long sentences do not keep its finished ones computing (`_extend_compacting`).

Hypotheses are laid out source-major: row b * W + k is beam k of sentence b.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transformer.architecture import Model, build
from transformer.config import BOS_ID, EOS_ID, PAD_ID, DecodeConfig, ModelConfig

Cache = Any
StepFn = Callable[[Cache, jax.Array, jax.Array], tuple[jax.Array, Cache]]
ReorderFn = Callable[[Cache, jax.Array], Cache]

NEG_INF = -1.0e9  # finite: -inf - -inf would make NaNs in comparisons of dead beams


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """((5 + length) / 6) ** alpha, the GNMT length normalisation."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _only_eos_at_last(log_probs: jax.Array, is_last: jax.Array) -> jax.Array:
    """log_probs [B, W, V]; where is_last [B], every token but EOS becomes impossible."""
    not_eos = jnp.arange(log_probs.shape[-1]) != EOS_ID
    return jnp.where(is_last[:, None, None] & not_eos, NEG_INF, log_probs)


def _previous_tokens(sequences: jax.Array, step: jax.Array) -> jax.Array:
    """sequences [B, W, L] -> the token each hypothesis output at step - 1 (BOS at 0), [B, W]."""
    previous = jax.lax.dynamic_index_in_dim(
        sequences, jnp.maximum(step - 1, 0), axis=2, keepdims=False
    )
    return jnp.where(step == 0, BOS_ID, previous)


def _block_repeated_ngrams(log_probs: jax.Array, sequences: jax.Array, step: jax.Array, n: int):
    """Makes impossible every token that would repeat an n-gram of its hypothesis.

    log_probs [B, W, V] for the token at position `step`; sequences [B, W, L]
    hold each hypothesis's tokens at positions 0 .. step-1. A token t is banned
    for a hypothesis when its last n-1 tokens followed by t already occur in it.
    """
    length = sequences.shape[-1]
    if n > length:  # no room for an n-gram, let alone two
        return log_probs
    context = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(step - (n - 1), 0), n - 1, axis=2)
    starts = length - n + 1  # window j covers positions j .. j+n-1
    matches = jnp.arange(starts) < step - (n - 1)  # the window lies before `step`
    matches = jnp.broadcast_to(matches, sequences.shape[:2] + (starts,))
    for i in range(n - 1):
        matches &= sequences[:, :, i : i + starts] == context[:, :, i : i + 1]
    followers = sequences[:, :, n - 1 :]  # [B, W, starts]: the token closing window j
    rows = jnp.arange(sequences.shape[0])[:, None, None]
    beams = jnp.arange(sequences.shape[1])[None, :, None]
    banned = jnp.zeros(log_probs.shape, bool).at[rows, beams, followers].max(matches)
    return jnp.where(banned, NEG_INF, log_probs)


def top_k(x: jax.Array, k: int, maxima: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """jax.lax.top_k over the last axis, the same values and indices (ties to
    the lower index), several times faster over a large vocabulary on XLA:CPU.

    The last axis is cut into chunks of C entries (C a divisor of its size);
    the k best entries all lie in the k chunks of highest maximum: an entry
    outside them is outranked by each of their maxima, which are at least as
    high and, where equal, come from a chunk of lower indices (ties between
    chunks go to the lower one). So the top k of the k chunks' k * C entries,
    taken in index order, are the top k of the row: [128, 37000] with k = 8
    goes from a top-k over 37,000 entries to one over 500 chunk maxima (C = 74)
    and one over 592 entries, 5x faster (docs/performance.md). Rows with no
    divisor of their size near 64 take jax.lax.top_k as is. `maxima`: the
    chunks' maxima (`chunk_maxima`), where the caller has them already.
    """
    size = x.shape[-1]
    chunk = _chunk_size(size, k)
    if chunk is None:
        return jax.lax.top_k(x, k)
    lead = x.shape[:-1]
    chunks = x.reshape(*lead, size // chunk, chunk)
    if maxima is None:
        maxima = jnp.max(chunks, axis=-1)
    _, best = jax.lax.top_k(maxima, k)
    best = jnp.sort(best, axis=-1)  # index order, so that ties still go to the lower index
    candidates = jnp.take_along_axis(chunks, best[..., None], axis=-2).reshape(*lead, k * chunk)
    values, place = jax.lax.top_k(candidates, k)
    index = jnp.take_along_axis(best, place // chunk, axis=-1) * chunk + place % chunk
    return values, index


def chunk_maxima(x: jax.Array, k: int) -> jax.Array | None:
    """The maxima of the chunks `top_k(x, k)` cuts x's rows into; None where it does not."""
    size = x.shape[-1]
    chunk = _chunk_size(size, k)
    if chunk is None:
        return None
    return jnp.max(x.reshape(*x.shape[:-1], size // chunk, chunk), axis=-1)


def _chunk_size(size: int, k: int) -> int | None:
    """The divisor of `size` in [16, 256] nearest to 64 (measured best from 8000
    to 37000 entries), if the chunks outnumber k enough to pay; else None."""
    divisors = [c for c in range(16, 257) if size % c == 0 and size // c >= 4 * k]
    if size < 1024 or not divisors:
        return None
    return min(divisors, key=lambda c: abs(math.log(c / 64)))


def best_extensions(
    alive_logp: jax.Array,
    log_probs: jax.Array,
    k: int,
    *,
    normalized: bool = True,
    only_eos: jax.Array | None = None,
    unbanned: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The k best one-token extensions of W hypotheses per sentence.

    alive_logp [B, W], log_probs [B, W, V] -> (scores [B, k], beam [B, k],
    token [B, k]), best first: the top k of alive_logp + log_probs over W x V.
    They are all among each beam's own best k, so two small top-ks (over V per
    beam, then over W x k) replace one over W x V, in the same order (ties go
    to the lower beam, then the lower token), and cost less.

    normalized=False: log_probs holds logits, and only each beam's k best are
    normalised, as `log_softmax_grouped` would have (the order within a row is
    the same). The row's maximum is taken from the top-k's chunk maxima, so the
    [B, W, V] rows are read twice (maxima, sum of exponentials), not three times.
    unbanned: with normalized=False, the logits before some tokens were banned
    (set to NEG_INF in log_probs, `no_repeat_ngram`): the normaliser is theirs,
    the model's own, as log-probabilities banned after `log_softmax_grouped`
    would be; a ban does not raise the scores of the tokens it leaves.

    only_eos [B]: sentences at their last position, where only EOS may follow.
    Their candidates are their beams' EOS extensions, best first, then NEG_INF:
    those of a top-k with every other token at NEG_INF (`_only_eos_at_last`),
    without another pass over the rows.
    """
    batch, width, vocab = log_probs.shape
    per_beam = min(k, vocab)
    maxima = chunk_maxima(log_probs, per_beam)
    if not normalized:
        model = log_probs if unbanned is None else unbanned
        # The barrier keeps XLA from merging the two maxima into one over the rows.
        reuse = maxima is not None and unbanned is None
        over = jax.lax.optimization_barrier(maxima) if reuse else model
        peak = jnp.max(over, axis=-1, keepdims=True)  # [B, W, 1]
        log_total = jnp.log(_sum_exp(model - peak))

    def normalize(values):  # [B, W, n] taken from log_probs' rows
        return values if normalized else (values - peak) - log_total

    beam_best, beam_tokens = top_k(log_probs, per_beam, maxima)  # [B, W, k]
    candidates = (alive_logp[:, :, None] + normalize(beam_best)).reshape(batch, -1)
    scores, flat = jax.lax.top_k(candidates, k)  # [B, k]
    token = jnp.take_along_axis(beam_tokens.reshape(batch, -1), flat, axis=1)
    beam = flat // per_beam
    if only_eos is None:
        return scores, beam, token
    ending = alive_logp + normalize(log_probs[:, :, EOS_ID : EOS_ID + 1])[..., 0]  # [B, W]
    ending, ending_beam = jax.lax.top_k(ending, min(k, width))
    fill = k - ending.shape[1]
    ending = jnp.pad(ending, ((0, 0), (0, fill)), constant_values=2 * NEG_INF)
    ending_beam = jnp.pad(ending_beam, ((0, 0), (0, fill)))
    ending_token = jnp.where(jnp.arange(k) < width, EOS_ID, PAD_ID)
    last = only_eos[:, None]
    return (
        jnp.where(last, ending, scores),
        jnp.where(last, ending_beam, beam),
        jnp.where(last, ending_token, token),
    )


def beam_search(
    step_fn: StepFn,
    reorder_fn: ReorderFn,
    cache: Cache,
    max_lengths: jax.Array,
    *,
    length: int,
    beam_size: int,
    alpha: float,
    no_repeat_ngram: int = 0,
    n_best: int = 1,
    early_stop: bool = True,
    step_for_sentences: Callable[[jax.Array], StepFn] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The n_best best hypotheses of each sentence under the length penalty.

    max_lengths [B]: the most output tokens (EOS included) per sentence, each at
    most `length`, the static size of the outputs. Returns (tokens [B, n_best,
    length], best first, each ending with EOS and then PAD; scores [B, n_best],
    log P / lp, NEG_INF where fewer hypotheses ended; the number of steps run).
    n_best is at most beam_size. no_repeat_ngram n > 0: no hypothesis repeats an
    n-gram of tokens. early_stop=False runs every sentence to its max length.

    With `step_for_sentences(sentences)` (the step function of those sentences
    alone), the sentences still searching are gathered, with their beams and
    cache (`select_sentences`), into a batch of 1/8 the size once no more than
    that remain, as `sample_search` does with its rows: a batch's last long
    sentences no longer drag its finished ones through every step.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in [1, beam_size={beam_size}], got {n_best}")
    batch, width = max_lengths.shape[0], beam_size
    run = functools.partial(
        _beam_steps, reorder_fn=reorder_fn, width=width, length=length, alpha=alpha,
        no_repeat_ngram=no_repeat_ngram, n_best=n_best, early_stop=early_stop,
    )  # fmt: skip
    first_beam_only = jnp.where(jnp.arange(width) == 0, 0.0, NEG_INF)
    state = dict(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        alive=jnp.zeros((batch, width, length), jnp.int32),
        alive_logp=jnp.broadcast_to(first_beam_only, (batch, width)),
        finished=jnp.zeros((batch, n_best, length), jnp.int32),
        score=jnp.full((batch, n_best), NEG_INF, jnp.float32),
        count=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
    )
    state = _extend_compacting(
        run, step_fn, state, jnp.clip(max_lengths, 1, length), step_for_sentences,
        outputs=("finished", "score"),
        take_cache=functools.partial(select_sentences, width=width),
    )  # fmt: skip
    return state["finished"], state["score"], state["step"]


def _beam_steps(
    step_fn, state, max_lengths, *, reorder_fn, width, length, alpha, no_repeat_ngram, n_best,
    early_stop, until_alive,
):  # fmt: skip
    """The loop of `beam_search`, until at most `until_alive` sentences are searching."""
    batch = max_lengths.shape[0]
    best_possible_lp = length_penalty(max_lengths, alpha)  # [B]

    def body(state):
        step, cache = state["step"], state["cache"]
        tokens = _previous_tokens(state["alive"], step).reshape(batch * width, 1)
        out, cache = step_fn(cache, tokens, step)
        normalized = not isinstance(out, Logits)  # else normalised after the top-k
        log_probs = out if normalized else out.logits
        log_probs = log_probs.reshape(batch, width, -1).astype(jnp.float32)  # [B, W, V]
        unbanned = None
        if no_repeat_ngram:
            unbanned = None if normalized else log_probs  # the model's normaliser stays
            log_probs = _block_repeated_ngrams(log_probs, state["alive"], step, no_repeat_ngram)
        # 2W candidates: even if W of them end in EOS, W remain to continue.
        scores, origin, token = best_extensions(
            state["alive_logp"], log_probs, 2 * width, normalized=normalized,
            only_eos=step + 1 >= max_lengths, unbanned=unbanned,
        )  # fmt: skip
        sequences = jnp.take_along_axis(state["alive"], origin[:, :, None], axis=1)
        sequences = jax.lax.dynamic_update_index_in_dim(sequences, token, step, axis=2)

        # Only EOS among the W best candidates ends a hypothesis (as in fairseq):
        # an EOS ranked below them would not have been in a beam of W.
        in_beam = jnp.arange(2 * width) < width
        possible = scores > NEG_INF / 2  # not an extension of a dead beam
        ended = (token == EOS_ID) & in_beam & possible & ~state["done"][:, None]
        final = jnp.where(ended, scores / length_penalty(step + 1, alpha), NEG_INF)
        # The n_best best of those kept and those just ended; on ties, the older.
        score, pick = jax.lax.top_k(jnp.concatenate([state["score"], final], axis=1), n_best)
        pool = jnp.concatenate([state["finished"], sequences], axis=1)
        finished = jnp.take_along_axis(pool, pick[:, :, None], axis=1)
        count = state["count"] + jnp.sum(ended, axis=1)

        live_scores, keep = jax.lax.top_k(jnp.where(token == EOS_ID, NEG_INF, scores), width)
        alive = jnp.take_along_axis(sequences, keep[:, :, None], axis=1)  # [B, W, L]
        parents = jnp.take_along_axis(origin, keep, axis=1)  # [B, W]
        rows = (jnp.arange(batch)[:, None] * width + parents).reshape(-1)
        cache = reorder_fn(cache, rows)
        live_bound = live_scores[:, 0] / best_possible_lp
        hopeless = ((score[:, -1] >= live_bound) | (count >= width)) if early_stop else False
        done = state["done"] | hopeless | (step + 1 >= max_lengths)
        return dict(
            step=step + 1,
            cache=cache,
            alive=alive,
            alive_logp=live_scores,
            finished=finished,
            score=score,
            count=count,
            done=done,
        )

    def cond(state):
        return (state["step"] < length) & (jnp.sum(~state["done"]) > until_alive)

    return jax.lax.while_loop(cond, body, state)


def greedy_search(
    step_fn: StepFn, cache: Cache, max_lengths: jax.Array, *, length: int, no_repeat_ngram: int = 0
) -> jax.Array:
    """The most likely next token at every step until EOS: tokens [B, length], PAD after EOS.

    no_repeat_ngram n > 0: the most likely token that repeats no n-gram of the output.
    """
    most_likely = lambda log_probs, key: jnp.argmax(log_probs, axis=-1)  # noqa: E731
    return _one_token_at_a_time(
        step_fn, cache, max_lengths, most_likely, None, length=length,
        no_repeat_ngram=no_repeat_ngram,
    )  # fmt: skip


def sample_search(
    step_fn: StepFn,
    cache: Cache,
    max_lengths: jax.Array,
    keys: jax.Array,
    *,
    length: int,
    epsilon: float,
    step_for_rows: Callable[[jax.Array], StepFn] | None = None,
) -> jax.Array:
    """Every row an output drawn from the model, token by token: tokens [R, length].

    Epsilon sampling (Hewitt et al., 2022): a token is drawn among those of
    probability at least epsilon (the most likely one always among them), in
    proportion to their probabilities; epsilon 0 draws from the whole vocabulary.
    Row r's draws come from its own key, keys[r] ([R] keys): what a row draws
    does not depend on the other rows of its batch.

    With `step_for_rows(rows)` (the step function of those rows alone), the
    rows still drawing are gathered into a batch of 1/8 the size once no more
    than that remain, and again from there: most samples end near the typical
    length, a few run on, and the batch no longer pays for the ended rows.
    Every cache entry must then be per row ([R, ...]), as with one hypothesis
    per sentence.
    """
    choose = functools.partial(epsilon_sample, epsilon=epsilon)
    return _one_token_at_a_time(
        step_fn, cache, max_lengths, choose, keys, length=length, step_for_rows=step_for_rows
    )


def epsilon_sample(log_probs: jax.Array, keys: jax.Array, *, epsilon: float) -> jax.Array:
    """log_probs [R, V] -> one token per row, among those of probability >= epsilon,
    row r drawn with keys[r] ([R] keys).

    At most 1/epsilon tokens can have that probability, so the draw is among the
    top ceil(1/epsilon) + 1 only (the + 1 for float rounding): random numbers for
    ~50 tokens a row instead of the whole vocabulary. Rows rarely have more than
    a dozen such tokens, and a top-k of 16 costs half one of 51 over 8000 pieces,
    so the top 16 are taken first and the full top-k only for a batch in which
    some row's 16th token still reaches epsilon. The draw is a Gumbel-max whose
    noise for the first 16 places is the same either way: a row draws the same
    token whichever top-k its batch took.
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    vocab = log_probs.shape[-1]
    k = vocab if epsilon == 0 else min(vocab, math.ceil(1.0 / epsilon) + 1)
    first = min(k, FIRST_TOP_K)
    threshold = math.log(epsilon) if epsilon else -jnp.inf

    def draw(top: jax.Array, tokens: jax.Array) -> jax.Array:
        keep = (top >= threshold) | (jnp.arange(top.shape[-1]) == 0)
        noise = _gumbel(keys, first)
        if top.shape[-1] > first:
            noise = jnp.concatenate(
                [noise, _gumbel(_fold_in_rows(keys, 1), top.shape[-1] - first)], 1
            )
        choice = jnp.argmax(jnp.where(keep, top + noise, -jnp.inf), axis=-1)
        return jnp.take_along_axis(tokens, choice[:, None], axis=1)[:, 0]

    top, tokens = top_k(log_probs, first)
    if first == k:
        return draw(top, tokens)
    return jax.lax.cond(
        # Some row may have more than `first` candidates: its `first` all reach epsilon.
        # (Not top[:, -1] >= threshold: a slice of its output makes XLA:CPU sort
        # whole rows instead of its top-k, 80x slower.)
        jnp.any(jnp.all(top >= threshold, axis=-1)),
        lambda: draw(*top_k(log_probs, k)),
        lambda: draw(top, tokens),
    )


FIRST_TOP_K = 16


def _fold_in_rows(keys: jax.Array, data) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (0, None))(keys, data)


def _gumbel(keys: jax.Array, width: int) -> jax.Array:
    """[R, width] Gumbel noise, row r from keys[r]."""
    return jax.vmap(lambda key: jax.random.gumbel(key, (width,)))(keys)


COMPACT_BY = 8  # rows still decoding are gathered into a batch this many times smaller


def _one_token_at_a_time(
    step_fn: StepFn,
    cache: Cache,
    max_lengths: jax.Array,
    choose: Callable[[jax.Array, jax.Array | None], jax.Array],
    keys: jax.Array | None,
    *,
    length: int,
    no_repeat_ngram: int = 0,
    step_for_rows: Callable[[jax.Array], StepFn] | None = None,
) -> jax.Array:
    """One hypothesis per row, extended by choose(log_probs [R, V], keys [R] of the
    step) until EOS; keys None: choose gets None."""
    rows = max_lengths.shape[0]
    state = dict(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        out=jnp.zeros((rows, length), jnp.int32),
        done=jnp.zeros((rows,), bool),
    )
    if keys is not None:
        if keys.shape != (rows,):
            raise ValueError(f"one key per row wanted: {rows} keys, got shape {keys.shape}")
        state["keys"] = keys
    run = functools.partial(
        _extend_rows, choose=choose, length=length, no_repeat_ngram=no_repeat_ngram
    )
    state = _extend_compacting(
        run, step_fn, state, jnp.clip(max_lengths, 1, length), step_for_rows, outputs=("out",)
    )
    return state["out"]


def _take_rows(tree, rows: jax.Array):
    return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0), tree)


def _extend_compacting(
    run, step_fn, state, max_lengths, step_for_rows, *, outputs, take_cache=_take_rows
):
    """`run` to the end; with step_for_rows, in batches of 1/COMPACT_BY the size
    once few enough rows (sentences, for beam search) are left. Every entry of
    `state` but the step and the cache is per row ([R, ...]); take_cache(cache,
    rows) gathers the cache's. Returns the final state, whose `outputs` are
    those of every row."""
    rows = max_lengths.shape[0]
    few = rows // COMPACT_BY
    if step_for_rows is None or few < COMPACT_BY:
        return run(step_fn, state, max_lengths, until_alive=0)
    state = run(step_fn, state, max_lengths, until_alive=few)
    # The rows still decoding, padded with an ended row: an ended row's outputs
    # no longer change, so its copy writes back what is there.
    alive = jnp.nonzero(~state["done"], size=few, fill_value=jnp.argmax(state["done"]))[0]
    sub_state = {
        name: value
        if name == "step"
        else (take_cache if name == "cache" else _take_rows)(value, alive)
        for name, value in state.items()
    }
    sub_step_for_rows = lambda sub: step_for_rows(jnp.take(alive, sub))  # noqa: E731
    sub = _extend_compacting(
        run, step_for_rows(alive), sub_state, jnp.take(max_lengths, alive), sub_step_for_rows,
        outputs=outputs, take_cache=take_cache,
    )  # fmt: skip
    written = {name: state[name].at[alive].set(sub[name]) for name in outputs}
    return {**state, "step": sub["step"], **written}


def _extend_rows(step_fn, state, max_lengths, *, choose, length, no_repeat_ngram, until_alive):
    """The loop of `_one_token_at_a_time`, until at most `until_alive` rows are decoding."""
    rows = max_lengths.shape[0]

    def body(state):
        step, cache, out = state["step"], state["cache"], state["out"]
        tokens = _previous_tokens(out[:, None], step).reshape(rows, 1)
        log_probs, cache = step_fn(cache, tokens, step)
        log_probs = _only_eos_at_last(log_probs[:, None], step + 1 >= max_lengths)
        if no_repeat_ngram:
            log_probs = _block_repeated_ngrams(log_probs, out[:, None], step, no_repeat_ngram)
        step_keys = None
        if "keys" in state:  # each row's key for this step
            step_keys = _fold_in_rows(state["keys"], step)
        token = jnp.where(state["done"], PAD_ID, choose(log_probs[:, 0], step_keys))
        out = jax.lax.dynamic_update_index_in_dim(out, token.astype(jnp.int32), step, axis=1)
        done = state["done"] | (token == EOS_ID)
        return {**state, "step": step + 1, "cache": cache, "out": out, "done": done}

    def cond(state):
        return (state["step"] < length) & (jnp.sum(~state["done"]) > until_alive)

    return jax.lax.while_loop(cond, body, state)


# ----------------------------------------------------------------------------
# The model plugged into the search
# ----------------------------------------------------------------------------


def reorder_cache(cache: Cache, rows: jax.Array) -> Cache:
    """Hypothesis i continues hypothesis rows[i] [B*W]: gathers what is per hypothesis.

    The Transformer's self-attention keys/values are not moved: they stay in
    the row that wrote them, and each layer's lineage table [B, W, L]
    (transformer/attention.py) says in which beam's row a hypothesis finds
    them; gathering the table's rows hands a hypothesis its parent's history (a
    parent is always of the same sentence). The LSTM's states (`state_i`,
    [B*W, D] each) are gathered themselves. The cross-attention entries are per
    source sentence and shared by its beams.
    """

    def gather(path, leaf):
        names = {str(getattr(key, "key", "")) for key in path}
        if "lineage" in names:
            hypotheses = leaf.reshape(-1, leaf.shape[-1])  # [B, W, L] -> [B*W, L]
            return jnp.take(hypotheses, rows, axis=0).reshape(leaf.shape)
        if any(name.startswith("state_") for name in names):
            return jnp.take(leaf, rows, axis=0)
        return leaf

    return jax.tree_util.tree_map_with_path(gather, cache)


def select_sentences(cache: Cache, sentences: jax.Array, *, width: int) -> Cache:
    """The cache of the sentences `sentences` [B'] (of B), each with its W beams.

    Everything in the cache is per sentence ([B, ...]) except the LSTM's
    `state_i`, per hypothesis ([B*W, ...], source-major; see reorder_cache).
    """

    def take(path, leaf):
        if any(str(getattr(key, "key", "")).startswith("state_") for key in path):
            per_sentence = leaf.reshape(-1, width, *leaf.shape[1:])
            return jnp.take(per_sentence, sentences, axis=0).reshape(-1, *leaf.shape[1:])
        return jnp.take(leaf, sentences, axis=0)

    return jax.tree_util.tree_map_with_path(take, cache)


def output_length(config: ModelConfig, source_length: int, max_extra: int) -> int:
    """Static output size for sources padded to source_length: min(S + max_extra, max_len)."""
    return max(1, min(source_length + max_extra, config.max_len))


def sample_length(config: ModelConfig, source_length: int, max_extra: int) -> int:
    """Static output size of the samples: at most twice the padded source + 10.

    A sample stands in for a reference, and a reference that long is not a
    translation: in ding_de_en's test split none exceeds twice its source + 10
    pieces. Beam search's outputs keep `output_length`; the samples' shorter
    cache and loop make the sampling, most of the demo's final evaluation,
    about a third cheaper for the typical 16-token source.
    """
    return min(output_length(config, source_length, max_extra), 2 * source_length + 10)


def model_step(
    model: Model,
    params: Any,
    inputs: jax.Array,
    hypotheses: int,
    length: int,
    *,
    repeat: int = 1,
    normalized: bool = True,
):
    """(step_fn, cache) of the model for `hypotheses` rows (a multiple of B).

    Encodes the source once and prepares what the decoder reads of it once per
    sentence in the cache; step_fn runs one decoder position and returns
    float32 log-probs (normalized=False: `Logits`, for beam search). repeat > 1:
    the rows of `inputs` come in runs of `repeat` copies of one source
    (samples), and each source is encoded once.
    """
    encoded = model.apply({"params": params}, inputs[::repeat], method="encode")
    encoded = jnp.repeat(encoded, repeat, axis=0)
    _, variables = model.apply(
        {"params": params}, encoded, hypotheses, length,
        method="init_cache", mutable=["cache"],
    )  # fmt: skip
    return step_function(model, params, inputs, normalized=normalized), variables["cache"]


def step_function(
    model: Model, params: Any, inputs: jax.Array, *, normalized: bool = True
) -> StepFn:
    """The decoder's step for the sources `inputs` (their padding masks the attention):
    log-probs, or with normalized=False the `Logits` they come from."""

    def step_fn(cache, tokens, step):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, inputs, tokens, step,
            method="decode_step", mutable=["cache"],
        )  # fmt: skip
        logits = logits[:, 0].astype(jnp.float32)
        out = log_softmax_grouped(logits, inputs.shape[0]) if normalized else Logits(logits)
        return out, variables["cache"]

    return step_fn


class Logits(NamedTuple):
    """A step's logits [B*W, V], float32, in place of its log-probabilities:
    beam search normalises only the k it keeps of each row (`best_extensions`).
    Over [128, 37000], a top-k of the normalised rows cost 14-15 ms on XLA:CPU,
    of the logits with the k values normalised after 4.3 ms (docs/performance.md)."""

    logits: jax.Array


def _sum_exp(shifted: jax.Array) -> jax.Array:
    """[..., V] -> [..., 1]: the sum of exponentials as a product with ones: XLA:CPU
    fuses the exp into the matmul and takes half the time of its reduction (3.5
    -> 2.0 ms over [32, 4, 37000]); HIGHEST keeps float32 sums on accelerators."""
    ones = jnp.ones((shifted.shape[-1], 1), jnp.float32)
    return jnp.matmul(jnp.exp(shifted), ones, precision=jax.lax.Precision.HIGHEST)


def log_softmax_grouped(logits: jax.Array, sources: int) -> jax.Array:
    """logits [B*W, V] -> float32 log-probabilities, normalised over [B, W, V].

    The same values as over [B*W, V]; the 3-D shape keeps XLA:CPU from fusing
    the normalisation's reductions into the output projection's matmul, which
    it does for a 2-D matmul + row reduction and which runs several times
    slower (docs/performance.md).
    """
    rows, vocab = logits.shape
    grouped = logits.astype(jnp.float32).reshape(sources, rows // sources, vocab)
    shifted = grouped - jnp.max(grouped, axis=-1, keepdims=True)
    return (shifted - jnp.log(_sum_exp(shifted))).reshape(rows, vocab)


def max_output_lengths(inputs: jax.Array, max_extra: int, length: int) -> jax.Array:
    """Per sentence: its source length (non-PAD tokens) + max_extra, at most `length`."""
    return jnp.minimum(jnp.sum(inputs != PAD_ID, axis=1) + max_extra, length)


def decode(model: Model, params: Any, inputs: jax.Array, settings: DecodeConfig) -> jax.Array:
    """inputs [B, S] source ids (EOS-terminated, PAD after) -> output ids [B, L].

    Beam search as `settings` says (beam size 1: greedy decoding). Rows of the
    output end with EOS, then PAD.
    """
    if settings.beam_size == 1:
        length = output_length(model.config, inputs.shape[1], settings.max_extra)
        step_fn, cache = model_step(model, params, inputs, inputs.shape[0], length)
        max_lengths = max_output_lengths(inputs, settings.max_extra, length)
        return greedy_search(
            step_fn, cache, max_lengths, length=length, no_repeat_ngram=settings.no_repeat_ngram
        )
    tokens, _ = decode_n_best(model, params, inputs, settings, n_best=1)
    return tokens[:, 0]


def decode_n_best(
    model: Model, params: Any, inputs: jax.Array, settings: DecodeConfig, *, n_best: int
) -> tuple[jax.Array, jax.Array]:
    """Beam search's n_best (<= beam_size) best outputs of each source, best first:
    tokens [B, n_best, L] and their scores log P / lp [B, n_best] (NEG_INF where
    fewer hypotheses ended)."""
    beam_size = settings.beam_size
    length = output_length(model.config, inputs.shape[1], settings.max_extra)
    step_fn, cache = model_step(
        model, params, inputs, inputs.shape[0] * beam_size, length, normalized=False
    )
    max_lengths = max_output_lengths(inputs, settings.max_extra, length)
    tokens, scores, _ = beam_search(
        step_fn, reorder_cache, cache, max_lengths, length=length, beam_size=beam_size,
        alpha=settings.length_penalty, no_repeat_ngram=settings.no_repeat_ngram, n_best=n_best,
        step_for_sentences=lambda s: step_function(
            model, params, jnp.take(inputs, s, axis=0), normalized=False
        ),
    )  # fmt: skip
    return tokens, scores


def decode_samples(
    model: Model, params: Any, inputs: jax.Array, key: jax.Array, settings: DecodeConfig
) -> jax.Array:
    """settings.mbr_samples outputs of each source drawn by epsilon sampling
    (settings.mbr_epsilon): tokens [B, N, L].

    Each ends with EOS, then PAD. The source is repeated N times, so that every
    sample is decoded as a sentence of its own (a beam of one): unlike beams,
    samples never share a history, and reading the keys of N rows through a
    lineage table would cost N times the self-attention for nothing.

    A sentence's random draws depend on `key` and on the sentence alone
    (`source_keys`), not on the other sentences of the batch or its row: a
    batch may be drawn in chunks of any size with the same result.
    """
    batch, num_samples = inputs.shape[0], settings.mbr_samples
    keys = jax.vmap(lambda k: jax.random.split(k, num_samples))(source_keys(key, inputs))
    length = sample_length(model.config, inputs.shape[1], settings.max_extra)
    inputs = jnp.repeat(inputs, num_samples, axis=0)
    step_fn, cache = model_step(
        model, params, inputs, batch * num_samples, length, repeat=num_samples
    )
    max_lengths = max_output_lengths(inputs, settings.max_extra, length)
    tokens = sample_search(
        step_fn, cache, max_lengths, keys.reshape(-1), length=length,
        epsilon=settings.mbr_epsilon,
        step_for_rows=lambda rows: step_function(model, params, jnp.take(inputs, rows, axis=0)),
    )  # fmt: skip
    return tokens.reshape(batch, num_samples, length)


def source_keys(key: jax.Array, inputs: jax.Array) -> jax.Array:
    """inputs [B, S] -> [B] keys: key folded with a hash of each row's ids, which
    PAD (0) does not change, so a sentence gets the same key in any batch."""
    weights = np.asarray([pow(_HASH_BASE, i, 2**32) for i in range(inputs.shape[1])], np.uint32)
    hashes = jnp.sum(inputs.astype(jnp.uint32) * weights, axis=1, dtype=jnp.uint32)
    return jax.vmap(jax.random.fold_in, (None, 0))(key, hashes)


_HASH_BASE = 1_000_003  # odd: every power is odd, so no position's weight is 0 mod 2^32


def _sampling_only(settings: DecodeConfig) -> DecodeConfig:
    """The settings that change what sampling computes (one compilation for the rest)."""
    return DecodeConfig(
        mbr=2, mbr_samples=settings.mbr_samples, mbr_epsilon=settings.mbr_epsilon,
        max_extra=settings.max_extra,
    )  # fmt: skip


def _search_only(settings: DecodeConfig) -> DecodeConfig:
    """The settings that change what beam search computes."""
    return dataclasses.replace(settings, mbr_samples=0, mbr_epsilon=0.0, mbr_seed=0)


@functools.cache
def _compiled_sampler(config: ModelConfig, settings: DecodeConfig):
    return jax.jit(functools.partial(decode_samples, build(config), settings=settings))


def sample(
    model: Model, params: Any, inputs: jax.Array, key: jax.Array, decode: DecodeConfig
) -> jax.Array:
    """`decode_samples`, jitted once per (model config, sampling settings, input shape)."""
    return _compiled_sampler(model.config, _sampling_only(decode))(params, inputs, key)


@functools.cache
def _compiled(config: ModelConfig, settings: DecodeConfig):
    model = build(config)
    if settings.mbr:
        return jax.jit(
            functools.partial(decode_n_best, model, settings=settings, n_best=settings.mbr)
        )
    return jax.jit(functools.partial(decode, model, settings=settings))


def compile_ahead(
    model: Model, params: Any, inputs: jax.Array, decode: DecodeConfig, *, sampler: bool = False
) -> None:
    """Compiles what `translate` (sampler: `sample`) runs for inputs' shape and
    placement, without running it: jit keeps the program, so the later calls
    of that shape start at once. `Translator` calls it from a background thread
    while another batch decodes."""
    if sampler:
        compiled = _compiled_sampler(model.config, _sampling_only(decode))
        compiled.lower(params, inputs, jax.random.key(0)).compile()
    else:
        _compiled(model.config, _search_only(decode)).lower(params, inputs).compile()


PAPER_SEARCH = DecodeConfig()  # beam 4, length penalty 0.6, input + 50


def translate(
    model: Model, params: Any, inputs: jax.Array, decode: DecodeConfig = PAPER_SEARCH
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Beam search as `decode` configures it, jitted once per (model config, search
    settings, input shape): output ids [B, L], or with decode.mbr = N > 0 the N best
    and their scores (`decode_n_best`)."""
    return _compiled(model.config, _search_only(decode))(params, inputs)
