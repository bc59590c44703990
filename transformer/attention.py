"""Attention (paper section 3.2): masks, scaled dot-product, multi-head, KV cache.

Shapes: B batch, T query length, S key/value length, N heads, K query/key size
per head, V value size per head, D model width.

Masks are boolean, True where attention is allowed, shaped to broadcast
against the [B, N, T, S] logits (usually [B, 1, T, S] or [B, 1, 1, S]).

Decoding with a cache (see `MultiHeadAttention.init_cache`):
  * self-attention keeps keys/values for every output position and writes
    one position per step, into the row of the hypothesis that computed it.
    Beam search never moves them: a lineage table says in which beam's row
    each hypothesis finds its entry of each position, and a reordering of the
    beams gathers that table only. The W hypotheses of a sentence attend to
    the W*L entries of its rows, masked to their own history
    (`cached_self_attention`): W times the logits of one position, small
    beside the projections, and no copy of the cache. A beam search reads
    only the prefix of the cache that holds the current position, one of a
    few lengths chosen by `lax.switch` (`prefix_parts`). With beams (W > 1) the
    keys are kept transposed, [B, N, K, L*W], the layout in which XLA:CPU
    multiplies the W queries of a sentence by them fastest (7x at the demo's
    beam of 8); with one hypothesis a row (greedy decoding, samples), as the
    values are, [B, N, L, K]: the product is as fast either way, and a
    position's keys are then written contiguously instead of one element per
    memory line (docs/performance.md);
  * cross-attention keys/values are projected once per source sentence and
    kept at the source batch size. Beam search runs W hypotheses per source:
    their queries [B*W, 1, N, K] are regrouped to [B, W, N, K] so that all
    beams of a sentence attend to the one copy of its keys/values.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer.config import ModelConfig
from transformer.dropout import Dropout
from transformer.matmul import matmul

PARTS = 4  # prefix lengths a beam search's self-attention chooses from (prefix_parts)
_NEG_INF = -1e10  # large and finite: a fully masked row gives uniform weights, not NaN


# ----------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------


def padding_mask(kv_tokens: jax.Array) -> jax.Array:
    """[B, S] token ids -> [B, 1, 1, S]: keys that are not padding (id 0)."""
    return (kv_tokens != 0)[:, None, None, :]


def causal_mask(length: int) -> jax.Array:
    """[1, 1, T, T]: query t may attend to keys 0..t."""
    return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array) -> jax.Array:
    """[B, T] and [B, S] segment ids of packed rows -> [B, 1, T, S]: same example."""
    return (q_segments[:, :, None] == kv_segments[:, None, :])[:, None]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the masks that are not None (broadcasting)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    return functools.reduce(jnp.logical_and, masks)


# ----------------------------------------------------------------------------
# Scaled dot-product attention
# ----------------------------------------------------------------------------


def dot_product_attention_weights(
    query: jax.Array,
    key: jax.Array,
    mask: jax.Array | None,
    *,
    heads_major: bool = False,
    transposed_keys: bool = False,
) -> jax.Array:
    """softmax(Q K^T / sqrt(d_k)), in float32 whatever the input dtype.

    query [B, T, N, K], key [B, S, N, K] ([B, N, S, K] if heads_major,
    [B, N, K, S] if transposed_keys), mask [B|1, 1|N, T|1, S] -> [B, N, T, S].
    """
    query = query * jnp.asarray(1.0 / math.sqrt(query.shape[-1]), query.dtype)
    # Heads-major operands make both this matmul and its gradients plain batched
    # matmuls, which every backend runs in the compute dtype.
    query = query.transpose(0, 2, 1, 3)  # [B, N, T, K]
    if transposed_keys:
        logits = matmul("BNTK,BNKS->BNTS", query, key, query.dtype)
    else:
        key = key if heads_major else key.transpose(0, 2, 1, 3)  # [B, N, S, K]
        logits = matmul("BNTK,BNSK->BNTS", query, key, query.dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, _NEG_INF)
    return jax.nn.softmax(logits, axis=-1)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout: nn.Module | None = None,
    deterministic: bool = True,
    heads_major: bool = False,
    transposed_keys: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, returning the weights too.

    query [B, T, N, K], key [B, S, N, K], value [B, S, N, V] (with heads_major:
    key [B, N, S, K], value [B, N, S, V], as the decoding cache holds them;
    transposed_keys: key [B, N, K, S], as it holds them for beams)
    -> output [B, T, N, V] (float32), weights [B, N, T, S] (float32).
    `dropout`, if given, is applied to the weights (attention dropout).
    """
    weights = dot_product_attention_weights(
        query, key, mask, heads_major=heads_major, transposed_keys=transposed_keys
    )
    dropped = weights if dropout is None else dropout(weights, deterministic=deterministic)
    value = value if heads_major else value.transpose(0, 2, 1, 3)  # [B, N, S, V]
    out = matmul("BNTS,BNSV->BNTV", dropped, value, value.dtype)
    return out.transpose(0, 2, 1, 3), weights  # [B, T, N, V]


def lineage_mask(lineage: jax.Array, step: jax.Array) -> jax.Array:
    """Which cached entries each hypothesis of a sentence attends to at `step`.

    lineage [B, W, L]: lineage[b, i, l] is the beam j of sentence b whose row
    holds hypothesis i's key/value of position l. -> [B, 1, W, L*W], against
    the sentence's entries laid out [L*W] position-major (entry l*W + j is
    position l of beam j's row): at each position up to `step`, the one entry
    of the hypothesis's own history.
    """
    beams = jnp.arange(lineage.shape[1])
    own = lineage[:, :, :, None] == beams  # [B, W(i), L, W(j)]
    own = own & (jnp.arange(lineage.shape[2]) <= step)[:, None]
    return own.reshape(lineage.shape[0], 1, lineage.shape[1], -1)


def keys_transposed(width: int) -> bool:
    """Whether the decoding cache of W hypotheses a sentence keeps its keys
    transposed: self-attention [B, N, K, L*W] and cross-attention [B, N, K, S]
    for beams; [B, N, L, K] and [B, N, S, K] with one hypothesis a row. The W
    queries of a sentence are multiplied by transposed keys fastest; one query
    by keys as projected (XLA:CPU, docs/performance.md)."""
    return width > 1


def prefix_parts(width: int, length: int) -> int:
    """Into how many prefix lengths `cached_self_attention` cuts the cache of
    W hypotheses a sentence over `length` positions: one per 4 positions, at
    most PARTS (each is compiled). With one hypothesis a row (greedy decoding,
    samples) the whole cache is read: there the switch cost more than it saved
    (docs/performance.md)."""
    return 1 if width == 1 else max(1, min(PARTS, length // 4))


def cached_self_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    lineage: jax.Array,
    step: jax.Array,
    parts: int = 1,
) -> tuple[jax.Array, jax.Array | None]:
    """One decoding position of self-attention over the cache, read in place.

    query [B*W, 1, N, K]; the cache as `MultiHeadAttention.init_cache` lays it
    out, key [B, N, K, L*W] (W > 1; [B, N, L, K] for W = 1, see
    `keys_transposed`) and value [B, N, L*W, V] (position-major: entry l*W + j
    is position l of beam j's row); lineage [B, W, L].
    -> output [B*W, 1, N, V], weights [B, N, W, L*W] (both float32).

    With `parts` > 1 only a prefix of the cache is read: the shortest of
    `parts` lengths (L/parts, 2L/parts, ..., L, rounded up) that holds `step`,
    chosen by `lax.switch`. The positions past `step` are masked anyway, and
    reading the whole cache at every position is what a long search spends
    most on besides its matmuls: the weights are then not returned (None).
    """
    sources, width, length = lineage.shape
    heads = key.shape[1]
    query = query.reshape(sources, width, heads, -1).transpose(0, 2, 1, 3)  # [B, N, W, K]
    query = query * jnp.asarray(1.0 / math.sqrt(query.shape[-1]), query.dtype)
    transposed = keys_transposed(width)
    scores = "BNTK,BNKS->BNTS" if transposed else "BNTK,BNSK->BNTS"

    def attend(positions: int) -> tuple[jax.Array, jax.Array]:
        entries = positions * width
        keys = key[..., :entries] if transposed else key[:, :, :entries]
        logits = matmul(scores, query, keys, query.dtype)
        mask = lineage_mask(lineage[:, :, :positions], step)
        weights = jax.nn.softmax(jnp.where(mask, logits, _NEG_INF), axis=-1)
        out = matmul("BNTS,BNSV->BNTV", weights, value[:, :, :entries], value.dtype)
        return out.transpose(0, 2, 1, 3).reshape(sources * width, 1, heads, -1), weights

    if parts <= 1:
        return attend(length)
    lengths = sorted({-(-length * part // parts) for part in range(1, parts + 1)})
    index = jnp.searchsorted(jnp.asarray(lengths), step, side="right")  # first length > step
    branches = [functools.partial(lambda n: attend(n)[0], n) for n in lengths]
    return jax.lax.switch(index, branches), None


def fused_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """The same computation through jax.nn.dot_product_attention (on GPU).

    With no `implementation` named, jax (0.10) lowers it to XLA's own attention
    on every backend; cuDNN's fused kernel is used only when named, which needs
    a GPU to be measured and checked (packed rows' masks included) and has not
    been. It needs d_k == d_v and cannot return weights or apply attention dropout.
    """
    if mask is not None:
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (query.shape[1], key.shape[1]))
    return jax.nn.dot_product_attention(query, key, value, mask=mask)  # [B, T, N, V]


# ----------------------------------------------------------------------------
# Projections
# ----------------------------------------------------------------------------


def _glorot(in_axis, out_axis):
    return nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis
    )


class HeadsProjection(nn.Module):
    """x [B, L, D] -> [B, L, N, H]: one linear map per head, with bias."""

    num_heads: int
    head_size: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.num_heads, self.head_size)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_glorot(0, (1, 2)), ("embed", "heads", "kv")),
            shape,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv")), shape[1:]
        )
        return matmul("BLD,DNH->BLNH", x, kernel, self.dtype) + bias  # [B, L, N, H]


class OutputProjection(nn.Module):
    """Concatenated heads [B, T, N, V] -> [B, T, D] (W^O, with bias)."""

    d_model: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-2], x.shape[-1], self.d_model)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_glorot((0, 1), 2), ("heads", "kv", "embed")),
            shape,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (self.d_model,)
        )
        return matmul("BTNV,NVD->BTD", x, kernel, self.dtype) + bias  # [B, T, D]


# ----------------------------------------------------------------------------
# Multi-head attention
# ----------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, ...).

    `is_self_attention` decides what the decoding cache holds: growing keys and
    values of the outputs so far (self), or the projected source (cross).

    Attention weights are recorded with `sow('intermediates', 'attention_weights')`
    whenever the caller makes the 'intermediates' collection mutable; otherwise
    the fused path is used where it applies.
    """

    config: ModelConfig
    is_self_attention: bool

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        self.query = HeadsProjection(c.num_heads, c.d_k, dtype)
        self.key = HeadsProjection(c.num_heads, c.d_k, dtype)
        self.value = HeadsProjection(c.num_heads, c.d_v, dtype)
        self.out = OutputProjection(c.d_model, dtype)
        self.dropout = Dropout(c.attention_dropout)

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None,
        mask: jax.Array | None,
        *,
        deterministic: bool = True,
        decode_step: jax.Array | None = None,
    ) -> jax.Array:
        """inputs_q [B, T, D], inputs_kv [B, S, D] -> [B, T, D].

        Self-attention ignores `inputs_kv`. With `decode_step` (a scalar: the
        position of the single query, T = 1) keys and values come from the
        cache made by `init_cache`; the self-attention cache is updated in place.
        """
        dtype = jnp.dtype(self.config.dtype)
        query = self.query(inputs_q).astype(dtype)  # [B, T, N, K]
        if self.is_self_attention and decode_step is not None:
            # Decoding passes no self-attention mask: the lineage is the mask.
            key, value, lineage = self._write_cache(inputs_q, decode_step)
            # Attention maps need the weights over the whole cache; a search reads
            # only the prefix that holds `decode_step`.
            maps = self.is_mutable_collection("intermediates")
            parts = 1 if maps else prefix_parts(*lineage.shape[1:])
            out, weights = cached_self_attention(query, key, value, lineage, decode_step, parts)
            if maps:
                self.sow("intermediates", "attention_weights", weights)
            return self.out(out)
        if self.is_self_attention:
            key = self.key(inputs_q).astype(dtype)
            value = self.value(inputs_q).astype(dtype)
        elif decode_step is not None:
            key = self.get_variable("cache", "key")  # heads-major: see init_cache
            value = self.get_variable("cache", "value")
            transposed = keys_transposed(query.shape[0] // key.shape[0])
            out = self._attend(
                query, key, value, mask, deterministic, heads_major=True,
                transposed_keys=transposed,
            )  # fmt: skip
            return self.out(out)
        else:
            key = self.key(inputs_kv).astype(dtype)
            value = self.value(inputs_kv).astype(dtype)
        out = self._attend(query, key, value, mask, deterministic)  # [B, T, N, V]
        return self.out(out)

    def _write_cache(self, inputs, decode_step):
        """Writes this position's keys/values into each hypothesis's own row."""
        dtype = jnp.dtype(self.config.dtype)
        lineage = self.get_variable("cache", "lineage")  # [B, W, L]
        sources, width, length = lineage.shape
        cached = {}
        # Keys [B, N, K, L*W] (transposed, W > 1), values [B, N, L*W, V]: see init_cache.
        key_axis = 3 if keys_transposed(width) else 2
        for name, projection, axis in (("key", self.key, key_axis), ("value", self.value, 2)):
            new = projection(inputs).astype(dtype)  # [B*W, 1, N, K]
            new = new.reshape(sources, width, *new.shape[2:]).transpose(0, 2, 1, 3)  # [B,N,W,K]
            if axis == 3:
                new = new.transpose(0, 1, 3, 2)  # [B, N, K, W]
            entries = self.get_variable("cache", name)
            shape = entries.shape
            # L*W viewed as [L, W] (a free reshape): one in-place write of all W
            # beams, side by side in memory.
            entries = entries.reshape(*shape[:axis], length, width, *shape[axis + 1 :])
            new = jnp.expand_dims(new, axis)
            entries = jax.lax.dynamic_update_slice_in_dim(entries, new, decode_step, axis=axis)
            cached[name] = entries.reshape(shape)
        own = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[:, None], (sources, width, 1))
        cached["lineage"] = jax.lax.dynamic_update_slice_in_dim(lineage, own, decode_step, axis=2)
        for name, array in cached.items():
            self.put_variable("cache", name, array)
        return cached["key"], cached["value"], cached["lineage"]

    def _attend(
        self, query, key, value, mask, deterministic, heads_major=False, transposed_keys=False
    ):
        """Queries of a batch that is a multiple of the keys' batch share keys by group."""
        batch, length = query.shape[:2]
        group = batch // key.shape[0]
        query = query.reshape(key.shape[0], group * length, *query.shape[2:])
        needs_weights = self.is_mutable_collection("intermediates")
        uses_dropout = self.config.attention_dropout > 0 and not deterministic
        # jax's attention on GPU only (see fused_attention); elsewhere our einsums,
        # which keep the backward matmuls in the compute dtype (transformer/matmul.py).
        fused = jax.default_backend() == "gpu" and key.shape[-1] == value.shape[-1]
        if needs_weights or uses_dropout or heads_major or not fused:
            out, weights = dot_product_attention(
                query, key, value, mask, dropout=self.dropout, deterministic=deterministic,
                heads_major=heads_major, transposed_keys=transposed_keys,
            )  # fmt: skip
            self.sow("intermediates", "attention_weights", weights)
        else:
            out = fused_attention(query, key, value, mask)
        return out.reshape(batch, length, *out.shape[2:])  # [B, T, N, V]

    def init_cache(self, batch: int, length: int, encoded: jax.Array | None = None) -> None:
        """Creates the decoding cache.

        Self-attention: zero keys [B_src, N, K, L*W] ([B_src, N, L, K] when W
        = 1) and values [B_src, N, L*W, V] for `batch` = B_src * W hypotheses of `length`
        steps, and their lineage [B_src, W, L] (only the batch size of
        `encoded` is used). Cross-attention: the source's keys/values,
        projected once from `encoded` [B_src, S, D]; `batch` may be any
        multiple of B_src. Both are stored heads-major, [B_src, N, S, K|V], the
        layout the attention's batched matmuls read: stored as projected, [B_src,
        S, N, K|V], they would be transposed again at every decoding step. With
        beams the keys are transposed, [B_src, N, K, S] (`keys_transposed`).
        """
        c = self.config
        dtype = jnp.dtype(c.dtype)
        if self.is_self_attention:
            # Hypotheses are source-major, W per sentence. Heads-major, so that
            # a sentence's L*W entries are one matrix per head.
            sources = batch if encoded is None else encoded.shape[0]
            width = batch // sources
            # With beams, the keys transposed, [B_src, N, K, L*W]: the layout the W
            # queries of a sentence are multiplied by fastest (XLA:CPU: 7x at W = 8,
            # K = 48). With one hypothesis a row, [B, N, L, K]: see keys_transposed.
            key_shape = (c.d_k, width * length) if keys_transposed(width) else (length, c.d_k)
            key = jnp.zeros((sources, c.num_heads, *key_shape), dtype)
            value = jnp.zeros((sources, c.num_heads, width * length, c.d_v), dtype)
            # Each hypothesis starts with its own row at every position.
            own = jnp.arange(width, dtype=jnp.int32)[None, :, None]
            self.put_variable("cache", "lineage", jnp.broadcast_to(own, (sources, width, length)))
        else:
            transposed = keys_transposed(batch // encoded.shape[0])
            key = self.key(encoded).astype(dtype)  # [B_src, S, N, K]
            key = key.transpose(0, 2, 3, 1) if transposed else key.transpose(0, 2, 1, 3)
            value = self.value(encoded).astype(dtype).transpose(0, 2, 1, 3)
        self.put_variable("cache", "key", key)
        self.put_variable("cache", "value", value)
