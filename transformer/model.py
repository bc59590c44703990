"""The Transformer (paper section 3): embeddings, positions, encoder and decoder.

Shapes: B batch, S source length, T target length, D model width, F feed-forward
width, V vocabulary size, L length of the decoding cache.

Inputs are token ids with 0 as padding. Packed rows (several examples in one
row) carry segment ids (1, 2, ... per example, 0 on padding) and positions
(restarting at 0 for each example); unpacked rows need neither.

Parameters are float32 and carry logical axis names (vocab, embed, heads, kv,
mlp); activations are constrained to (batch, length, ...) names. Matmuls take
their inputs in `config.dtype` and accumulate in float32; layer norms, softmax
and logits are float32.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer.attention import (
    MultiHeadAttention,
    causal_mask,
    combine_masks,
    padding_mask,
    segment_mask,
)
from transformer.config import BOS_ID, ModelConfig
from transformer.dropout import Dropout
from transformer.matmul import matmul

EMBED = ("batch", "length", "embed")


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def sinusoidal_positions(positions: jax.Array, d_model: int) -> jax.Array:
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(same); [B, L] -> [B, L, D]."""
    inv_freq = np.exp(-math.log(10000.0) * np.arange(0, d_model, 2) / d_model)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, D/2]
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, L, D/2, 2]
    return pe.reshape(*positions.shape, -1)[..., :d_model]


def default_positions(tokens: jax.Array) -> jax.Array:
    """0, 1, 2, ... along each row: the positions of an unpacked batch."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)


def shift_right(targets: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Decoder inputs: BOS then the targets moved one step right.

    Each packed example starts again with BOS (where its position is 0);
    padding stays padding. [B, T] -> [B, T].
    """
    shifted = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    if positions is None:
        positions = default_positions(targets)
    shifted = jnp.where(positions == 0, BOS_ID, shifted)
    return jnp.where(targets == 0, 0, shifted)


def _partitioned(init, names):
    return nn.with_logical_partitioning(init, names)


# ----------------------------------------------------------------------------
# Embeddings, positions, feed-forward
# ----------------------------------------------------------------------------


class Embed(nn.Module):
    """Token embedding [V, D], multiplied by sqrt(D); `attend` is the tied output layer."""

    config: ModelConfig

    def setup(self):
        c = self.config
        # Standard deviation D^-0.5: scaled by sqrt(D) the inputs have unit
        # variance, and tied output logits start small.
        init = nn.initializers.normal(stddev=c.d_model**-0.5)
        self.table = self.param(
            "embedding", _partitioned(init, ("vocab", "embed")), (c.vocab_size, c.d_model)
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """[B, L] ids -> [B, L, D]."""
        return jnp.take(self.table, tokens, axis=0) * math.sqrt(self.config.d_model)

    def attend(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> logits [B, T, V] (float32)."""
        return matmul("BTD,VD->BTV", x, self.table, jnp.dtype(self.config.dtype))


class OutputLayer(nn.Module):
    """Untied pre-softmax projection [D, V] (when `tie_output` is off)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kernel = self.param(
            "kernel",
            _partitioned(nn.initializers.xavier_uniform(), ("embed", "vocab")),
            (c.d_model, c.vocab_size),
        )
        return matmul("BTD,DV->BTV", x, kernel, jnp.dtype(c.dtype))


class LearnedPositions(nn.Module):
    """A learned table [max_len, D] (Table 3, row E)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(stddev=c.d_model**-0.5)
        table = self.param("embedding", _partitioned(init, (None, "embed")), (c.max_len, c.d_model))
        return jnp.take(table, positions, axis=0)


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2: [B, L, D] -> [B, L, D]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        c = self.config
        dtype = jnp.dtype(c.dtype)
        init = nn.initializers.xavier_uniform()
        w1 = self.param("wi", _partitioned(init, ("embed", "mlp")), (c.d_model, c.d_ff))
        b1 = self.param("bi", _partitioned(nn.initializers.zeros, ("mlp",)), (c.d_ff,))
        w2 = self.param("wo", _partitioned(init, ("mlp", "embed")), (c.d_ff, c.d_model))
        b2 = self.param("bo", _partitioned(nn.initializers.zeros, ("embed",)), (c.d_model,))
        h = nn.relu(matmul("BLD,DF->BLF", x, w1, dtype) + b1)  # [B, L, F]
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = Dropout(c.relu_dropout)(h, deterministic=deterministic)
        return matmul("BLF,FD->BLD", h, w2, dtype) + b2


def _layer_norm(config: ModelConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon,
        dtype=jnp.float32,
        name=name,
        scale_init=_partitioned(nn.initializers.ones, ("embed",)),
        bias_init=_partitioned(nn.initializers.zeros, ("embed",)),
    )


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """A sublayer with its residual connection, dropout and layer norm.

    post-LN (the paper): LayerNorm(x + Dropout(Sublayer(x)))
    pre-LN:              x + Dropout(Sublayer(LayerNorm(x)))
    """

    config: ModelConfig

    def setup(self):
        self.norm = _layer_norm(self.config, "norm")
        self.dropout = Dropout(self.config.dropout)

    def __call__(self, x: jax.Array, sublayer, deterministic: bool) -> jax.Array:
        if self.config.layer_norm == "pre":
            return x + self.dropout(sublayer(self.norm(x)), deterministic=deterministic)
        return self.norm(x + self.dropout(sublayer(x), deterministic=deterministic))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a residual block."""

    config: ModelConfig

    def setup(self):
        self.self_attention = MultiHeadAttention(self.config, is_self_attention=True)
        self.feed_forward = FeedForward(self.config)
        self.attention_block = ResidualBlock(self.config)
        self.feed_forward_block = ResidualBlock(self.config)

    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
        """x [B, S, D], mask [B, 1, S|1, S] -> [B, S, D]."""
        x = self.attention_block(
            x,
            lambda y: self.self_attention(y, None, mask, deterministic=deterministic),
            deterministic,
        )
        x = self.feed_forward_block(x, lambda y: self.feed_forward(y, deterministic), deterministic)
        return nn.with_logical_constraint(x, EMBED)


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention, feed-forward."""

    config: ModelConfig

    def setup(self):
        self.self_attention = MultiHeadAttention(self.config, is_self_attention=True)
        self.cross_attention = MultiHeadAttention(self.config, is_self_attention=False)
        self.feed_forward = FeedForward(self.config)
        self.self_attention_block = ResidualBlock(self.config)
        self.cross_attention_block = ResidualBlock(self.config)
        self.feed_forward_block = ResidualBlock(self.config)

    def __call__(self, x, encoded, self_mask, cross_mask, deterministic, decode_step=None):
        """x [B, T, D], encoded [B_src, S, D] -> [B, T, D].

        With `decode_step`, T = 1 and both attentions read the cache; `encoded`
        is then unused (may be None).
        """
        x = self.self_attention_block(
            x,
            lambda y: self.self_attention(
                y, None, self_mask, deterministic=deterministic, decode_step=decode_step
            ),
            deterministic,
        )
        x = self.cross_attention_block(
            x,
            lambda y: self.cross_attention(
                y, encoded, cross_mask, deterministic=deterministic, decode_step=decode_step
            ),
            deterministic,
        )
        x = self.feed_forward_block(x, lambda y: self.feed_forward(y, deterministic), deterministic)
        return nn.with_logical_constraint(x, EMBED)

    def init_cache(self, batch: int, length: int, encoded: jax.Array) -> None:
        self.self_attention.init_cache(batch, length, encoded)
        self.cross_attention.init_cache(batch, length, encoded)


def _maybe_remat(layer_class, config: ModelConfig, static_argnums):
    if not config.remat:
        return layer_class
    return nn.remat(layer_class, static_argnums=static_argnums)


# ----------------------------------------------------------------------------
# Stacks
# ----------------------------------------------------------------------------


class Embedder(nn.Module):
    """Token embedding * sqrt(D) + positional encoding, then dropout."""

    config: ModelConfig
    embed: Embed

    def setup(self):
        if self.config.positional == "learned":
            self.positions = LearnedPositions(self.config)
        self.dropout = Dropout(self.config.dropout)

    def __call__(self, tokens, positions, deterministic):
        x = self.embed(tokens)
        if self.config.positional == "learned":
            x = x + self.positions(positions)
        else:
            x = x + sinusoidal_positions(positions, self.config.d_model)
        x = self.dropout(x, deterministic=deterministic)
        return nn.with_logical_constraint(x, EMBED)  # [B, L, D]


class Encoder(nn.Module):
    config: ModelConfig
    embed: Embed

    def setup(self):
        c = self.config
        self.embedder = Embedder(c, self.embed)
        layer = _maybe_remat(EncoderLayer, c, static_argnums=(3,))
        self.layers = [layer(c, name=f"layer_{i}") for i in range(c.num_encoder_layers)]
        if c.layer_norm == "pre":
            self.final_norm = _layer_norm(c, "final_norm")

    def __call__(self, tokens, positions, mask, deterministic):
        """tokens [B, S] -> encoded [B, S, D]."""
        x = self.embedder(tokens, positions, deterministic)
        for layer in self.layers:
            x = layer(x, mask, deterministic)
        if self.config.layer_norm == "pre":
            x = self.final_norm(x)
        return x


class Decoder(nn.Module):
    config: ModelConfig
    embed: Embed

    def setup(self):
        c = self.config
        self.embedder = Embedder(c, self.embed)
        layer = _maybe_remat(DecoderLayer, c, static_argnums=(5,))
        self.layers = [layer(c, name=f"layer_{i}") for i in range(c.num_decoder_layers)]
        if c.layer_norm == "pre":
            self.final_norm = _layer_norm(c, "final_norm")
        if not c.tie_output:
            self.output = OutputLayer(c)

    def __call__(
        self, tokens, encoded, positions, self_mask, cross_mask, deterministic, decode_step=None
    ):
        """tokens [B, T] (already shifted right) -> logits [B, T, V] (float32)."""
        x = self.embedder(tokens, positions, deterministic)
        for layer in self.layers:
            x = layer(x, encoded, self_mask, cross_mask, deterministic, decode_step)
        if self.config.layer_norm == "pre":
            x = self.final_norm(x)
        logits = self.embed.attend(x) if self.config.tie_output else self.output(x)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    def init_cache(self, batch: int, length: int, encoded: jax.Array) -> None:
        for layer in self.layers:
            layer.init_cache(batch, length, encoded)


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


class Transformer(nn.Module):
    """The encoder-decoder Transformer.

    Training calls the module: `logits = model.apply(vars, inputs, targets, ...)`.
    Decoding calls `encode` once, `init_cache` once, then `decode_step` per
    output position (see transformer/decoding.py).
    """

    config: ModelConfig

    def setup(self):
        c = self.config
        if c.share_embeddings:
            self.embed = Embed(c)
            self.encoder = Encoder(c, self.embed)
            self.decoder = Decoder(c, self.embed)
        else:
            self.source_embed = Embed(c)
            self.target_embed = Embed(c)
            self.encoder = Encoder(c, self.source_embed)
            self.decoder = Decoder(c, self.target_embed)

    def __call__(
        self,
        inputs: jax.Array,
        targets: jax.Array,
        *,
        inputs_positions: jax.Array | None = None,
        targets_positions: jax.Array | None = None,
        inputs_segmentation: jax.Array | None = None,
        targets_segmentation: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Teacher-forced forward pass: inputs [B, S], targets [B, T] -> logits [B, T, V]."""
        encoded = self.encode(inputs, inputs_positions, inputs_segmentation, deterministic)
        decoder_inputs = shift_right(targets, targets_positions)
        return self.decode(
            encoded,
            inputs,
            decoder_inputs,
            targets_positions,
            inputs_segmentation,
            targets_segmentation,
            deterministic,
        )

    def encode(self, inputs, positions=None, segmentation=None, deterministic=True):
        """inputs [B, S] -> encoded [B, S, D]."""
        mask = padding_mask(inputs)
        if segmentation is not None:
            mask = combine_masks(mask, segment_mask(segmentation, segmentation))
        if positions is None:
            positions = default_positions(inputs)
        return self.encoder(inputs, positions, mask, deterministic)

    def decode(
        self,
        encoded,
        inputs,
        decoder_inputs,
        positions=None,
        inputs_segmentation=None,
        targets_segmentation=None,
        deterministic=True,
    ):
        """Teacher-forced decoder: decoder_inputs [B, T] (shifted right) -> logits [B, T, V].

        `inputs` [B, S] are the source ids, needed for the source padding mask.
        """
        self_mask = combine_masks(
            padding_mask(decoder_inputs), causal_mask(decoder_inputs.shape[1])
        )
        cross_mask = padding_mask(inputs)
        if targets_segmentation is not None:
            self_mask = combine_masks(
                self_mask, segment_mask(targets_segmentation, targets_segmentation)
            )
            cross_mask = combine_masks(
                cross_mask, segment_mask(targets_segmentation, inputs_segmentation)
            )
        if positions is None:
            positions = default_positions(decoder_inputs)
        return self.decoder(
            decoder_inputs, encoded, positions, self_mask, cross_mask, deterministic
        )

    def init_cache(self, encoded: jax.Array, batch: int, length: int) -> None:
        """Makes the decoding cache (apply with mutable=['cache']).

        encoded [B_src, S, D]; `batch` hypotheses (a multiple of B_src, source
        major: hypotheses b*W .. b*W+W-1 belong to source b) of up to `length` tokens.
        """
        self.decoder.init_cache(batch, length, encoded)

    def decode_step(self, inputs: jax.Array, tokens: jax.Array, step: jax.Array) -> jax.Array:
        """One decoder position for every hypothesis, reading and updating the cache.

        inputs [B_src, S] source ids (for the padding mask), tokens [B, 1] the
        previous output token of each hypothesis, step the position being
        decoded (scalar) -> logits [B, 1, V].
        """
        positions = jnp.full(tokens.shape, step, jnp.int32)
        return self.decoder(
            tokens, None, positions, None, padding_mask(inputs), True, decode_step=step
        )
