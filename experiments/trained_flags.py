"""Flags of the entry points that use a trained model: which workdir and checkpoint, and
the DecodeConfig's settings, which default to those the workdir trained with."""

from __future__ import annotations

import dataclasses
import sys

from absl import flags

from experiments import config_flags
from experiments.cli import UserError, define_compilation_cache_flag, use_compilation_cache
from transformer import config, record, trained
from transformer.translation import Translator

WORKDIR = flags.DEFINE_string("workdir", None, "The workdir that experiments.wmt trained in.")
STEP = flags.DEFINE_integer("step", None, "Use the checkpoint of this step (default: latest).")
AVERAGE_LAST = flags.DEFINE_integer(
    "average_last",
    0,
    "Average the parameters of the last K checkpoints (the paper: 5 or 20). Default: as "
    "the run's final evaluation (its --final_eval_average_last); 0: the latest alone.",
)
COMPILATION_CACHE = define_compilation_cache_flag()
config_flags.define(config.DecodeConfig, note=" Default: the workdir's (shown: the paper's).")


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


def load() -> trained.Trained:
    """The workdir's model, its `decode` the workdir's with the decoding flags given.

    The flags are checked against the workdir's config before the parameters
    load (minutes, when averaging big checkpoints)."""
    check()
    configs = record.read_configs(WORKDIR.value)
    decode = decode_config(configs.decode)
    average = AVERAGE_LAST.value
    if STEP.value is None and not flags.FLAGS["average_last"].present:
        # The run's final evaluation's model (the paper's recipes: the mean of the last
        # 5 or 20), so that its scores are reproduced; as many as there are, if fewer.
        kept = len(record.checkpoint_steps(WORKDIR.value))
        average = min(configs.train.final_eval_average_last, kept) if kept > 1 else 0
    use_compilation_cache(COMPILATION_CACHE.value, WORKDIR.value)
    model = trained.load(WORKDIR.value, step=STEP.value, average_last=average)
    return dataclasses.replace(model, decode=decode)


def decode_config(recorded: config.DecodeConfig) -> config.DecodeConfig:
    """The workdir's DecodeConfig with the decoding flags given, so that a workdir's
    final scores are reproduced by default. --mbr=0 turns the workdir's MBR off,
    samples and all; so does a --beam_size below the workdir's MBR size."""
    changes = config_flags.given(config.DecodeConfig)
    config.check_settings(recorded.replace(**changes))  # each value alone, before the rule below
    beam = changes.get("beam_size", recorded.beam_size)
    if "mbr" not in changes and recorded.mbr > beam:
        print(
            f"warning: --beam_size={beam} is below the workdir's mbr={recorded.mbr}: MBR off "
            "(give --mbr to keep it)",
            file=sys.stderr,
        )
        changes["mbr"] = 0
    if changes.get("mbr") == 0:
        changes.setdefault("mbr_samples", 0)
    return recorded.replace(**changes).validate()


def translator(model: trained.Trained, **options) -> Translator:
    """A Translator for a model from load(); `options` go to Translator."""
    return Translator(model.model, model.params, model.vocab, model.decode, **options)
