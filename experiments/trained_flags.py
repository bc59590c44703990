"""Flags shared by the entry points that use a trained model: which workdir and checkpoint."""

from __future__ import annotations

from absl import flags

from experiments.cli import UserError
from transformer import trained
from transformer.translation import Translator

WORKDIR = flags.DEFINE_string("workdir", None, "The workdir that experiments.wmt trained in.")
STEP = flags.DEFINE_integer("step", None, "Use the checkpoint of this step (default: latest).")
AVERAGE_LAST = flags.DEFINE_integer(
    "average_last", 0, "Average the parameters of the last K checkpoints (the paper: 5 or 20)."
)
BEAM = flags.DEFINE_integer(
    "beam", None, "Beam size (1: greedy decoding). Default: the workdir's --beam_size."
)
ALPHA = flags.DEFINE_float(
    "alpha",
    None,
    "Length penalty ((5 + len) / 6)^alpha. Default: the workdir's --length_penalty.",
)

NO_REPEAT_NGRAM = flags.DEFINE_integer(
    "no_repeat_ngram",
    None,
    "Never repeat an n-gram of this many subword pieces within an output (0: off). "
    "Default: the workdir's --no_repeat_ngram.",
)
MBR = flags.DEFINE_integer(
    "mbr",
    None,
    "Minimum Bayes risk decoding: of the beam's N best outputs, the one with the highest "
    "mean chrF against all N (0: off; N <= beam size). Default: the workdir's --mbr.",
)
MBR_SAMPLES = flags.DEFINE_integer(
    "mbr_samples",
    None,
    "With --mbr: the mean chrF is against this many outputs sampled from the model "
    "(epsilon sampling) instead of against the N best (0: the N best). "
    "Default: the workdir's --mbr_samples.",
)


def check() -> None:
    """Validates the shared flags: one line naming the flag on a bad value."""
    if not WORKDIR.value:
        raise UserError("--workdir is required: the directory experiments.wmt trained in")
    if STEP.value is not None and AVERAGE_LAST.value:
        raise UserError("give --step or --average_last, not both")
    if STEP.value is not None and STEP.value < 0:
        raise UserError(f"--step must be >= 0, got {STEP.value}")
    if AVERAGE_LAST.value < 0:
        raise UserError(f"--average_last must be >= 0, got {AVERAGE_LAST.value}")
    if BEAM.value is not None and BEAM.value < 1:
        raise UserError(f"--beam must be >= 1, got {BEAM.value}")
    if ALPHA.value is not None and ALPHA.value < 0:
        raise UserError(f"--alpha must be >= 0, got {ALPHA.value}")
    if NO_REPEAT_NGRAM.value is not None and NO_REPEAT_NGRAM.value < 0:
        raise UserError(f"--no_repeat_ngram must be >= 0, got {NO_REPEAT_NGRAM.value}")
    if MBR.value is not None and (MBR.value < 0 or MBR.value == 1):
        raise UserError(f"--mbr must be 0 (off) or at least 2, got {MBR.value}")
    if MBR_SAMPLES.value is not None and MBR_SAMPLES.value < 0:
        raise UserError(f"--mbr_samples must be >= 0, got {MBR_SAMPLES.value}")


def load() -> trained.Trained:
    check()
    return trained.load(WORKDIR.value, step=STEP.value, average_last=AVERAGE_LAST.value)


def translator(model: trained.Trained, **options) -> Translator:
    """A Translator for the loaded model. Beam size, length penalty, n-gram blocking and
    MBR (with its samples): the flags where given, else those the workdir trained with
    (so that a workdir's final scores are reproduced by default). `options` go to
    Translator."""
    beam = model.train.beam_size if BEAM.value is None else BEAM.value
    alpha = model.train.length_penalty if ALPHA.value is None else ALPHA.value
    ngram = model.train.no_repeat_ngram if NO_REPEAT_NGRAM.value is None else NO_REPEAT_NGRAM.value
    mbr = model.train.mbr if MBR.value is None else MBR.value
    if mbr > beam:
        raise UserError(
            f"--mbr={mbr} needs a beam of at least {mbr} (the beam is {beam}): "
            "give --beam, or --mbr=0 for none"
        )
    samples = model.train.mbr_samples if MBR_SAMPLES.value is None else MBR_SAMPLES.value
    if samples and not mbr:
        if MBR_SAMPLES.value is None:
            samples = 0  # --mbr=0 turns the workdir's MBR off, samples and all
        else:
            raise UserError(f"--mbr_samples={samples} needs --mbr of at least 2 (MBR is off)")
    return Translator(
        model.model, model.params, model.vocab, beam_size=beam, alpha=alpha,
        no_repeat_ngram=ngram, mbr=mbr, mbr_samples=samples,
        mbr_epsilon=model.train.mbr_epsilon, **options,
    )  # fmt: skip
