r"""Training-step throughput and MFU: one JSON line per configuration.

  python -m benchmarks.train_step --preset=base --rows=8 --length=128 --dtype=bfloat16
  python -m benchmarks.train_step --preset=tiny,base --dtype=float32,bfloat16

Batches are packed rows of `length` tokens (source and target each), every
position filled, so target tokens per step = rows x length. Times are the
median of --repeats timed steps after compilation (reported separately). MFU
is analytic matmul FLOPs (transformer/flops.py) over the time, against both a
float32 and a bfloat16-input matmul peak measured in the same run on CPU (on
GPU/TPU: the datasheet bf16 peak).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
from absl import flags

from benchmarks import packed_batch, peak_rss_gib, positive_ints
from experiments import cli
from transformer import config, flops, sharding, train
from transformer.model import Transformer

_PRESETS = flags.DEFINE_list("preset", ["base"], "Presets to measure.")
_DTYPES = flags.DEFINE_list("dtype", ["bfloat16"], "Compute dtypes to measure.")
_ROWS = flags.DEFINE_list("rows", ["8"], "Rows per batch.")
_LENGTHS = flags.DEFINE_list("length", ["128"], "Tokens per row (source and target each).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per configuration.", lower_bound=1)
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialize layer activations.")
_OVERRIDES = flags.DEFINE_list(
    "set", [], "Model config changes, e.g. d_model=128,d_ff=512,num_heads=4,vocab_size=4000."
)


def overrides() -> dict:
    """--set key=value pairs, typed like the ModelConfig field they change."""
    fields = {f.name: f.type for f in dataclasses.fields(config.ModelConfig)}
    changes = {}
    for item in _OVERRIDES.value:
        key, _, value = item.partition("=")
        if key not in fields:
            raise ValueError(f"--set: unknown model setting {key!r}")
        current = getattr(config.preset("base"), key)
        changes[key] = type(current)(value) if not isinstance(current, bool) else value == "true"
    if "d_model" in changes or "num_heads" in changes:
        d, h = changes.get("d_model", 0), changes.get("num_heads", 0)
        if d and h:
            changes.setdefault("d_k", d // h)
            changes.setdefault("d_v", d // h)
    return changes


def measure(preset: str, dtype: str, rows: int, length: int, peaks: dict) -> dict:
    model_cfg = config.preset(preset).replace(
        dtype=dtype, remat=_REMAT.value, max_len=max(length, 64), **overrides()
    )
    train_cfg = config.TrainConfig()
    mesh = sharding.make_mesh(sharding.parse_mesh("data:-1", jax.device_count()))
    model, optimizer = Transformer(model_cfg), train.make_optimizer(model_cfg, train_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
        state, shardings = train.create_state(model, optimizer, 0, mesh)
        step = train.jit_train_step(model, optimizer, train_cfg, mesh, shardings)
        batch = sharding.global_batch(mesh, packed_batch(rows, length, model_cfg.vocab_size))
        start = time.perf_counter()
        one = np.float32(1.0)  # the learning rate's factor
        compiled = step.lower(state, batch, one).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, batch, one)  # warm-up
        jax.block_until_ready(metrics)
        times = []
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            state, metrics = compiled(state, batch, one)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    step_flops = flops.train_step_flops(model_cfg, rows, length, length)
    tokens = rows * length
    return {
        "benchmark": "train_step",
        "preset": preset,
        **({"set": ",".join(_OVERRIDES.value)} if _OVERRIDES.value else {}),
        "dtype": dtype,
        "rows": rows,
        "length": length,
        "remat": _REMAT.value,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "step_s_min": round(min(times), 4),
        "target_tokens_per_s": round(tokens / step_s, 1),
        "tokens_per_s": round(2 * tokens / step_s, 1),
        "tflops_per_s": round(step_flops / step_s / 1e12, 4),
        **{f"mfu_vs_{name}": round(step_flops / step_s / peak, 4) for name, peak in peaks.items()},
        "peak_rss_gib": round(peak_rss_gib(), 3),
    }


def device_peaks() -> dict[str, float]:
    if jax.devices()[0].platform == "cpu":
        return {name: flops.measured_matmul_peak(name) for name in ("float32", "bfloat16")}
    peak, _ = flops.device_peak()
    return {"datasheet_bf16": peak}


def main(argv):
    del argv
    rows_list, lengths = positive_ints("rows", _ROWS.value), positive_ints("length", _LENGTHS.value)
    for dtype in _DTYPES.value:
        if dtype not in config.DTYPES:
            raise cli.UserError(f"--dtype takes {' and/or '.join(config.DTYPES)}, got {dtype!r}")
    for preset in _PRESETS.value:
        config.preset(preset)  # an unknown name fails here, before any measurement
    peaks = device_peaks()
    print(
        json.dumps(
            {
                "benchmark": "matmul_peak",
                **{f"{k}_tflops": round(v / 1e12, 4) for k, v in peaks.items()},
            }
        ),
        flush=True,
    )
    for preset in _PRESETS.value:
        for dtype in _DTYPES.value:
            for rows in rows_list:
                for length in lengths:
                    print(json.dumps(measure(preset, dtype, rows, length, peaks)), flush=True)


if __name__ == "__main__":
    cli.run(main)
