r"""The training loop's overhead: steps/s of `experiments.wmt` against the bare compiled step.

  python -m benchmarks.loop                      # the micro model, 8 x 64 rows, 3 rounds
  python -m benchmarks.loop --steps=600 --repeats=5

The micro model (d_model 32, one layer each side, the demo's 8000-piece
vocabulary, float32, dropout 0.1) makes the step short, so that whatever the
loop does on the host between steps shows. Each round runs both sides, each in
its own process: the real loop (`python -m experiments.wmt`, the demo's corpus
and batches, no evaluation or checkpoint inside the timed steps; steps/s from
its progress lines after the first, which holds the compilation) and the bare
step (`benchmarks.train_step` at the same shapes: one compiled step on a fixed
batch, waited for after each call). Prints one JSON line per side per round,
then the medians and their ratio. The first run builds ding_de_en and its
vocabulary in --workdir, untimed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

from absl import flags

import benchmarks
import experiments
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/loop_bench", "Scratch folder.")
_STEPS = flags.DEFINE_integer("steps", 400, "Steps of each loop run.", lower_bound=100)
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Steps per progress line.", lower_bound=10)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Rounds of both sides.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")

MICRO = dict(d_model=32, num_heads=4, d_k=8, d_v=8, d_ff=128, num_encoder_layers=1,
             num_decoder_layers=1, vocab_size=8000, dropout=0.1)  # fmt: skip
ROWS, LENGTH = 8, 64
FLAGFILE = os.path.join(os.path.dirname(experiments.__file__), "configs", "ding_deen_cpu.flags")


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise cli.UserError(f"{' '.join(command[:3])}: {result.stderr.strip().splitlines()[-1]}")
    return result.stdout


def loop_side(workdir: str, steps: int) -> dict:
    """experiments.wmt on the micro model; steps/s from its progress lines after the first."""
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    for name in ("metrics.jsonl", "results.json"):
        if os.path.exists(os.path.join(workdir, name)):
            os.remove(os.path.join(workdir, name))
    model_flags = [f"--{k}={v}" for k, v in MICRO.items()]
    _run([
        sys.executable, "-m", "experiments.wmt",
        f"--flagfile={FLAGFILE}", f"--workdir={workdir}",
        *model_flags, f"--dtype={_DTYPE.value}", f"--batch_rows={ROWS}", f"--steps={steps}",
        "--train_minutes=0", "--cooldown_fraction=0", f"--log_every={_LOG_EVERY.value}",
        "--eval_every=0", "--final_eval_split=", "--checkpoint_minutes=0",
    ])  # fmt: skip
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["train/steps_per_second"] for r in map(json.loads, f) if "train/loss" in r]
    return {"side": "loop", "steps_per_s": round(statistics.median(rates[1:]), 2)}


def bare_side(steps: int) -> dict:
    """benchmarks.train_step at the same shapes: the compiled step alone."""
    out = _run([
        sys.executable, "-m", "benchmarks.train_step", "--preset=cpu",
        *[f"--{k}={v}" for k, v in MICRO.items()],
        f"--dtype={_DTYPE.value}", f"--rows={ROWS}", f"--length={LENGTH}", f"--repeats={steps}",
    ])  # fmt: skip
    figures = json.loads(out.strip().splitlines()[-1])
    return {"side": "bare_step", "steps_per_s": round(1.0 / figures["step_s"], 2)}


def main(argv):
    del argv
    workdir = os.path.join(_WORKDIR.value, "micro")
    loop_side(workdir, 100)  # builds the corpus, vocabulary and token ids: untimed
    results: dict[str, list[float]] = {"loop": [], "bare_step": []}
    for round_ in range(_REPEATS.value):
        for measure in (lambda: loop_side(workdir, _STEPS.value), lambda: bare_side(_STEPS.value)):
            figure = measure()
            results[figure["side"]].append(figure["steps_per_s"])
            print(json.dumps({"benchmark": "loop", "round": round_, **figure}), flush=True)
    loop, bare = (statistics.median(results[k]) for k in ("loop", "bare_step"))
    print(json.dumps({
        "benchmark": "loop", "model": "micro", "rows": ROWS, "length": LENGTH,
        "dtype": _DTYPE.value, "cpus": os.cpu_count(), "loop_steps_per_s": loop,
        "bare_step_steps_per_s": bare, "loop_over_bare": round(loop / bare, 3),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    benchmarks.run(main)
