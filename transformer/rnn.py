"""The recurrent baseline: an LSTM encoder-decoder with attention (Luong et al., 2015).

The model the paper set out to replace, built to plug into everything the
Transformer uses: the same batches (packed or not), embeddings, loss, training
loop, checkpoints, beam search and evaluation. `--architecture=lstm` picks it
(transformer/architecture.py).

- Encoder: bidirectional LSTM layers, D/2 units each way, their outputs
  concatenated to D; from the second layer on each layer adds its input back
  (residual connections, as in Wu et al., 2016), which lets deep stacks train.
- Decoder: unidirectional LSTM layers of D units, residual the same way, then
  Luong's "general" global attention from the top layer's output h_t to the
  encoder's outputs e_s: score = h_t W_a e_s / sqrt(D), context c_t = sum_s
  a_ts e_s, attentional state tanh(W_c [c_t; h_t]), then the tied output layer.
  The 1/sqrt(D) is ours: it keeps the first steps' attention from saturating,
  the same reason the Transformer scales its dot products.
- The decoder starts from a zero state and reads the source through attention
  only, and the attentional state is not fed back as an input (Luong's input
  feeding): both keep the attention a parallel computation over all target
  positions in training, so only the LSTM cells run sequentially.
- Dropout (P_drop) on the embeddings, on each layer's output and on the
  attentional state.
- Packed rows: each example starts from a zero state, in either direction;
  the attention masks are the Transformer's (padding and same example).

Unused settings of ModelConfig (heads, d_k, d_v, d_ff, positional encoding,
layer norm placement, remat) are ignored; there are no positional encodings,
since a recurrence knows the order.

Shapes: B batch, S source length, T target length, L either length, D model
width, H units of one LSTM, G = 4H gates, V vocabulary size.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer.attention import _NEG_INF, combine_masks, padding_mask, segment_mask
from transformer.config import ModelConfig
from transformer.dropout import Dropout
from transformer.matmul import matmul
from transformer.model import Embed, OutputLayer, _partitioned, shift_right


def example_starts(tokens: jax.Array, segmentation: jax.Array | None) -> jax.Array:
    """[B, L] -> bool [B, L]: position l is the first of its example, reading left to right.

    Unpacked rows are one example followed by padding (a segment of its own).
    """
    segments = (tokens != 0).astype(jnp.int32) if segmentation is None else segmentation
    previous = jnp.pad(segments, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    return segments != previous


def example_ends(tokens: jax.Array, segmentation: jax.Array | None) -> jax.Array:
    """[B, L] -> bool [B, L]: position l is the last of its example (where a
    right-to-left reading starts)."""
    segments = (tokens != 0).astype(jnp.int32) if segmentation is None else segmentation
    following = jnp.pad(segments, ((0, 0), (0, 1)), constant_values=-1)[:, 1:]
    return segments != following


def _gate_bias(key, shape, dtype=jnp.float32):
    """Zeros, except 1 for the forget gate: a new cell keeps its memory at first."""
    units = shape[0] // 4
    return jnp.zeros(shape, dtype).at[units : 2 * units].set(1.0)


class LSTM(nn.Module):
    """One LSTM layer read in one direction: [B, L, D_in] -> [B, L, H].

    The recurrence of flax.linen.LSTMCell (the same gates, the same results
    for the same weights: tests/test_rnn.py), laid out so that the input's
    share of the gates is one matmul over all positions; only the state's share
    runs position by position (jax.lax.scan), where the cell would do both.
    """

    features: int
    config: ModelConfig
    reverse: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, starts: jax.Array, state=None):
        """x [B, L, D_in]; starts [B, L] bool: the state is zeroed before reading
        these positions; state (c, h), each [B, H], or None for zeros.
        Returns outputs [B, L, H] and the final state."""
        units, dtype = self.features, jnp.dtype(self.config.dtype)
        init = nn.initializers.xavier_uniform()
        w_in = self.param("wi", _partitioned(init, ("embed", "mlp")), (x.shape[-1], 4 * units))
        w_state = self.param(
            "wh", _partitioned(nn.initializers.orthogonal(), (None, "mlp")), (units, 4 * units)
        )
        bias = self.param("bias", _partitioned(_gate_bias, ("mlp",)), (4 * units,))
        from_input = matmul("BLD,DG->BLG", x, w_in, dtype) + bias  # [B, L, G]
        if state is None:
            zeros = jnp.zeros((x.shape[0], units), jnp.float32)
            state = (zeros, zeros)

        def step(state, inputs):
            gates, start = inputs  # [B, G], [B]
            keep = ~start[:, None]
            c, h = state[0] * keep, state[1] * keep
            gates = gates + matmul("BH,HG->BG", h, w_state, dtype)
            i, f, u, o = jnp.split(gates, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (c, h), h

        time_major = (from_input.swapaxes(0, 1), starts.swapaxes(0, 1))
        state, outputs = jax.lax.scan(step, state, time_major, reverse=self.reverse)
        return outputs.swapaxes(0, 1), state  # [B, L, H]


class RecurrentEncoder(nn.Module):
    """Bidirectional LSTM layers: tokens [B, S] -> encoded [B, S, D]."""

    config: ModelConfig
    embed: Embed

    def setup(self):
        c = self.config
        half = c.d_model // 2
        self.forward_layers = [
            LSTM(half, c, name=f"layer_{i}_forward") for i in range(c.num_encoder_layers)
        ]
        self.backward_layers = [
            LSTM(c.d_model - half, c, reverse=True, name=f"layer_{i}_backward")
            for i in range(c.num_encoder_layers)
        ]
        self.dropout = Dropout(c.dropout)

    def __call__(self, tokens, segmentation, deterministic):
        starts, ends = example_starts(tokens, segmentation), example_ends(tokens, segmentation)
        x = self.dropout(self.embed(tokens), deterministic=deterministic)
        for i, forward in enumerate(self.forward_layers):
            backward = self.backward_layers[i]
            y = jnp.concatenate([forward(x, starts)[0], backward(x, ends)[0]], axis=-1)
            y = self.dropout(y, deterministic=deterministic)
            x = y if i == 0 else x + y
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))  # [B, S, D]


class RecurrentDecoder(nn.Module):
    """LSTM layers, attention over the source, the attentional state, the logits."""

    config: ModelConfig
    embed: Embed

    def setup(self):
        c = self.config
        init = nn.initializers.xavier_uniform()
        self.layers = [LSTM(c.d_model, c, name=f"layer_{i}") for i in range(c.num_decoder_layers)]
        self.w_score = self.param(
            "attention_score", _partitioned(init, ("embed", None)), (c.d_model, c.d_model)
        )
        self.w_combine = self.param(
            "attention_combine", _partitioned(init, (None, "embed")), (2 * c.d_model, c.d_model)
        )
        if not c.tie_output:
            self.output = OutputLayer(c)
        self.dropout = Dropout(c.dropout)

    def attention_keys(self, encoded: jax.Array) -> jax.Array:
        """encoded [B, S, D] -> W_a e_s [B, S, D], computed once per source."""
        return matmul("BSD,DE->BSE", encoded, self.w_score, jnp.dtype(self.config.dtype))

    def attend(self, h, keys, encoded, mask) -> jax.Array:
        """h [B, T, D] against keys/encoded [B, S, D], mask [B, T|1, S] ->
        attentional state [B, T, D]."""
        dtype = jnp.dtype(self.config.dtype)
        scores = jnp.einsum(
            "BTD,BSD->BTS", h.astype(dtype), keys.astype(dtype),
            preferred_element_type=jnp.float32,
        ) / math.sqrt(self.config.d_model)  # fmt: skip
        weights = jax.nn.softmax(jnp.where(mask, scores, _NEG_INF), axis=-1)  # [B, T, S]
        self.sow("intermediates", "cross_attention", weights[:, None])  # one "head": [B, 1, T, S]
        context = jnp.einsum(
            "BTS,BSD->BTD", weights.astype(dtype), encoded.astype(dtype),
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        both = jnp.concatenate([context, h], axis=-1)  # [B, T, 2D]
        return jnp.tanh(matmul("BTE,ED->BTD", both, self.w_combine, dtype))

    def logits(self, state: jax.Array, deterministic: bool) -> jax.Array:
        state = self.dropout(state, deterministic=deterministic)
        if self.config.tie_output:
            return self.embed.attend(state)
        return self.output(state)  # [B, T, V]

    def __call__(self, tokens, starts, encoded, cross_mask, deterministic):
        """Teacher-forced: tokens [B, T] (shifted right) -> logits [B, T, V]."""
        x = self.dropout(self.embed(tokens), deterministic=deterministic)
        for i, layer in enumerate(self.layers):
            y = self.dropout(layer(x, starts)[0], deterministic=deterministic)
            x = y if i == 0 else x + y
        state = self.attend(x, self.attention_keys(encoded), encoded, cross_mask)
        return self.logits(state, deterministic)

    def init_cache(self, encoded: jax.Array, batch: int) -> None:
        """Zero LSTM states for `batch` hypotheses; the source's keys once per sentence."""
        for i in range(len(self.layers)):
            zeros = jnp.zeros((batch, self.config.d_model), jnp.float32)
            self.put_variable("cache", f"state_{i}", (zeros, zeros))
        self.put_variable("cache", "source_keys", self.attention_keys(encoded))
        self.put_variable("cache", "source", encoded)

    def decode_step(self, tokens: jax.Array, source_mask: jax.Array) -> jax.Array:
        """tokens [B*W, 1] -> logits [B*W, 1, V]; source_mask [B, 1, S].

        A hypothesis's state sits in its own row of the cache (`state_i`,
        gathered when beams change places, see decoding.reorder_cache); the
        source entries are per sentence and shared by its W beams.
        """
        x = self.embed(tokens)
        no_start = jnp.zeros(tokens.shape, jnp.bool_)
        for i, layer in enumerate(self.layers):
            y, state = layer(x, no_start, self.get_variable("cache", f"state_{i}"))
            self.put_variable("cache", f"state_{i}", state)
            x = y if i == 0 else x + y
        keys, encoded = (
            self.get_variable("cache", "source_keys"),
            self.get_variable("cache", "source"),
        )
        sources, rows = encoded.shape[0], tokens.shape[0]
        queries = x.reshape(sources, rows // sources, -1)  # [B, W, D]: a sentence's beams
        state = self.attend(queries, keys, encoded, source_mask)
        return self.logits(state.reshape(rows, 1, -1), True)


class RecurrentModel(nn.Module):
    """The LSTM encoder-decoder, called and decoded like the Transformer
    (transformer/model.py): `__call__` for training, `encode`, `init_cache`
    and `decode_step` for the search (transformer/decoding.py)."""

    config: ModelConfig

    def setup(self):
        c = self.config
        if c.share_embeddings:
            self.embed = Embed(c)
            self.encoder = RecurrentEncoder(c, self.embed)
            self.decoder = RecurrentDecoder(c, self.embed)
        else:
            self.source_embed = Embed(c)
            self.target_embed = Embed(c)
            self.encoder = RecurrentEncoder(c, self.source_embed)
            self.decoder = RecurrentDecoder(c, self.target_embed)

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
        cross_mask = padding_mask(inputs)
        if targets_segmentation is not None:
            cross_mask = combine_masks(
                cross_mask, segment_mask(targets_segmentation, inputs_segmentation)
            )
        starts = example_starts(decoder_inputs, targets_segmentation)
        return self.decoder(decoder_inputs, starts, encoded, cross_mask[:, 0], deterministic)

    def encode(self, inputs, positions=None, segmentation=None, deterministic=True):
        """inputs [B, S] -> encoded [B, S, D]. Positions are not needed by a recurrence."""
        del positions
        return self.encoder(inputs, segmentation, deterministic)

    def init_cache(self, encoded: jax.Array, batch: int, length: int) -> None:
        """The decoding cache (apply with mutable=['cache']) for `batch` hypotheses,
        source major; an LSTM's cache does not grow, so `length` is not needed."""
        del length
        self.decoder.init_cache(encoded, batch)

    def decode_step(self, inputs: jax.Array, tokens: jax.Array, step: jax.Array) -> jax.Array:
        """inputs [B_src, S] source ids, tokens [B, 1], step (unused: the state
        carries the position) -> logits [B, 1, V]."""
        del step
        return self.decoder.decode_step(tokens, padding_mask(inputs)[:, 0])
