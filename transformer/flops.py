"""Analytic FLOPs of a training step, and the device peak they are compared with (MFU).

Counts are matrix multiplications only (2 FLOPs per multiply-add), as in the
usual MFU definition; a training step is 3x the forward pass (forward,
gradient with respect to activations, gradient with respect to weights).
Attention scores are counted over the full padded length of a row, which is
what the hardware computes.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from transformer.config import ModelConfig

# Dense bf16 peak per chip (datasheets), by jax device_kind prefix.
DATASHEET_PEAK = {
    "TPU v2": 45e12 / 2,  # per core
    "TPU v3": 123e12 / 2,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA V100": 125e12,
    "Tesla V100": 125e12,
    "Tesla P100": 18.7e12,
}


def forward_flops(
    c: ModelConfig, rows: int, source_len: int, target_len: int, attention_scores: bool = True
) -> float:
    """Matmul FLOPs of one teacher-forced forward pass over [rows, length] batches.

    attention_scores=False leaves out Q.K^T and weights.V (the part quadratic in length).
    """
    if c.architecture == "lstm":
        return float(rows * _recurrent_flops(c, source_len, target_len, attention_scores))
    d, h = c.d_model, c.num_heads
    qk, v = h * c.d_k, h * c.d_v
    projections = 2 * d * (2 * qk + v) + 2 * v * d  # Q, K, V and output, per token
    feed_forward = 4 * d * c.d_ff

    def scores(queries, keys):  # QK^T and weights x V, per row
        return 2 * queries * keys * (qk + v) if attention_scores else 0

    s, t = source_len, target_len
    encoder = c.num_encoder_layers * (s * (projections + feed_forward) + scores(s, s))
    cross = t * (2 * d * qk + 2 * v * d) + s * 2 * d * (qk + v) + scores(t, s)
    decoder = c.num_decoder_layers * (t * (projections + feed_forward) + scores(t, t) + cross)
    logits = 2 * t * d * c.vocab_size
    return float(rows * (encoder + decoder + logits))


def _recurrent_flops(c: ModelConfig, s: int, t: int, attention_scores: bool) -> float:
    """The LSTM baseline (transformer/rnn.py), one row: gates from the input and
    from the state at every position, the attention and the logits."""
    d = c.d_model

    def lstm(inputs, units):  # per position
        return 2 * 4 * units * (inputs + units)

    encoder = c.num_encoder_layers * s * (lstm(d, d // 2) + lstm(d, d - d // 2))
    decoder = c.num_decoder_layers * t * lstm(d, d)
    attention = 2 * s * d * d + 2 * t * 2 * d * d  # W_a on the source, W_c on [c; h]
    if attention_scores:
        attention += 4 * t * s * d
    return encoder + decoder + attention + 2 * t * d * c.vocab_size


def train_step_flops(c: ModelConfig, rows: int, source_len: int, target_len: int) -> float:
    return 3.0 * forward_flops(c, rows, source_len, target_len)


@functools.cache
def measured_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted square matmul on one local device (the fastest repeat).

    A peak is what the machine can do: other load (a shared host's steal time)
    only slows a repeat down, so the fastest one is the estimate, not the
    median, which a busy host drags down until MFU reads close to 100%.
    bfloat16 inputs accumulate in float32, as the model's matmuls do. Measured
    once per process. Call it outside any mesh context: under one, jit would
    run the matmul on every device of the mesh (here: an error instead).
    """
    x = jax.device_put(jnp.ones((size, size), jnp.dtype(dtype)), jax.local_devices()[0])
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    matmul(x, x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x, x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def cpu_flags(cpuinfo: str | None = None) -> set[str] | None:
    """The first CPU's feature flags in /proc/cpuinfo (x86 "flags", Arm "Features");
    None where it cannot tell (no /proc/cpuinfo, e.g. macOS, or no flags line in it)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has bfloat16 dot-product instructions, from /proc/cpuinfo.

    x86: avx512_bf16 or amx_bf16; Arm: bf16. None where it cannot tell.
    """
    flags = cpu_flags(cpuinfo)
    return None if flags is None else bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)


def fastest_dtype() -> str:
    """The compute dtype that runs faster here: bfloat16 on GPU/TPU; on CPU,
    float32 unless the CPU has bfloat16 instructions (AVX-512 BF16, AMX, Arm
    BF16) and its bfloat16 matmuls measure at least 10% faster than float32
    ones. Without those instructions XLA converts bfloat16 in software and runs
    slower; a one-off timing on a busy machine must not pick that path."""
    if jax.devices()[0].platform != "cpu":
        return "bfloat16"
    if cpu_has_bfloat16() is False:
        choice = np.int32(0)
    else:
        bf16, f32 = measured_matmul_peak("bfloat16"), measured_matmul_peak("float32")
        choice = np.int32(bf16 > 1.1 * f32)
    if jax.process_count() > 1:  # every process must compute alike: process 0's choice
        choice = multihost_utils.broadcast_one_to_all(choice)
    return "bfloat16" if int(choice) else "float32"


def device_peak(dtype: str = "bfloat16", given: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of all devices, where the figure comes from). `given`: the peak of
    one accelerator device, or on CPU of one process's cores, in FLOP/s (0: look it up
    or measure)."""
    device = jax.devices()[0]
    # All "devices" of a CPU process share its cores; each process of a multi-host
    # run has its own.
    count = jax.process_count() if device.platform == "cpu" else jax.device_count()
    if given:
        return given * count, "given"
    if device.platform != "cpu":
        for prefix, peak in DATASHEET_PEAK.items():
            if device.device_kind.startswith(prefix):
                return peak * jax.device_count(), f"datasheet {device.device_kind}"
    # CPU (or an unknown accelerator): measure. The faster of float32 and
    # bfloat16-input matmuls is the peak: which one wins depends on the CPU (AVX-512
    # BF16 or not), and MFU should not flatter a slow path.
    measured = {name: measured_matmul_peak(name) for name in sorted({"float32", dtype})}
    best = max(measured, key=measured.get)
    return measured[best] * count, f"measured {best} matmul on {device.device_kind}"
