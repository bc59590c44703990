"""The LSTM baseline (transformer/rnn.py): masks, packing, cached decoding, the search.

The same numeric checks as the Transformer's (tests/test_model.py): cached
decoding equals the teacher-forced pass, packed examples do not see each
other, padding changes nothing; and the beam search's scores are the model's
own, which they are only if every hypothesis's state follows it when beams
change places.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_module, tiny_training_args

from transformer import decoding
from transformer.analysis.params import formula_counts, real_counts
from transformer.architecture import build
from transformer.config import EOS_ID, PAD_ID, DecodeConfig
from transformer.model import shift_right
from transformer.rnn import LSTM, RecurrentModel, example_ends, example_starts


@pytest.fixture(scope="module")
def lstm(tiny):
    config = tiny.replace(architecture="lstm")
    model = build(config)
    assert isinstance(model, RecurrentModel)
    x = jnp.ones((2, 6), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(1), x, x)["params"])
    forward = jax.jit(lambda p, x, y, **kw: model.apply({"params": p}, x, y, **kw))
    return model, params, forward


def test_example_boundaries_in_both_reading_directions():
    tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])
    assert example_starts(tokens, segments).tolist() == [[1, 0, 1, 0, 0, 1]]
    assert example_ends(tokens, segments).tolist() == [[0, 1, 0, 0, 1, 1]]
    # Unpacked: one example, then padding.
    assert example_starts(tokens, None).tolist() == [[1, 0, 0, 0, 0, 1]]
    assert example_ends(tokens, None).tolist() == [[0, 0, 0, 0, 1, 1]]


def test_the_layer_computes_what_flax_lstm_cell_computes(tiny):
    """Our layer hoists the input's share of the gates out of the recurrence; the
    recurrence is still flax.linen.LSTMCell's, with the same weights."""
    units, length = 6, 5
    layer = LSTM(units, tiny)
    x = jax.random.normal(jax.random.key(0), (2, length, 4))
    no_starts = jnp.zeros((2, length), bool)
    params = nn.unbox(layer.init(jax.random.key(1), x, no_starts)["params"])
    ours, _ = layer.apply({"params": params}, x, no_starts)
    gate = lambda w, k: w[:, k * units : (k + 1) * units]  # noqa: E731  # i, f, candidate, o
    cell_params = {}
    for k, name in enumerate("ifgo"):
        cell_params["i" + name] = {"kernel": gate(params["wi"], k)}
        cell_params["h" + name] = {
            "kernel": gate(params["wh"], k),
            "bias": params["bias"][k * units : (k + 1) * units],
        }
    cell = nn.LSTMCell(units)
    carry = cell.initialize_carry(jax.random.key(0), (2, 4))
    outputs = []
    for t in range(length):
        carry, h = cell.apply({"params": cell_params}, carry, x[:, t])
        outputs.append(h)
    np.testing.assert_allclose(ours, jnp.stack(outputs, axis=1), atol=1e-5)


def test_padding_changes_nothing(lstm, make_tokens):
    model, params, forward = lstm
    x, y = make_tokens((2, 5)), make_tokens((2, 4))
    padded = forward(params, jnp.pad(x, ((0, 0), (0, 3))), jnp.pad(y, ((0, 0), (0, 2))))
    np.testing.assert_allclose(padded[:, :4], forward(params, x, y), atol=1e-5)


def test_packed_examples_do_not_see_each_other(lstm, make_tokens):
    """Two examples in one row, read in both directions, equal each read alone."""
    model, params, forward = lstm
    x1, y1 = make_tokens((1, 3)), make_tokens((1, 3))
    x2, y2 = make_tokens((1, 4)), make_tokens((1, 4))
    x = jnp.concatenate([x1, x2, jnp.zeros((1, 1), jnp.int32)], axis=1)
    y = jnp.concatenate([y1, y2, jnp.zeros((1, 1), jnp.int32)], axis=1)
    x_seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    y_seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    x_pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])
    packed = forward(
        params, x, y,
        inputs_positions=x_pos, targets_positions=x_pos,
        inputs_segmentation=x_seg, targets_segmentation=y_seg,
    )  # fmt: skip
    np.testing.assert_allclose(packed[0, :3], forward(params, x1, y1)[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:7], forward(params, x2, y2)[0], atol=1e-5)


def test_the_source_reaches_the_output(lstm, make_tokens):
    """The attention is not a no-op: another source gives other logits."""
    model, params, forward = lstm
    x, y = make_tokens((1, 6)), make_tokens((1, 4))
    other = x.at[0, 2].set((x[0, 2] + 1) % 500 + 4)
    assert not np.allclose(forward(params, x, y), forward(params, other, y), atol=1e-4)


@pytest.mark.parametrize("beams", [1, 3])
def test_cached_decoding_equals_the_full_forward_pass(lstm, make_tokens, beams):
    model, params, forward = lstm
    x = make_tokens((2, 6)).at[1, 4:].set(PAD_ID)
    y = make_tokens((2, 5))
    encoded = model.apply({"params": params}, x, method="encode")
    _, cache = model.apply(
        {"params": params}, encoded, 2 * beams, 8, method="init_cache", mutable=["cache"]
    )
    tokens = jnp.repeat(shift_right(y), beams, axis=0)  # source-major hypotheses
    outputs = []
    for t in range(y.shape[1]):
        logits, cache = model.apply(
            {"params": params, **cache}, x, tokens[:, t : t + 1], t,
            method="decode_step", mutable=["cache"],
        )  # fmt: skip
        outputs.append(logits)
    stepped = jnp.concatenate(outputs, axis=1).reshape(2, beams, y.shape[1], -1)
    full = forward(params, x, y)
    for k in range(beams):
        np.testing.assert_allclose(stepped[:, k], full, atol=1e-4)


def test_reordering_moves_each_hypothesis_state(lstm, make_tokens):
    model, params, _ = lstm
    x = make_tokens((1, 5))
    step_fn, cache = decoding.model_step(model, params, x, 3, 8)
    _, cache = step_fn(cache, jnp.array([[5], [6], [7]]), 0)  # three different states
    moved = decoding.reorder_cache(cache, jnp.array([2, 2, 0]))
    before, after = cache["decoder"]["state_0"], moved["decoder"]["state_0"]
    for part in range(2):  # (c, h)
        np.testing.assert_array_equal(after[part], before[part][jnp.array([2, 2, 0])])
    np.testing.assert_array_equal(moved["decoder"]["source"], cache["decoder"]["source"])


def test_beam_scores_are_the_models_own(lstm, make_tokens):
    """Each of the n best's scores is log P(y|x) / lp(|y|) by the full forward pass."""
    model, params, forward = lstm
    x = make_tokens((2, 6)).at[:, -1].set(EOS_ID)
    settings = DecodeConfig(beam_size=4, mbr=4, max_extra=4)
    tokens, scores = decoding.translate(model, params, x, settings)
    for b in range(2):
        for k in range(4):
            row = np.asarray(tokens[b, k])
            length = list(row).index(EOS_ID) + 1
            logp = jax.nn.log_softmax(forward(params, x[b : b + 1], jnp.asarray(row[None])))
            total = float(np.take_along_axis(logp[0, :length], row[:length, None], 1).sum())
            lp = ((5 + length) / 6) ** settings.length_penalty
            assert scores[b, k] == pytest.approx(total / lp, abs=1e-4)


@pytest.mark.parametrize(
    "changes", [{}, {"d_model": 24}, {"share_embeddings": False, "tie_output": False}]
)
def test_parameter_formula_matches_the_model(tiny, changes):
    config = tiny.replace(architecture="lstm", **changes)
    assert formula_counts(config) == real_counts(config)


def test_experiments_wmt_trains_resumes_and_translates_the_lstm(ding_sample, tmp_path):
    workdir = tmp_path / "lstm"
    args = [*tiny_training_args(ding_sample, workdir, 6, checkpoint_every=3), "--architecture=lstm"]
    run_module("experiments.wmt", *args)
    resumed = run_module("experiments.wmt", *args, "--steps=10")
    assert b"resumed from step 6" in resumed.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert sorted(losses) == list(range(1, 11))
    assert losses[10] < losses[1]
    assert '"architecture": "lstm"' in (workdir / "config.json").read_text()
    translated = run_module(
        "experiments.translate", f"--workdir={workdir}", "--beam_size=2", stdin=b"Das Haus.\n"
    )
    assert len(translated.stdout.decode().splitlines()) == 1
