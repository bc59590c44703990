"""The workdir's record of a run, written by training and read by everything after it.

  config.json          the model, data, train and decode configs
  vocab.model          the SentencePiece vocabulary (transformer/data/vocab.py)
  checkpoints/<step>   orbax checkpoints (transformer/checkpoint.py)

Training checks config.json when it starts, refusing a workdir that holds a
different model or trained on other data, and rewrites it once the run's
state is restored; translation, evaluation and averaging read it back. A field
missing from an older config.json had its default when that run trained.
"""

from __future__ import annotations

import dataclasses
import json
import os

from etils import epath

from transformer import checkpoint
from transformer.checkpoint import CheckpointError
from transformer.config import ConfigError, DataConfig, DecodeConfig, ModelConfig, TrainConfig

CONFIG_FILE = "config.json"

# Fields that fix the parameters' shapes: a config.json without one of them
# cannot be read by falling back to the default.
SHAPE_FIELDS = (
    "vocab_size", "d_model", "d_ff", "num_heads", "d_k", "d_v",
    "num_encoder_layers", "num_decoder_layers",
)  # fmt: skip

# Model settings that change how, not what, is computed: a run may resume with others.
COMPUTE_ONLY = ("dtype", "remat")

_FIX = "restore it from a copy, or train again in a new --workdir"


@dataclasses.dataclass(frozen=True)
class Configs:
    """Everything a run was configured with."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    decode: DecodeConfig

    def as_record(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _RECORDS}


_RECORDS = ("model", "data", "train", "decode")


# What a run trains on: a workdir keeps them (another corpus or direction is a new run).
DATA_FIELDS = ("dataset", "direction")


def check_config(workdir: str, configs: Configs) -> None:
    """Refuses a workdir whose config.json records another model, corpus or direction."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return
    record = configs.as_record()
    previous = read_record(path)
    defaults = {
        f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name not in SHAPE_FIELDS
    }
    changed = sorted(
        k
        for k in record["model"]
        if k not in COMPUTE_ONLY and previous["model"].get(k, defaults.get(k)) != record["model"][k]
    )
    if changed:
        raise CheckpointError(
            f"{workdir} holds a model with a different config ({', '.join(changed)}); "
            "use a new --workdir or the same model flags"
        )
    moved = [
        f"{k} {previous['data'][k]} -> {record['data'][k]}"
        for k in DATA_FIELDS
        if k in previous["data"] and previous["data"][k] != record["data"][k]
    ]
    if moved:
        raise CheckpointError(
            f"{workdir} trained on other data ({', '.join(moved)}); use a new --workdir "
            "(with --init_from to start from this one's parameters)"
        )


# Settings that decide which examples make up batch n (the plan, data/pipeline.py).
PLAN_FIELDS = {
    "data": ("max_len", "batching", "batch_rows", "row_length", "tokens_per_batch",
             "sentence_repeats", "first_alternative_only", "subword_sampling"),
    "train": ("seed",),
}  # fmt: skip


def replanned(workdir: str, configs: Configs) -> list[str]:
    """The plan's settings that differ from those the workdir's run started with,
    as 'name old -> new': resumed with them, its batches are no longer the ones an
    uninterrupted run would have had. Micro-batches split bucketed rows, so there
    their count counts too."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return []
    previous, record = read_record(path), configs.as_record()
    fields = dict(PLAN_FIELDS)
    if configs.data.batching == "bucketed":
        fields["train"] = (*fields["train"], "grad_accum_steps")
    return [
        f"{name} {previous[part][name]} -> {record[part][name]}"
        for part, names in fields.items()
        for name in names
        if name in previous.get(part, {}) and previous[part][name] != record[part][name]
    ]


def write_config(workdir: str, configs: Configs) -> None:
    """workdir/config.json; refuses a workdir that trained another model or corpus."""
    check_config(workdir, configs)
    path = epath.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(configs.as_record(), indent=2) + "\n")


def write_whole(path: epath.Path, text: str) -> None:
    """Writes `text` under a temporary name, then renames it to `path`: a run
    killed while writing leaves the earlier file (or none), never half of one."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:  # a full disk, a Ctrl-C: no temporary file stays
        tmp.unlink(missing_ok=True)
        raise


def read_record(path: epath.Path) -> dict:
    """A config.json as a dict of its "model", "data", "train" (and "decode") records.

    A record written before decoding had a config of its own keeps the decoding
    settings in "train"; they move to "decode" here.
    """
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); {_FIX}") from e
    if not isinstance(record, dict) or not all(
        isinstance(record.get(k), dict) for k in ("model", "data", "train")
    ):
        raise CheckpointError(
            f"{path} is not a training config (it needs model, data and train records); {_FIX}"
        )
    if not isinstance(record.get("decode"), dict):
        names = {f.name for f in dataclasses.fields(DecodeConfig)}
        train = record["train"]
        record["decode"] = {k: train.pop(k) for k in list(train) if k in names}
    return record


def read_configs(workdir: str) -> Configs:
    """The configs training wrote to workdir/config.json."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(
            f"{workdir} is not a training workdir (no {CONFIG_FILE}); "
            "give the --workdir that experiments.wmt trained in"
        )
    record = read_record(path)
    missing = [name for name in SHAPE_FIELDS if name not in record["model"]]
    if missing:
        raise CheckpointError(
            f"{path} is not a training config (its model record lacks {', '.join(missing)}); {_FIX}"
        )
    try:
        configs = Configs(
            model=ModelConfig(**record["model"]),
            data=DataConfig(**record["data"]),
            train=TrainConfig(**record["train"]),
            decode=DecodeConfig(**record["decode"]),
        )
    except TypeError as e:  # a field these configs do not have
        raise CheckpointError(f"{path} is not a training config ({e}); {_FIX}") from e
    for name in _RECORDS:  # values edited by hand, or damaged, are named as flags are
        try:
            getattr(configs, name).validate()
        except ConfigError as e:
            raise CheckpointError(f"{path}: {name} {e}; {_FIX}") from e
    return configs


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the workdir's complete checkpoints, oldest first."""
    if not checkpoint.checkpoint_dir(workdir).exists():
        return []
    mngr = checkpoint.manager(workdir, read_only=True)
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()
