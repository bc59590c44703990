"""Model flags shared by the entry points: a preset plus optional overrides.

`--preset=base --num_heads=16` is the base model with 16 heads; when the head
count or width changes and the per-head sizes are not given, d_k = d_v =
d_model / num_heads (the paper's convention), so the division must be exact.
"""

from __future__ import annotations

from absl import flags

from transformer import config

_PRESET = flags.DEFINE_enum(
    "preset",
    "base",
    list(config.PRESETS),
    "Named model: the paper's Table 3 rows, big, tiny or cpu.",
)

_INT_OVERRIDES = {
    "vocab_size": "Size of the shared SentencePiece vocabulary.",
    "d_model": "Model width.",
    "d_ff": "Inner width of the feed-forward blocks.",
    "num_heads": "Attention heads.",
    "d_k": "Per-head query/key size (default: d_model / num_heads).",
    "d_v": "Per-head value size (default: d_model / num_heads).",
    "num_layers": "Layers in the encoder and in the decoder.",
    "num_encoder_layers": "Encoder layers (overrides --num_layers).",
    "num_decoder_layers": "Decoder layers (overrides --num_layers).",
    "max_len": "Longest source or target sequence, in tokens.",
}
_FLOAT_OVERRIDES = {
    "dropout": "Residual and embedding dropout (P_drop).",
    "attention_dropout": "Dropout on attention weights.",
    "relu_dropout": "Dropout after the feed-forward ReLU.",
}
_ENUM_OVERRIDES = {
    "positional": (config.POSITIONAL, "Positional encoding."),
    "layer_norm": (config.LAYER_NORMS, "Layer norm placement: post (the paper's) or pre."),
    "dtype": (
        (*config.DTYPES, "auto"),
        "Compute dtype of matmuls (parameters stay float32); auto: the faster one on this "
        "machine (bfloat16 on GPU/TPU; on CPU, measured).",
    ),
}
_BOOL_OVERRIDES = {
    "share_embeddings": "One embedding table for source and target.",
    "tie_output": "Pre-softmax projection tied to the target embedding.",
    "remat": "Recompute layer activations in the backward pass (saves memory).",
}

for _name, _help in _INT_OVERRIDES.items():
    flags.DEFINE_integer(_name, None, _help + " Default: the preset's.")
for _name, _help in _FLOAT_OVERRIDES.items():
    flags.DEFINE_float(_name, None, _help + " Default: the preset's.")
for _name, (_choices, _help) in _ENUM_OVERRIDES.items():
    flags.DEFINE_enum(_name, None, list(_choices), _help + " Default: the preset's.")
for _name, _help in _BOOL_OVERRIDES.items():
    flags.DEFINE_bool(_name, None, _help + " Default: the preset's.")


def dtype_is_auto() -> bool:
    return flags.FLAGS["dtype"].value == "auto"


def model_config() -> config.ModelConfig:
    """The validated ModelConfig from --preset and the override flags.

    With --dtype=auto the preset's dtype stands in: the caller measures when
    it may start JAX's backend (see flops.fastest_dtype).
    """
    values = flags.FLAGS
    overrides = {
        name: values[name].value
        for name in (*_INT_OVERRIDES, *_FLOAT_OVERRIDES, *_ENUM_OVERRIDES, *_BOOL_OVERRIDES)
        if values[name].value is not None
    }
    layers = overrides.pop("num_layers", None)
    if layers is not None:
        overrides.setdefault("num_encoder_layers", layers)
        overrides.setdefault("num_decoder_layers", layers)
    if overrides.get("dtype") == "auto":
        del overrides["dtype"]
    base = config.preset(_PRESET.value)
    if {"d_model", "num_heads"} & overrides.keys():
        overrides = _derive_head_sizes(base, overrides)
    return base.replace(**overrides).validate()


def _derive_head_sizes(base: config.ModelConfig, overrides: dict) -> dict:
    """d_k = d_v = d_model / num_heads where the per-head sizes are not given."""
    d_model = overrides.get("d_model", base.d_model)
    heads = overrides.get("num_heads", base.num_heads)
    if not (isinstance(heads, int) and heads > 0 and d_model > 0):
        return overrides  # validate() names the bad value
    if d_model % heads and not {"d_k", "d_v"} <= overrides.keys():
        raise config.ConfigError(
            f"--d_model={d_model} is not divisible by --num_heads={heads}; "
            "change one of them or give --d_k and --d_v explicitly"
        )
    return {"d_k": d_model // heads, "d_v": d_model // heads, **overrides}


def preset_name() -> str:
    return _PRESET.value
