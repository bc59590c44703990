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

import json
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
from absl import flags

import benchmarks
from benchmarks import peak_rss_gib, positive_ints
from experiments import cli, config_flags
from transformer import config, flops, sharding, train
from transformer.architecture import build
from transformer.data.batching import random_packed

_PRESETS = flags.DEFINE_list("preset", ["base"], "Presets to measure.")
_DTYPES = flags.DEFINE_list("dtype", ["bfloat16"], "Compute dtypes to measure.")
_ROWS = flags.DEFINE_list("rows", ["8"], "Rows per batch.")
_LENGTHS = flags.DEFINE_list("length", ["128"], "Tokens per row (source and target each).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per configuration.", lower_bound=1)
# Any other ModelConfig setting changes the presets measured, e.g. --d_model=128.
config_flags.define(config.ModelConfig, skip=("dtype",), note=" Default: the preset's.")


def model_config(preset: str, dtype: str, length: int) -> config.ModelConfig:
    """The preset with the dtype measured, room for `length` and the settings given."""
    changes = {"dtype": dtype, "max_len": max(length, 64)}
    changes.update(config_flags.given(config.ModelConfig, skip=("dtype",)))
    return config.changed_model(config.preset(preset), changes)


def measure(preset: str, dtype: str, rows: int, length: int, peaks: dict) -> dict:
    model_cfg = model_config(preset, dtype, length)
    train_cfg = config.TrainConfig()
    mesh = sharding.make_mesh(sharding.parse_mesh("data:-1", jax.device_count()))
    model, optimizer = build(model_cfg), train.make_optimizer(model_cfg, train_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
        state, shardings = train.create_state(model, optimizer, 0, mesh)
        step = train.jit_train_step(model, optimizer, train_cfg, mesh, shardings)
        batch = sharding.global_batch(mesh, random_packed(rows, length, model_cfg.vocab_size))
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
        **config_flags.given(config.ModelConfig, skip=("dtype",)),
        "dtype": dtype,
        "rows": rows,
        "length": length,
        "remat": model_cfg.remat,
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
    benchmarks.run(main)
