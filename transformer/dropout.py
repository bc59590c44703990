"""Dropout with flax's masks, drawn four times faster on CPU.

`Dropout` is `flax.linen.Dropout` (same rng stream, same masks, same outputs,
bit for bit) with one change: the random bits. jax lowers its Threefry hash to
a rolled loop of five passes over the whole mask on CPU (to compile faster) and
unrolls it on every other platform. On CPU the rolled loop is memory-bound: a
[32, 128, 256] mask took 4.5-4.8 ms against 1.0-1.2 ms unrolled, the same bits.
Here the hash is written in `lax` ops, unrolled, so XLA fuses it with the mask
into one vectorised loop on every platform. The bits are those of
`jax.random.bits(key, shape)` with jax's default (partitionable) Threefry: they
do not depend on how the array is sharded, so a run resumed on another mesh
draws the same masks. Keys of any other generator fall back to
`jax.random.bernoulli`.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's, 20 rounds


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return lax.shift_left(x, np.uint32(bits)) | lax.shift_right_logical(x, np.uint32(32 - bits))


def threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (Salmon et al., 2011) of the counters (x0, x1) under key uint32[2];
    the counters broadcast against each other."""
    ks = (key[0], key[1], key[0] ^ key[1] ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for block in range(5):
        for rotation in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, rotation) ^ x0
        x0 = x0 + ks[(block + 1) % 3]
        x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _threefry_key_data(key: jax.Array) -> jax.Array | None:
    """The key's uint32[2] if jax would draw its bits with partitionable Threefry."""
    if not getattr(jax.config, "jax_threefry_partitionable", True):
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        return jax.random.key_data(key)
    default = getattr(jax.config, "jax_default_prng_impl", "threefry2x32")
    if default != "threefry2x32" or key.shape != (2,):
        return None
    return key


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array | None:
    """jax.random.bits(key, shape) (uint32) for a Threefry key; None for other keys."""
    data = _threefry_key_data(key)
    if data is None or math.prod(shape) >= 2**32:
        return None
    # The element's row-major index as the counter, as jax counts (its high word is 0
    # below 2**32 elements); a sum of iotas, which the SPMD partitioner can split.
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
        stride *= shape[axis]
    x0, x1 = threefry2x32(data.astype(jnp.uint32), np.uint32(0), index)
    return x0 ^ x1


def bernoulli(key: jax.Array, p: float, shape: tuple[int, ...]) -> jax.Array:
    """jax.random.bernoulli(key, p, shape), bit for bit, with the unrolled hash."""
    bits = random_bits(key, shape)
    if bits is None:
        return jax.random.bernoulli(key, p, shape)
    # jax.random.uniform's float32 in [0, 1): 23 random mantissa bits under exponent 0.
    mantissa = lax.shift_right_logical(bits, np.uint32(9)) | np.uint32(0x3F800000)
    uniform = lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    return uniform < np.float32(p)


class Dropout(nn.Module):
    """flax.linen.Dropout without broadcast dims; masks from `bernoulli` above.

    The class keeps flax's name so that auto-named instances (`Dropout_0`) draw
    from the same rng stream as flax's.
    """

    rate: float

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        mask = bernoulli(self.make_rng("dropout"), keep_prob, inputs.shape)
        return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
