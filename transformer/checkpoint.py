"""Checkpoints with orbax: the train state in parts, saved asynchronously, resumed by default.

A checkpoint is a folder `<workdir>/checkpoints/<step>` with three items:
  params     the model parameters (all that translation needs)
  opt_state  the optimizer state
  meta       JSON: step, dropout key, the data iterator's state
Orbax writes each save to a temporary folder and renames it when complete,
so a run killed mid-save leaves no half checkpoint behind under a step name.

Where a run starts (written once, here and in train.py):
  1. the latest checkpoint in the workdir (resume, the default);
  2. else --init_from, a checkpoint whose parameters start a new run;
  3. else a fresh initialization.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from transformer.progress import hide_library_warning

CHECKPOINTS = "checkpoints"
ITEMS = ("params", "opt_state", "meta")


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message names it and what to do."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose arrays are not this run's model's or optimizer's: written
    with other flags, not damaged, so never moved aside by a fallback."""


_MISMATCH = "it was written with other model or optimizer flags; rerun with those"

# Orbax's words for a tree of arrays other than the one asked for.
_OTHER_TREE = ("tree structures do not match", "is not compatible with the stored shape")


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
    """workdir/checkpoints, made absolute (orbax refuses relative paths)."""
    if "://" not in str(workdir):
        workdir = os.path.abspath(workdir)
    return epath.Path(workdir) / CHECKPOINTS


def manager(
    workdir, keep: int | None = None, *, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
    """The workdir's CheckpointManager; keeps the last `keep` checkpoints."""
    # Orbax logs "Metadata file does not exist" from several threads for a step folder
    # it did not finish (empty, or copied in part); `restore` names such a checkpoint
    # in one line, and the warnings would come before it.
    hide_library_warning("Metadata file does not exist")
    # Reading only: nothing is created or cleaned up. (Orbax's own read_only
    # option does the same but warns twice on every use.)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any | None
    meta: dict


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
    """Starts an (asynchronous) save of the state at `step`."""
    meta = {**meta, "fingerprint": fingerprint(params)}
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(_jsonable(meta)),
    )
    try:
        mngr.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 - includes the failure of the previous async save
        raise _write_error(mngr, step, e) from e


def wait(mngr: ocp.CheckpointManager) -> None:
    """Waits for the asynchronous save in flight; a failed write is a CheckpointError."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        raise _write_error(mngr, None, e) from e


def _reason(error: BaseException) -> str:
    """The most telling message in an exception chain: an OSError's (disk full...) if any."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(error).split())
    system = re.search(r": ([^:\[]+?) \[os_error_code", text)  # TensorStore's OS errors
    return system.group(1) if system else (text[:300] or type(error).__name__)


def close(mngr: ocp.CheckpointManager) -> None:
    """Closes the manager, which also finishes a save in flight (its failure is one line)."""
    try:
        mngr.close()
    except Exception as e:  # noqa: BLE001
        raise _write_error(mngr, None, e) from e


def fingerprint(tree) -> list[int]:
    """A 32-bit sum of the raw bits of every array: any altered word changes it.

    Orbax stores no checksums; this, kept in the checkpoint's meta, tells a
    checkpoint whose bytes changed on disk from a good one.
    """

    def bits(x):
        x = jnp.asarray(x)
        words = jax.lax.bitcast_convert_type(x, jnp.uint32) if x.dtype.itemsize == 4 else x
        return jnp.sum(words.astype(jnp.uint32), dtype=jnp.uint32)

    return [int(v) for v in jax.device_get(jax.tree.leaves(jax.tree.map(bits, tree)))]


def _write_error(mngr: ocp.CheckpointManager, step: int | None, error: Exception):
    reason = _reason(error)
    complete = sorted(mngr.all_steps())
    kept = f"the newest complete checkpoint is step {complete[-1]}" if complete else "none exists"
    which = f"checkpoint {step}" if step is not None else "a checkpoint"
    return CheckpointError(
        f"cannot write {which} in {mngr.directory}: {reason}; {kept}. "
        "Free space (or fix permissions) and rerun the same command to resume"
    )


def _jsonable(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=lambda x: np.asarray(x).tolist()))


def restore(
    mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state=None
) -> Restored:
    """Restores `step` into the shardings of the abstract trees (opt_state optional).

    Raises CheckpointError naming the checkpoint when it is unreadable or its
    arrays do not match the model.
    """
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    path = mngr.directory / str(step)
    missing = [name for name in items if not (path / name).exists()]
    if missing:  # an empty or partial folder under a step's name, not orbax's work
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {', '.join(missing)}")
    try:
        with _stderr_held_back():
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
        if any(words in str(e) for words in _OTHER_TREE):
            raise CheckpointMismatchError(
                f"checkpoint {path} holds other arrays than this run's state: {_MISMATCH}"
            ) from e
        raise CheckpointError(f"checkpoint {path} cannot be restored: {_tensorstore(e)}") from e
    _check_shapes(path, abstract_params, restored["params"])
    expected = restored["meta"].get("fingerprint")
    if expected is not None and fingerprint(restored["params"]) != list(expected):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its parameters do not match the fingerprint "
            "written with them (a file was altered or damaged)"
        )
    return Restored(step, restored["params"], restored.get("opt_state"), restored["meta"])


def _tensorstore(error: Exception) -> str:
    """A TensorStore/orbax error's message without its dumps: TensorStore appends its
    spec (hundreds of characters) and nests 'Error opening "<driver>" driver: '."""
    reason = " ".join(str(error).split())
    reason = re.split(
        r"\s*See full TensorStore details|\s*<bound method|\s*\[tensorstore_spec", reason
    )[0]
    reason = re.sub(r'Error opening "[\w.]+" driver: ', "", reason)
    return reason[:300].rstrip(". ")


@contextlib.contextmanager
def _stderr_held_back(grace_seconds: float = 1.0):
    """Holds back what is written to stderr (fd 2) during a restore.

    When one array cannot be read, orbax's event loop stops and closes while
    TensorStore still reads the other arrays; each read that ends then prints
    "RuntimeError: Event loop is closed" with a traceback from a TensorStore
    thread, during the restore and shortly after it, ahead of our one-line
    error. So stderr goes to a temporary file: after a restore that succeeds
    its content is written out (orbax's warnings are kept); after one that
    fails, the reads still running are given `grace_seconds` to end, and the
    file, noise and all, is dropped: the error says what went wrong.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            if failed:
                time.sleep(grace_seconds)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                held.seek(0)
                os.write(2, held.read())


def _check_shapes(path, expected, restored) -> None:
    for (key, want), got in zip(
        jax.tree_util.tree_leaves_with_path(expected),
        jax.tree_util.tree_leaves(restored),
        strict=True,
    ):
        if tuple(want.shape) != tuple(got.shape):
            raise CheckpointMismatchError(
                f"checkpoint {path} holds {jax.tree_util.keystr(key)} of shape {got.shape}, "
                f"the model expects {want.shape}: {_MISMATCH}"
            )


def restore_latest(
    mngr, abstract_params, abstract_opt_state=None, *, fallback: bool = False
) -> Restored | None:
    """The newest checkpoint, or None if there is none.

    An unreadable newest checkpoint is an error; with `fallback` the previous
    ones are tried in turn, and those newer than the first readable one are
    moved aside (nothing is deleted). A checkpoint of other flags
    (CheckpointMismatchError) is no reason to fall back: the older ones were written
    with the same flags.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    unreadable = []
    for i, step in enumerate(steps):
        try:
            restored, error = restore(mngr, step, abstract_params, abstract_opt_state), None
        except CheckpointMismatchError:
            raise
        except CheckpointError as e:
            if not fallback:
                hint = (
                    f"; rerun with --fallback_checkpoint to start from step {steps[i + 1]}"
                    if i + 1 < len(steps)
                    else ""
                )
                raise CheckpointError(f"{e}{hint}") from e
            restored, error = None, e
        if fallback and jax.process_count() > 1:
            error = _unreadable_everywhere(mngr.directory / str(step), error)
        if error is None:
            # Proven unreadable: moved aside (not deleted) so that this run can write
            # their steps again, and kept for inspection; by one process of several.
            if jax.process_index() == 0:
                for bad, why in unreadable:
                    _move_aside(mngr.directory / str(bad), why)
            return restored
        unreadable.append((step, error))
    if steps:  # moving them all aside would start the next run from scratch
        raise CheckpointError(
            f"no checkpoint in {mngr.directory} can be restored, so none was moved aside; "
            f"the newest: {unreadable[0][1]}"
        )
    return None


def _unreadable_everywhere(path, error: CheckpointError | None) -> CheckpointError | None:
    """With several processes, what each made of a checkpoint, agreed: the error if
    every process failed to read it, None if every one read it.

    A process whose peer stopped for another reason fails the restore's collectives
    too; that is not the checkpoint's fault, and the failed agreement (or a split
    verdict) is then an error that moves nothing aside.
    """
    try:
        failed = multihost_utils.process_allgather(np.int32(error is not None))
    except Exception as e:  # noqa: BLE001 - a peer is gone
        raise (
            error or CheckpointError(f"checkpoint {path}: the processes stopped agreeing")
        ) from e
    if failed.all():
        return error or CheckpointError(f"checkpoint {path} is unreadable on the other processes")
    if not failed.any():
        return None
    raise CheckpointError(
        f"checkpoint {path} is unreadable on {int(failed.sum())} of {failed.size} processes "
        "only; every host must see the same files (a shared --workdir)"
    )


def _move_aside(bad: epath.Path, error: CheckpointError) -> None:
    """Renames an unreadable step folder to <step>.unreadable (.2, .3, ... if taken)."""
    aside, n = bad.parent / f"{bad.name}.unreadable", 1
    while aside.exists():
        n += 1
        aside = bad.parent / f"{bad.name}.unreadable.{n}"
    try:
        bad.rename(aside)
    except OSError as moving:
        logging.warning("%s; could not move it aside (%s), trying the previous one", error, moving)
        return
    logging.warning("%s; moved to %s, trying the previous checkpoint", error, aside)
