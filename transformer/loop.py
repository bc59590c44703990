"""The training loop: resume, iterate, log, evaluate, checkpoint, stop on time or SIGTERM.

`train_and_evaluate(setup)` is the whole of a training run, read top to bottom:

  1. the mesh, the workdir's config.json, the dataset and the batch pipeline;
  2. the state: resumed from the workdir's latest checkpoint, else initialized
     (from --init_from's parameters where given), else fresh;
  3. the steps, until `steps`, the time budget or SIGTERM; every `log_every`
     steps a progress line, every `eval_every` a validation, checkpoints by
     steps and by minutes;
  4. a last checkpoint, then the final evaluation (validation loss, BLEU and
     chrF on the final split), also written to workdir/results.json.

The step itself is transformer/train.py. Restarting the same command in the
same workdir continues where it stopped: the batch order is a function of the
step, so a resumed run sees the batches it would have seen.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import math
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from transformer import checkpoint, config, flops, metrics, record, sharding, trained
from transformer.config import DataConfig, DecodeConfig, ModelConfig, TrainConfig
from transformer.data import datasets, pipeline, vocab
from transformer.data.vocab import VOCAB_FILE
from transformer.evaluation import Evaluator
from transformer.progress import counted, format_duration, say
from transformer.train import (
    Program,
    TrainState,
    abstract_state,
    cooldown_factor,
    seconds_per_step,
    training_program,
)

# Steps dispatched to the devices ahead of the last one known finished. Two keep
# the device queue full (the next step is queued while one runs) and bound what
# a save or a SIGTERM has to wait for, whatever the step time.
MAX_IN_FLIGHT = 2

# With several processes, what one process's clock or signal says is agreed on
# every AGREE_EVERY steps, at the same steps everywhere: a save and a stop are
# collective, and processes that decided apart would wait for each other forever.
AGREE_EVERY = 10


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
    """What a run is given: the configs, where it writes, and how it is split."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    decode: DecodeConfig
    workdir: str
    mesh: str = "data:-1"
    init_from: str | None = None  # a workdir whose latest parameters start this run
    fallback_checkpoint: bool = False  # an unreadable newest checkpoint: use an older one

    def configs(self) -> record.Configs:
        return record.Configs(self.model, self.data, self.train, self.decode)


def train_and_evaluate(setup: Setup) -> dict:
    """Trains until `steps` (or the time budget, or SIGTERM), then evaluates.

    Returns the final figures (also written to workdir/results.json).
    """
    config.check_batch_split(setup.data, setup.train)
    if epath.Path(setup.workdir).exists() and not epath.Path(setup.workdir).is_dir():
        raise config.ConfigError(f"{setup.workdir} is a file, not a folder; give a folder's path")
    sizes = sharding.parse_mesh(setup.mesh, jax.device_count())
    sharding.check_divisibility(sizes, setup.model, _packed_rows(setup.data))
    mesh = sharding.make_mesh(sizes)
    _check_init_from(setup)
    setup = fit_recipe_to_host(setup, mesh)
    if jax.process_index() == 0:
        record.check_config(setup.workdir, setup.configs())
        if changes := record.replanned(setup.workdir, setup.configs()):
            say(
                f"resumed with other batch settings ({', '.join(changes)}): the batches "
                "from here are not those the run would have had without the change"
            )
        datasets.prepare(setup.data)
    multihost_utils.sync_global_devices("dataset prepared")
    data = pipeline.train_data(
        setup.data,
        setup.workdir,
        setup.model.vocab_size,
        setup.model.max_len,
        setup.train.seed,
        row_multiple=sizes["data"]
        * sizes["fsdp"]
        * setup.train.grad_accum_steps
        // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    program = training_program(setup.model, setup.train, mesh)
    model = program.model
    peak, peak_source = flops.device_peak(  # outside the mesh: one device
        setup.model.dtype, setup.train.peak_tflops * 1e12
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
        state, start = _resume(setup, program, mesh)
        if jax.process_index() == 0:  # rewritten only once the run is known to start
            record.write_config(setup.workdir, setup.configs())
        run = Run(
            setup=setup,
            mesh=mesh,
            data=data,
            evaluator=Evaluator(
                model, data.vocab, mesh, data=setup.data, train=setup.train, decode=setup.decode
            ),
            writer=metrics.SummaryWriter(setup.workdir, enabled=jax.process_index() == 0),
            peak_flops=peak,
        )
        say(f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_source})")
        results = run.train(state, program.step, start)
        run.writer.close()
    if jax.process_index() == 0:
        _write_results(setup.workdir, results)
    return results


def _write_results(workdir: str, results: dict) -> None:
    """workdir/results.json. Figures of the same step that this run did not
    compute (a rerun with no final evaluation) are kept from the earlier file."""
    path = epath.Path(workdir) / "results.json"
    try:
        earlier = json.loads(path.read_text()) if path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        earlier = {}
    if isinstance(earlier, dict) and earlier.get("step") == results["step"]:
        earlier.pop("preempted", None)  # this run says whether it was
        results = {**earlier, **results}
    record.write_whole(path, json.dumps(results, indent=2))


def _check_init_from(setup: Setup) -> None:
    """--init_from, checked before any work where it will be used (this workdir
    has no checkpoint yet): a training workdir with a checkpoint, of a model
    with the same shapes. Its vocabulary is the one its parameters index, so it
    becomes this workdir's (process 0 copies it); another one already here is
    refused."""
    if not setup.init_from or record.checkpoint_steps(setup.workdir):
        return
    flag = f"--init_from={setup.init_from}"
    try:
        source = record.read_configs(setup.init_from).model
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"{flag}: {e}") from None
    if not record.checkpoint_steps(setup.init_from):
        raise checkpoint.CheckpointError(f"{flag} has no checkpoint to start from")
    differ = [
        f"{name} {getattr(source, name)} there, {getattr(setup.model, name)} here"
        for name in record.SHAPE_FIELDS
        if getattr(source, name) != getattr(setup.model, name)
    ]
    if differ:
        raise checkpoint.CheckpointError(
            f"{flag} trained a model of other shapes ({'; '.join(differ)}); give its model flags"
        )
    theirs = epath.Path(setup.init_from) / VOCAB_FILE
    mine = epath.Path(setup.workdir) / VOCAB_FILE
    if mine.exists():
        if mine.read_bytes() != theirs.read_bytes():
            raise checkpoint.CheckpointError(
                f"{setup.workdir} has a vocabulary other than that of {flag}, whose "
                "parameters index its own; use a new --workdir"
            )
    elif jax.process_index() == 0:
        vocab.install(mine, theirs.read_bytes())
        say(f"vocabulary: {theirs}, which {flag}'s parameters were trained with")


def _packed_rows(data: DataConfig) -> int:
    return data.batch_rows if data.batching == "packed" else 0


def fit_recipe_to_host(setup: Setup, mesh) -> Setup:
    """No dropout where the time budget buys fewer than `dropout_min_steps` steps.

    Decided once, when the workdir is new, from the compiled step timed on a
    batch of the run's shape; a resumed run keeps what its config.json records,
    whatever its own budget (one that trains on by --steps alone has none).
    """
    train, model = setup.train, setup.model
    if model.dropout <= 0:
        return setup
    no_dropout = model.replace(dropout=0.0, attention_dropout=0.0, relu_dropout=0.0)
    if (epath.Path(setup.workdir) / record.CONFIG_FILE).exists():
        recorded = record.read_configs(setup.workdir)
        was = recorded.train  # a recipe that could have turned dropout off
        adapted = recorded.model.dropout == 0 and was.train_minutes and was.dropout_min_steps
        return dataclasses.replace(setup, model=no_dropout) if adapted else setup
    if not (train.train_minutes and train.dropout_min_steps):
        return setup
    data = setup.data
    rows, length = data.batch_rows, data.row_length
    if data.batching == "bucketed":
        length = model.max_len
        # The rows split over the batch's devices and into micro-batches, as the run's do.
        multiple = mesh.shape["data"] * mesh.shape["fsdp"] * train.grad_accum_steps
        rows = max(1, data.tokens_per_batch // length // multiple) * multiple
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
        seconds = seconds_per_step(model, train, mesh, rows, length)
    if jax.process_count() > 1:  # every process decides alike: process 0's timing
        seconds = float(multihost_utils.broadcast_one_to_all(np.float32(seconds)))
    steps = min(train.steps, int(60 * train.train_minutes / seconds))
    budget = counted(train.train_minutes, "minute")
    measured = f"a step takes {seconds:.2f}s here: about {steps:,} steps in {budget}"
    if steps >= train.dropout_min_steps:
        say(f"{measured}, dropout {model.dropout:g} kept")
        return setup
    say(f"{measured}, under {train.dropout_min_steps:,}: training without dropout")
    return dataclasses.replace(setup, model=no_dropout)


# ----------------------------------------------------------------------------
# Where a run starts
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Start:
    step: int = 0
    train_seconds: float = 0.0  # training time of the runs before this one


def _resume(setup: Setup, program: Program, mesh) -> tuple[TrainState, Start]:
    """The workdir's latest checkpoint, else --init_from's parameters, else a fresh state.

    -> (state, where this run starts).
    """
    abstract, shardings = abstract_state(program.model, program.optimizer, setup.train.seed, mesh)
    mngr = checkpoint.manager(setup.workdir, setup.train.keep_checkpoints)
    restored = checkpoint.restore_latest(
        mngr, abstract.params, abstract.opt_state, fallback=setup.fallback_checkpoint
    )
    mngr.close()
    if restored is not None:
        meta = restored.meta
        state = TrainState(
            step=jnp.asarray(meta["step"], jnp.int32),
            params=restored.params,
            opt_state=restored.opt_state,
            rng=jnp.asarray(meta["rng"], jnp.uint32),
        )
        say(f"resumed from step {restored.step} ({mngr.directory})")
        start = Start(restored.step, float(meta.get("train_seconds", 0.0)))
        return jax.device_put(state, shardings), start
    state = program.init(jax.random.key(setup.train.seed))
    if setup.init_from:
        source = checkpoint.manager(setup.init_from, read_only=True)
        loaded = checkpoint.restore_latest(source, abstract.params)
        source.close()
        if loaded is None:
            raise checkpoint.CheckpointError(f"--init_from={setup.init_from} has no checkpoint")
        state = state.replace(params=loaded.params)
        say(f"initialized parameters from {setup.init_from} step {loaded.step}")
    return state, Start()


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class Run:
    """The parts a run's loop works with, built once by train_and_evaluate."""

    setup: Setup
    mesh: jax.sharding.Mesh
    data: pipeline.TrainData
    evaluator: Evaluator
    writer: metrics.SummaryWriter
    peak_flops: float

    def train(self, state: TrainState, step_fn, start: Start) -> dict:
        """Steps from `start` until the run ends, then the final evaluation -> results."""
        cfg = self.setup.train
        clock = Clock(cfg, start.train_seconds)
        saver = Saver(self.setup, start.step)
        preemption = Preemption(start.step)
        progress = Progress(self.setup, self.writer, self.peak_flops)
        in_flight: collections.deque = collections.deque()  # a metric of each unfinished step
        step_flops = _cached_step_flops(self.setup.model)
        step = start.step
        # Batch n is a function of n: the data position is the step (one batch a step).
        iterator = self.data.iterator(start=step)
        place = sharding.batch_placer(self.mesh)
        batch = place(next(iterator))
        if step >= cfg.steps:
            say(f"step {step} is at or past --steps={cfg.steps}: nothing to train")
        try:
            while step < cfg.steps and not preemption.stop:
                left = clock.minutes_left(step)
                if left is not None and left <= 0:
                    say(f"time budget of {cfg.train_minutes:g} minutes used at step {step}")
                    break
                state, step_metrics = step_fn(
                    state, batch, np.float32(cooldown_factor(cfg, step, left))
                )
                step += 1
                rows, length = batch["targets"].shape
                progress.add(step_metrics, step_flops(rows, batch["inputs"].shape[1], length))
                in_flight.append(step_metrics["loss"])
                if step == start.step + 1:  # once: the compilation is in this first step
                    jax.block_until_ready(step_metrics["loss"])
                    say(f"first step compiled and ran in {clock.run_seconds():.1f}s")
                if step < cfg.steps:  # the next batch, placed while this step runs
                    batch = place(next(iterator))
                if len(in_flight) > MAX_IN_FLIGHT:
                    in_flight.popleft().block_until_ready()
                    preemption.completed = step - len(in_flight)
                if jax.process_count() > 1 and step % AGREE_EVERY == 0:
                    local = np.array([preemption.requested, saver.time_due()], np.int32)
                    agreed = multihost_utils.process_allgather(local)  # [processes, 2]
                    preemption.agreed = bool(agreed[:, 0].any())  # a signal anywhere
                    saver.agreed_time_due = bool(agreed[0, 1])  # process 0's clock
                if step % cfg.log_every == 0:
                    progress.report(step, clock.minutes_left(step))
                if cfg.eval_every and step % cfg.eval_every == 0:
                    with clock.paused():
                        self.writer.write(
                            step, self.evaluator.validate(state.params), prefix="eval/"
                        )
                if saver.due(step):
                    # Not training time: a budget that ran out during a save would end
                    # the run at this step, recorded as short of it, and a rerun would
                    # train one step more.
                    with clock.paused():
                        saver.save(step, state, clock.training_seconds())
            if progress.pending:  # the last steps' line; a NaN among them stops here too
                progress.report(step, clock.minutes_left(step))
        except FloatingPointError as e:
            saver.close()
            raise FloatingPointError(
                f"{e}; stopped without saving: the last good checkpoint is step "
                f"{saver.saved_step}. Lower --learning_rate_scale, set --grad_clip_norm, "
                "or use --nan_policy=skip"
            ) from None
        finally:
            preemption.close(step)
            iterator.close()  # stops grain's worker processes, if any
        if step != saver.saved_step:
            saver.save(step, state, clock.training_seconds())
        saver.close()
        train_minutes = clock.training_seconds() / 60
        results = {"step": step, "train_minutes": train_minutes}
        preempted = {**results, "preempted": True}
        if preemption.stop:
            return preempted
        try:
            with preemption.interrupting():
                return {**results, **self._final(state.params, step)}
        except Preempted:
            say(
                f"SIGTERM received during the final evaluation: stopped; step {step} is saved, "
                "and the same command evaluates it"
            )
            return preempted

    def _final(self, params, step: int) -> dict:
        """The final evaluation (of the mean of the last checkpoints, where asked)."""
        results, last = {}, self.setup.train.final_eval_average_last
        if last > 1:
            params, averaged = average_last(self.setup.workdir, params, last)
            results["averaged_steps"] = averaged
            say(f"final evaluation with the mean of checkpoints {', '.join(map(str, averaged))}")
        results.update(self.evaluator.final(params))
        final = {k: v for k, v in results.items() if isinstance(v, float)}
        self.writer.write(step, final, "final/")
        return results


def average_last(workdir: str, params, last: int) -> tuple[Any, list[int]]:
    """The mean of the parameters of the workdir's last `last` checkpoints (all of them
    if fewer), laid out as `params`, and their steps: the paper's evaluation model
    (section 6.1)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    steps = record.checkpoint_steps(workdir)[-last:]
    return trained.mean_params(workdir, abstract, steps), steps


def _cached_step_flops(model: ModelConfig):
    """(rows, source length, target length) -> FLOPs of a step, computed once per shape."""

    @functools.cache
    def step_flops(rows: int, source_length: int, target_length: int) -> float:
        return flops.train_step_flops(model, rows, source_length, target_length)

    return step_flops


class Clock:
    """Training time: this run's and the runs' before it, evaluations and saves excluded.

    With several processes the time budget is process 0's clock, fetched every
    10 steps at the same steps everywhere, so that all stop and anneal alike.
    """

    def __init__(self, train: TrainConfig, earlier_seconds: float):
        self.budget_minutes = train.train_minutes
        self.earlier = earlier_seconds
        self.start = time.monotonic()
        self.excluded = 0.0
        self.shared: float | None = None

    def run_seconds(self) -> float:
        return time.monotonic() - self.start

    def training_seconds(self) -> float:
        return self.earlier + self.run_seconds() - self.excluded

    def minutes_left(self, step: int) -> float | None:
        """Of the time budget (None without one)."""
        if not self.budget_minutes:
            return None
        seconds = self.training_seconds()
        if jax.process_count() > 1:
            if step % 10 == 0 or self.shared is None:
                self.shared = float(multihost_utils.broadcast_one_to_all(np.float32(seconds)))
            seconds = self.shared
        return self.budget_minutes - seconds / 60

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count as training (evaluations)."""
        begin = time.monotonic()
        try:
            yield
        finally:
            self.excluded += time.monotonic() - begin


class Saver:
    """Checkpoints by steps and by minutes; remembers the last step saved."""

    def __init__(self, setup: Setup, start_step: int):
        self.train = setup.train
        self.mngr = checkpoint.manager(setup.workdir, self.train.keep_checkpoints)
        self.saved_step, self.last_save = start_step, time.monotonic()
        self.agreed_time_due = False  # several processes: set by the loop (AGREE_EVERY)

    def time_due(self) -> bool:
        """Whether checkpoint_minutes have passed since the last save, by this clock."""
        minutes = self.train.checkpoint_minutes
        return bool(minutes and time.monotonic() - self.last_save >= 60 * minutes)

    def due(self, step: int) -> bool:
        every = self.train.checkpoint_every
        by_steps = every and step % every == 0
        if jax.process_count() > 1:  # process 0's clock, as agreed
            by_time, self.agreed_time_due = self.agreed_time_due, False
        else:
            by_time = self.time_due()
        return bool(by_steps or by_time)

    def save(self, step: int, state: TrainState, train_seconds: float) -> None:
        meta = {
            "step": step,
            "rng": state.rng,
            "data": {"next_index": step},  # what earlier versions resume from
            "train_seconds": train_seconds,
        }
        checkpoint.save(self.mngr, step, state.params, state.opt_state, meta)
        self.saved_step, self.last_save = step, time.monotonic()

    def close(self) -> None:
        """Waits for an asynchronous save to finish."""
        checkpoint.wait(self.mngr)
        checkpoint.close(self.mngr)


class Preemption:
    """Turns SIGTERM (a spot VM's preemption notice) and a first Ctrl-C (SIGINT)
    into a flag the loop checks: it saves a checkpoint and stops. A second
    Ctrl-C stops at once, unsaved, as does one after the loop (`close`).

    `completed` is the last step the devices have finished, kept up to date by
    the loop; with at most MAX_IN_FLIGHT steps queued behind it, the checkpoint
    saved after a signal is at most MAX_IN_FLIGHT + 1 steps later. With several
    processes all stop at the next step they agree at (AGREE_EVERY), whichever
    of them was signalled.
    """

    def __init__(self, completed: int):
        self.requested, self.completed = False, completed
        self.agreed = False  # several processes: set by the loop (AGREE_EVERY)
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            again = " (Ctrl-C again: stop at once, unsaved)"
        else:
            again = ""
        name = signal.Signals(signum).name
        say(f"{name} received after step {self.completed}: saving a checkpoint and stopping{again}")
        self.requested = True

    @property
    def stop(self) -> bool:
        """Whether the loop stops: this process's signal, or with several
        processes one that any of them received, as last agreed."""
        return self.agreed if jax.process_count() > 1 else self.requested

    def close(self, step: int) -> None:
        """After the loop, which stopped at `step`: Ctrl-C interrupts again (the
        last save is then the only thing a SIGTERM still waits for)."""
        self.completed = step
        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextlib.contextmanager
    def interrupting(self):
        """SIGTERM raises Preempted within: the final evaluation has nothing to
        save, and a spot VM's notice leaves it seconds, not minutes."""
        if not self.installed:
            yield
            return

        def stop(signum, frame):
            raise Preempted

        signal.signal(signal.SIGTERM, stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Preempted(BaseException):
    """SIGTERM during the final evaluation (a BaseException, as KeyboardInterrupt: no
    library's `except Exception` takes it for a failure of its own)."""


# ----------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------


class Progress:
    """Collects step metrics (as device arrays) and reports them every `log_every` steps."""

    def __init__(self, setup: Setup, writer: metrics.SummaryWriter, peak_flops: float):
        self.train, self.writer, self.peak = setup.train, writer, peak_flops
        self.pending: list[tuple[dict, float]] = []  # (metrics, FLOPs) of each step
        self.last_time = time.monotonic()

    def add(self, step_metrics: dict, step_flops: float) -> None:
        self.pending.append((step_metrics, step_flops))

    def report(self, step: int, minutes_left: float | None) -> dict:
        """Fetches the pending metrics, prints one line, writes the summaries.

        Raises FloatingPointError if a step was not finite and the policy is stop.
        """
        fetched = jax.device_get([m for m, _ in self.pending])
        now = time.monotonic()
        elapsed = max(now - self.last_time, 1e-9)
        self.last_time = now
        first = step - len(fetched) + 1
        bad = [first + i for i, m in enumerate(fetched) if m["nonfinite"]]
        if bad and self.train.nan_policy == "stop":
            raise FloatingPointError(f"loss or gradients not finite at step {bad[0]}")
        summary = _summarize(fetched, elapsed)
        summary["mfu"] = sum(f for _, f in self.pending) / elapsed / self.peak
        self.pending = []
        eta = (self.train.steps - step) / summary["steps_per_second"]
        if minutes_left is not None:
            eta = min(eta, minutes_left * 60)
        say(
            f"step {step}/{self.train.steps} | loss {summary['loss']:.3f} | "
            f"acc {100 * summary['accuracy']:.1f}% | ppl {summary['perplexity']:.2f} | "
            f"lr {summary['learning_rate']:.2e} | gnorm {summary['grad_norm']:.2f} | "
            f"{summary['steps_per_second']:.2f} steps/s | "
            f"{summary['target_tokens_per_second']:,.0f} tgt tok/s | "
            f"MFU {100 * summary['mfu']:.1f}% | ETA {format_duration(eta)}"
        )
        self.writer.write(step, summary, prefix="train/")
        return summary


def _summarize(fetched: list[dict], elapsed: float) -> dict:
    """Means and rates over the steps of one report."""
    total = {
        k: float(np.sum([m[k] for m in fetched]))
        for k in ("target_tokens", "source_tokens", "nonfinite")
    }
    mean = {
        k: float(np.mean([m[k] for m in fetched]))
        for k in ("loss", "nll", "accuracy", "learning_rate", "grad_norm")
    }
    return {
        **mean,
        "perplexity": math.exp(min(mean["nll"], 50)),
        "steps_per_second": len(fetched) / elapsed,
        "target_tokens_per_second": total["target_tokens"] / elapsed,
        "tokens_per_second": (total["target_tokens"] + total["source_tokens"]) / elapsed,
        # Real (unpadded) tokens a step: what the paper's "about 25000" counts.
        "source_tokens_per_step": total["source_tokens"] / len(fetched),
        "target_tokens_per_step": total["target_tokens"] / len(fetched),
        "skipped_steps": int(total["nonfinite"]),
    }
