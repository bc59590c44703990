r"""The paper's Table 1, measured: one self-attention layer against one recurrent layer.

  python -m benchmarks.table1                              # d_model 512, n = 16 ... 2048
  python -m benchmarks.table1 --lengths=32,64 --rows=1 --out_dir=table1

For each sequence length n, one forward pass of each layer at the same width
D: the Transformer's multi-head self-attention (transformer/attention.py, the
base model's 8 heads) and the LSTM baseline's recurrent layer (transformer/rnn.py,
D units). Per point, one JSON line:

- forward_ms: the median of --repeats timed calls of the jitted layer;
- sequential_steps: how many times the layer's computation runs one after
  another, read from its jaxpr (the product of its scan lengths; 1 if none).
  Table 1's "sequential operations": O(1) against O(n);
- flops: the layer's matmul FLOPs by formula: 4nD^2 + 2n^2D for attention
  (four projections, scores and weighted values), 16nD^2 for the LSTM (four
  gates from the input and from the state). Table 1's "complexity per layer":
  O(n^2 D) against O(n D^2), equal where n is about 6D.

Writes table1.md (the paper's rows beside the measured ones) and table1.png
(time and sequential steps against n) to --out_dir.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags

import benchmarks
from benchmarks import positive_ints
from experiments import cli
from transformer import config
from transformer.attention import MultiHeadAttention
from transformer.rnn import LSTM

_LENGTHS = flags.DEFINE_list(
    "lengths", ["16", "32", "64", "128", "256", "512", "1024", "2048"], "Sequence lengths n."
)
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Width D of both layers.", lower_bound=8)
_HEADS = flags.DEFINE_integer("num_heads", 8, "Heads of the self-attention layer.", lower_bound=1)
_ROWS = flags.DEFINE_integer("rows", 8, "Sequences per forward pass.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(config.DTYPES), "Matmul input dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per point.", lower_bound=1)
_OUT_DIR = flags.DEFINE_string("out_dir", "table1", "Where table1.md and table1.png go.")

LAYERS = ("self-attention", "recurrent")


def layer_fn(layer: str, model: config.ModelConfig):
    """(forward(params, x [B, n, D]) -> [B, n, D], init(x) -> params) of one layer."""
    if layer == "self-attention":
        module = MultiHeadAttention(model, is_self_attention=True)
        apply = lambda p, x: module.apply({"params": p}, x, None, None)  # noqa: E731
    else:
        module = LSTM(model.d_model, model)
        starts = lambda x: jnp.zeros(x.shape[:2], jnp.bool_).at[:, 0].set(True)  # noqa: E731
        apply = lambda p, x: module.apply({"params": p}, x, starts(x))[0]  # noqa: E731

    def init(x):
        args = (x, None, None) if layer == "self-attention" else (x, jnp.zeros(x.shape[:2], bool))
        return nn.unbox(module.init(jax.random.key(0), *args)["params"])

    return jax.jit(apply), init


def sequential_steps(fn, *args) -> int:
    """How many times the traced computation runs in sequence: the product of
    the scan lengths on its deepest chain of nested scans (1 without one)."""

    def deepest(jaxpr) -> int:
        most = 1
        for eqn in jaxpr.eqns:
            inner = [v for v in eqn.params.values() if hasattr(v, "jaxpr")]
            nested = max((deepest(getattr(v, "jaxpr", v)) for v in inner), default=1)
            length = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            most = max(most, length * nested)
        return most

    return deepest(jax.make_jaxpr(fn)(*args).jaxpr)


def layer_flops(layer: str, n: int, d: int) -> float:
    """Matmul FLOPs of one row (2 per multiply-add)."""
    if layer == "self-attention":
        return 2.0 * (4 * n * d * d + 2 * n * n * d)
    return 2.0 * 8 * n * d * d


def measure(layer: str, n: int, model: config.ModelConfig, rows: int, repeats: int) -> dict:
    x = jax.random.normal(jax.random.key(1), (rows, n, model.d_model), jnp.float32)
    forward, init = layer_fn(layer, model)
    params = init(x)
    forward(params, x).block_until_ready()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(params, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return {
        "benchmark": "table1",
        "layer": layer,
        "n": n,
        "d_model": model.d_model,
        "rows": rows,
        "dtype": model.dtype,
        "forward_ms": round(1000 * statistics.median(times), 3),
        "sequential_steps": sequential_steps(lambda p, v: forward(p, v), params, x),
        "flops": layer_flops(layer, n, model.d_model) * rows,
        "device": jax.devices()[0].device_kind,
    }


PAPER = {  # Table 1: complexity per layer, sequential operations, maximum path length
    "self-attention": ("O(n^2 d)", "O(1)", "O(1)"),
    "recurrent": ("O(n d^2)", "O(n)", "O(n)"),
}


def write_table(points: list[dict], path: str) -> None:
    by = {(p["layer"], p["n"]): p for p in points}
    lengths = sorted({p["n"] for p in points})
    first, last = lengths[0], lengths[-1]
    lines = [
        f"Measured at D = {points[0]['d_model']}, {points[0]['rows']} sequences per pass, "
        f"{points[0]['dtype']}, on {points[0]['device']}.",
        "",
        "| layer | complexity per layer (paper) | sequential operations (paper) "
        f"| maximum path length (paper) | sequential steps measured, n = {first} / {last} |",
        "|---|---|---|---|---|",
    ]
    for layer in LAYERS:
        steps = (
            f"{by[(layer, first)]['sequential_steps']} / {by[(layer, last)]['sequential_steps']}"
        )
        lines.append(f"| {layer} | {' | '.join(PAPER[layer])} | {steps} |")
    lines += [
        "",
        "| n | self-attention ms | recurrent ms | recurrent / self-attention "
        "| self-attention GFLOP | recurrent GFLOP |",
        "|---|---|---|---|---|---|",
    ]
    for n in lengths:
        a, r = by[("self-attention", n)], by[("recurrent", n)]
        lines.append(
            f"| {n} | {a['forward_ms']:.2f} | {r['forward_ms']:.2f} "
            f"| {r['forward_ms'] / a['forward_ms']:.1f}x | {a['flops'] / 1e9:.2f} "
            f"| {r['flops'] / 1e9:.2f} |"
        )
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, steps_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for layer in LAYERS:
        mine = sorted((p for p in points if p["layer"] == layer), key=lambda p: p["n"])
        lengths = [p["n"] for p in mine]
        time_axis.plot(lengths, [p["forward_ms"] for p in mine], "o-", label=layer)
        steps_axis.plot(lengths, [p["sequential_steps"] for p in mine], "o-", label=layer)
    for axis, title in ((time_axis, "forward pass (ms)"), (steps_axis, "sequential steps")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length n")
        axis.set_title(title)
        axis.legend()
    d, rows = points[0]["d_model"], points[0]["rows"]
    figure.suptitle(f"One layer, D = {d}, {rows} sequences, {points[0]['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; see --help")
    lengths = positive_ints("lengths", _LENGTHS.value)
    d, heads = _D_MODEL.value, _HEADS.value
    if d % heads:
        raise cli.UserError(f"--d_model={d} is not divisible by --num_heads={heads}")
    model = config.BASE.replace(
        d_model=d, num_heads=heads, d_k=d // heads, d_v=d // heads, dtype=_DTYPE.value
    ).validate()
    try:
        os.makedirs(_OUT_DIR.value, exist_ok=True)
    except OSError as e:
        raise cli.UserError(f"cannot create --out_dir={_OUT_DIR.value}: {e.strerror}") from None
    points = []
    for n in lengths:
        for layer in LAYERS:
            points.append(measure(layer, n, model, _ROWS.value, _REPEATS.value))
            print(json.dumps(points[-1]), flush=True)
    write_table(points, os.path.join(_OUT_DIR.value, "table1.md"))
    write_plot(points, os.path.join(_OUT_DIR.value, "table1.png"))


if __name__ == "__main__":
    benchmarks.run(main)
