"""Test session setup: 8 forced CPU devices (for the sharding tests), CPU only.

XLA_FLAGS must be set before jax is first imported, which is why it lives here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from transformer import config  # noqa: E402


@pytest.fixture(scope="session")
def tiny() -> config.ModelConfig:
    """The tiny preset in float32 without dropout: numeric tests compare exactly."""
    return config.preset("tiny").replace(dropout=0.0)


@pytest.fixture
def make_tokens():
    """make_tokens(shape, vocab_size=512): random ids avoiding the special ids 0..3."""
    rng = np.random.default_rng(0)

    def make(shape, vocab_size: int = 512) -> jax.Array:
        return jax.numpy.asarray(rng.integers(4, vocab_size, shape), jax.numpy.int32)

    return make
