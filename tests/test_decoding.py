"""Decoding: beam search against brute force on hand-set probabilities, greedy, the cache."""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import decoding
from transformer.architecture import build
from transformer.config import BOS_ID, EOS_ID, PAD_ID, DecodeConfig
from transformer.model import Transformer

# A second-order Markov "model" over 6 tokens: P(next | before-previous, previous).
# Its cache holds each hypothesis's previous tokens, so the search must reorder
# the cache correctly for the probabilities to be right.
V = 6
A, B = 4, 5  # two ordinary tokens; 0 PAD, 1 EOS, 2 BOS, 3 UNK never produced


def markov_table(seed: int, eos_bias: float = 0.0) -> np.ndarray:
    """log P[before_previous, previous, next], with PAD/BOS/UNK never produced."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (V, V, V))
    logits[..., EOS_ID] += eos_bias
    logits[..., [PAD_ID, BOS_ID, 3]] = -np.inf
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def markov_search(table, batch, length):
    """(step_fn, reorder_fn, cache) for the table, for `batch` hypotheses."""
    table = jnp.asarray(table, jnp.float32)

    def step_fn(cache, tokens, step):
        history = jax.lax.dynamic_update_index_in_dim(cache, tokens[:, 0], step, axis=1)
        before = jnp.where(step > 0, history[:, jnp.maximum(step - 1, 0)], BOS_ID)
        return table[before, tokens[:, 0]], history

    reorder = lambda cache, rows: cache[rows]  # noqa: E731
    return step_fn, reorder, jnp.zeros((batch, length), jnp.int32)


def repeats_an_ngram(seq, n: int) -> bool:
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def ranked(table, max_length, alpha, no_repeat=0):
    """Every sequence ending in EOS of at most max_length tokens (that repeats no n-gram
    of no_repeat tokens, where no_repeat > 0), with its log P / lp, best first."""
    scored = []
    for n in range(1, max_length + 1):
        for body in itertools.product([A, B], repeat=n - 1):
            seq = (*body, EOS_ID)
            if no_repeat and repeats_an_ngram(seq, no_repeat):
                continue
            logp, before, prev = 0.0, BOS_ID, BOS_ID
            for token in seq:
                logp += table[before, prev, token]
                before, prev = prev, token
            scored.append((seq, logp / ((5 + n) / 6) ** alpha))
    return sorted(scored, key=lambda pair: -pair[1])


def brute_force(table, max_length, alpha, no_repeat=0):
    """The best sequence by log P / lp and its score (see `ranked`)."""
    return ranked(table, max_length, alpha, no_repeat)[0]


def greedy_by_hand(table, max_length, no_repeat=0):
    seq, before, prev = [], BOS_ID, BOS_ID
    while True:
        row = table[before, prev].copy()
        if len(seq) + 1 == max_length:
            row[np.arange(V) != EOS_ID] = -np.inf
        if no_repeat:
            for token in range(V):
                if repeats_an_ngram([*seq, token], no_repeat):
                    row[token] = -np.inf
        token = int(np.argmax(row))
        seq.append(token)
        if token == EOS_ID:
            return tuple(seq)
        before, prev = prev, token


def run_beam(
    table, max_lengths, beam_size, alpha, length=8, early_stop=True, no_repeat=0, n_best=None,
    logits=False,
):  # fmt: skip
    """beam_search on the table: tokens [B, L] and scores [B] of the best (n_best None),
    else [B, n_best, L] and [B, n_best]; and the steps run. logits: the step returns
    `Logits` (the log-probabilities shifted by a constant), as a model's step does."""
    max_lengths = jnp.asarray(max_lengths)
    step_fn, reorder, cache = markov_search(table, max_lengths.shape[0] * beam_size, length)
    if logits:
        log_prob_step = step_fn

        def step_fn(cache, tokens, step):
            out, cache = log_prob_step(cache, tokens, step)
            return decoding.Logits(out + 3.0), cache

    tokens, scores, steps = decoding.beam_search(
        step_fn,
        reorder,
        cache,
        max_lengths,
        length=length,
        beam_size=beam_size,
        alpha=alpha,
        no_repeat_ngram=no_repeat,
        n_best=n_best or 1,
        early_stop=early_stop,
    )
    if n_best is None:
        return tokens[:, 0], scores[:, 0], steps
    return tokens, scores, steps


def trimmed(row) -> tuple:
    row = list(np.asarray(row))
    return tuple(row[: row.index(EOS_ID) + 1])


def test_beam_search_finds_the_best_penalized_sequence_where_greedy_does_not():
    seeds_where_greedy_differs = 0
    for seed in range(12):
        table = markov_table(seed)
        expected, expected_score = brute_force(table, max_length=5, alpha=0.6)
        tokens, scores, _ = run_beam(table, [5], beam_size=6, alpha=0.6)
        assert trimmed(tokens[0]) == expected, seed
        np.testing.assert_allclose(scores[0], expected_score, rtol=1e-5)
        greedy = greedy_by_hand(table, 5)
        if greedy != expected:
            seeds_where_greedy_differs += 1
            out = decoding.greedy_search(
                markov_search(table, 1, 8)[0],
                jnp.zeros((1, 8), jnp.int32),
                jnp.asarray([5]),
                length=8,
            )
            assert trimmed(out[0]) == greedy != expected
    assert seeds_where_greedy_differs >= 2  # the tables do tell the two apart


def test_length_penalty_changes_the_choice():
    # From BOS: EOS at once is likely; a longer continuation is less likely in
    # total but better per token: with alpha large enough the long one wins.
    table = np.full((V, V, V), -np.inf)
    table[..., EOS_ID] = np.log(0.55)
    table[..., A] = np.log(0.45)
    table[BOS_ID, A, :] = -np.inf
    table[BOS_ID, A, A] = 0.0  # after A comes A for sure, then free again
    table[A, A, :] = -np.inf
    table[A, A, EOS_ID] = 0.0
    short, _ = brute_force(table, 4, alpha=0.0)
    long, _ = brute_force(table, 4, alpha=2.0)
    assert short == (EOS_ID,) and long == (A, A, EOS_ID)
    for alpha, expected in ((0.0, short), (2.0, long)):
        tokens, _, _ = run_beam(table, [4], beam_size=2, alpha=alpha)
        assert trimmed(tokens[0]) == expected


def test_max_length_per_sentence_ends_with_eos():
    table = markov_table(3, eos_bias=-30.0)  # EOS all but impossible: outputs reach the limit
    tokens, _, _ = run_beam(table, [2, 5, 7], beam_size=3, alpha=0.6, length=7)
    for row, limit in zip(np.asarray(tokens), [2, 5, 7], strict=True):
        assert len(trimmed(row)) == limit
        assert (row[limit:] == PAD_ID).all()
    out = decoding.greedy_search(
        markov_search(table, 3, 7)[0],
        jnp.zeros((3, 7), jnp.int32),
        jnp.asarray([2, 5, 7]),
        length=7,
    )
    assert [len(trimmed(r)) for r in np.asarray(out)] == [2, 5, 7]


def test_early_stop_stops_early_and_changes_nothing():
    for seed in range(6):
        table = markov_table(seed, eos_bias=1.0)  # sentences end soon: the bound can bite
        early = run_beam(table, [8, 8], beam_size=4, alpha=0.6, length=8)
        full = run_beam(table, [8, 8], beam_size=4, alpha=0.6, length=8, early_stop=False)
        np.testing.assert_array_equal(early[0], full[0])
        np.testing.assert_allclose(early[1], full[1])
        assert int(full[2]) == 8
        assert int(early[2]) < 8, seed


@pytest.mark.parametrize("n_best", [3, 7])
def test_n_best_is_the_exact_ranking_when_the_beam_holds_every_sequence(n_best):
    # Outputs of at most 3 tokens over two ordinary tokens: 7 sequences, and never
    # more than 8 candidates a step, so beam 8 sees and ends every one of them.
    for seed in range(6):
        table = markov_table(seed)
        expected = ranked(table, 3, alpha=0.6)[:n_best]
        tokens, scores, _ = run_beam(table, [3], beam_size=8, alpha=0.6, n_best=n_best)
        assert [trimmed(row) for row in tokens[0]] == [seq for seq, _ in expected], seed
        np.testing.assert_allclose(scores[0], [score for _, score in expected], rtol=1e-5)


def test_n_best_starts_with_the_single_best_and_scores_each_hypothesis_truly():
    for seed in range(6):
        table = markov_table(seed, eos_bias=0.5)
        best, best_score, _ = run_beam(table, [7, 5], beam_size=4, alpha=1.0)
        tokens, scores, _ = run_beam(table, [7, 5], beam_size=4, alpha=1.0, n_best=4)
        np.testing.assert_array_equal(tokens[:, 0], best)
        np.testing.assert_allclose(scores[:, 0], best_score)
        true_scores = dict(ranked(table, 7, alpha=1.0))
        for rows, row_scores, limit in zip(tokens, scores, [7, 5], strict=True):
            assert (np.diff(row_scores) <= 0).all()
            hypotheses = [trimmed(row) for row in rows]
            assert len(set(hypotheses)) == 4 and all(len(h) <= limit for h in hypotheses)
            np.testing.assert_allclose(row_scores, [true_scores[h] for h in hypotheses], rtol=1e-5)


def test_n_best_beyond_the_beam_is_refused():
    with pytest.raises(ValueError, match="n_best must be in"):
        run_beam(markov_table(0), [3], beam_size=2, alpha=0.6, n_best=3)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_one_is_greedy_on_the_table(alpha):
    for seed in range(6):
        table = markov_table(seed)
        tokens, _, _ = run_beam(table, [6], beam_size=1, alpha=alpha)
        assert trimmed(tokens[0]) == greedy_by_hand(table, 6)


def repetitive_table(seed: int) -> np.ndarray:
    """markov_table with long outputs that like to repeat their previous token."""
    table = markov_table(seed, eos_bias=-2.0)
    for token in range(V):
        table[:, token, token] += 2.0
    return table - np.logaddexp.reduce(table, axis=-1, keepdims=True)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("logits", [False, True])
def test_no_repeat_ngram_finds_the_best_sequence_that_repeats_none(n, logits):
    # Beam 8 over two ordinary tokens keeps every hypothesis of up to 3 tokens,
    # so on 6-token outputs it is exact: it must equal the brute force restricted
    # to sequences without a repeated n-gram. Without early stopping: its "W
    # hypotheses ended" rule is a heuristic, and blocking ends hypotheses sooner.
    # From logits (what translating does), the scores are the model's log P: a
    # ban does not renormalise over the tokens it leaves.
    changed = 0
    for seed in range(8):
        table = repetitive_table(seed)
        expected, expected_score = brute_force(table, 6, alpha=2.0, no_repeat=n)
        tokens, scores, _ = run_beam(
            table, [6], beam_size=8, alpha=2.0, no_repeat=n, early_stop=False, logits=logits
        )
        assert trimmed(tokens[0]) == expected, seed
        np.testing.assert_allclose(scores[0], expected_score, rtol=1e-5)
        unrestricted, _ = brute_force(table, 6, alpha=2.0)
        changed += unrestricted != expected
    assert changed >= 2  # the unrestricted best does repeat n-grams on these tables


@pytest.mark.parametrize("n", [1, 2, 3])
def test_greedy_with_no_repeat_ngram_takes_the_best_token_that_repeats_none(n):
    changed = 0
    for seed in range(8):
        table = repetitive_table(seed)
        out = decoding.greedy_search(
            markov_search(table, 1, 8)[0],
            jnp.zeros((1, 8), jnp.int32),
            jnp.asarray([7]),
            length=8,
            no_repeat_ngram=n,
        )
        expected = greedy_by_hand(table, 7, no_repeat=n)
        assert trimmed(out[0]) == expected, seed
        assert not repeats_an_ngram(expected, n)
        changed += expected != greedy_by_hand(table, 7)
    assert changed >= 2


def sampling_distribution(table, max_length):
    """{sequence: probability} of drawing each output from the table, EOS forced at max_length."""
    exact = {}
    for n in range(max_length):
        for body in itertools.product([A, B], repeat=n):
            p, before, prev = 1.0, BOS_ID, BOS_ID
            for token in body:
                p *= np.exp(table[before, prev, token])
                before, prev = prev, token
            if n < max_length - 1:  # at the last position only EOS may follow
                p *= np.exp(table[before, prev, EOS_ID])
            exact[(*body, EOS_ID)] = p
    return exact


def test_sampling_draws_each_sequence_with_its_probability():
    table, max_length, rows = markov_table(5, eos_bias=0.5), 4, 20000
    step_fn, _, cache = markov_search(table, rows, max_length)
    tokens = decoding.sample_search(
        step_fn, cache, jnp.full((rows,), max_length), jax.random.split(jax.random.key(0), rows),
        length=max_length,
        epsilon=0.0,
    )  # fmt: skip
    drawn = [trimmed(row) for row in np.asarray(tokens)]
    exact = sampling_distribution(table, max_length)
    assert set(drawn) <= set(exact) and sum(exact.values()) == pytest.approx(1.0)
    for sequence, p in exact.items():
        assert drawn.count(sequence) / rows == pytest.approx(p, abs=0.015), sequence


def test_epsilon_sampling_draws_only_tokens_of_probability_at_least_epsilon():
    probs = np.array([0.04, 0.5, 0.3, 0.15, 0.01])
    log_probs = jnp.log(jnp.tile(probs, (20000, 1)))
    keys = jax.random.split(jax.random.key(1), 20000)  # one per row
    tokens = np.asarray(decoding.epsilon_sample(log_probs, keys, epsilon=0.05))
    frequency = np.bincount(tokens, minlength=5) / len(tokens)
    np.testing.assert_allclose(frequency, [0, 0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.015)
    # No token reaches epsilon: the most likely one is drawn.
    flat = jnp.log(jnp.asarray([[0.01] * 50 + [0.02] + [0.48 / 49] * 49]))
    assert int(decoding.epsilon_sample(flat, keys[:1], epsilon=0.05)[0]) == 50
    with pytest.raises(ValueError, match="epsilon must be in"):
        decoding.epsilon_sample(log_probs, keys, epsilon=1.0)


# ----------------------------------------------------------------------------
# The Transformer
# ----------------------------------------------------------------------------


def test_epsilon_sampling_reaches_past_the_first_top_k_and_keeps_each_rows_draw():
    """A row of 30 candidates (over the first top-k of 16) is drawn among all 30,
    and the other rows of its batch draw what they draw without it."""
    rows, vocab = 6000, 100
    few = np.full(vocab, 1e-6)
    few[[7, 40, 90]] = [0.5, 0.3, 0.2]
    many = np.full(vocab, 1e-6)
    many[50:80] = 1 / 30
    keys = jax.random.split(jax.random.key(5), rows)
    sample = jax.jit(functools.partial(decoding.epsilon_sample, epsilon=0.02))
    assert decoding.FIRST_TOP_K == 16 < 30 < math.ceil(1 / 0.02) + 1
    plain = np.asarray(sample(jnp.log(jnp.tile(few, (rows, 1))), keys))
    np.testing.assert_allclose(
        np.bincount(plain, minlength=vocab)[[7, 40, 90]] / rows, [0.5, 0.3, 0.2], atol=0.02
    )
    mixed = np.asarray(sample(jnp.log(jnp.tile(few, (rows, 1))).at[0].set(jnp.log(many)), keys))
    np.testing.assert_array_equal(mixed[1:], plain[1:])
    assert 50 <= mixed[0] < 80
    spread = np.asarray(sample(jnp.log(jnp.tile(many, (rows, 1))), keys))
    frequency = np.bincount(spread, minlength=vocab) / rows
    assert ((spread >= 50) & (spread < 80)).all()
    np.testing.assert_allclose(frequency[50:80], 1 / 30, atol=0.012)


@pytest.fixture(scope="module")
def tiny_model(tiny):
    model = Transformer(tiny)
    x = jnp.ones((2, 6), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(3), x, x)["params"])
    return model, params


@pytest.fixture(scope="module", params=["transformer", "lstm"])
def each_model(request, tiny, tiny_model):
    """The tiny Transformer, then the LSTM baseline: the search must treat both alike."""
    if request.param == "transformer":
        return tiny_model
    model = build(tiny.replace(architecture="lstm"))
    x = jnp.ones((2, 6), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(3), x, x)["params"])
    return model, params


def sources(make_tokens):
    x = np.array(make_tokens((3, 7)))
    x[:, -1] = EOS_ID
    x[1, 4:] = PAD_ID
    x[1, 3] = EOS_ID
    return jnp.asarray(x)


def greedy_without_cache(model, params, inputs, length):
    """Greedy decoding by running the full decoder on every prefix (no cache).

    Each prefix is padded to `length`: the decoder is causal, so what follows
    position `step` does not change its logits, and one compiled forward pass
    serves every step."""
    out = np.zeros((inputs.shape[0], 0), np.int32)
    max_lengths = np.minimum(np.sum(np.asarray(inputs) != PAD_ID, axis=1) + 3, length)
    done = np.zeros(inputs.shape[0], bool)
    forward = jax.jit(lambda targets: model.apply({"params": params}, inputs, targets))
    for step in range(length):
        targets = np.full((out.shape[0], length), PAD_ID, np.int32)
        targets[:, :step], targets[:, step] = out, A
        logits = np.asarray(forward(jnp.asarray(targets)))[:, step].copy()
        logits[step + 1 >= max_lengths, :] = -np.inf
        logits[step + 1 >= max_lengths, EOS_ID] = 0
        token = np.where(done, PAD_ID, logits.argmax(-1))
        done |= token == EOS_ID
        out = np.concatenate([out, token[:, None]], axis=1)
    return out


def test_cached_greedy_equals_uncached_greedy(each_model, make_tokens):
    model, params = each_model
    inputs = sources(make_tokens)
    cached = decoding.decode(model, params, inputs, DecodeConfig(beam_size=1, max_extra=3))
    length = decoding.output_length(model.config, inputs.shape[1], 3)
    assert cached.shape == (3, length)
    # Prefixes fed to the full forward pass contain PAD after EOS; the decoder
    # masks PAD as a key, and those positions come after EOS, so only rows
    # before EOS are compared.
    uncached = greedy_without_cache(model, params, inputs, length)
    for row_cached, row_full in zip(np.asarray(cached), uncached, strict=True):
        assert trimmed(row_cached) == trimmed(row_full)


def test_beam_one_equals_greedy_on_the_model(each_model, make_tokens):
    model, params = each_model
    inputs = sources(make_tokens)
    greedy = decoding.decode(model, params, inputs, DecodeConfig(beam_size=1))
    step_fn_tokens = decoding.translate(model, params, inputs, DecodeConfig(beam_size=1))
    np.testing.assert_array_equal(greedy, step_fn_tokens)
    beam_one = _beam_on_model(model, params, inputs, beam_size=1, alpha=0.6)
    for a, b in zip(np.asarray(greedy), np.asarray(beam_one), strict=True):
        assert trimmed(a) == trimmed(b)


def _beam_on_model(model, params, inputs, beam_size, alpha):
    """decoding.decode's beam path, also for beam_size 1."""
    length = decoding.output_length(model.config, inputs.shape[1], 50)
    step_fn, cache = decoding.model_step(model, params, inputs, inputs.shape[0] * beam_size, length)
    tokens, _, _ = decoding.beam_search(
        step_fn,
        decoding.reorder_cache,
        cache,
        decoding.max_output_lengths(inputs, 50, length),
        length=length,
        beam_size=beam_size,
        alpha=alpha,
    )
    return tokens[:, 0]


def test_beam_search_on_the_model_scores_at_least_greedy(each_model, make_tokens):
    """Beam 4's hypothesis is never worse by the search's own score than greedy's."""
    model, params = each_model
    inputs = sources(make_tokens)
    beam = np.asarray(decoding.translate(model, params, inputs, DecodeConfig()))
    greedy = np.asarray(decoding.translate(model, params, inputs, DecodeConfig(beam_size=1)))

    def score(rows):
        targets = jnp.asarray(rows)
        logp = jax.nn.log_softmax(model.apply({"params": params}, inputs, targets))
        picked = np.take_along_axis(np.asarray(logp), rows[..., None], axis=-1)[..., 0]
        lengths = np.array([len(trimmed(r)) for r in rows])
        mask = np.arange(rows.shape[1])[None] < lengths[:, None]
        return (picked * mask).sum(1) / ((5 + lengths) / 6) ** 0.6

    assert (score(beam) >= score(greedy) - 1e-4).all()


def test_the_first_of_the_n_best_is_the_translation(each_model, make_tokens):
    model, params = each_model
    inputs = sources(make_tokens)
    one = decoding.translate(model, params, inputs, DecodeConfig())
    tokens, scores = decoding.translate(model, params, inputs, DecodeConfig(mbr=4))
    assert tokens.shape == (3, 4, one.shape[1]) and scores.shape == (3, 4)
    np.testing.assert_array_equal(tokens[:, 0], one)
    assert (np.diff(np.asarray(scores), axis=1) <= 0).all()
    assert len({trimmed(row) for row in np.asarray(tokens[0])}) > 1  # distinct hypotheses


def test_reordering_beams_moves_the_lineage_and_no_key_or_value(tiny_model):
    model, params = tiny_model
    inputs = jnp.ones((2, 5), jnp.int32)
    encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
    _, variables = model.apply(
        {"params": params}, encoded, 8, 6, method=Transformer.init_cache, mutable=["cache"]
    )
    cache = jax.tree_util.tree_map(  # distinct values, so that any move would show
        lambda x: (
            jax.random.normal(jax.random.key(x.size), x.shape).astype(x.dtype)
            if x.dtype != jnp.int32
            else x
        ),
        variables["cache"],
    )
    rows = jnp.array([1, 1, 0, 3, 7, 4, 4, 5])  # each beam's parent, within its sentence
    moved = decoding.reorder_cache(cache, rows)
    for layer in moved["decoder"]:
        self_attention = moved["decoder"][layer]["self_attention"]
        # Sentence b's hypothesis i now reads its parent's history: rows - 4 b.
        np.testing.assert_array_equal(
            self_attention["lineage"][:, :, 0], [[1, 1, 0, 3], [3, 0, 0, 1]]
        )
        for kind in ("self_attention", "cross_attention"):
            for name in ("key", "value"):
                before = cache["decoder"][layer][kind][name]
                assert moved["decoder"][layer][kind][name] is before
        assert moved["decoder"][layer]["cross_attention"]["key"].shape[0] == 2  # per source


def test_beam_search_through_the_lineage_equals_copying_the_cache(tiny_model, make_tokens):
    """The straightforward beam search: the source copied per beam, and every
    cached key/value gathered whenever beams change places."""
    model, params = tiny_model
    inputs, width = sources(make_tokens), 4
    length = decoding.output_length(model.config, inputs.shape[1], 50)
    max_lengths = decoding.max_output_lengths(inputs, 50, length)
    ours = decoding.decode(model, params, inputs, DecodeConfig(beam_size=width))

    tiled = jnp.repeat(inputs, width, axis=0)  # one "sentence" per hypothesis: W = 1
    step_fn, cache = decoding.model_step(model, params, tiled, tiled.shape[0], length)

    def copy_everything(cache, rows):
        def gather(path, leaf):
            names = {getattr(k, "key", None) for k in path}
            return leaf if "lineage" in names else jnp.take(leaf, rows, axis=0)

        return jax.tree_util.tree_map_with_path(gather, cache)

    def search(reorder):
        tokens, _, _ = decoding.beam_search(
            step_fn, reorder, cache, max_lengths, length=length, beam_size=width, alpha=0.6
        )
        return np.asarray(tokens[:, 0])

    np.testing.assert_array_equal(ours, search(copy_everything))
    # Beams did change places: ignoring the reordering gives other translations.
    assert (search(lambda cache, rows: cache) != np.asarray(ours)).any()


@pytest.mark.parametrize("sources, beams, vocab", [(3, 4, 50), (5, 1, 50), (2, 4, 8000)])
def test_grouped_log_softmax_equals_the_plain_one(sources, beams, vocab):
    logits = jax.random.normal(jax.random.key(0), (sources * beams, vocab), jnp.bfloat16) * 5
    got = decoding.log_softmax_grouped(logits, sources)
    assert got.dtype == jnp.float32 and got.shape == (sources * beams, vocab)
    want = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shape, k, values",
    [
        ((3, 4, 37000), 8, "normal"),
        ((16, 8000), 16, "grid"),  # exact ties everywhere, within and across chunks
        ((4, 8000), 16, "one_token"),  # one finite entry, the rest NEG_INF (EOS only)
        ((2, 8000), 16, "straddle"),  # the 16th value is the max of one chunk, not of another
        ((5, 1009), 4, "normal"),  # no divisor to chunk by: jax.lax.top_k itself
    ],
)
def test_chunked_top_k_equals_lax_top_k(shape, k, values):
    rng = np.random.default_rng(0)
    if values == "normal":
        x = rng.normal(0, 3, shape)
    elif values == "grid":
        x = rng.integers(-6, 0, shape)
    else:
        x = np.full(shape, decoding.NEG_INF)
        x[..., 1] = -0.5
    if values == "straddle":
        # The last chunk holds the best value and fifteen -2s; the first chunk
        # ten -2s of lower index, which come first among equals.
        x[..., -1], x[..., -16:-1], x[..., :10] = 0.0, -2.0, -2.0
    x = jnp.asarray(x, jnp.float32)
    assert (decoding._chunk_size(shape[-1], k) is None) == (shape[-1] == 1009)
    got_values, got_index = jax.jit(decoding.top_k, static_argnums=1)(x, k)
    want_values, want_index = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(got_values, want_values)
    np.testing.assert_array_equal(got_index, want_index)


def test_best_extensions_equal_one_top_k_over_all_candidates():
    rng = np.random.default_rng(0)
    b, w, v, k = 6, 4, 40, 8
    # Values on a coarse grid: many exact ties, within and across beams.
    log_probs = jnp.asarray(rng.integers(-6, 0, (b, w, v)), jnp.float32)
    alive = jnp.asarray(rng.integers(-3, 0, (b, w)), jnp.float32)
    scores, beam, token = decoding.best_extensions(alive, log_probs, k)
    flat_scores, flat = jax.lax.top_k((alive[:, :, None] + log_probs).reshape(b, -1), k)
    np.testing.assert_array_equal(scores, flat_scores)
    np.testing.assert_array_equal(beam, flat // v)
    np.testing.assert_array_equal(token, flat % v)
    # Fewer tokens than candidates wanted per beam (a tiny vocabulary).
    scores, beam, token = decoding.best_extensions(alive, log_probs[..., :3], k)
    flat_scores, flat = jax.lax.top_k((alive[:, :, None] + log_probs[..., :3]).reshape(b, -1), k)
    np.testing.assert_array_equal(scores, flat_scores)
    np.testing.assert_array_equal(token, flat % 3)


@pytest.mark.parametrize("vocab", [40, 8000])
def test_best_extensions_of_logits_equal_those_of_their_log_probs(vocab):
    """Beam search takes its top-k from the logits and normalises the k it keeps:
    the same scores, bit for bit, and the same beams and tokens."""
    b, w, k = 5, 4, 8
    logits = jax.random.normal(jax.random.key(1), (b * w, vocab)) * 4
    alive = jax.random.normal(jax.random.key(2), (b, w))
    log_probs = decoding.log_softmax_grouped(logits, b).reshape(b, w, vocab)
    want = decoding.best_extensions(alive, log_probs, k)
    got = decoding.best_extensions(alive, logits.reshape(b, w, vocab), k, normalized=False)
    for g, x in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, x)
    # Not a top-k of the logits plus the beams' scores: normalising matters.
    unnormalised = decoding.best_extensions(alive, logits.reshape(b, w, vocab), k)
    assert not np.array_equal(unnormalised[0], want[0])


@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("vocab", [40, 8000])
def test_only_eos_extensions_equal_a_top_k_with_every_other_token_impossible(vocab, normalized):
    """At a sentence's last position its candidates are its beams' EOS extensions:
    bit for bit those of a top-k over rows masked to EOS alone, wherever they
    are possible (the search keeps nothing else of a sentence that ends)."""
    b, w, k = 6, 4, 8
    logits = jax.random.normal(jax.random.key(3), (b, w, vocab)) * 4
    logits = logits.at[4].set(logits[4, 0]).reshape(b * w, vocab)  # sentence 4: ties
    log_probs = decoding.log_softmax_grouped(logits, b).reshape(b, w, vocab)
    alive = jax.random.normal(jax.random.key(4), (b, w))
    alive = alive.at[1, 2:].set(decoding.NEG_INF).at[3, 1:].set(decoding.NEG_INF)  # dead beams
    alive = alive.at[4].set(alive[4, 0])  # with sentence 4's rows equal: the lower beam first
    last = jnp.asarray([True, True, False, True, True, False])
    rows = log_probs if normalized else logits.reshape(b, w, vocab)
    got = decoding.best_extensions(alive, rows, k, normalized=normalized, only_eos=last)
    masked = decoding._only_eos_at_last(log_probs, last)
    want = decoding.best_extensions(alive, masked, k)
    possible = np.asarray(want[0]) > decoding.NEG_INF / 2
    assert possible.sum() == 4 * w - 2 - 3 + 2 * k  # every live beam's EOS; all of the others
    for g, x in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g)[possible], np.asarray(x)[possible])
    assert (np.asarray(got[0])[~possible] <= decoding.NEG_INF / 2).all()
    np.testing.assert_array_equal(np.asarray(got[2])[np.asarray(last)][:, :w] == EOS_ID, True)
    # Without only_eos the last sentences' best tokens are not all EOS.
    free = decoding.best_extensions(alive, rows, k, normalized=normalized)
    assert not (np.asarray(free[2])[np.asarray(last)][:, :w] == EOS_ID).all()


def _sampling(samples: int, epsilon: float) -> DecodeConfig:
    return DecodeConfig(mbr=2, mbr_samples=samples, mbr_epsilon=epsilon)


def test_samples_at_a_high_epsilon_are_the_greedy_output(each_model, make_tokens):
    model, params = each_model
    inputs = sources(make_tokens)
    greedy = np.asarray(decoding.decode(model, params, inputs, DecodeConfig(beam_size=1)))
    samples = decoding.sample(
        model, params, inputs, jax.random.key(0), _sampling(3, epsilon=0.99)
    )  # only the most likely token reaches 0.99
    # Samples stop at twice the padded source + 10: the greedy output up to there, then EOS.
    length = decoding.sample_length(model.config, inputs.shape[1], 50)
    assert length == 2 * inputs.shape[1] + 10 < greedy.shape[1]
    assert samples.shape == (3, 3, length)
    cut = 0
    for row, drawn in zip(greedy, np.asarray(samples), strict=True):
        expected = trimmed(row)
        if len(expected) > length:
            expected, cut = (*expected[: length - 1], EOS_ID), cut + 1
        assert all(trimmed(sample) == expected for sample in drawn)
    assert cut > 0  # an untrained model's greedy output runs past the samples' cap
    varied = np.asarray(
        decoding.sample(model, params, inputs, jax.random.key(0), _sampling(4, epsilon=0.0))
    )
    for drawn in varied.reshape(12, -1):  # each ends with EOS, then PAD
        assert set(drawn[len(trimmed(drawn)) :]) <= {PAD_ID}
    assert len({trimmed(sample) for sample in varied[0]}) > 1  # an untrained model: diverse
    again = decoding.sample(model, params, inputs, jax.random.key(0), _sampling(4, epsilon=0.0))
    np.testing.assert_array_equal(varied, again)


def test_a_sentences_samples_do_not_depend_on_its_batch(each_model, make_tokens):
    """The same sentence in another row, beside other sentences, with more PAD
    after it: the same key; drawn at the same padded length, the same samples."""
    model, params = each_model
    inputs = np.asarray(sources(make_tokens))
    key, settings = jax.random.key(3), _sampling(4, epsilon=0.0)
    other = np.array(make_tokens((1, inputs.shape[1])))
    other[:, -1] = EOS_ID
    moved = np.concatenate([inputs[2:], other, inputs[:2]])  # rows 2, new, 0, 1
    keys = np.asarray(jax.random.key_data(decoding.source_keys(key, jnp.asarray(inputs))))
    moved_keys = np.asarray(jax.random.key_data(decoding.source_keys(key, jnp.asarray(moved))))
    np.testing.assert_array_equal(moved_keys[[2, 3, 0]], keys)
    assert len({tuple(k) for k in keys}) == 3  # a key per sentence
    wider = np.pad(inputs, ((0, 0), (0, 5)))
    wider_keys = np.asarray(jax.random.key_data(decoding.source_keys(key, jnp.asarray(wider))))
    np.testing.assert_array_equal(wider_keys, keys)
    drawn = np.asarray(decoding.sample(model, params, jnp.asarray(inputs), key, settings))
    drawn_moved = np.asarray(decoding.sample(model, params, jnp.asarray(moved), key, settings))
    np.testing.assert_array_equal(drawn_moved[[2, 3, 0]], drawn)
    assert len({trimmed(s) for s in drawn.reshape(-1, drawn.shape[-1])}) > 3  # not all alike
    reseeded = decoding.sample(model, params, jnp.asarray(inputs), jax.random.key(4), settings)
    assert not np.array_equal(np.asarray(reseeded), drawn)  # the key does change them


def test_sampling_gathers_the_rows_still_decoding_and_changes_no_output():
    """Rows that end at different steps; the rows still decoding are moved into
    smaller batches (1/8, then 1/64), and every row's tokens stay the same."""
    rows, length, vocab = 512, 40, 12
    ends = jnp.asarray(np.random.default_rng(0).integers(1, length, rows), jnp.int32)
    batch_sizes = []

    def step_for(row_ids):
        def step_fn(cache, tokens, step):
            batch_sizes.append(tokens.shape[0])  # at trace time: once per batch size
            # A row's own token each step (its id, its last token and the step), EOS at its end.
            token = (cache["row"] * 7 + tokens[:, 0] * 3 + step) % (vocab - 3) + 3
            token = jnp.where(step >= cache["end"], EOS_ID, token)
            log_probs = jnp.where(jnp.arange(vocab) == token[:, None], 0.0, -20.0)
            return jax.nn.log_softmax(log_probs), cache

        return step_fn

    cache = {"row": jnp.arange(rows), "end": ends}
    max_lengths = jnp.full((rows,), length)
    search = functools.partial(
        decoding.sample_search, max_lengths=max_lengths,
        keys=jax.random.split(jax.random.key(0), rows), length=length, epsilon=0.99,
    )  # fmt: skip
    plain = np.asarray(search(step_for(None), cache))
    assert batch_sizes == [rows]
    gathered = np.asarray(search(step_for(None), cache, step_for_rows=step_for))
    assert batch_sizes[1:] == [rows, rows // 8, rows // 64]
    np.testing.assert_array_equal(gathered, plain)
    np.testing.assert_array_equal([trimmed(r).index(EOS_ID) for r in plain], ends)


def test_beam_search_gathers_the_sentences_still_searching_and_changes_no_output():
    """64 sentences of the table ending at different steps (their max lengths, EOS):
    with step_for_sentences, the last 8 searching move into a batch of their own,
    their per-hypothesis cache (`state_*`) with them, and every sentence's n best
    and scores stay what the whole batch finds."""
    sentences, width, length = 64, 3, 9
    table = markov_table(1, eos_bias=-4.0)
    max_lengths = jnp.asarray(np.random.default_rng(1).integers(1, length + 1, sentences))
    # EOS made rarer: some sentences end by EOS, others at their max length.
    step_fn, reorder, history = markov_search(table, sentences * width, length)
    rows_seen = []

    def step_for(sentence_ids):
        def step(cache, tokens, position):
            rows_seen.append(tokens.shape[0])  # at trace time: once per batch size
            history, cache_out = step_fn(cache["state_history"], tokens, position)
            return history, {"state_history": cache_out}

        return step

    reorder_named = lambda cache, rows: {"state_history": reorder(cache["state_history"], rows)}  # noqa: E731
    search = functools.partial(
        decoding.beam_search, reorder_fn=reorder_named, cache={"state_history": history},
        max_lengths=max_lengths, length=length, beam_size=width, alpha=0.6, n_best=2,
    )  # fmt: skip
    tokens, scores, _ = search(step_for(None))
    assert rows_seen == [sentences * width]
    gathered, gathered_scores, _ = search(step_for(None), step_for_sentences=step_for)
    assert rows_seen[1:] == [sentences * width, sentences // 8 * width]
    np.testing.assert_array_equal(gathered, tokens)
    np.testing.assert_array_equal(gathered_scores, scores)
    lengths = [len(trimmed(row)) for row in np.asarray(tokens[:, 0])]
    assert len(set(lengths)) > 3  # the sentences did end at different steps


def test_beam_search_on_the_model_gathers_sentences_without_changing_them(
    each_model, make_tokens, step_sources
):
    """`decoding.decode_n_best` gathers the sentences still searching (their self-
    and cross-attention entries, or the LSTM's states) into a batch of their own;
    its n best equal a search of the whole batch to the end."""
    model, params = each_model
    lengths = np.random.default_rng(2).integers(1, 5, 64)  # sources of 1 to 4 tokens,
    lengths[::16] = 9  # and 4 of 9: the last ones searching
    inputs = np.array(make_tokens((64, 9)))
    for row, n in enumerate(lengths):
        inputs[row, n - 1] = EOS_ID
        inputs[row, n:] = PAD_ID
    inputs = jnp.asarray(inputs)
    settings = DecodeConfig(beam_size=3, max_extra=2)
    tokens, scores = decoding.decode_n_best(model, params, inputs, settings, n_best=2)
    assert step_sources == [64, 8]
    length = decoding.output_length(model.config, inputs.shape[1], 2)
    step_fn, cache = decoding.model_step(model, params, inputs, 64 * 3, length)
    whole, whole_scores, _ = decoding.beam_search(
        step_fn, decoding.reorder_cache, cache, decoding.max_output_lengths(inputs, 2, length),
        length=length, beam_size=3, alpha=settings.length_penalty, n_best=2,
    )  # fmt: skip
    np.testing.assert_array_equal(tokens, whole)
    np.testing.assert_allclose(scores, whole_scores, rtol=1e-5)
    ends = [len(trimmed(row)) for row in np.asarray(whole[:, 0])]
    assert len(set(ends)) > 3
