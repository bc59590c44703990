r"""Train a Transformer on WMT (or the CPU corpus), then evaluate it.

  python -m experiments.wmt --flagfile=experiments/configs/wmt14_ende_base.flags \
      --workdir=/tmp/ende_base
  python -m experiments.wmt --flagfile=experiments/configs/ding_deen_cpu.flags \
      --workdir=workdirs/ding --train_minutes=10

Running the same command again in the same workdir resumes from the latest
checkpoint. Every flag is checked before anything is compiled; a bad value
stops with one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import flags, logging

from experiments import cli, model_flags
from transformer import config

FLAGS = flags.FLAGS

_HELP = {
    # data
    "dataset": "Corpus: " + ", ".join(config.DATASETS),
    "direction": "source-target languages, e.g. en-de (the paper's) or de-en.",
    "data_dir": "TFDS data directory (local or gs://); default ~/tensorflow_datasets.",
    "manual_dir": "Folder with manually downloaded archives (WMT) or the Ding file (de-en).",
    "batching": "packed: fixed rows holding several examples; bucketed: similar lengths "
    "under a token budget (the paper's).",
    "batch_rows": "packed: rows per optimizer step (global, all processes).",
    "row_length": "packed: tokens per row (source and target each).",
    "tokens_per_batch": "bucketed: padded tokens per step, source and target each "
    "(the paper: about 25000).",
    "vocab_sample_size": "Sentence pairs sampled to train the SentencePiece vocabulary.",
    "sentence_repeats": "ding_de_en: times each full-sentence pair appears per epoch.",
    "first_alternative_only": "ding_de_en: phrases keep only the first of their synonymous "
    "alternatives (sentences keep all).",
    "subword_sampling": "Probability that a training example's side is segmented by "
    "another of its n-best SentencePiece segmentations no longer than the best one "
    "(subword regularization; 0: off).",
    "data_workers": "Processes producing batches from the prepared token ids (0: auto, a "
    "quarter of the host's cores up to 16; -1: none, threads in the training process).",
    "num_threads": "Threads producing batches when there are no --data_workers.",
    "prefetch_batches": "Batches prepared ahead.",
    # training
    "steps": "Optimizer updates (the paper: 100000 base, 300000 big).",
    "warmup_steps": "Linear warmup of the learning rate (the paper: 4000).",
    "learning_rate_scale": "Multiplies d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).",
    "lr_decay": "After the warmup: rsqrt (the paper: step^-0.5) or constant (hold the "
    "peak; pair it with --cooldown_fraction).",
    "adam_b1": "Adam beta1.",
    "adam_b2": "Adam beta2.",
    "adam_eps": "Adam epsilon.",
    "label_smoothing": "Label smoothing epsilon (the paper: 0.1). Default: the preset's.",
    "cooldown_fraction": "Decay the learning rate linearly to 0 over this last fraction of "
    "the run (of --steps, or of --train_minutes when that ends it first); 0: off.",
    "grad_clip_norm": "Clip gradients to this global norm (0: off).",
    "grad_accum_steps": "Split each step's batch into this many sequential micro-batches.",
    "seed": "Seed of initialization, dropout and data order.",
    "train_minutes": "Stop training after this many minutes (0: run all steps).",
    "log_every": "Steps between progress lines.",
    "eval_every": "Steps between validation evaluations (0: only at the end).",
    "eval_bleu_sentences": "Validation sentences translated for BLEU at each evaluation.",
    "final_eval_split": "Split translated and scored at the end ('' to skip).",
    "beam_size": "Beam size for evaluation decoding (the paper: 4).",
    "length_penalty": "Length penalty alpha (the paper: 0.6).",
    "no_repeat_ngram": "Decoding never repeats an n-gram of this many subword pieces within "
    "an output (0: off, the paper's).",
    "mbr": "Minimum Bayes risk decoding: of the beam's N best outputs, the one with the "
    "highest mean chrF against all N (0: off, the paper's; N <= beam size).",
    "mbr_samples": "With --mbr: the mean chrF is against this many outputs sampled from the "
    "model (epsilon sampling) instead of against the N best (0: the N best).",
    "mbr_epsilon": "Epsilon of the --mbr_samples: each sampled token has at least this "
    "probability (0: any token).",
    "checkpoint_every": "Steps between checkpoints (0: by time only).",
    "checkpoint_minutes": "Minutes between checkpoints (the paper: 10; 0: by steps only).",
    "keep_checkpoints": "Checkpoints kept (the paper averages the last 5 base / 20 big).",
    "nan_policy": "On a non-finite loss: stop (the default) or skip the step.",
}
_DATA_FIELDS = [f for f in dataclasses.fields(config.DataConfig) if f.name != "max_len"]
_TRAIN_FIELDS = list(dataclasses.fields(config.TrainConfig))
_NO_DEFAULT = ("label_smoothing",)  # None: taken from the preset


_CHOICES = {
    "dataset": list(config.DATASETS),
    "batching": list(config.BATCHING),
    "nan_policy": list(config.NAN_POLICIES),
    "lr_decay": list(config.LR_DECAYS),
}


def _define(field: dataclasses.Field) -> None:
    """A flag per config field, typed by its default."""
    name, help_text = field.name, _HELP.get(field.name, field.name)
    default = None if name in _NO_DEFAULT else field.default
    if name in _CHOICES:
        flags.DEFINE_enum(name, default, _CHOICES[name], help_text)
    elif isinstance(field.default, bool):
        flags.DEFINE_bool(name, default, help_text)
    elif isinstance(field.default, int):
        flags.DEFINE_integer(name, default, help_text)
    elif isinstance(field.default, float):
        flags.DEFINE_float(name, default, help_text)
    else:
        flags.DEFINE_string(name, default, help_text)


for _field in _DATA_FIELDS + _TRAIN_FIELDS:
    _define(_field)

_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, vocabulary and logs go.")
_MESH = flags.DEFINE_string("mesh", "data:-1", "Device mesh, e.g. data:-1 or data:2,tensor:4.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Start from the latest parameters of this workdir."
)
_FALLBACK = flags.DEFINE_bool(
    "fallback_checkpoint", False, "If the newest checkpoint is unreadable, use an older one."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process runs off Cloud TPU)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CHECK_ONLY = flags.DEFINE_bool(
    "check_only", False, "Validate the flags, print the configs as JSON and exit."
)


def build_configs() -> tuple[config.ModelConfig, config.DataConfig, config.TrainConfig]:
    """Validated configs from the flags; ConfigError names the bad flag."""
    model = model_flags.model_config()
    data = config.DataConfig(
        **{f.name: FLAGS[f.name].value for f in _DATA_FIELDS}, max_len=model.max_len
    )
    train_values = {f.name: FLAGS[f.name].value for f in _TRAIN_FIELDS}
    if train_values["label_smoothing"] is None:
        preset_smoothing = config.PRESETS[model_flags.preset_name()].label_smoothing
        train_values["label_smoothing"] = 0.1 if preset_smoothing is None else preset_smoothing
    train = config.TrainConfig(**train_values)
    data.validate()
    train.validate()
    if data.batching == "packed" and data.batch_rows % train.grad_accum_steps:
        raise config.ConfigError(
            f"batch_rows ({data.batch_rows}) must be divisible by grad_accum_steps "
            f"({train.grad_accum_steps})"
        )
    return model, data, train


def initialize_distributed() -> None:
    """jax.distributed.initialize() where several processes take part."""
    import jax

    if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
        if (
            jax.config.jax_platforms in (None, "", "cpu")
            or os.environ.get("JAX_PLATFORMS") == "cpu"
        ):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()  # a Cloud TPU pod slice: everything comes from the VM


def _resolve_dtype(model: config.ModelConfig) -> config.ModelConfig:
    """--dtype=auto -> the dtype that runs faster here (process 0's choice)."""
    if not model_flags.dtype_is_auto():
        return model
    from transformer import flops

    return model.replace(dtype=flops.fastest_dtype())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; flags start with --")
    model, data, train = build_configs()
    if _CHECK_ONLY.value:
        from transformer import sharding

        sharding.mesh_spec(_MESH.value)  # its device count is checked where it runs
        model = _resolve_dtype(model)
        print(
            json.dumps(
                {
                    "model": dataclasses.asdict(model),
                    "data": dataclasses.asdict(data),
                    "train": dataclasses.asdict(train),
                },
                indent=2,
            )
        )
        return
    if not _WORKDIR.value:
        raise cli.UserError("--workdir is required: where checkpoints and logs go")
    initialize_distributed()
    import jax

    from transformer import sharding
    from transformer.train import Setup, train_and_evaluate

    model = _resolve_dtype(model)  # after initialize: measuring starts the backend
    sizes = sharding.parse_mesh(_MESH.value, jax.device_count())
    sharding.check_divisibility(sizes, model, data.batch_rows if data.batching == "packed" else 0)
    logging.info("model %s, data %s, train %s", model, data, train)
    setup = Setup(
        model, train, data, _WORKDIR.value, _MESH.value, _INIT_FROM.value, _FALLBACK.value
    )
    try:
        train_and_evaluate(setup)
    except FloatingPointError as e:
        raise cli.UserError(str(e)) from None


if __name__ == "__main__":
    cli.run(main)
