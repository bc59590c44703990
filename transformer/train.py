"""Training as pure functions: the paper's schedule and optimizer, the label-smoothed
loss, the train and eval steps, and the state they work on.

`train_step(state, batch, lr_factor) -> (state, metrics)` is a plain function, jitted
with the state donated and sharded over the mesh; transformer/loop.py drives it.

Shapes: R rows of a batch, T target length, V vocabulary.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from transformer import sharding
from transformer.architecture import Model, build
from transformer.config import ModelConfig, TrainConfig
from transformer.data.batching import random_packed

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
    """Adam(0.9, 0.98, 1e-9) on the paper's schedule, optionally after norm clipping.

    The clipping keeps no state, and is applied outside optax.chain so that the
    optimizer's state is Adam's either way: a run may resume with clipping
    turned on (as the non-finite loss error advises) or off.
    """
    adam = optax.adam(
        _schedule(model, train), b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps
    )
    if train.grad_clip_norm <= 0:
        return adam
    clip = optax.clip_by_global_norm(train.grad_clip_norm)

    def update(grads, state, params=None):
        grads, _ = clip.update(grads, optax.EmptyState())
        return adam.update(grads, state, params)

    return optax.GradientTransformation(adam.init, update)


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
    # of the step, forward and backward.
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


_PACKING_KEYS = (
    "inputs_positions",
    "targets_positions",
    "inputs_segmentation",
    "targets_segmentation",
)


def _model_inputs(batch: dict) -> dict:
    """The packing columns of a batch, passed to the model as keyword arguments."""
    return {key: batch[key] for key in _PACKING_KEYS if key in batch}


def loss_sums(params, batch, rng, model: Model, smoothing: float, deterministic: bool):
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
    model: Model,
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
    applied = _schedule_count(state.opt_state, state.step)  # behind step after a skipped one
    metrics = {
        "loss": sums["loss"] / tokens,
        "nll": sums["nll"] / tokens,
        "accuracy": sums["correct"] / tokens,
        "target_tokens": sums["tokens"],
        "source_tokens": sums["source_tokens"],
        "grad_norm": grad_norm,
        "learning_rate": schedule(applied) * lr_factor,
        "nonfinite": (~finite).astype(jnp.int32),
    }
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
    )
    return new_state, metrics


def _schedule_count(opt_state, default: jax.Array) -> jax.Array:
    """The step count optax's schedule is at: the updates applied, which a
    skipped (non-finite) step does not advance."""
    states = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
    counts = [s.count for s in states if isinstance(s, optax.ScaleByScheduleState)]
    return counts[0] if counts else default


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


class Program(NamedTuple):
    """What training a model config with a recipe on a mesh is made of."""

    model: Model
    optimizer: optax.GradientTransformation
    shardings: Any  # the TrainState's
    step: Callable  # `jit_train_step`
    init: Callable  # rng -> a fresh TrainState, made in its shardings


@functools.lru_cache(maxsize=1)
def training_program(model_cfg: ModelConfig, train: TrainConfig, mesh) -> Program:
    """The Program of a config on a mesh. The last one made is kept, so that
    timing the step on this host (`seconds_per_step`) and the run that follows
    share its compilations (seconds on a CPU)."""
    model = build(model_cfg)
    optimizer = make_optimizer(model_cfg, train)
    initialize = init_fn(model, optimizer, train.seed)
    _, shardings = sharding.abstract_init(initialize, jax.random.key(train.seed), mesh)
    step = jit_train_step(model, optimizer, train, mesh, shardings)
    return Program(model, optimizer, shardings, step, sharding.jit_init(initialize, shardings))


def eval_step(params, batch: dict, *, model: Model, smoothing: float) -> dict:
    """Loss sums of one evaluation batch (no dropout)."""
    _, sums = loss_sums(params, batch, None, model, smoothing, True)
    return sums


# ----------------------------------------------------------------------------
# Initialization and restoring
# ----------------------------------------------------------------------------


def init_fn(model: Model, optimizer, seed: int, row_length: int = 8):
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
    return sharding.abstract_init(init_fn(model, optimizer, seed), jax.random.key(seed), mesh)


# ----------------------------------------------------------------------------
# What a step costs on this host
# ----------------------------------------------------------------------------


def seconds_per_step(
    model_cfg: ModelConfig, train: TrainConfig, mesh, rows: int, length: int, repeats: int = 3
) -> float:
    """Median wall time of the compiled train step over `mesh`, on a batch of `rows`
    packed rows of `length` random tokens: what this host will spend on a step.

    Compiles the step once (seconds on a CPU), for the run too where its
    config is the same (`training_program`); every process measures alike.
    """
    program = training_program(model_cfg, train, mesh)
    step = program.step
    state = program.init(jax.random.key(train.seed))
    local = random_packed(rows, length, model_cfg.vocab_size)
    batch = sharding.batch_placer(mesh, process_local=False)(local)  # as the run's loop does
    state, metrics = step(state, batch, np.float32(0.0))  # compiles; a zero learning rate
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, batch, np.float32(0.0))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return float(np.median(times))
