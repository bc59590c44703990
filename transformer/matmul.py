"""Mixed-precision matmul: inputs in the compute dtype, accumulation and output in float32.

`matmul("BLD,DF->BLF", x, w, jnp.bfloat16)` multiplies bfloat16 copies of x
and w and returns float32. Its gradient does the same: JAX's own transpose of
a mixed-dtype einsum upcasts both operands to float32, which on hardware with
fast bfloat16 units (TPU, GPU, CPUs with AVX-512 BF16) runs the two backward
matmuls - two thirds of the training FLOPs - at float32 speed. Here the
incoming gradient is rounded to bfloat16 instead, and each operand's gradient
is accumulated in float32 and returned in that operand's own dtype (float32
for parameters: no rounding of weight gradients). The residuals kept for the
backward pass are the bfloat16 copies, which also halves their memory.
"""

from __future__ import annotations

import functools
import math
import string

import jax
import jax.numpy as jnp


def _transposed(equation: str) -> tuple[str, str]:
    """'ab,bc->ac' -> ('ac,bc->ab', 'ab,ac->bc'): the equations of both operand gradients.

    Valid when every index appears in exactly two of the three terms, as in
    all of the model's contractions.
    """
    inputs, out = equation.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    return f"{out},{rhs}->{lhs}", f"{lhs},{out}->{rhs}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _low_precision_einsum(equation: str, x: jax.Array, y: jax.Array, dtype) -> jax.Array:
    return jnp.einsum(
        equation, x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32
    )


def _forward(equation, x, y, dtype):
    x_low, y_low = x.astype(dtype), y.astype(dtype)
    out = jnp.einsum(equation, x_low, y_low, preferred_element_type=jnp.float32)
    # The zero-size arrays only carry the operands' dtypes to the backward pass.
    return out, (x_low, y_low, jnp.zeros((0,), x.dtype), jnp.zeros((0,), y.dtype))


def _einsum_in_natural_order(equation: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum(equation, a, b), computed with the output in the order a dot writes it.

    A dot writes [shared batch indices, a's free indices, b's free indices].
    Asking einsum for another order makes XLA:CPU transpose an *operand*
    instead of the small result. For the tied output layer's weight gradient
    ('BTD,BTV->VD') that operand is the [B*T, V] logits gradient, the largest
    array of the step, copied with strides (docs/performance.md).
    """
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    if a.dtype != jnp.float32:
        # XLA:CPU's DotThunk has no bf16 x bf16 -> f32 kernel for some of the
        # reordered dots (seen in the model's remat backward); keep einsum's order.
        return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)
    natural = "".join(
        [i for i in lhs if i in rhs and i in out]
        + [i for i in lhs if i not in rhs and i in out]
        + [i for i in rhs if i not in lhs and i in out]
    )
    result = jnp.einsum(f"{lhs},{rhs}->{natural}", a, b, preferred_element_type=jnp.float32)
    return result.transpose([natural.index(i) for i in out])


def _merge_contracted_prefix(equation: str, a: jax.Array, b: jax.Array):
    """'BTD,BTF->DF' on a [B, T, D], b [B, T, F] -> ('ZD,ZF->DF', a [B*T, D], b [B*T, F]).

    A weight gradient contracts the leading batch and length axes of both
    operands. As a 3-D contraction, XLA:CPU first copies each operand into a
    [D, B*T] layout; merged into one leading axis, the same dot reads both in
    place (a matrix product with the first operand transposed). Equations
    without such a shared contracted prefix are returned unchanged.
    """
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    k = 0
    while k < min(len(lhs), len(rhs)) and lhs[k] == rhs[k] and lhs[k] not in out:
        k += 1
    # As in _einsum_in_natural_order: XLA:CPU's DotThunk has no bf16 x bf16 -> f32
    # kernel for a dot whose first operand is transposed.
    if k < 2 or a.shape[:k] != b.shape[:k] or a.dtype != jnp.float32:
        return equation, a, b
    merged = next(c for c in string.ascii_uppercase + string.ascii_lowercase if c not in equation)
    rows = math.prod(a.shape[:k])
    return (
        f"{merged}{lhs[k:]},{merged}{rhs[k:]}->{out}",
        a.reshape(rows, *a.shape[k:]),
        b.reshape(rows, *b.shape[k:]),
    )


def _backward(equation, dtype, residuals, grad):
    x_low, y_low, x_kind, y_kind = residuals
    grad_x_eq, grad_y_eq = _transposed(equation)
    grad = grad.astype(dtype)
    grad_x = _einsum_in_natural_order(grad_x_eq, grad, y_low)
    grad_y = _einsum_in_natural_order(*_merge_contracted_prefix(grad_y_eq, x_low, grad))
    return grad_x.astype(x_kind.dtype), grad_y.astype(y_kind.dtype)


_low_precision_einsum.defvjp(_forward, _backward)


def matmul(equation: str, x: jax.Array, y: jax.Array, dtype) -> jax.Array:
    """einsum(equation, x, y) computed in `dtype`, accumulated and returned in float32."""
    return _low_precision_einsum(equation, x, y, jnp.dtype(dtype))
