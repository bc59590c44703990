"""Parameter accounting: the count by formula, per component, beside the real one.

The formula follows the paper's layer definitions (biases included, layer
norms with a scale and a bias); `real_counts` reads the same components off
the model's parameter tree by `jax.eval_shape`, so no memory is used even for
the big model. The two must agree exactly for every configuration.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer.architecture import build
from transformer.config import ModelConfig

COMPONENTS = (
    "multi-head attention",
    "feed-forward",
    "layer norm",
    "encoder layer",
    "decoder layer",
    "encoder (all layers)",
    "decoder (all layers)",
    "embeddings and output",
    "final layer norms",
    "total",
)


RECURRENT_COMPONENTS = (
    "encoder layer",
    "decoder layer",
    "encoder (all layers)",
    "decoder (all layers)",
    "attention",
    "embeddings and output",
    "total",
)


def components(c: ModelConfig) -> tuple[str, ...]:
    return RECURRENT_COMPONENTS if c.architecture == "lstm" else COMPONENTS


def _embeddings(c: ModelConfig) -> int:
    tables = 1 if c.share_embeddings else 2
    return tables * c.vocab_size * c.d_model + (0 if c.tie_output else c.d_model * c.vocab_size)


def _lstm(inputs: int, units: int) -> int:
    """One LSTM: input and state weights of the four gates, and their biases."""
    return 4 * units * (inputs + units + 1)


def recurrent_formula_counts(c: ModelConfig) -> dict[str, int]:
    """The LSTM baseline (transformer/rnn.py) by formula, keyed by RECURRENT_COMPONENTS."""
    d = c.d_model
    encoder_layer = _lstm(d, d // 2) + _lstm(d, d - d // 2)  # both directions read [B, S, D]
    decoder_layer = _lstm(d, d)
    attention = d * d + 2 * d * d  # W_a [D, D] and W_c [2D, D]
    counts = {
        "encoder layer": encoder_layer,
        "decoder layer": decoder_layer,
        "encoder (all layers)": c.num_encoder_layers * encoder_layer,
        "decoder (all layers)": c.num_decoder_layers * decoder_layer,
        "attention": attention,
        "embeddings and output": _embeddings(c),
    }
    counts["total"] = sum(counts[k] for k in list(counts)[2:])
    return counts


def formula_counts(c: ModelConfig) -> dict[str, int]:
    """Parameter counts by formula, keyed by components(c)."""
    if c.architecture == "lstm":
        return recurrent_formula_counts(c)
    d, h = c.d_model, c.num_heads
    attention = (d * h * c.d_k + h * c.d_k) * 2 + (d * h * c.d_v + h * c.d_v) + h * c.d_v * d + d
    feed_forward = d * c.d_ff + c.d_ff + c.d_ff * d + d
    norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * norm
    decoder_layer = 2 * attention + feed_forward + 3 * norm
    embeddings = _embeddings(c)
    if c.positional == "learned":
        embeddings += 2 * c.max_len * d  # one table per stack
    final_norms = 2 * norm if c.layer_norm == "pre" else 0
    encoder = c.num_encoder_layers * encoder_layer
    decoder = c.num_decoder_layers * decoder_layer
    return {
        "multi-head attention": attention,
        "feed-forward": feed_forward,
        "layer norm": norm,
        "encoder layer": encoder_layer,
        "decoder layer": decoder_layer,
        "encoder (all layers)": encoder,
        "decoder (all layers)": decoder,
        "embeddings and output": embeddings,
        "final layer norms": final_norms,
        "total": encoder + decoder + embeddings + final_norms,
    }


def param_shapes(c: ModelConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs (nothing is allocated)."""
    model = build(c)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = jax.eval_shape(lambda x, y: model.init(jax.random.key(0), x, y), tokens, tokens)
    return nn.unbox(variables["params"])


def _size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def recurrent_real_counts(c: ModelConfig) -> dict[str, int]:
    params = param_shapes(c)
    encoder, decoder = params["encoder"], params["decoder"]
    decoder_layers = {k: v for k, v in decoder.items() if k.startswith("layer_")}
    attention = _size(decoder["attention_score"]) + _size(decoder["attention_combine"])
    return {
        "encoder layer": _size(encoder["layer_0_forward"]) + _size(encoder["layer_0_backward"]),
        "decoder layer": _size(decoder["layer_0"]),
        "encoder (all layers)": _size(encoder),
        "decoder (all layers)": _size(decoder_layers),
        "attention": attention,
        "embeddings and output": _size(params) - _size(encoder) - _size(decoder_layers) - attention,
        "total": _size(params),
    }


def real_counts(c: ModelConfig) -> dict[str, int]:
    """The same components counted on the initialized model's parameter tree."""
    if c.architecture == "lstm":
        return recurrent_real_counts(c)
    params = param_shapes(c)
    encoder, decoder = params["encoder"], params["decoder"]
    encoder_layers = {k: v for k, v in encoder.items() if k.startswith("layer_")}
    decoder_layers = {k: v for k, v in decoder.items() if k.startswith("layer_")}
    final_norms = _size(encoder.get("final_norm", {})) + _size(decoder.get("final_norm", {}))
    layers = _size(encoder_layers) + _size(decoder_layers)
    first = encoder_layers["layer_0"]
    return {
        "multi-head attention": _size(first["self_attention"]),
        "feed-forward": _size(first["feed_forward"]),
        "layer norm": _size(first["attention_block"]["norm"]),
        "encoder layer": _size(first),
        "decoder layer": _size(decoder_layers["layer_0"]),
        "encoder (all layers)": _size(encoder_layers),
        "decoder (all layers)": _size(decoder_layers),
        "embeddings and output": _size(params) - layers - final_norms,
        "final layer norms": final_norms,
        "total": _size(params),
    }
