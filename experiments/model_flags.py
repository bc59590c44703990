"""The model's flags: a preset, then any ModelConfig field as an override.

`--preset=base --num_heads=16` is the base model with 16 heads and d_k = d_v =
512 / 16 (config.changed_model).
Two flags are conveniences of the command line, not settings: --num_layers
sets both layer counts, and --dtype=auto picks the faster dtype here.
"""

from __future__ import annotations

from absl import flags

from experiments import config_flags
from transformer import config

_PRESET = flags.DEFINE_enum(
    "preset",
    "base",
    list(config.PRESETS),
    "Named model: the paper's Table 3 rows, big, tiny or cpu.",
)
_NUM_LAYERS = flags.DEFINE_integer(
    "num_layers",
    6,
    "Layers in the encoder and in the decoder (each its own flag too). "
    "Default: the preset's (shown: the base model's).",
)
config_flags.define(
    config.ModelConfig,
    extra_choices={"dtype": ("auto",)},
    note=" Default: the preset's (shown: the base model's).",
)
flags.FLAGS[
    "dtype"
].help += " auto: the faster one on this machine (bfloat16 on GPU/TPU; on CPU, measured)."


def dtype_is_auto() -> bool:
    return flags.FLAGS["dtype"].present > 0 and flags.FLAGS["dtype"].value == "auto"


def preset_name() -> str:
    return _PRESET.value


def model_config() -> config.ModelConfig:
    """The validated ModelConfig from --preset and the flags given.

    With --dtype=auto the preset's dtype stands in: the caller measures when
    it may start JAX's backend (see flops.fastest_dtype).
    """
    changes = config_flags.given(config.ModelConfig)
    if flags.FLAGS["num_layers"].present:
        if _NUM_LAYERS.value < 1:
            raise config.ConfigError(f"--num_layers must be >= 1, got {_NUM_LAYERS.value}")
        changes.setdefault("num_encoder_layers", _NUM_LAYERS.value)
        changes.setdefault("num_decoder_layers", _NUM_LAYERS.value)
    if changes.get("dtype") == "auto":
        del changes["dtype"]
    return config.changed_model(config.preset(_PRESET.value), changes)
