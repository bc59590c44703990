"""A trained model from its workdir: configs, vocabulary and parameters, one or averaged.

Training leaves in its workdir everything that translation needs (its config,
vocabulary and checkpoints: transformer/record.py), so that `load(workdir)` is
all a user of a trained model calls.

Checkpoint averaging (the paper's section 6.1: the last 5 checkpoints of the
base model, the last 20 of the big one, written at 10-minute intervals) takes
the element-wise mean of the parameters. `write_average` stores that mean as
a workdir of its own (config, vocabulary and one checkpoint), which every
entry point loads like any other.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from transformer import checkpoint, record, sharding
from transformer.architecture import Model, build
from transformer.checkpoint import CheckpointError
from transformer.config import DataConfig, DecodeConfig, ModelConfig
from transformer.data.vocab import VOCAB_FILE, Vocabulary


@dataclasses.dataclass
class Trained:
    """What translation needs: the model, its parameters and vocabulary, and the configs."""

    model: Model
    params: Any
    vocab: Vocabulary
    data: DataConfig
    decode: DecodeConfig  # what training evaluated with: the default of translate/evaluate
    steps: tuple[int, ...]  # the checkpoint(s) the parameters come from

    def describe(self) -> str:
        if len(self.steps) == 1:
            return f"step {self.steps[0]}"
        return f"the average of steps {', '.join(map(str, self.steps))}"


def load_vocab(workdir: str, model: ModelConfig) -> Vocabulary:
    """The workdir's vocabulary; refused if it does not fit the model's embedding."""
    path = epath.Path(workdir) / VOCAB_FILE
    if not path.exists():
        raise CheckpointError(f"{workdir} has no {VOCAB_FILE}; it is needed to translate")
    vocab = Vocabulary.load(path)
    if vocab.size != model.vocab_size:
        raise CheckpointError(
            f"{path} has {vocab.size} pieces but the model was trained with "
            f"{model.vocab_size}: the vocabulary belongs to another run"
        )
    return vocab


def abstract_params(model: ModelConfig) -> Any:
    """ShapeDtypeStructs of the parameters, on the first device."""
    transformer = build(model)
    tokens = jnp.ones((1, 8), jnp.int32)
    mesh = sharding.make_mesh(dict.fromkeys(sharding.MESH_AXES, 1), jax.devices()[:1])
    init = lambda rng: transformer.init(rng, tokens, tokens)["params"]  # noqa: E731
    return sharding.abstract_init(init, jax.random.key(0), mesh)[0]


def load_params(workdir: str, model: ModelConfig, step: int) -> Any:
    mngr = checkpoint.manager(workdir, read_only=True)
    try:
        return checkpoint.restore(mngr, step, abstract_params(model)).params
    finally:
        mngr.close()


def choose_steps(workdir: str, step: int | None = None, average_last: int = 0) -> list[int]:
    """Which checkpoints to use: the latest, a given step, or the last K."""
    steps = record.checkpoint_steps(workdir)
    if not steps:
        raise CheckpointError(f"{workdir} has no checkpoint yet; train first or check the path")
    if step is not None:
        if step not in steps:
            raise CheckpointError(
                f"{workdir} has no checkpoint at step {step}; it has {_listed(steps)}"
            )
        return [step]
    if average_last:
        if average_last > len(steps):
            raise CheckpointError(
                f"cannot average the last {average_last} checkpoints: {workdir} has "
                f"{len(steps)} ({_listed(steps)}); ask for at most {len(steps)}"
            )
        return steps[-average_last:]
    return steps[-1:]


def _listed(steps: list[int]) -> str:
    return "steps " + ", ".join(map(str, steps))


def average_params(workdir: str, model: ModelConfig, steps: list[int]) -> Any:
    """The element-wise mean of the parameters of the checkpoints at `steps`, as arrays
    not committed to a device, so that any mesh the caller jits over may take them."""
    mean = mean_params(workdir, abstract_params(model), steps)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), mean)


def mean_params(workdir: str, abstract: Any, steps: list[int]) -> Any:
    """The element-wise mean of the parameters of the checkpoints at `steps`, each
    restored into `abstract`'s shapes and shardings, so that one of another shape is
    refused by name (transformer/checkpoint.py) rather than broadcast."""
    mngr = checkpoint.manager(workdir, read_only=True)
    try:
        total = None
        for step in steps:
            params = checkpoint.restore(mngr, step, abstract).params
            total = params if total is None else jax.tree.map(jnp.add, total, params)
    finally:
        mngr.close()
    return jax.tree.map(lambda x: x / len(steps), total)


def _one_checkpoint(workdir: str, model: ModelConfig, step: int) -> tuple[Any, list[int]]:
    """Its parameters (not committed to a device) and the steps they come from: the
    steps averaged into it by `write_average`, else its own."""
    mngr = checkpoint.manager(workdir, read_only=True)
    try:
        restored = checkpoint.restore(mngr, step, abstract_params(model))
    finally:
        mngr.close()
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored.params)
    return params, [int(s) for s in restored.meta.get("averaged_steps", [step])]


def load(workdir: str, *, step: int | None = None, average_last: int = 0) -> Trained:
    """The workdir's model: its latest checkpoint, a given step, or the mean of the last K."""
    configs = record.read_configs(workdir)
    model_cfg = configs.model
    vocab = load_vocab(workdir, model_cfg)
    steps = choose_steps(workdir, step, average_last)
    try:
        if len(steps) == 1:  # its meta says whether experiments.average wrote it
            params, steps = _one_checkpoint(workdir, model_cfg, steps[0])
        else:
            params = average_params(workdir, model_cfg, steps)
    except CheckpointError as e:
        others = [s for s in record.checkpoint_steps(workdir) if s not in steps]
        hint = f" (the workdir's other checkpoints: {_listed(others)})" if others else ""
        raise CheckpointError(f"{e}{hint}") from e
    return Trained(build(model_cfg), params, vocab, configs.data, configs.decode, tuple(steps))


def write_average(workdir: str, last: int, output: str) -> Trained:
    """Averages the last `last` checkpoints into a new workdir `output` and returns it.

    `output` gets the config and vocabulary of `workdir` and one checkpoint,
    at the newest averaged step, whose meta lists the steps averaged.
    """
    out = epath.Path(output)
    _check_average_output(workdir, output)  # before the restores, which take minutes at scale
    trained = load(workdir, average_last=last)
    out.mkdir(parents=True, exist_ok=True)
    for name in (record.CONFIG_FILE, VOCAB_FILE):
        (out / name).write_bytes((epath.Path(workdir) / name).read_bytes())
    mngr = checkpoint.manager(output, async_save=False)
    step = trained.steps[-1]
    meta = {
        "step": step,
        "averaged_steps": list(trained.steps),
        "source": str(workdir),
        "fingerprint": checkpoint.fingerprint(trained.params),  # checked on every restore
    }
    mngr.save(
        step,
        args=checkpoint.ocp.args.Composite(
            params=checkpoint.ocp.args.StandardSave(trained.params),
            meta=checkpoint.ocp.args.JsonSave(meta),
        ),
    )
    mngr.wait_until_finished()
    mngr.close()
    return trained


def _check_average_output(workdir: str, output: str) -> None:
    """Refuses an --output of `write_average` that is the workdir itself, holds
    checkpoints, or holds another run's config or vocabulary (never overwritten)."""
    out = epath.Path(output)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{output} is a file; give --output a folder for the average")
    if out.resolve() == epath.Path(workdir).resolve():
        raise CheckpointError("the averaged checkpoint needs its own --output, not the workdir")
    if (out / checkpoint.CHECKPOINTS).exists() and record.checkpoint_steps(output):
        raise CheckpointError(f"{output} already holds checkpoints; choose a new --output")
    for name in (record.CONFIG_FILE, VOCAB_FILE):
        mine, theirs = epath.Path(workdir) / name, out / name
        if mine.is_file() and theirs.exists() and theirs.read_bytes() != mine.read_bytes():
            raise CheckpointError(f"{output} holds another run's {name}; choose a new --output")
