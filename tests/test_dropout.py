"""transformer.dropout: jax's Threefry bits and flax's Dropout, bit for bit, unrolled."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from transformer import dropout

KEYS = {
    "raw": jax.random.PRNGKey(0),
    "raw, large seed": jax.random.PRNGKey(2**31 + 12345),
    "typed": jax.random.key(7),
    "folded": jax.random.fold_in(jax.random.PRNGKey(3), 99),
}


@pytest.mark.parametrize("name", KEYS)
@pytest.mark.parametrize("shape", [(1,), (5, 7), (2, 3, 257), (4, 33, 64)])
def test_bits_and_masks_are_jaxs(name, shape):
    key = KEYS[name]
    bits = jax.jit(dropout.random_bits, static_argnums=1)(key, shape)
    np.testing.assert_array_equal(bits, jax.random.bits(key, shape, jnp.uint32))
    for p in (0.9, 0.5, 0.1):
        np.testing.assert_array_equal(
            dropout.bernoulli(key, p, shape), jax.random.bernoulli(key, p, shape)
        )


def test_bits_do_not_depend_on_the_sharding():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    key = jax.random.PRNGKey(11)
    sharded = jax.jit(lambda k: dropout.random_bits(k, (16, 10)), out_shardings=sharding)(key)
    assert len(sharded.addressable_shards) == 8
    np.testing.assert_array_equal(sharded, jax.random.bits(key, (16, 10), jnp.uint32))


def test_keys_of_another_generator_fall_back_to_jax():
    key = jax.random.key(5, impl="rbg")
    assert dropout.random_bits(key, (8, 8)) is None
    np.testing.assert_array_equal(
        dropout.bernoulli(key, 0.7, (8, 8)), jax.random.bernoulli(key, 0.7, (8, 8))
    )


def test_jaxs_original_threefry_falls_back_to_jax():
    key = jax.random.PRNGKey(3)
    with jax.threefry_partitionable(False):
        assert dropout.random_bits(key, (4, 5)) is None
        original = jax.random.bernoulli(key, 0.5, (4, 5))
        np.testing.assert_array_equal(dropout.bernoulli(key, 0.5, (4, 5)), original)
    assert not np.array_equal(original, jax.random.bernoulli(key, 0.5, (4, 5)))


class _Block(nn.Module):
    """Two auto-named dropouts, as model.py names its feed-forward one."""

    layer: type

    @nn.compact
    def __call__(self, x, deterministic):
        x = self.layer(0.1)(x, deterministic=deterministic)
        return self.layer(0.3)(jnp.tanh(x), deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
def test_dropout_is_flaxs_in_a_model(deterministic):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 9, 16))
    rngs = {"dropout": jax.random.PRNGKey(5)}
    ours = _Block(dropout.Dropout).apply({}, x, deterministic, rngs=rngs)
    flax_ = _Block(nn.Dropout).apply({}, x, deterministic, rngs=rngs)
    np.testing.assert_array_equal(ours, flax_)
    dropped = np.mean(np.asarray(ours) == 0)
    assert dropped == 0 if deterministic else 0.3 < dropped < 0.45  # 1 - 0.9 * 0.7 = 0.37


def test_rates_zero_and_one():
    x = jnp.ones((3, 5))
    rngs = {"dropout": jax.random.PRNGKey(0)}
    np.testing.assert_array_equal(dropout.Dropout(0.0).apply({}, x, False, rngs=rngs), x)
    np.testing.assert_array_equal(dropout.Dropout(1.0).apply({}, x, False, rngs=rngs), 0 * x)


def _hash_sizes(jaxpr) -> list[int]:
    """Output sizes of jax's own random bits (random_bits, threefry2x32) in a jaxpr and
    its sub-jaxprs."""
    sizes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("random_bits", "threefry2x32"):
            sizes.append(max(v.aval.size for v in eqn.outvars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    sizes += _hash_sizes(inner)
    return sizes


def test_the_models_masks_do_not_take_jaxs_bits(tiny):
    from transformer.model import Transformer

    rngs = {"dropout": jax.random.PRNGKey(1)}
    x = jnp.ones((2, 8, 16))
    flaxs = jax.make_jaxpr(lambda x: _Block(nn.Dropout).apply({}, x, False, rngs=rngs))(x)
    assert max(_hash_sizes(flaxs.jaxpr)) == x.size  # what the check finds in flax's

    model = Transformer(tiny.replace(dropout=0.1, relu_dropout=0.1, attention_dropout=0.1))
    tokens = jnp.ones((2, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens, tokens)["params"]

    def forward(params):
        return model.apply({"params": params}, tokens, tokens, deterministic=False, rngs=rngs)

    assert max(_hash_sizes(jax.make_jaxpr(forward)(params).jaxpr), default=0) <= 2
