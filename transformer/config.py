"""Frozen configurations: the model, its named presets, and the training recipe.

Everything the library needs arrives through these dataclasses; nothing reads
flags. `ModelConfig.validate()` is called by the entry points before anything
is compiled, so a bad setting fails in milliseconds with a message that names it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

# Special token ids, fixed for every vocabulary the project trains (see
# transformer/data/vocab.py). Padding must not share an id with anything else:
# the loss and the attention masks treat id 0 as "no token".
PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3

DTYPES = ("float32", "bfloat16")
POSITIONAL = ("sinusoidal", "learned")
LAYER_NORMS = ("post", "pre")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of the encoder-decoder Transformer.

    Defaults are the paper's base model (Table 3, first row) with a shared
    source/target vocabulary of 37000 pieces.
    """

    vocab_size: int = 37000
    d_model: int = 512
    d_ff: int = 2048
    num_heads: int = 8
    d_k: int = 64  # per-head query/key size
    d_v: int = 64  # per-head value size; separate from d_k (Table 3, row B)
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout: float = 0.1  # residual branches and embeddings+positions (P_drop)
    attention_dropout: float = 0.0  # on the attention weights
    relu_dropout: float = 0.0  # inside the feed-forward block, after the ReLU
    positional: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_len: int = 256  # longest sequence, source or target, in tokens
    layer_norm: Literal["post", "pre"] = "post"  # post-LN is the paper's
    share_embeddings: bool = True  # one table for source and target tokens
    tie_output: bool = True  # pre-softmax projection = target embedding^T
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute; params stay f32
    remat: bool = False  # recompute layer activations in the backward pass
    layer_norm_epsilon: float = 1e-6

    def validate(self) -> ModelConfig:
        """Raises ConfigError naming the first bad setting; returns self."""
        positive = (
            "vocab_size",
            "d_model",
            "d_ff",
            "num_heads",
            "d_k",
            "d_v",
            "num_encoder_layers",
            "num_decoder_layers",
            "max_len",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("dropout", "attention_dropout", "relu_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        _check_choice("positional", self.positional, POSITIONAL)
        _check_choice("layer_norm", self.layer_norm, LAYER_NORMS)
        _check_choice("dtype", self.dtype, DTYPES)
        if self.vocab_size <= UNK_ID:
            raise ConfigError(
                f"vocab_size must exceed the {UNK_ID + 1} special ids, got {self.vocab_size}"
            )
        return self

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        shown = ", ".join(choice or "'' (none)" for choice in allowed)
        raise ConfigError(f"{name} must be one of {shown}; got {value!r}")


# ----------------------------------------------------------------------------
# Presets: the paper's models (Table 3) and small ones for tests and the CPU.
# ----------------------------------------------------------------------------

BASE = ModelConfig()


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model, with where it comes from in the paper's Table 3.

    `paper_params_m` is the parameter count the paper prints (millions), None
    where its table leaves the cell empty (the row changes no parameter count
    or it is not in the paper). `label_smoothing` is set only by the D rows,
    which vary the training recipe rather than the model.
    """

    model: ModelConfig
    row: str
    paper_params_m: float | None = None
    label_smoothing: float | None = None


def _row(row: str, paper: float | None = None, *, label_smoothing=None, **changes) -> Preset:
    return Preset(BASE.replace(**changes), row, paper, label_smoothing)


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
    "ls0": _row("(D) eps_ls=0.0", label_smoothing=0.0),
    "ls0.2": _row("(D) eps_ls=0.2", label_smoothing=0.2),
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
            dropout=0.0,  # 30 minutes see about one epoch: nothing to regularize yet
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


# ----------------------------------------------------------------------------
# Training recipe.
# ----------------------------------------------------------------------------


NAN_POLICIES = ("stop", "skip")
LR_DECAYS = ("rsqrt", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimizer, schedule and loss (the paper's sections 5.3 and 5.4) and the loop."""

    steps: int = 100_000
    warmup_steps: int = 4000
    learning_rate_scale: float = 1.0  # multiplies d_model^-0.5 * min(...)
    # After the warmup: the paper's inverse square root, or hold the peak (with a cooldown).
    lr_decay: Literal["rsqrt", "constant"] = "rsqrt"
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-9
    label_smoothing: float = 0.1
    grad_clip_norm: float = 0.0  # 0 disables clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer update
    # Linear decay of the learning rate to 0 over this last fraction of the run
    # (of `steps`, or of `train_minutes` when that ends it first); 0: the paper's schedule.
    cooldown_fraction: float = 0.0
    seed: int = 0
    # The loop: time budget, logging, evaluation, checkpoints.
    train_minutes: float = 0.0  # stop after this much wall time in the loop (0: no limit)
    log_every: int = 100
    eval_every: int = 1000  # validation loss/BLEU every N steps (0: only at the end)
    eval_bleu_sentences: int = 200  # validation sentences translated for BLEU (0: none)
    final_eval_split: str = "test"  # translated in full at the end ("" to skip)
    beam_size: int = 4
    length_penalty: float = 0.6
    no_repeat_ngram: int = 0  # > 0: decoding never repeats an n-gram of pieces (paper: off)
    mbr: int = 0  # > 1: of the beam's N best outputs, the highest mean chrF (paper: off)
    mbr_samples: int = 0  # > 0: ... against this many epsilon-sampled outputs, not the N
    mbr_epsilon: float = 0.02  # sampled tokens have at least this probability
    checkpoint_every: int = 1000  # steps (0: only by time and at the end)
    checkpoint_minutes: float = 10.0  # the paper's interval (0: only by steps)
    keep_checkpoints: int = 5  # the paper averages the last 5 (base) or 20 (big)
    nan_policy: Literal["stop", "skip"] = "stop"

    def validate(self) -> TrainConfig:
        for name in (
            "steps",
            "warmup_steps",
            "grad_accum_steps",
            "log_every",
            "keep_checkpoints",
            "beam_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "eval_bleu_sentences", "checkpoint_every", "no_repeat_ngram"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.mbr and not 2 <= self.mbr <= self.beam_size:
            raise ConfigError(
                f"mbr must be 0 (off) or from 2 to beam_size={self.beam_size}, got {self.mbr!r}"
            )
        if not isinstance(self.mbr_samples, int) or self.mbr_samples < 0:
            raise ConfigError(f"mbr_samples must be an integer >= 0, got {self.mbr_samples!r}")
        if self.mbr_samples and not self.mbr:
            raise ConfigError(
                "mbr_samples needs mbr >= 2 (the samples judge the beam's N best): "
                "set mbr, or mbr_samples=0"
            )
        if not 0.0 <= self.mbr_epsilon < 1.0:
            raise ConfigError(f"mbr_epsilon must be in [0, 1), got {self.mbr_epsilon!r}")
        for name in ("train_minutes", "checkpoint_minutes", "grad_clip_norm", "length_penalty"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate_scale <= 0:
            raise ConfigError(f"learning_rate_scale must be > 0, got {self.learning_rate_scale}")
        for name in ("adam_b1", "adam_b2", "label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise ConfigError(
                f"cooldown_fraction must be in [0, 1], got {self.cooldown_fraction!r}"
            )
        if self.adam_eps <= 0:
            raise ConfigError(f"adam_eps must be > 0, got {self.adam_eps}")
        _check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        _check_choice("lr_decay", self.lr_decay, LR_DECAYS)
        _check_choice("final_eval_split", self.final_eval_split, ("", "validation", "test"))
        return self

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


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


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which corpus, which direction, and how examples become batches.

    `direction` is "<source>-<target>" in the dataset's language codes, for
    example "en-de" for the paper's English->German on wmt14_translate/de-en.

    Batching "packed": rows of `row_length` tokens holding several examples
    each (segment ids and positions), `batch_rows` rows per step.
    Batching "bucketed": examples of similar length padded together, as many
    as fit `tokens_per_batch` (source and target each), the paper's scheme.
    Both are global figures: each process reads its share.
    """

    dataset: str = "wmt14_translate/de-en"
    direction: str = "en-de"
    data_dir: str | None = None  # TFDS data directory (local or gs://)
    manual_dir: str | None = None  # downloaded archives / corpus file
    max_len: int = 256  # longest training example kept, in tokens (source or target)
    batching: Literal["packed", "bucketed"] = "packed"
    batch_rows: int = 64
    row_length: int = 256
    tokens_per_batch: int = 25_000
    vocab_sample_size: int = 2_000_000  # sentence pairs sampled to train SentencePiece
    # ding_de_en only: how often each full-sentence pair appears per epoch
    # (phrases appear once), and whether phrases keep only their first alternative.
    sentence_repeats: int = 1
    first_alternative_only: bool = False
    # Subword regularization of training batches: each side of an example is, with
    # this probability, segmented by one of the vocabulary's other n-best
    # segmentations that is no longer than its best one (so every planned row
    # still fits), chosen by a seeded RNG (so batch n is the same after resuming).
    subword_sampling: float = 0.0
    # Processes producing batches (grain workers, free of the training process's
    # GIL); 0 = auto: a quarter of the host's cores, at most 16 (none on a 2-core
    # host, where threads suffice); -1 = none, threads only.
    data_workers: int = 0
    num_threads: int = 2  # threads producing batches when there are no workers
    prefetch_batches: int = 8

    def languages(self) -> tuple[str, str]:
        source, _, target = self.direction.partition("-")
        return source, target

    def validate(self) -> DataConfig:
        _check_choice("dataset", self.dataset, tuple(DATASETS))
        _check_choice("batching", self.batching, BATCHING)
        a, b = DATASETS[self.dataset]
        if self.direction not in (f"{a}-{b}", f"{b}-{a}"):
            raise ConfigError(
                f"direction must be {a}-{b} or {b}-{a} for {self.dataset}, got {self.direction!r}"
            )
        for name in (
            "max_len",
            "batch_rows",
            "row_length",
            "tokens_per_batch",
            "vocab_sample_size",
            "sentence_repeats",
            "num_threads",
            "prefetch_batches",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.data_workers < -1:
            raise ConfigError(
                f"data_workers must be -1 (none), 0 (auto) or a count, got {self.data_workers}"
            )
        if not 0.0 <= self.subword_sampling <= 1.0:
            raise ConfigError(
                f"subword_sampling must be a probability in [0, 1], got {self.subword_sampling!r}"
            )
        if self.batching == "packed" and self.max_len > self.row_length:
            raise ConfigError(
                f"max_len ({self.max_len}) must not exceed row_length ({self.row_length}) "
                "when batching is packed: a kept example must fit in a row"
            )
        return self

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)
