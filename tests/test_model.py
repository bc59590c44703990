"""The model: shapes of every preset (eval_shape), padding, causality, packing, cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import config
from transformer.config import BOS_ID
from transformer.model import Transformer, shift_right, sinusoidal_positions

# ----------------------------------------------------------------------------
# Shapes, for every preset, without allocating anything.
# ----------------------------------------------------------------------------


def _shapes(c: config.ModelConfig, batch=2, source=7, target=5):
    model = Transformer(c)
    x = jax.ShapeDtypeStruct((batch, source), jnp.int32)
    y = jax.ShapeDtypeStruct((batch, target), jnp.int32)
    variables = jax.eval_shape(lambda x, y: model.init(jax.random.key(0), x, y), x, y)
    params = nn.unbox(variables["params"])
    encoded = jax.eval_shape(
        lambda p, x: model.apply({"params": p}, x, method=Transformer.encode), params, x
    )
    logits = jax.eval_shape(lambda p, x, y: model.apply({"params": p}, x, y), params, x, y)
    return params, encoded, logits


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_preset_shapes(name):
    c = config.preset(name)
    params, encoded, logits = _shapes(c)
    assert encoded.shape == (2, 7, c.d_model)
    assert logits.shape == (2, 5, c.vocab_size) and logits.dtype == jnp.float32
    d, n = c.d_model, c.num_heads
    assert params["embed"]["embedding"].shape == (c.vocab_size, d)
    for stack, layers in (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)):
        assert sorted(k for k in params[stack] if k.startswith("layer_")) == sorted(
            f"layer_{i}" for i in range(layers)
        )
    layer = params["decoder"]["layer_0"]
    for attn in ("self_attention", "cross_attention"):
        assert layer[attn]["query"]["kernel"].shape == (d, n, c.d_k)
        assert layer[attn]["key"]["kernel"].shape == (d, n, c.d_k)
        assert layer[attn]["value"]["kernel"].shape == (d, n, c.d_v)
        assert layer[attn]["out"]["kernel"].shape == (n, c.d_v, d)
    assert layer["feed_forward"]["wi"].shape == (d, c.d_ff)
    assert layer["feed_forward"]["wo"].shape == (c.d_ff, d)


@pytest.mark.parametrize(
    "changes, present, absent",
    [
        ({"share_embeddings": False}, ["source_embed", "target_embed"], ["embed"]),
        ({"tie_output": False}, ["embed"], []),
        ({"positional": "learned"}, ["embed"], []),
        ({"layer_norm": "pre"}, ["embed"], []),
    ],
)
def test_option_parameters(changes, present, absent):
    c = config.preset("base").replace(**changes)
    params, _, logits = _shapes(c)
    assert all(k in params for k in present) and not any(k in params for k in absent)
    assert logits.shape[-1] == c.vocab_size
    if not c.tie_output:
        assert params["decoder"]["output"]["kernel"].shape == (c.d_model, c.vocab_size)
    if c.positional == "learned":
        assert params["encoder"]["embedder"]["positions"]["embedding"].shape == (
            c.max_len,
            c.d_model,
        )
    if c.layer_norm == "pre":
        assert "final_norm" in params["encoder"] and "final_norm" in params["decoder"]


def test_every_parameter_has_logical_axis_names():
    c = config.preset("tiny")
    x = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    variables = jax.eval_shape(lambda x: Transformer(c).init(jax.random.key(0), x, x), x)
    specs = nn.get_partition_spec(variables)["params"]
    params = nn.unbox(variables["params"])
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    for spec, leaf in zip(
        jax.tree_util.tree_leaves(specs, is_leaf=is_spec),
        jax.tree_util.tree_leaves(params),
        strict=True,
    ):
        assert len(spec) == len(leaf.shape)
        assert any(name is not None for name in spec)


# ----------------------------------------------------------------------------
# Numerics on the tiny model.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny):
    model = Transformer(tiny)
    x = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), x, x)["params"])
    forward = jax.jit(lambda p, x, y, **kw: model.apply({"params": p}, x, y, **kw))
    return model, params, forward


def test_sinusoids_follow_the_paper():
    pe = sinusoidal_positions(jnp.array([[0, 3]]), 8)[0]
    np.testing.assert_allclose(pe[0], [0, 1] * 4, atol=1e-7)
    i = np.arange(4)
    np.testing.assert_allclose(pe[1, 0::2], np.sin(3 / 10000 ** (2 * i / 8)), rtol=1e-5)
    np.testing.assert_allclose(pe[1, 1::2], np.cos(3 / 10000 ** (2 * i / 8)), rtol=1e-5)


def test_shift_right_restarts_each_packed_example():
    targets = jnp.array([[7, 8, 9, 5, 6, 0]])
    positions = jnp.array([[0, 1, 2, 0, 1, 0]])
    np.testing.assert_array_equal(shift_right(targets, positions), [[BOS_ID, 7, 8, BOS_ID, 5, 0]])


def test_source_padding_does_not_leak(tiny_model, make_tokens):
    _, params, forward = tiny_model
    x, y = make_tokens((2, 6)), make_tokens((2, 5))
    x = x.at[1, 4:].set(0)
    more_padding = jnp.pad(x, ((0, 0), (0, 5)))
    np.testing.assert_allclose(forward(params, x, y), forward(params, more_padding, y), atol=1e-5)


def test_target_padding_does_not_leak(tiny_model, make_tokens):
    _, params, forward = tiny_model
    x, y = make_tokens((2, 6)), make_tokens((2, 5))
    y = y.at[0, 3:].set(0)
    longer = forward(params, x, jnp.pad(y, ((0, 0), (0, 4))))
    np.testing.assert_allclose(forward(params, x, y)[0, :3], longer[0, :3], atol=1e-5)
    np.testing.assert_allclose(forward(params, x, y)[1], longer[1, :5], atol=1e-5)


def test_decoder_is_causal(tiny_model, make_tokens):
    _, params, forward = tiny_model
    x, y = make_tokens((1, 6)), make_tokens((1, 8))
    t = 4
    changed = y.at[0, t].set(y[0, t] % 500 + 5)
    before, after = forward(params, x, y), forward(params, x, changed)
    # Target t enters the decoder at position t + 1: outputs 0..t must not move.
    np.testing.assert_allclose(before[0, : t + 1], after[0, : t + 1], atol=1e-6)
    assert np.abs(before[0, t + 1 :] - after[0, t + 1 :]).max() > 1e-3


def test_packed_row_equals_separate_examples(tiny_model, make_tokens):
    _, params, forward = tiny_model
    x1, y1, x2, y2 = (
        make_tokens((1, 4)),
        make_tokens((1, 3)),
        make_tokens((1, 5)),
        make_tokens((1, 4)),
    )
    # One row holding both examples, then padding.
    x = jnp.concatenate([x1, x2, jnp.zeros((1, 2), jnp.int32)], axis=1)
    y = jnp.concatenate([y1, y2, jnp.zeros((1, 1), jnp.int32)], axis=1)
    x_seg = jnp.array([[1] * 4 + [2] * 5 + [0] * 2])
    y_seg = jnp.array([[1] * 3 + [2] * 4 + [0]])
    x_pos = jnp.array([list(range(4)) + list(range(5)) + [0, 0]])
    y_pos = jnp.array([list(range(3)) + list(range(4)) + [0]])
    packed = forward(
        params,
        x,
        y,
        inputs_positions=x_pos,
        targets_positions=y_pos,
        inputs_segmentation=x_seg,
        targets_segmentation=y_seg,
    )
    np.testing.assert_allclose(packed[0, :3], forward(params, x1, y1)[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:7], forward(params, x2, y2)[0], atol=1e-5)


def _step_by_step(model, params, x, y, beams):
    """Logits of teacher-forced decoding one position at a time with the cache."""
    encoded = model.apply({"params": params}, x, method=Transformer.encode)
    batch, length = y.shape[0] * beams, y.shape[1]
    _, cache = model.apply(
        {"params": params},
        encoded,
        batch,
        length + 3,
        method=Transformer.init_cache,
        mutable=["cache"],
    )
    step = jax.jit(
        lambda p, c, tok, t: model.apply(
            {"params": p, **c}, x, tok, t, method=Transformer.decode_step, mutable=["cache"]
        )
    )
    tokens = jnp.repeat(shift_right(y), beams, axis=0)  # hypotheses source-major
    outputs = []
    for t in range(length):
        logits, cache = step(params, cache, tokens[:, t : t + 1], t)
        outputs.append(logits)
    return jnp.concatenate(outputs, axis=1).reshape(y.shape[0], beams, length, -1)


@pytest.mark.parametrize(
    "changes",
    [
        {"layer_norm": "post"},
        {"layer_norm": "pre"},
        {"positional": "learned", "tie_output": False, "share_embeddings": False},
    ],
)
def test_cached_decoding_equals_full_forward(tiny, changes, make_tokens):
    c = tiny.replace(**changes)
    model = Transformer(c)
    x, y = make_tokens((2, 6)), make_tokens((2, 5))
    x = x.at[1, 4:].set(0)
    params = nn.unbox(model.init(jax.random.key(1), x, y)["params"])
    full = model.apply({"params": params}, x, y)
    stepped = _step_by_step(model, params, x, y, beams=3)
    for beam in range(3):  # every beam shares the one copy of the source keys/values
        np.testing.assert_allclose(stepped[:, beam], full, atol=2e-5)


def test_cached_decoding_bfloat16(tiny, make_tokens):
    c = tiny.replace(dtype="bfloat16")
    model = Transformer(c)
    x, y = make_tokens((2, 6)), make_tokens((2, 5))
    params = nn.unbox(model.init(jax.random.key(1), x, y)["params"])
    full = model.apply({"params": params}, x, y)
    assert full.dtype == jnp.float32
    stepped = _step_by_step(model, params, x, y, beams=1)[:, 0]
    np.testing.assert_allclose(stepped, full, atol=0.05)
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32


def test_dropout_is_active_only_in_training(make_tokens):
    c = config.preset("tiny").replace(dropout=0.3)
    model = Transformer(c)
    x, y = make_tokens((2, 6)), make_tokens((2, 5))
    params = nn.unbox(model.init(jax.random.key(0), x, y)["params"])

    def run(seed, deterministic):
        return model.apply(
            {"params": params},
            x,
            y,
            deterministic=deterministic,
            rngs={"dropout": jax.random.key(seed)},
        )

    np.testing.assert_array_equal(run(0, True), run(1, True))
    np.testing.assert_array_equal(run(0, False), run(0, False))
    assert np.abs(run(0, False) - run(1, False)).max() > 1e-3


def test_remat_gives_the_same_gradients(tiny, make_tokens):
    x, y = make_tokens((2, 6)), make_tokens((2, 5))
    params = nn.unbox(Transformer(tiny).init(jax.random.key(0), x, y)["params"])

    def loss(p, c):
        logits = Transformer(c).apply({"params": p}, x, y)
        return jax.nn.logsumexp(logits, axis=-1).mean()

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    plain = grad(params, tiny)
    remat = grad(params, tiny.replace(remat=True))
    for a, b in zip(
        jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)
