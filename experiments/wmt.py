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

from experiments import cli, config_flags, model_flags
from transformer import config

FLAGS = flags.FLAGS

config_flags.define(config.DataConfig, skip=("max_len",))  # max_len: the model's
config_flags.define(config.TrainConfig)
flags.FLAGS["label_smoothing"].help += " Default: the preset's (shown: the base model's)."
config_flags.define(config.DecodeConfig)

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
_COMPILATION_CACHE = cli.define_compilation_cache_flag()


def build_configs() -> tuple[
    config.ModelConfig, config.DataConfig, config.TrainConfig, config.DecodeConfig
]:
    """Validated configs from the preset and the flags given; ConfigError names the bad one."""
    model = model_flags.model_config()
    data = config_flags.update(config.DataConfig(max_len=model.max_len), skip=("max_len",))
    train = config_flags.update(config.recipe(model_flags.preset_name()))
    decode = config_flags.update(config.DecodeConfig())
    config.check_batch_split(data, train)
    return model, data, train, decode


def initialize_distributed() -> None:
    """jax.distributed.initialize() where several processes take part: those the
    flags name, or the hosts of a Cloud TPU slice, which jax finds by itself."""
    _check_process_flags()
    import jax

    explicit = bool(_NUM_PROCESSES.value and _NUM_PROCESSES.value > 1)
    if not (explicit or _on_cloud_tpu_vm()):
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
        if _PROCESS_ID.value == 0:
            cli.leave_last()
        return
    # A TPU VM's hosts learn their slice from its metadata server (GKE's from the
    # environment). A VM whose metadata describes no slice (a Colab TPU runtime)
    # gives nothing to detect: one process, as without TPUs.
    try:
        jax.distributed.initialize()
    except ValueError as e:  # jax detected no cluster
        logging.info("no TPU slice to join (%s): one process", e)
        return
    except (OSError, RuntimeError) as e:  # the metadata server did not answer
        logging.warning("no TPU slice found (%s): one process", " ".join(str(e).split())[:300])
        return
    if jax.process_count() > 1 and jax.process_index() == 0:
        cli.leave_last()


def _check_process_flags() -> None:
    """--num_processes, --process_id and --coordinator_address, which go together."""
    count, index, address = _NUM_PROCESSES.value, _PROCESS_ID.value, _COORDINATOR.value
    if count is None:
        if index is not None or address:
            raise cli.UserError("--process_id and --coordinator_address need --num_processes")
        return
    if count < 1:
        raise cli.UserError(f"--num_processes must be a positive integer, got {count}")
    if count == 1:
        return
    if not address:
        raise cli.UserError(
            f"--num_processes={count} needs --coordinator_address=HOST:PORT (process 0's)"
        )
    if index is None or not 0 <= index < count:
        raise cli.UserError(f"--process_id must be from 0 to {count - 1}, got {index}")


def _on_cloud_tpu_vm() -> bool:
    """Whether jax found TPU chips and libtpu when it was imported (it then sets the
    TPU VM up). No public API says so before the backends start, which must come
    after jax.distributed.initialize()."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # a jax that moved it: no slice is joined by itself
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _resolve_dtype(model: config.ModelConfig) -> config.ModelConfig:
    """--dtype=auto -> the dtype that runs faster here (process 0's choice)."""
    if not model_flags.dtype_is_auto():
        return model
    from transformer import flops

    return model.replace(dtype=flops.fastest_dtype())


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; flags start with --")
    model, data, train, decode = build_configs()
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
                    "decode": dataclasses.asdict(decode),
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
    from transformer.loop import Setup, train_and_evaluate

    cli.use_compilation_cache(_COMPILATION_CACHE.value, _WORKDIR.value)  # before compiling
    model = _resolve_dtype(model)  # after initialize: measuring starts the backend
    if jax.default_backend() == "cpu":
        from experiments import tcmalloc
        from transformer.progress import say

        say(f"memory allocator: {tcmalloc.describe()}")
    sizes = sharding.parse_mesh(_MESH.value, jax.device_count())
    sharding.check_divisibility(sizes, model, data.batch_rows if data.batching == "packed" else 0)
    logging.info("model %s, data %s, train %s, decode %s", model, data, train, decode)
    setup = Setup(
        model=model,
        train=train,
        data=data,
        decode=decode,
        workdir=_WORKDIR.value,
        mesh=_MESH.value,
        init_from=_INIT_FROM.value,
        fallback_checkpoint=_FALLBACK.value,
    )
    try:
        train_and_evaluate(setup)
    except FloatingPointError as e:
        raise cli.UserError(str(e)) from None


if __name__ == "__main__":
    cli.run(main)
