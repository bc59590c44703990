r"""Where attention's quadratic cost starts to matter: step time vs length and vs batch.

  python -m benchmarks.scaling --preset=base --dtype=bfloat16 --tokens=4096
  python -m benchmarks.scaling --preset=tiny --sweep_lengths=64,128 --sweep_rows=1,2

Length sweep: the same number of tokens per step (--tokens), as rows of
64 ... 1024 tokens: the matmuls of the projections and feed-forward layers
cost the same at every length, so the growth of the step time is attention's
S^2 part. Batch sweep: rows of 128 tokens, 1 ... 32 rows: step time per token
falls while the matmuls are too small to keep the cores busy. One JSON line
per point (the train_step benchmark's fields plus the sweep's name), with the
share of the step's FLOPs spent in attention scores from the analytic count.
Also takes the train_step benchmark's --preset, --dtype, --repeats and model settings.
"""

from __future__ import annotations

import json

from absl import flags

import benchmarks
from benchmarks import positive_ints, train_step
from transformer import flops

_TOKENS = flags.DEFINE_integer(
    "tokens", 4096, "Tokens per step (each side) in the length sweep.", lower_bound=1
)
_LENGTHS = flags.DEFINE_list(
    "sweep_lengths", ["64", "128", "256", "512", "1024"], "Row lengths of the length sweep."
)
_ROWS = flags.DEFINE_list(
    "sweep_rows", ["1", "2", "4", "8", "16", "32"], "Rows of the batch sweep."
)
_BATCH_LENGTH = flags.DEFINE_integer(
    "batch_length", 128, "Row length of the batch sweep.", lower_bound=1
)


def attention_share(preset: str, rows: int, length: int) -> float:
    """Fraction of the forward FLOPs in Q.K^T and weights.V (from the analytic count)."""
    model = train_step.model_config(preset, "float32", length)
    total = flops.forward_flops(model, rows, length, length)
    without = flops.forward_flops(model, rows, length, length, attention_scores=False)
    return 1.0 - without / total


def main(argv):
    del argv
    lengths = positive_ints("sweep_lengths", _LENGTHS.value)
    points = [("length", max(1, _TOKENS.value // n), n) for n in lengths]
    points += [("batch", r, _BATCH_LENGTH.value) for r in positive_ints("sweep_rows", _ROWS.value)]
    peaks = train_step.device_peaks()
    preset, dtype = train_step._PRESETS.value[0], train_step._DTYPES.value[0]
    for sweep, rows, length in points:
        result = train_step.measure(preset, dtype, rows, length, peaks)
        result.update(
            sweep=sweep,
            step_s_per_1k_tokens=round(result["step_s"] / (rows * length) * 1000, 4),
            attention_flops_share=round(attention_share(preset, rows, length), 3),
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    benchmarks.run(main)
