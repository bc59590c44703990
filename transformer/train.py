"""Training: the label-smoothed loss, the paper's optimizer and schedule, the step, the loop.

`train_step(state, batch, lr_factor) -> (state, metrics)` is a plain function, jitted
with the state donated and sharded over the mesh; `train_and_evaluate` is the
one loop that drives it: data, checkpoints, logging, evaluation.

Shapes: R rows of a batch, T target length, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import signal
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from transformer import checkpoint, evaluation, flops, metrics, sharding, trained
from transformer.config import DataConfig, ModelConfig, TrainConfig
from transformer.data import datasets, pipeline
from transformer.model import Transformer

# ----------------------------------------------------------------------------
# State, schedule, optimizer
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2]: the run's dropout key; step keys are folded in


def learning_rate_schedule(
    d_model: int, warmup_steps: int, scale: float = 1.0, decay: str = "rsqrt"
):
    """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step from 1.

    Linear warmup for `warmup_steps`, then decay with the inverse square root
    of the step (the paper's equation 3). With decay="constant" the rate holds
    its peak, scale * (d_model * warmup)^-0.5, after the warmup (for short runs
    that end with a cooldown).
    """

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        after_warmup = step**-0.5 if decay == "rsqrt" else jnp.float32(warmup_steps**-0.5)
        return scale * d_model**-0.5 * jnp.minimum(after_warmup, step * warmup_steps**-1.5)

    return schedule


def _schedule(model: ModelConfig, train: TrainConfig):
    return learning_rate_schedule(
        model.d_model, train.warmup_steps, train.learning_rate_scale, train.lr_decay
    )


def make_optimizer(model: ModelConfig, train: TrainConfig) -> optax.GradientTransformation:
    """Adam(0.9, 0.98, 1e-9) on the paper's schedule, optionally after norm clipping."""
    adam = optax.adam(
        _schedule(model, train), b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps
    )
    if train.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adam)
    return adam


def cooldown_factor(train: TrainConfig, step: int, minutes_left: float | None) -> float:
    """The learning rate's multiplier at `step`: 1, then linearly down to 0 over
    the last `cooldown_fraction` of the run.

    The run ends at `steps` or when the `train_minutes` budget is used, whichever
    comes first, so the factor is the smaller of a step-based and (with a budget)
    a time-based ramp: a time-budgeted run anneals whatever speed its machine has.
    """
    fraction = train.cooldown_fraction
    if fraction <= 0:
        return 1.0
    factor = (train.steps - step) / (fraction * train.steps)
    if minutes_left is not None and train.train_minutes:
        factor = min(factor, minutes_left / (fraction * train.train_minutes))
    return float(min(max(factor, 0.0), 1.0))


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------


def cross_entropy_sums(
    logits: jax.Array, targets: jax.Array, smoothing: float
) -> dict[str, jax.Array]:
    """Sums over the non-padding target tokens of a batch, all in float32.

    logits [R, T, V], targets [R, T] -> {loss, nll, correct, tokens}. `loss` is
    the cross-entropy against the smoothed distribution (1 - eps on the target,
    eps / (V - 1) elsewhere) minus that distribution's entropy, so a perfect
    prediction scores 0; `nll` is the plain negative log-likelihood (perplexity).
    """
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    weights = (targets != 0).astype(jnp.float32)
    # log p = logit - logsumexp: only [R, T] reductions of the logits, never the
    # [R, T, V] log-softmax, which cost two more passes over the largest array
    # of the step, forward and backward (the loss took 2.3x as long that way).
    lse = jax.nn.logsumexp(logits, axis=-1)  # [R, T]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    target_log_prob = target_logit - lse
    sum_log_probs = jnp.sum(logits, axis=-1) - vocab * lse
    confidence, low = 1.0 - smoothing, smoothing / (vocab - 1)
    smoothed = -(confidence - low) * target_log_prob - low * sum_log_probs
    entropy = -(
        confidence * math.log(confidence) + (low * math.log(low) * (vocab - 1) if low > 0 else 0.0)
    )
    # Correct when the target's logit is the largest (a tie counts as correct).
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return {
        "loss": jnp.sum((smoothed - entropy) * weights),
        "nll": jnp.sum(-target_log_prob * weights),
        "correct": jnp.sum(correct * weights),
        "tokens": jnp.sum(weights),
    }


def _model_inputs(batch: dict) -> dict:
    keys = ("inputs_positions", "targets_positions", "inputs_segmentation", "targets_segmentation")
    names = ("inputs_position", "targets_position", "inputs_segmentation", "targets_segmentation")
    return {key: batch[name] for key, name in zip(keys, names, strict=True) if name in batch}


def loss_sums(params, batch, rng, model: Transformer, smoothing: float, deterministic: bool):
    """(sum of the smoothed loss, all sums) of one batch; differentiable in params."""
    rngs = None if rng is None else {"dropout": rng}
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        batch["targets"],
        deterministic=deterministic,
        rngs=rngs,
        **_model_inputs(batch),
    )
    sums = cross_entropy_sums(logits, batch["targets"], smoothing)
    sums["source_tokens"] = jnp.sum(batch["inputs"] != 0).astype(jnp.float32)
    return sums["loss"], sums


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------


def _micro_batches(batch: dict, k: int) -> dict:
    """[R, ...] -> [k, R/k, ...], micro-batch i taking rows i, i+k, ... so that
    every device's rows are spread evenly over the micro-batches."""

    def split(x):
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def _gradient_sums(params, batch, rng, model, train: TrainConfig):
    """Gradients of the summed loss and the sums, over k micro-batches in sequence."""
    grad_fn = jax.grad(loss_sums, has_aux=True)
    args = (model, train.label_smoothing, False)
    k = train.grad_accum_steps
    if k == 1:
        return grad_fn(params, batch, rng, *args)

    def accumulate(carry, micro):
        batch_i, i = micro
        grads, sums = grad_fn(params, batch_i, jax.random.fold_in(rng, i), *args)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = (
        jax.tree.map(jnp.zeros_like, params),
        dict.fromkeys(
            ("loss", "nll", "correct", "tokens", "source_tokens"), jnp.zeros((), jnp.float32)
        ),
    )
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (_micro_batches(batch, k), jnp.arange(k)))
    return grads, sums


def train_step(
    state: TrainState,
    batch: dict,
    lr_factor: jax.Array | float = 1.0,
    *,
    model: Transformer,
    optimizer: optax.GradientTransformation,
    train: TrainConfig,
):
    """One optimizer update on a global batch -> (new state, metrics).

    The loss is normalized by the non-padding target tokens of the whole
    global batch (all micro-batches). `lr_factor` multiplies the scheduled
    learning rate (the loop's cooldown; Adam's update is linear in it). A step
    whose loss or gradient is not finite changes nothing but the step counter
    and is flagged in the metrics.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    grads, sums = _gradient_sums(state.params, batch, rng, model, train)
    tokens = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * lr_factor, updates)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    schedule = _schedule(model.config, train)
    metrics = {
        "loss": sums["loss"] / tokens,
        "nll": sums["nll"] / tokens,
        "accuracy": sums["correct"] / tokens,
        "target_tokens": sums["tokens"],
        "source_tokens": sums["source_tokens"],
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step) * lr_factor,
        "nonfinite": (~finite).astype(jnp.int32),
    }
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
    )
    return new_state, metrics


def jit_train_step(model, optimizer, train: TrainConfig, mesh, state_shardings):
    """train_step jitted over the mesh: state donated, batch rows split over (data, fsdp).

    Called as step(state, batch, lr_factor); lr_factor is a traced scalar, so
    changing it does not recompile.
    """
    return jax.jit(
        functools.partial(train_step, model=model, optimizer=optimizer, train=train),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def eval_step(params, batch: dict, *, model: Transformer, smoothing: float) -> dict:
    """Loss sums of one evaluation batch (no dropout)."""
    _, sums = loss_sums(params, batch, None, model, smoothing, True)
    return sums


# ----------------------------------------------------------------------------
# Initialization and restoring
# ----------------------------------------------------------------------------


def init_fn(model: Transformer, optimizer, seed: int, row_length: int = 8):
    """rng -> a boxed TrainState (parameters carry their logical axis names)."""

    def init(rng):
        tokens = jnp.ones((1, row_length), jnp.int32)
        params = model.init(rng, tokens, tokens)["params"]
        dropout_key = jax.random.key_data(jax.random.key(seed + 1))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=dropout_key,
        )

    return init


def create_state(model, optimizer, seed: int, mesh) -> tuple[TrainState, Any]:
    """A fresh TrainState, initialized straight into its shardings."""
    return sharding.sharded_init(init_fn(model, optimizer, seed), jax.random.key(seed), mesh)


def abstract_state(model, optimizer, seed: int, mesh) -> tuple[TrainState, Any]:
    """ShapeDtypeStructs of the TrainState with their shardings (nothing allocated)."""
    init = init_fn(model, optimizer, seed)
    boxed = jax.eval_shape(init, jax.random.key(seed))
    shardings = sharding.logical_shardings(mesh, nn.get_partition_spec(boxed))
    shapes = jax.eval_shape(lambda rng: nn.unbox(init(rng)), jax.random.key(seed))
    return checkpoint.abstract_like(shapes, shardings), shardings


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """What the loop is given: the configs, where it writes, and how it is split."""

    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    workdir: str
    mesh: str = "data:-1"
    init_from: str | None = None  # a workdir whose latest parameters start this run
    fallback_checkpoint: bool = False  # an unreadable newest checkpoint: use an older one


class Preemption:
    """Turns SIGTERM (a spot VM's preemption notice) into a flag the loop checks.

    `completed` is the last step the devices have finished, kept up to date by
    the loop; with at most MAX_IN_FLIGHT steps queued behind it, the checkpoint
    saved after a signal is at most MAX_IN_FLIGHT + 1 steps later.
    """

    def __init__(self, completed: int):
        self.requested, self.completed = False, completed
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        say(f"SIGTERM received after step {self.completed}: saving a checkpoint and stopping")
        self.requested = True


# Steps dispatched to the devices ahead of the last one known finished. Two keep
# the device queue full (the next step is queued while one runs) and bound what
# a save or a SIGTERM has to wait for, whatever the step time.
MAX_IN_FLIGHT = 2


# Model settings that change how, not what, is computed: a run may resume with others.
COMPUTE_ONLY = ("dtype", "remat")


def _write_config(setup: Setup) -> None:
    """workdir/config.json: what translate/evaluate need; refuses another model's workdir."""
    path = epath.Path(setup.workdir) / "config.json"
    record = {
        "model": dataclasses.asdict(setup.model),
        "data": dataclasses.asdict(setup.data),
        "train": dataclasses.asdict(setup.train),
    }
    if path.exists():
        previous = trained.read_record(path)["model"]
        # A field missing from an older config.json had its default then (read_configs too);
        # a shape field has no default to fall back on.
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(ModelConfig)
            if f.name not in trained.SHAPE_FIELDS
        }
        changed = sorted(
            k
            for k in record["model"]
            if k not in COMPUTE_ONLY and previous.get(k, defaults.get(k)) != record["model"][k]
        )
        if changed:
            raise checkpoint.CheckpointError(
                f"{setup.workdir} holds a model with a different config ({', '.join(changed)}); "
                "use a new --workdir or the same model flags"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def say(message: str) -> None:
    """A line for the person running training (process 0 only)."""
    if jax.process_index() == 0:
        print(message, flush=True)


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


class Progress:
    """Collects step metrics (as device arrays) and reports them every `log_every` steps."""

    def __init__(self, setup: Setup, writer, peak_flops: float, start_step: int):
        self.setup, self.writer, self.peak = setup, writer, peak_flops
        self.pending: list[tuple[int, dict, float]] = []
        self.last_time = time.monotonic()
        self.start_step = start_step
        self.train_seconds = 0.0

    def add(self, step: int, metrics: dict, step_flops: float) -> None:
        self.pending.append((step, metrics, step_flops))

    def report(self, step: int, remaining_minutes: float | None) -> dict:
        """Fetches the pending metrics, prints one line, writes the summaries.

        Raises FloatingPointError if a step was not finite and the policy is stop.
        """
        fetched = jax.device_get([m for _, m, _ in self.pending])
        now = time.monotonic()
        elapsed = max(now - self.last_time, 1e-9)
        self.last_time = now
        bad = [s for (s, _, _), m in zip(self.pending, fetched, strict=True) if m["nonfinite"]]
        if bad and self.setup.train.nan_policy == "stop":
            raise FloatingPointError(f"loss or gradients not finite at step {bad[0]}")
        total = {
            k: float(np.sum([m[k] for m in fetched]))
            for k in ("target_tokens", "source_tokens", "nonfinite")
        }
        mean = lambda k: float(np.mean([m[k] for m in fetched]))  # noqa: E731
        n = len(fetched)
        summary = {
            "loss": mean("loss"),
            "nll": mean("nll"),
            "accuracy": mean("accuracy"),
            "perplexity": math.exp(min(mean("nll"), 50)),
            "learning_rate": mean("learning_rate"),
            "grad_norm": mean("grad_norm"),
            "steps_per_second": n / elapsed,
            "target_tokens_per_second": total["target_tokens"] / elapsed,
            "tokens_per_second": (total["target_tokens"] + total["source_tokens"]) / elapsed,
            "mfu": sum(f for _, _, f in self.pending) / elapsed / self.peak,
            "skipped_steps": int(total["nonfinite"]),
        }
        self.pending = []
        steps_left = self.setup.train.steps - step
        eta = steps_left / summary["steps_per_second"]
        if remaining_minutes is not None:
            eta = min(eta, remaining_minutes * 60)
        if jax.process_index() == 0:
            print(
                f"step {step}/{self.setup.train.steps} | loss {summary['loss']:.3f} | "
                f"acc {100 * summary['accuracy']:.1f}% | ppl {summary['perplexity']:.2f} | "
                f"lr {summary['learning_rate']:.2e} | gnorm {summary['grad_norm']:.2f} | "
                f"{summary['steps_per_second']:.2f} steps/s | "
                f"{summary['target_tokens_per_second']:,.0f} tgt tok/s | "
                f"MFU {100 * summary['mfu']:.1f}% | ETA {_format_duration(eta)}",
                flush=True,
            )
        self.writer.write(step, summary, prefix="train/")
        return summary


def train_and_evaluate(setup: Setup) -> dict:
    """Trains until `steps` (or the time budget, or SIGTERM), then evaluates.

    Returns the final figures (also written to workdir/results.json).
    """
    cfg, model_cfg, data_cfg = setup.train, setup.model, setup.data
    is_chief = jax.process_index() == 0
    sizes = sharding.parse_mesh(setup.mesh, jax.device_count())
    mesh = sharding.make_mesh(sizes)
    rows = data_cfg.batch_rows
    sharding.check_divisibility(sizes, model_cfg, rows if data_cfg.batching == "packed" else 0)
    if is_chief:
        _write_config(setup)
        datasets.prepare(data_cfg)
    multihost_utils.sync_global_devices("dataset prepared")
    data = pipeline.train_data(
        data_cfg,
        setup.workdir,
        model_cfg.vocab_size,
        model_cfg.max_len,
        cfg.seed,
        row_multiple=sizes["data"] * sizes["fsdp"] * cfg.grad_accum_steps // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    model = Transformer(model_cfg)
    optimizer = make_optimizer(model_cfg, cfg)
    peak, peak_source = flops.device_peak(model_cfg.dtype)  # outside the mesh: one device

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
        state, state_shardings, start_step, trained_seconds = _start(setup, model, optimizer, mesh)
        step_fn = jit_train_step(model, optimizer, cfg, mesh, state_shardings)
        evaluator = evaluation.Evaluator(model, data_cfg, data.vocab, mesh, cfg)
        writer = metrics.SummaryWriter(setup.workdir, enabled=is_chief)
        say(f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_source})")
        results = _loop(
            setup,
            state,
            step_fn,
            mesh,
            data,
            evaluator,
            writer,
            peak,
            start_step,
            trained_seconds,
        )
        writer.close()
    if is_chief:
        (epath.Path(setup.workdir) / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _start(setup: Setup, model, optimizer, mesh):
    """Resume, else init_from, else fresh.

    -> (state, shardings, step, seconds of training before this run).
    """
    abstract, shardings = abstract_state(model, optimizer, setup.train.seed, mesh)
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
        state = jax.device_put(state, shardings)
        say(f"resumed from step {restored.step} ({mngr.directory})")
        return state, shardings, restored.step, float(meta.get("train_seconds", 0.0))
    state, shardings = create_state(model, optimizer, setup.train.seed, mesh)
    if setup.init_from:
        source = checkpoint.manager(setup.init_from, read_only=True)
        loaded = checkpoint.restore_latest(source, abstract.params)
        source.close()
        if loaded is None:
            raise checkpoint.CheckpointError(f"--init_from={setup.init_from} has no checkpoint")
        state = state.replace(params=loaded.params)
        say(f"initialized parameters from {setup.init_from} step {loaded.step}")
    return state, shardings, 0, 0.0


def _loop(
    setup,
    state,
    step_fn,
    mesh,
    data,
    evaluator,
    writer,
    peak,
    start_step,
    trained_seconds,
):
    cfg = setup.train
    mngr = checkpoint.manager(setup.workdir, cfg.keep_checkpoints)
    preemption = Preemption(start_step)
    progress = Progress(setup, writer, peak, start_step)
    in_flight: collections.deque = collections.deque()  # a metric of each unfinished step
    step_flops = functools.cache(functools.partial(flops.train_step_flops, setup.model))
    step, saved_step = start_step, start_step
    loop_start = last_save = time.monotonic()
    eval_seconds = 0.0

    def training_seconds():  # this run's and the runs' before it, evaluation excluded
        return trained_seconds + time.monotonic() - loop_start - eval_seconds

    def save():
        meta = {
            "step": step,
            "rng": state.rng,
            "data": {"next_index": step},  # what earlier versions resume from
            "train_seconds": training_seconds(),
        }
        checkpoint.save(mngr, step, state.params, state.opt_state, meta)

    shared_clock = {}

    def minutes_left():
        if not cfg.train_minutes:
            return None
        seconds = training_seconds()
        if jax.process_count() > 1:
            # One clock for all processes (they must stop and anneal alike): process
            # 0's, fetched every 10 steps, at the same steps everywhere.
            if step % 10 == 0 or "seconds" not in shared_clock:
                shared_clock["seconds"] = float(
                    multihost_utils.broadcast_one_to_all(np.float32(seconds))
                )
            seconds = shared_clock["seconds"]
        return cfg.train_minutes - seconds / 60

    # Batch n is a function of n: the data position is the step (one batch a step).
    iterator = data.iterator(start=start_step)
    batch = sharding.global_batch(mesh, next(iterator))
    try:
        while step < cfg.steps and not preemption.requested:
            left = minutes_left()
            if left is not None and left <= 0:
                say(f"time budget of {cfg.train_minutes:g} minutes used at step {step}")
                break
            state, metrics = step_fn(state, batch, np.float32(cooldown_factor(cfg, step, left)))
            step += 1
            rows, length = batch["targets"].shape
            progress.add(step, metrics, step_flops(rows, batch["inputs"].shape[1], length))
            in_flight.append(metrics["loss"])
            if step == start_step + 1:  # once: the compilation is in this first step
                jax.block_until_ready(metrics["loss"])
                say(f"first step compiled and ran in {time.monotonic() - loop_start:.1f}s")
            if step < cfg.steps:  # the next batch goes to the devices while this step runs
                batch = sharding.global_batch(mesh, next(iterator))
            if len(in_flight) > MAX_IN_FLIGHT:
                in_flight.popleft().block_until_ready()
                preemption.completed = step - len(in_flight)
            if step % cfg.log_every == 0:
                progress.report(step, minutes_left())
            if cfg.eval_every and step % cfg.eval_every == 0:
                t = time.monotonic()
                writer.write(step, evaluator.validate(state.params), prefix="eval/")
                eval_seconds += time.monotonic() - t
            due_steps = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
            due_time = cfg.checkpoint_minutes and (
                time.monotonic() - last_save >= 60 * cfg.checkpoint_minutes
            )
            if due_steps or due_time:
                save()
                saved_step, last_save = step, time.monotonic()
    except FloatingPointError as e:
        checkpoint.wait(mngr)
        checkpoint.close(mngr)
        raise FloatingPointError(
            f"{e}; stopped without saving: the last good checkpoint is step {saved_step}. "
            "Lower --learning_rate_scale, set --grad_clip_norm, or use --nan_policy=skip"
        ) from None
    finally:
        iterator.close()  # stops grain's worker processes, if any
    if progress.pending:
        progress.report(step, minutes_left())
    if step != saved_step:
        save()
    checkpoint.wait(mngr)
    checkpoint.close(mngr)
    train_minutes = training_seconds() / 60
    if preemption.requested:
        return {"step": step, "preempted": True, "train_minutes": train_minutes}
    results = {"step": step, "train_minutes": train_minutes, **evaluator.final(state.params)}
    writer.write(step, {k: v for k, v in results.items() if isinstance(v, float)}, "final/")
    return results
