"""Frozen configurations: the model and its presets, the training recipe, decoding, data.

Everything the library needs arrives through these dataclasses; nothing reads
flags. Each setting is declared once, here, with `setting(default, help, ...)`:
its default, its one-line help (which the entry points show as the flag's help,
experiments/config_flags.py) and its check. `validate()` runs every field's check
and the few checks that relate two fields; the entry points call it before
anything is compiled, so a bad value fails in milliseconds with a message that
names it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

# Special token ids, fixed for every vocabulary the project trains (see
# transformer/data/vocab.py). Padding must not share an id with anything else:
# the loss and the attention masks treat id 0 as "no token".
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the setting."""


# ----------------------------------------------------------------------------
# Settings: a default, a help line, a check.
# ----------------------------------------------------------------------------

# A check returns what is wrong with a value ("must be ..."), or None.
Check = Callable[[Any], "str | None"]


def positive(value) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return None if ok else "must be a positive integer"


def dimension(value) -> str | None:
    """A size of the model: what jax's int32 shapes and token ids can hold."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**31
    return None if ok else "must be a positive integer below 2**31"


def non_negative(value) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be an integer >= 0"


def _real(value) -> bool:
    """A finite number (not a bool, a string from a hand-edited config, inf or nan)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def at_least_zero(value) -> str | None:
    return None if _real(value) and value >= 0 else "must be a finite number >= 0"


def above_zero(value) -> str | None:
    return None if _real(value) and value > 0 else "must be a finite number > 0"


def fraction(value) -> str | None:
    """[0, 1): dropout rates, label smoothing, Adam's betas."""
    return None if _real(value) and 0.0 <= value < 1.0 else "must be in [0, 1)"


def probability(value) -> str | None:
    return None if _real(value) and 0.0 <= value <= 1.0 else "must be in [0, 1]"


def setting(default, help: str, *, check: Check | None = None, choices: tuple = ()):
    """A dataclass field with its help line, its check and its allowed values."""
    return dataclasses.field(
        default=default, metadata={"help": help, "check": check, "choices": choices}
    )


def check_settings(config) -> None:
    """Raises ConfigError naming the first field whose value fails its check."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        choices = field.metadata.get("choices")
        if choices and value not in choices:
            shown = ", ".join(repr(c) if c else "'' (none)" for c in choices)
            raise ConfigError(f"{field.name} must be one of {shown}; got {value!r}")
        check = field.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{field.name} {problem}, got {value!r}")


class _Config:
    """What every config shares: replace() and validate()."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def validate(self):
        """Raises ConfigError naming the first bad setting; returns self."""
        check_settings(self)
        self._check_together()
        return self

    def _check_together(self) -> None:
        """Checks that relate several fields (none by default)."""


# ----------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------

ARCHITECTURES = ("transformer", "lstm")
DTYPES = ("float32", "bfloat16")
POSITIONAL = ("sinusoidal", "learned")
LAYER_NORMS = ("post", "pre")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Config):
    """Shape and options of the encoder-decoder Transformer.

    Defaults are the paper's base model (Table 3, first row) with a shared
    source/target vocabulary of 37000 pieces.
    """

    architecture: Literal["transformer", "lstm"] = setting(
        "transformer",
        "transformer (the paper's model) or lstm (the recurrent baseline of transformer/rnn.py: "
        "d_model units, the layer counts and dropout apply; the attention and feed-forward "
        "settings do not).",
        choices=ARCHITECTURES,
    )
    vocab_size: int = setting(
        37000, "Size of the shared SentencePiece vocabulary.", check=dimension
    )
    d_model: int = setting(512, "Model width.", check=dimension)
    d_ff: int = setting(2048, "Inner width of the feed-forward blocks.", check=dimension)
    num_heads: int = setting(8, "Attention heads.", check=dimension)
    d_k: int = setting(64, "Per-head query/key size.", check=dimension)
    # Separate from d_k: Table 3's rows (B) shrink the keys only.
    d_v: int = setting(64, "Per-head value size.", check=dimension)
    num_encoder_layers: int = setting(6, "Encoder layers.", check=dimension)
    num_decoder_layers: int = setting(6, "Decoder layers.", check=dimension)
    dropout: float = setting(
        0.1, "Dropout on the residual branches and embeddings+positions (P_drop).", check=fraction
    )
    attention_dropout: float = setting(0.0, "Dropout on the attention weights.", check=fraction)
    relu_dropout: float = setting(0.0, "Dropout after the feed-forward ReLU.", check=fraction)
    positional: Literal["sinusoidal", "learned"] = setting(
        "sinusoidal", "Positional encoding.", choices=POSITIONAL
    )
    max_len: int = setting(256, "Longest source or target sequence, in tokens.", check=dimension)
    layer_norm: Literal["post", "pre"] = setting(
        "post", "Layer norm placement: post (the paper's) or pre.", choices=LAYER_NORMS
    )
    share_embeddings: bool = setting(True, "One embedding table for source and target.")
    tie_output: bool = setting(True, "Pre-softmax projection tied to the target embedding.")
    dtype: Literal["float32", "bfloat16"] = setting(
        "float32", "Compute dtype of the matmuls; parameters stay float32.", choices=DTYPES
    )
    remat: bool = setting(False, "Recompute layer activations in the backward pass (memory).")
    layer_norm_epsilon: float = setting(1e-6, "Epsilon of the layer norms.", check=above_zero)

    def _check_together(self) -> None:
        if self.vocab_size <= UNK_ID:
            raise ConfigError(
                f"vocab_size must exceed the {UNK_ID + 1} special ids, got {self.vocab_size}"
            )


# ----------------------------------------------------------------------------
# Presets: the paper's models (Table 3) and small ones for tests and the CPU.
# ----------------------------------------------------------------------------

BASE = ModelConfig()


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model, with where it comes from in the paper's Table 3.

    `paper_params_m` is the parameter count the paper prints (millions), None
    where its table leaves the cell empty. `recipe` holds the TrainConfig
    settings the row changes: the D rows vary label smoothing, which belongs to
    training rather than to the model.
    """

    model: ModelConfig
    row: str
    paper_params_m: float | None = None
    recipe: dict = dataclasses.field(default_factory=dict)


def _row(row: str, paper: float | None = None, *, recipe=None, **changes) -> Preset:
    return Preset(BASE.replace(**changes), row, paper, recipe or {})


PRESETS: dict[str, Preset] = {
    "base": _row("base", 65),
    # (A) number of heads at constant computation: d_k = d_v = d_model / h.
    "h1": _row("(A) h=1", num_heads=1, d_k=512, d_v=512),
    "h4": _row("(A) h=4", num_heads=4, d_k=128, d_v=128),
    "h16": _row("(A) h=16", num_heads=16, d_k=32, d_v=32),
    "h32": _row("(A) h=32", num_heads=32, d_k=16, d_v=16),
    # (B) smaller attention keys only; d_v stays 64.
    "dk16": _row("(B) d_k=16", 58, d_k=16),
    "dk32": _row("(B) d_k=32", 60, d_k=32),
    # (C) bigger and smaller models.
    "n2": _row("(C) N=2", 36, num_encoder_layers=2, num_decoder_layers=2),
    "n4": _row("(C) N=4", 50, num_encoder_layers=4, num_decoder_layers=4),
    "n8": _row("(C) N=8", 80, num_encoder_layers=8, num_decoder_layers=8),
    "d256": _row("(C) d_model=256", 28, d_model=256, d_k=32, d_v=32),
    "d1024": _row("(C) d_model=1024", 168, d_model=1024, d_k=128, d_v=128),
    "ff1024": _row("(C) d_ff=1024", 53, d_ff=1024),
    "ff4096": _row("(C) d_ff=4096", 90, d_ff=4096),
    # (D) regularization: dropout lives in the model, label smoothing in training.
    "drop0": _row("(D) P_drop=0.0", dropout=0.0),
    "drop0.2": _row("(D) P_drop=0.2", dropout=0.2),
    "ls0": _row("(D) eps_ls=0.0", recipe={"label_smoothing": 0.0}),
    "ls0.2": _row("(D) eps_ls=0.2", recipe={"label_smoothing": 0.2}),
    # (E) learned positional embeddings instead of sinusoids.
    "learned_pos": _row("(E) learned positions", positional="learned"),
    "big": _row("big", 213, d_model=1024, d_ff=4096, num_heads=16, d_k=64, d_v=64, dropout=0.3),
    # Not in the paper: a model small enough to compile in a second (tests).
    "tiny": Preset(
        BASE.replace(
            vocab_size=512,
            d_model=32,
            d_ff=64,
            num_heads=4,
            d_k=8,
            d_v=8,
            num_encoder_layers=2,
            num_decoder_layers=2,
            max_len=64,
        ),
        "tiny (tests)",
    ),
    # Not in the paper: the CPU demo's model, sized for 30 minutes on 2 cores.
    "cpu": Preset(
        BASE.replace(
            vocab_size=4000,
            d_model=192,
            d_ff=768,
            num_heads=4,
            d_k=48,
            d_v=48,
            num_encoder_layers=3,
            num_decoder_layers=3,
            dropout=0.0,  # the flagfile decides: dropout pays only where a host makes enough steps
            max_len=128,
        ),
        "cpu (demo)",
    ),
}

# The rows of Table 3 in the paper's order, for `experiments.params --table3`.
TABLE3 = (
    "base",
    "h1",
    "h4",
    "h16",
    "h32",
    "dk16",
    "dk32",
    "n2",
    "n4",
    "n8",
    "d256",
    "d1024",
    "ff1024",
    "ff4096",
    "drop0",
    "drop0.2",
    "ls0",
    "ls0.2",
    "learned_pos",
    "big",
)


def preset(name: str) -> ModelConfig:
    """The ModelConfig of a named preset; ConfigError lists the names if unknown."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].model


def changed_model(base: ModelConfig, changes: dict) -> ModelConfig:
    """`base` with `changes`, validated. Where the width or the head count changes and
    the per-head sizes are not given, d_k = d_v = d_model / num_heads (the paper's
    convention, Table 3's rows A), so the division must then be exact (for the
    Transformer; the LSTM baseline has no heads)."""
    recurrent = changes.get("architecture", base.architecture) == "lstm"  # it has no heads
    if {"d_model", "num_heads"} & changes.keys() and not recurrent:
        d_model = changes.get("d_model", base.d_model)
        heads = changes.get("num_heads", base.num_heads)
        if isinstance(heads, int) and heads > 0 and d_model > 0:  # else validate() names it
            if d_model % heads and not {"d_k", "d_v"} <= changes.keys():
                raise ConfigError(
                    f"--d_model={d_model} is not divisible by --num_heads={heads}; "
                    "change one of them or give --d_k and --d_v explicitly"
                )
            changes = {"d_k": d_model // heads, "d_v": d_model // heads, **changes}
    return base.replace(**changes).validate()


# ----------------------------------------------------------------------------
# Training recipe.
# ----------------------------------------------------------------------------

NAN_POLICIES = ("stop", "skip")
LR_DECAYS = ("rsqrt", "constant")
FINAL_SPLITS = ("", "validation", "test")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Config):
    """The optimizer, schedule and loss (the paper's sections 5.3 and 5.4) and the loop."""

    steps: int = setting(
        100_000, "Optimizer updates (the paper: 100000 base, 300000 big).", check=positive
    )
    warmup_steps: int = setting(
        4000, "Linear warmup of the learning rate (the paper: 4000).", check=positive
    )
    learning_rate_scale: float = setting(
        1.0, "Multiplies d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).", check=above_zero
    )
    lr_decay: Literal["rsqrt", "constant"] = setting(
        "rsqrt",
        "After the warmup: rsqrt (the paper's step^-0.5) or constant (hold the peak; pair "
        "it with --cooldown_fraction).",
        choices=LR_DECAYS,
    )
    adam_b1: float = setting(0.9, "Adam beta1.", check=fraction)
    adam_b2: float = setting(0.98, "Adam beta2.", check=fraction)
    adam_eps: float = setting(1e-9, "Adam epsilon.", check=above_zero)
    label_smoothing: float = setting(
        0.1, "Label smoothing epsilon (the paper: 0.1; Table 3's D rows vary it).", check=fraction
    )
    grad_clip_norm: float = setting(
        0.0, "Clip gradients to this global norm (0: off).", check=at_least_zero
    )
    grad_accum_steps: int = setting(
        1, "Split each step's batch into this many sequential micro-batches.", check=positive
    )
    cooldown_fraction: float = setting(
        0.0,
        "Decay the learning rate linearly to 0 over this last fraction of the run (of "
        "--steps, or of --train_minutes when that ends it first); 0: the paper's schedule.",
        check=probability,
    )
    # Dropout pays once a model has seen its training data a few times; a slow host
    # that makes few steps in its time budget does better without it.
    dropout_min_steps: int = setting(
        0,
        "With --train_minutes: if this host, timed on the run's batch before training, "
        "would make fewer steps than this in the budget, train without dropout (0: off).",
        check=non_negative,
    )
    seed: int = setting(0, "Seed of initialization, dropout and data order.")
    # The loop: time budget, logging, evaluation, checkpoints.
    train_minutes: float = setting(
        0.0, "Stop training after this many minutes (0: run all steps).", check=at_least_zero
    )
    log_every: int = setting(100, "Steps between progress lines.", check=positive)
    eval_every: int = setting(
        1000, "Steps between validation evaluations (0: only at the end).", check=non_negative
    )
    eval_bleu_sentences: int = setting(
        200, "Validation sentences translated for BLEU at each evaluation.", check=non_negative
    )
    final_eval_split: str = setting(
        "test", "Split translated and scored at the end ('' to skip).", choices=FINAL_SPLITS
    )
    checkpoint_every: int = setting(
        1000, "Steps between checkpoints (0: by time only).", check=non_negative
    )
    checkpoint_minutes: float = setting(
        10.0,
        "Minutes between checkpoints (the paper: 10; 0: by steps only).",
        check=at_least_zero,
    )
    keep_checkpoints: int = setting(
        5, "Checkpoints kept (the paper averages the last 5 base / 20 big).", check=positive
    )
    final_eval_average_last: int = setting(
        1,
        "The final evaluation uses the mean of the parameters of the last K checkpoints "
        "(the paper: 5 base, 20 big; 1: the final parameters).",
        check=positive,
    )
    nan_policy: Literal["stop", "skip"] = setting(
        "stop", "On a non-finite loss: stop, or skip the step.", choices=NAN_POLICIES
    )
    # Known TPUs and GPUs have their datasheet's peak (flops.DATASHEET_PEAK); others,
    # and a CPU's cores, are timed on a matmul when the run starts (1-2 s on a CPU).
    peak_tflops: float = setting(
        0.0,
        "The peak that MFU is against, in TFLOP/s: of one accelerator device, or on CPU of "
        "one process's cores (0: the datasheet's for a known TPU or GPU, else measured).",
        check=at_least_zero,
    )

    def _check_together(self) -> None:
        if self.final_eval_average_last > self.keep_checkpoints:
            raise ConfigError(
                f"final_eval_average_last ({self.final_eval_average_last}) exceeds "
                f"keep_checkpoints ({self.keep_checkpoints}): keep at least as many"
            )


def recipe(name: str) -> TrainConfig:
    """The TrainConfig of a preset: the defaults with the settings its row changes."""
    preset(name)  # an unknown name lists the choices
    return TrainConfig(**PRESETS[name].recipe)


# ----------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeConfig(_Config):
    """How text is decoded: beam search (the paper's section 6.1) and the options after it.

    Training writes it to the workdir's config.json and uses it for its
    evaluations; translate and evaluate start from that record, so a workdir's
    scores are reproduced unless a flag changes a setting.
    """

    beam_size: int = setting(4, "Beam size (the paper: 4; 1: greedy decoding).", check=positive)
    length_penalty: float = setting(
        0.6, "Length penalty alpha, ((5 + length) / 6)^alpha (the paper: 0.6).", check=at_least_zero
    )
    max_extra: int = setting(
        50,
        "Outputs end by the input's length plus this many tokens (the paper: 50).",
        check=positive,
    )
    no_repeat_ngram: int = setting(
        0,
        "Never repeat an n-gram of this many subword pieces within an output (0: off, the "
        "paper's).",
        check=non_negative,
    )
    mbr: int = setting(
        0,
        "Minimum Bayes risk: of the beam's N best outputs, the one with the highest mean "
        "chrF against all N (0: off, the paper's; 2 <= N <= beam size).",
        check=non_negative,
    )
    mbr_samples: int = setting(
        0,
        "With --mbr: the mean chrF is against this many outputs sampled from the model "
        "(epsilon sampling) instead of against the N best (0: the N best).",
        check=non_negative,
    )
    mbr_epsilon: float = setting(
        0.02,
        "Each token of an --mbr_samples draw has at least this probability (0: any token).",
        check=fraction,
    )
    mbr_seed: int = setting(0, "Seed of the --mbr_samples draws.")
    mbr_sample_candidates: bool = setting(
        False,
        "With --mbr_samples: the samples compete with the N best, each judged against the "
        "other samples (leaving itself out, which it would match perfectly); no effect "
        "without samples.",
    )
    mbr_utility: Literal["chrf", "chrf++"] = setting(
        "chrf",
        "MBR's measure of agreement: chrF (character 1-6-grams) or chrF++ (and word "
        "1-2-grams, which favour the word choices and order that BLEU rewards).",
        choices=("chrf", "chrf++"),
    )
    mbr_beta: float = setting(
        2.0,
        "MBR's chrF weighs recall beta times as much as precision (sacreBLEU's chrF: 2); "
        "a lower beta picks shorter, more precise outputs, which BLEU rewards.",
        check=above_zero,
    )

    def describe(self) -> str:
        """'beam 4, alpha 0.6', and the options that are on."""
        text = f"beam {self.beam_size}, alpha {self.length_penalty:g}"
        if self.no_repeat_ngram:
            text += f", no repeated {self.no_repeat_ngram}-grams"
        utility = {"chrf": "chrF", "chrf++": "chrF++"}[self.mbr_utility]
        if self.mbr_beta != 2.0:
            utility += f", beta {self.mbr_beta:g}"
        if self.mbr and not self.mbr_samples:
            text += f", MBR ({utility}) over the {self.mbr} best"
        elif self.mbr:
            among = " and the samples" if self.mbr_sample_candidates else ""
            text += (
                f", MBR ({utility}) over the {self.mbr} best{among} against "
                f"{self.mbr_samples} samples (epsilon {self.mbr_epsilon:g})"
            )
        return text

    def _check_together(self) -> None:
        if self.mbr and not 2 <= self.mbr <= self.beam_size:
            raise ConfigError(
                f"mbr must be 0 (off) or from 2 to beam_size={self.beam_size}, got {self.mbr!r}"
            )
        if self.mbr_samples and not self.mbr:
            raise ConfigError(
                "mbr_samples needs mbr >= 2 (the samples judge the beam's N best): "
                "set mbr, or mbr_samples=0"
            )
        if self.mbr_sample_candidates and self.mbr_samples == 1:
            raise ConfigError(
                "mbr_sample_candidates needs mbr_samples >= 2 (each sample is judged against "
                "the others) or 0 (no samples: it has no effect)"
            )


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------

# Dataset name -> its two languages.
DATASETS = {
    "ding_de_en": ("de", "en"),  # the Ding dictionary (Debian's trans-de-en): the CPU corpus
    "wmt14_translate/de-en": ("de", "en"),  # the paper's EN-DE: direction en-de
    "wmt14_translate/fr-en": ("fr", "en"),  # the paper's EN-FR: direction en-fr
    "wmt17_translate/de-en": ("de", "en"),
}
BATCHING = ("packed", "bucketed")


def check_batch_split(data: DataConfig, train: TrainConfig) -> None:
    """A packed batch splits evenly into the gradient accumulation's micro-batches."""
    if data.batching == "packed" and data.batch_rows % train.grad_accum_steps:
        raise ConfigError(
            f"batch_rows ({data.batch_rows}) must be divisible by grad_accum_steps "
            f"({train.grad_accum_steps})"
        )


VOCAB_MODELS = ("unigram", "bpe")


def _data_workers(value) -> str | None:
    ok = isinstance(value, int) and value >= -1
    return None if ok else "must be -1 (none), 0 (auto) or a count"


@dataclasses.dataclass(frozen=True)
class DataConfig(_Config):
    """Which corpus, which direction, and how examples become batches.

    `direction` is "<source>-<target>" in the dataset's language codes, for
    example "en-de" for the paper's English->German on wmt14_translate/de-en.

    Batching "packed": rows of `row_length` tokens holding several examples
    each (segment ids and positions), `batch_rows` rows per step.
    Batching "bucketed": examples of similar length padded together, as many
    as fit `tokens_per_batch` (source and target each), the paper's scheme.
    Both are global figures: each process reads its share.
    """

    dataset: str = setting(
        "wmt14_translate/de-en", "Corpus (ding_de_en: the CPU one).", choices=tuple(DATASETS)
    )
    direction: str = setting("en-de", "source-target languages, e.g. en-de (the paper's).")
    data_dir: str | None = setting(
        None, "TFDS data directory (local or gs://); default ~/tensorflow_datasets."
    )
    manual_dir: str | None = setting(
        None, "Folder with manually downloaded archives (WMT) or the Ding file (de-en)."
    )
    # The model's max_len: set by the entry point from the ModelConfig, no flag of its own.
    max_len: int = setting(256, "Longest training example kept, in tokens.", check=positive)
    batching: Literal["packed", "bucketed"] = setting(
        "packed",
        "packed: fixed rows holding several examples; bucketed: similar lengths under a "
        "token budget (the paper's).",
        choices=BATCHING,
    )
    batch_rows: int = setting(
        64, "packed: rows per optimizer step (global, all processes).", check=positive
    )
    row_length: int = setting(
        256, "packed: tokens per row (source and target each).", check=positive
    )
    tokens_per_batch: int = setting(
        25_000,
        "bucketed: padded tokens per step, source and target each (the paper: about 25000).",
        check=positive,
    )
    vocab_model: Literal["unigram", "bpe"] = setting(
        "unigram",
        "SentencePiece's algorithm: unigram, or bpe (byte-pair encoding, the paper's for "
        "EN-DE; its EN-FR word pieces are closest to it too).",
        choices=VOCAB_MODELS,
    )
    vocab_sample_size: int = setting(
        2_000_000, "Sentence pairs sampled to train the SentencePiece vocabulary.", check=positive
    )
    # ding_de_en only: phrases appear once per epoch, full sentences this often.
    sentence_repeats: int = setting(
        1, "ding_de_en: times each full-sentence pair appears per epoch.", check=positive
    )
    first_alternative_only: bool = setting(
        False,
        "ding_de_en: phrases keep only the first of their synonymous alternatives "
        "(sentences keep all).",
    )
    # Each side of an example is, with this probability, segmented by one of the
    # vocabulary's other n-best segmentations that is no longer than its best one
    # (so every planned row still fits), chosen by a seeded RNG (so batch n is the
    # same after resuming).
    subword_sampling: float = setting(
        0.0,
        "Probability that a training example's side is segmented by another of its n-best "
        "SentencePiece segmentations (subword regularization; 0: off).",
        check=probability,
    )
    # Worker processes run free of the training process's GIL; on a 2-core host
    # threads suffice, hence auto = a quarter of the cores.
    data_workers: int = setting(
        0,
        "Processes producing batches from the prepared token ids (0: auto, a quarter of "
        "the host's cores up to 16; -1: none, threads in the training process).",
        check=_data_workers,
    )
    num_threads: int = setting(
        2, "Threads producing batches when there are no --data_workers.", check=positive
    )
    prefetch_batches: int = setting(8, "Batches prepared ahead.", check=positive)

    def languages(self) -> tuple[str, str]:
        source, _, target = self.direction.partition("-")
        return source, target

    def _check_together(self) -> None:
        a, b = DATASETS[self.dataset]
        if self.direction not in (f"{a}-{b}", f"{b}-{a}"):
            raise ConfigError(
                f"direction must be {a}-{b} or {b}-{a} for {self.dataset}, got {self.direction!r}"
            )
        if self.batching == "packed" and self.max_len > self.row_length:
            raise ConfigError(
                f"max_len ({self.max_len}) must not exceed row_length ({self.row_length}) "
                "when batching is packed: a kept example must fit in a row"
            )
        if self.subword_sampling and self.vocab_model == "bpe":
            raise ConfigError(
                "subword_sampling needs vocab_model unigram: SentencePiece's BPE has no "
                "n-best segmentations to sample from"
            )
