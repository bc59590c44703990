r"""Why attention divides the dot products by sqrt(d_k) (paper section 3.2.1, footnote 4).

The argument. Let a query q and a key k have d_k components that are
independent, with mean 0 and variance 1. Their dot product q.k = sum_i q_i k_i
is a sum of d_k terms. Each term has mean 0 and variance E[q_i^2] E[k_i^2] = 1,
and because the terms are independent their variances add: Var(q.k) = d_k.
The logits therefore spread out like sqrt(d_k): about +-2.8 at d_k = 8, +-8 at
the base model's d_k = 64, +-32 at d_k = 1024.

Why that hurts. The softmax turns differences of logits into ratios of
weights through exp(). Differences of tens of units make those ratios huge, so
almost all the weight falls on the largest logit and the output is nearly a
one-hot vector. There the softmax is flat: its Jacobian diag(w) - w w^T goes to
zero as w becomes one-hot, so a loss on the attention output sends almost no
gradient back to the logits, and through them to the queries and keys.
Dividing by sqrt(d_k) gives the logits unit variance again whatever the head
size, so a head of size 1024 starts in the same regime as a head of size 8.

What `sweep` measures. It draws T queries, each with its own S keys (all
components standard normal), and a fixed random probe vector c per query.
For each d_k it computes, once from q.k and once from q.k / sqrt(d_k):
  * the standard deviation of the logits (sqrt(d_k) unscaled, 1 scaled);
  * the mean over queries of the largest softmax weight (1 means saturated);
  * the mean entropy of the weights in nats (log S when uniform, 0 one-hot);
  * the mean norm of d(c.softmax(l))/dl, the gradient that a loss linear in
    the weights sends to the logits l. It is small at both ends, for uniform
    weights as well as one-hot ones, and largest near a logit std of 3
    (unscaled d_k between 8 and 16); for large d_k it falls roughly as 1/sqrt(d_k).

Shapes: T queries, S keys per query, K = d_k.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_D_KS = tuple(2**i for i in range(3, 11))  # 8, 16, ..., 1024
FILE_STEM = "attention_scaling"  # <out_dir>/attention_scaling.{png,csv,json}


# ----------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------


class SoftmaxStats(NamedTuple):
    """Statistics of one set of logits [T, S]; means are over the T queries."""

    logit_std: float
    max_weight: float
    entropy: float  # nats
    grad_norm: float


@functools.partial(jax.jit, static_argnums=(1, 2, 3))  # compiles the generator once, not 3x
def draw(rng: jax.Array, d_k: int, num_queries: int, num_keys: int) -> tuple[jax.Array, ...]:
    """-> query [T, K], key [T, S, K], probe [T, S]; every entry standard normal.

    Each query gets its own keys so that all T*S dot products are independent.
    """
    q_rng, k_rng, c_rng = jax.random.split(rng, 3)
    query = jax.random.normal(q_rng, (num_queries, d_k))
    key = jax.random.normal(k_rng, (num_queries, num_keys, d_k))
    probe = jax.random.normal(c_rng, (num_queries, num_keys))
    return query, key, probe


def dot_product_logits(query: jax.Array, key: jax.Array, scaled: bool) -> jax.Array:
    """query [T, K], key [T, S, K] -> logits [T, S]: q.k, divided by sqrt(K) if `scaled`."""
    logits = jnp.einsum("TK,TSK->TS", query, key)
    return logits / math.sqrt(query.shape[-1]) if scaled else logits


def _probe_value(logits: jax.Array, probe: jax.Array) -> jax.Array:
    """logits [S], probe [S] -> scalar: a fixed linear readout of the weights, a stand-in loss."""
    return jnp.dot(jax.nn.softmax(logits), probe)


@jax.jit  # one compilation serves every d_k: the logits are [T, S] whatever K is
def softmax_stats(logits: jax.Array, probe: jax.Array) -> SoftmaxStats:
    """logits [T, S], probe [T, S] -> SoftmaxStats of scalar arrays."""
    log_weights = jax.nn.log_softmax(logits, axis=-1)  # finite even where exp underflows
    weights = jnp.exp(log_weights)  # [T, S]
    grads = jax.vmap(jax.grad(_probe_value))(logits, probe)  # [T, S]
    return SoftmaxStats(
        logit_std=jnp.std(logits),
        max_weight=jnp.mean(jnp.max(weights, axis=-1)),
        entropy=jnp.mean(-jnp.sum(weights * log_weights, axis=-1)),
        grad_norm=jnp.mean(jnp.linalg.norm(grads, axis=-1)),
    )


@dataclasses.dataclass(frozen=True)
class ScalingRow:
    """One d_k: the statistics of q.k (unscaled) and q.k / sqrt(d_k) (scaled)."""

    d_k: int
    num_keys: int
    unscaled: SoftmaxStats
    scaled: SoftmaxStats

    def flat(self) -> dict[str, float]:
        """Plain numbers keyed by column name, for CSV and JSON."""
        out = {
            "d_k": self.d_k,
            "sqrt_d_k": math.sqrt(self.d_k),
            # Footnote 4 predicts exactly 1: Var(q.k) = d_k.
            "var_over_d_k": self.unscaled.logit_std**2 / self.d_k,
        }
        for name, stats in (("unscaled", self.unscaled), ("scaled", self.scaled)):
            out.update({f"{field}_{name}": v for field, v in stats._asdict().items()})
            out[f"entropy_over_log_s_{name}"] = stats.entropy / math.log(self.num_keys)
        return out


def _to_floats(stats: SoftmaxStats) -> SoftmaxStats:
    return SoftmaxStats(*(float(v) for v in stats))


def sweep(
    d_ks: Sequence[int], num_queries: int = 512, num_keys: int = 64, seed: int = 0
) -> list[ScalingRow]:
    """One ScalingRow per d_k.

    All rows share one draw at the largest d_k; a smaller d_k uses the first
    d_k components. Each row is still an exact sample for its own d_k, and
    shared draws make the change from row to row less noisy (drawing each
    shape afresh would also cost a slow compilation of the generator per d_k).
    """
    query, key, probe = draw(jax.random.key(seed), max(d_ks), num_queries, num_keys)
    rows = []
    for d_k in d_ks:
        logits = dot_product_logits(query[:, :d_k], key[:, :, :d_k], scaled=False)  # [T, S]
        unscaled = softmax_stats(logits, probe)
        scaled = softmax_stats(logits / math.sqrt(d_k), probe)  # same draw: only the scale differs
        rows.append(ScalingRow(d_k, num_keys, _to_floats(unscaled), _to_floats(scaled)))
    return rows


# ----------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------

_GROUPS = (
    ("logit std", "logit_std", "{:>9.3f}"),
    ("max weight", "max_weight", "{:>9.3f}"),
    ("entropy (nats)", "entropy", "{:>9.3f}"),
    ("grad norm", "grad_norm", "{:>9.2e}"),
)


def format_table(rows: Sequence[ScalingRow]) -> str:
    """Aligned text: one line per d_k, each statistic unscaled beside scaled."""
    head = f"{'':>5}{'':>10}{'':>9}" + "".join(f"  {g:^18}" for g, _, _ in _GROUPS)
    sub = f"{'d_k':>5}{'sqrt(d_k)':>10}{'var/d_k':>9}" + "  {:>9}{:>9}".format(
        "q.k", "/sqrt"
    ) * len(_GROUPS)
    lines = [head, sub]
    for r in rows:
        line = f"{r.d_k:>5}{math.sqrt(r.d_k):>10.2f}{r.unscaled.logit_std**2 / r.d_k:>9.3f}"
        for _, field, fmt in _GROUPS:
            line += "  " + fmt.format(getattr(r.unscaled, field))
            line += fmt.format(getattr(r.scaled, field))
        lines.append(line)
    return "\n".join(lines)


def summary(rows: Sequence[ScalingRow], num_queries: int) -> str:
    """The footnote's argument in the measured numbers, a few lines."""
    ratios = [r.unscaled.logit_std**2 / r.d_k for r in rows]
    first, last = rows[0], rows[-1]
    num_keys = first.num_keys
    return "\n".join(
        [
            f"{num_queries} queries x {num_keys} keys per d_k; q.k = raw logits, "
            "/sqrt = logits divided by sqrt(d_k).",
            f"Var(q.k)/d_k stays within {min(ratios):.3f}..{max(ratios):.3f}: d_k independent "
            "products q_i k_i of variance 1 add up to variance d_k (footnote 4).",
            f"Unscaled, from d_k={first.d_k} to {last.d_k} the largest weight goes "
            f"{first.unscaled.max_weight:.3f} -> {last.unscaled.max_weight:.3f}, the gradient "
            f"norm {first.unscaled.grad_norm:.2e} -> {last.unscaled.grad_norm:.2e}.",
            f"Scaled, they stay at {first.scaled.max_weight:.3f} -> {last.scaled.max_weight:.3f}"
            f" and {first.scaled.grad_norm:.2e} -> {last.scaled.grad_norm:.2e}; "
            f"uniform weights would have entropy log S = {math.log(num_keys):.3f} nats.",
        ]
    )


def save_table(rows: Sequence[ScalingRow], out_dir: str) -> list[str]:
    """Writes <out_dir>/attention_scaling.csv and .json; returns their paths."""
    flat = [r.flat() for r in rows]
    csv_path = os.path.join(out_dir, f"{FILE_STEM}.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    json_path = os.path.join(out_dir, f"{FILE_STEM}.json")
    with open(json_path, "w") as f:
        json.dump(flat, f, indent=1)
    return [csv_path, json_path]


def save_plot(rows: Sequence[ScalingRow], out_dir: str) -> str:
    """Writes <out_dir>/attention_scaling.png (three panels against log2 d_k); returns its path."""
    # Figure without pyplot renders PNG with the Agg canvas and touches no global
    # backend state, so this works headless and inside other programs.
    from matplotlib.figure import Figure

    d_ks = [r.d_k for r in rows]
    fig = Figure(figsize=(13, 4), layout="constrained")
    std_ax, sat_ax, grad_ax = fig.subplots(1, 3)
    std_ax.plot(d_ks, [math.sqrt(d) for d in d_ks], "k:", label="sqrt(d_k)")
    sat_ax.plot([], [], "k-", label="max weight")
    sat_ax.plot([], [], "k--", label="entropy / log S")
    for name, color in (("unscaled", "tab:red"), ("scaled", "tab:blue")):
        stats = [getattr(r, name) for r in rows]
        std_ax.plot(d_ks, [s.logit_std for s in stats], "o-", color=color, label=name)
        sat_ax.plot(d_ks, [s.max_weight for s in stats], "o-", color=color, label=name)
        entropy = [s.entropy / math.log(r.num_keys) for s, r in zip(stats, rows, strict=True)]
        sat_ax.plot(d_ks, entropy, "s--", color=color)
        grad_ax.plot(d_ks, [s.grad_norm for s in stats], "o-", color=color, label=name)
    _label(std_ax, "logit standard deviation", log_y=True)
    _label(sat_ax, "softmax saturation", log_y=False)
    _label(grad_ax, "gradient norm w.r.t. logits", log_y=True)
    sat_ax.set_ylim(0, 1.05)
    path = os.path.join(out_dir, f"{FILE_STEM}.png")
    fig.savefig(path, dpi=100)
    return path


def _label(ax, title: str, log_y: bool) -> None:
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("d_k")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
