"""transformer/matmul.py: values and gradients in float32 and bfloat16, and the
layout of the output layer's weight gradient."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.matmul import matmul

# The model's contractions, with small shapes of distinct sizes.
EQUATIONS = {
    "BTD,VD->BTV": ((2, 3, 8), (11, 8)),  # tied output layer
    "BTD,DV->BTV": ((2, 3, 8), (8, 11)),  # untied output layer
    "BLD,DNH->BLNH": ((2, 5, 8), (8, 3, 4)),  # query/key/value projections
    "BTNV,NVD->BTD": ((2, 5, 3, 4), (3, 4, 8)),  # attention output projection
    "BNTK,BNSK->BNTS": ((2, 3, 5, 4), (2, 3, 7, 4)),  # attention logits
    "BNTS,BNSV->BNTV": ((2, 3, 5, 7), (2, 3, 7, 4)),  # attention-weighted values
    # Axis names that the merged batch-and-length axis of a weight gradient must avoid.
    "BZD,DNz->BZNz": ((2, 5, 8), (8, 3, 4)),
}


def _operands(equation):
    x_shape, y_shape = EQUATIONS[equation]
    kx, ky, kg = jax.random.split(jax.random.key(len(equation)), 3)
    x, y = jax.random.normal(kx, x_shape), jax.random.normal(ky, y_shape)
    out_shape = jnp.einsum(equation, x, y).shape
    return x, y, jax.random.normal(kg, out_shape)


def _value_and_grads(fn, x, y, cotangent):
    out, vjp = jax.vjp(fn, x, y)
    return (out, *vjp(cotangent))


@pytest.mark.parametrize("equation", sorted(EQUATIONS))
def test_float32_matmul_and_its_gradients_equal_einsum(equation):
    x, y, cotangent = _operands(equation)
    ours = _value_and_grads(lambda a, b: matmul(equation, a, b, jnp.float32), x, y, cotangent)
    plain = _value_and_grads(lambda a, b: jnp.einsum(equation, a, b), x, y, cotangent)
    for got, expected in zip(ours, plain, strict=True):
        assert got.shape == expected.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation", sorted(EQUATIONS))
def test_bfloat16_matmul_rounds_inputs_and_accumulates_in_float32(equation):
    x, y, cotangent = _operands(equation)
    ours = _value_and_grads(lambda a, b: matmul(equation, a, b, jnp.bfloat16), x, y, cotangent)
    # The reference: float32 arithmetic on the bfloat16-rounded operands and
    # incoming gradient, the gradients returned in float32.
    bf = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
    out, vjp = jax.vjp(lambda a, b: jnp.einsum(equation, a, b), bf(x), bf(y))
    expected = (out, *vjp(bf(cotangent)))
    for got, want in zip(ours, expected, strict=True):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Rounding is real: the float32 result differs.
    assert not np.allclose(ours[0], jnp.einsum(equation, x, y), rtol=1e-6, atol=1e-6)


def test_the_output_layers_weight_gradient_never_transposes_the_logits_gradient():
    """The [B*T, V] logits gradient is the largest array of a training step;
    transposing it to [V, B*T] for the weight gradient cost 10% of the CPU demo's
    step. Only the small [B*T, D] activations may be transposed."""
    batch, length, d_model, vocab = 4, 24, 16, 40
    x, table = jnp.ones((batch, length, d_model)), jnp.ones((vocab, d_model))
    transposed = re.compile(rf"f32\[({vocab},{batch * length}|{vocab},{batch},{length})\]")

    def transposes(attend):
        loss = lambda a, b: jnp.sum(jax.nn.log_softmax(attend(a, b)))  # noqa: E731
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, table).compile().as_text()
        return [line for line in hlo.splitlines() if transposed.search(line)]

    assert transposes(lambda a, b: jnp.einsum("BTD,VD->BTV", a, b))  # what XLA does by default
    assert transposes(lambda a, b: matmul("BTD,VD->BTV", a, b, jnp.float32)) == []


def test_weight_gradients_read_both_operands_in_place():
    """A weight gradient contracts the batch and length axes of the activations
    [B, L, D] and of the output gradient [B, L, F]. Left as a 3-D contraction,
    XLA:CPU first copies one of them into a [D or F, B*L] layout, for every
    matmul of the model at every step."""
    batch, length, d_model, d_ff = 4, 24, 16, 40
    x, kernel = jnp.ones((batch, length, d_model)), jnp.ones((d_model, d_ff))
    transposed = re.compile(rf"f32\[({d_model}|{d_ff}),({batch * length}|{batch},{length})\]")

    def transposes(project):
        loss = lambda a, b: jnp.sum(project(a, b) ** 2)  # noqa: E731
        hlo = jax.jit(jax.grad(loss, argnums=1)).lower(x, kernel).compile().as_text()
        return [line for line in hlo.splitlines() if transposed.search(line)]

    assert transposes(lambda a, b: jnp.einsum("BLD,DF->BLF", a, b))  # what XLA does by default
    assert transposes(lambda a, b: matmul("BLD,DF->BLF", a, b, jnp.float32)) == []
