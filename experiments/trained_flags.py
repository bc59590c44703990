"""Flags of the entry points that use a trained model: which workdir and checkpoint, and
the DecodeConfig's settings, which default to those the workdir trained with."""

from __future__ import annotations

from absl import flags

from experiments import config_flags
from experiments.cli import UserError
from transformer import config, trained
from transformer.translation import Translator

WORKDIR = flags.DEFINE_string("workdir", None, "The workdir that experiments.wmt trained in.")
STEP = flags.DEFINE_integer("step", None, "Use the checkpoint of this step (default: latest).")
AVERAGE_LAST = flags.DEFINE_integer(
    "average_last", 0, "Average the parameters of the last K checkpoints (the paper: 5 or 20)."
)
config_flags.define(config.DecodeConfig, note=" Default: the workdir's.")


def check() -> None:
    """Validates the checkpoint flags: one line naming the flag on a bad value."""
    if not WORKDIR.value:
        raise UserError("--workdir is required: the directory experiments.wmt trained in")
    if STEP.value is not None and AVERAGE_LAST.value:
        raise UserError("give --step or --average_last, not both")
    if STEP.value is not None and STEP.value < 0:
        raise UserError(f"--step must be >= 0, got {STEP.value}")
    if AVERAGE_LAST.value < 0:
        raise UserError(f"--average_last must be >= 0, got {AVERAGE_LAST.value}")


def check_decode() -> None:
    """Refuses a bad decoding flag before a model is loaded (the workdir's values aside)."""
    config.DecodeConfig(**_without_mbr(config_flags.given(config.DecodeConfig))).validate()


def _without_mbr(changes: dict) -> dict:
    """The flags without the MBR settings, whose checks need the workdir's beam size."""
    return {k: v for k, v in changes.items() if k not in ("mbr", "mbr_samples")}


def load() -> trained.Trained:
    check()
    check_decode()
    return trained.load(WORKDIR.value, step=STEP.value, average_last=AVERAGE_LAST.value)


def decode_config(model: trained.Trained) -> config.DecodeConfig:
    """The workdir's DecodeConfig with the decoding flags given (so that a workdir's final
    scores are reproduced by default). --mbr=0 turns the workdir's MBR off, samples and all."""
    changes = config_flags.given(config.DecodeConfig)
    if changes.get("mbr") == 0:
        changes.setdefault("mbr_samples", 0)
    return model.decode.replace(**changes).validate()


def translator(model: trained.Trained, **options) -> Translator:
    """A Translator for the loaded model and decode_config(); `options` go to Translator."""
    return Translator(model.model, model.params, model.vocab, decode_config(model), **options)
