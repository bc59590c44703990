"""Scaled dot-product attention against hand-computed values; masks; both paths."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import attention


def _one_hot_sentence(scale: float):
    """'I am a student': four tokens, one-hot embeddings times `scale`.

    With W_Q = W_K = identity, Q K^T = scale^2 * I: every token matches only
    itself. With d_k = 4 the paper's scale divides the logits by 2.
    """
    x = scale * jnp.eye(4)  # [T=4, d_model=4]
    return x.reshape(1, 4, 1, 4)  # [B, T, N, K]


def test_weights_match_hand_computation():
    q = k = _one_hot_sentence(2.0)
    weights = attention.dot_product_attention_weights(q, k, mask=None)[0, 0]
    # logits: 4 / sqrt(4) = 2 on the diagonal, 0 elsewhere.
    own = math.exp(2) / (math.exp(2) + 3)
    other = 1 / (math.exp(2) + 3)
    expected = np.full((4, 4), other)
    np.fill_diagonal(expected, own)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert own == pytest.approx(0.7112, abs=1e-4)


def test_scale_is_one_over_sqrt_dk():
    q = k = _one_hot_sentence(2.0)
    scaled = attention.dot_product_attention_weights(q, k, mask=None)[0, 0]
    unscaled = jax.nn.softmax(jnp.einsum("td,sd->ts", q[0, :, 0], k[0, :, 0]), axis=-1)
    # Without the scale the diagonal logit is 4 instead of 2: sharper weights.
    assert float(unscaled[0, 0]) == pytest.approx(math.exp(4) / (math.exp(4) + 3), rel=1e-6)
    assert float(scaled[0, 0]) < float(unscaled[0, 0]) - 0.2


def test_output_is_weighted_sum_of_values():
    q = k = _one_hot_sentence(2.0)
    values = jnp.arange(16.0).reshape(1, 4, 1, 4)
    out, weights = attention.dot_product_attention(q, k, values)
    expected = np.einsum("ts,sv->tv", np.asarray(weights[0, 0]), np.asarray(values[0, :, 0]))
    np.testing.assert_allclose(out[0, :, 0], expected, rtol=1e-6)


def test_masked_keys_get_zero_weight():
    q = k = _one_hot_sentence(2.0)
    mask = attention.padding_mask(jnp.array([[5, 6, 7, 0]]))  # last token is padding
    weights = attention.dot_product_attention_weights(q, k, mask)[0, 0]
    np.testing.assert_allclose(weights[:, 3], 0.0, atol=1e-12)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    own = math.exp(2) / (math.exp(2) + 2)  # only three keys left
    assert float(weights[0, 0]) == pytest.approx(own, rel=1e-6)


def test_fully_masked_row_is_finite():
    q = k = _one_hot_sentence(1.0)
    mask = jnp.zeros((1, 1, 4, 4), bool)
    weights = attention.dot_product_attention_weights(q, k, mask)
    assert np.isfinite(np.asarray(weights)).all()


def test_causal_mask():
    np.testing.assert_array_equal(attention.causal_mask(3)[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 1]])


def test_segment_mask():
    segments = jnp.array([[1, 1, 2, 0]])
    np.testing.assert_array_equal(
        attention.segment_mask(segments, segments)[0, 0],
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
    )


def test_combine_masks_ignores_none():
    a = jnp.array([True, False, True])
    b = jnp.array([True, True, False])
    np.testing.assert_array_equal(attention.combine_masks(a, None, b), [True, False, False])
    assert attention.combine_masks(None, None) is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_path_equals_explicit(dtype):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, s, 3, 8)), dtype) for s in (5, 7, 7))
    mask = attention.combine_masks(
        attention.padding_mask(jnp.array([[1] * 7, [1] * 4 + [0] * 3])),
        jnp.ones((1, 1, 5, 7), bool),
    )
    explicit, _ = attention.dot_product_attention(q, k, v, mask)
    fused = attention.fused_attention(q, k, v, mask)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(fused.astype(jnp.float32), explicit, atol=tol, rtol=tol)


def test_softmax_runs_in_float32_for_bfloat16_inputs():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.bfloat16) for _ in range(2))
    assert attention.dot_product_attention_weights(q, k, None).dtype == jnp.float32


@pytest.mark.parametrize("width", [1, 3])
def test_cached_attention_over_a_prefix_equals_the_whole_cache(width):
    """A search reads only the shortest prefix of the cache holding the step:
    the same output as reading it all, and entries past that prefix are not
    read at all (NaN there reaches the whole-cache output through 0 * NaN)."""
    sources, heads, size, length, parts = 2, 2, 4, 11, 3
    keys = jax.random.split(jax.random.key(0), 4)
    query = jax.random.normal(keys[0], (sources * width, 1, heads, size))
    key_shape = (size, length * width) if attention.keys_transposed(width) else (length, size)
    key = jax.random.normal(keys[1], (sources, heads, *key_shape))
    value = jax.random.normal(keys[2], (sources, heads, length * width, size))
    lineage = jax.random.randint(keys[3], (sources, width, length), 0, width)
    # prefixes of ceil(11/3) = 4, ceil(22/3) = 8 and 11 positions
    value = value.at[:, :, 8 * width :].set(jnp.nan)
    attend = jax.jit(attention.cached_self_attention, static_argnums=5)
    for step in range(8):
        whole, weights = attend(query, key, value, lineage, jnp.int32(step), 1)
        prefix, none = attend(query, key, value, lineage, jnp.int32(step), parts)
        assert none is None and weights.shape == (sources, heads, width, length * width)
        assert bool(jnp.isnan(whole).all()) and bool(jnp.isfinite(prefix).all())
    clean = jnp.nan_to_num(value, nan=0.5)
    for step in range(length):
        whole, _ = attend(query, key, clean, lineage, jnp.int32(step), 1)
        prefix, _ = attend(query, key, clean, lineage, jnp.int32(step), parts)
        np.testing.assert_allclose(prefix, whole, rtol=1e-5, atol=1e-6)
