r"""The paper's Table 3, trained: each row's variant on the CPU corpus, one budget, one seed each.

  python -m experiments.table3 --rows=A                    # the base row and the (A) rows
  python -m experiments.table3 --rows=A --base_seeds=3        # the noise measured on base
  python -m experiments.table3 --rows=A,B --seeds=3 --train_minutes=10 --out_dir=table3

Each row (transformer/analysis/table3.py: the paper's change scaled to the
CPU model's width) trains with `python -m experiments.wmt`, in its own process
and workdir under --out_dir, on --flagfile's recipe (the CPU demo's) with the
same time budget and seeds; dropout is kept at every step count
(--dropout_min_steps=0), since rows (D) are about it. Every row is then
evaluated the same way on the validation split: perplexity, and sacreBLEU and
chrF of beam 4 without MBR.

Resumes: a row whose run finished is not trained again, and a stopped one
continues from its last checkpoint. The first run's vocabulary is copied to
every other, so all rows read the same pieces. Writes table3.md (the paper's
columns), table3.png and table3.json (every run) to --out_dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from absl import flags
from etils import epath

from experiments import cli
from transformer import config, record
from transformer.analysis import table3
from transformer.analysis.params import formula_counts
from transformer.data.vocab import VOCAB_FILE

_ROWS = flags.DEFINE_list("rows", ["A"], "Table 3 groups to train, among A-E (base always).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per row (0, 1, ...).", lower_bound=1)
_BASE_SEEDS = flags.DEFINE_integer(
    "base_seeds",
    0,
    "Seeds of the base row (0: --seeds). More seeds there measure the seed-to-seed "
    "noise that every row is judged against, for a fraction of seeding every row.",
    lower_bound=0,
)
_MINUTES = flags.DEFINE_float("train_minutes", 5.0, "Training budget of each run.", lower_bound=0.1)
_OUT_DIR = flags.DEFINE_string("out_dir", "table3", "Where the runs, table and plot go.")
_RECIPE = flags.DEFINE_string(
    "recipe", "experiments/configs/ding_deen_cpu.flags", "Flagfile every run starts from."
)
_PRESET = flags.DEFINE_enum(
    "preset", "cpu", list(config.PRESETS), "The width the rows scale to (its d_model and N)."
)
_EXTRA = flags.DEFINE_list(
    "wmt_flags", [], "More flags for every run, e.g. --wmt_flags=--data_dir=DIR,--batch_rows=32."
)

EVALUATION = (
    "--final_eval_split=validation",
    "--beam_size=4",
    "--mbr=0",
    "--mbr_samples=0",
    "--eval_every=0",
    "--dropout_min_steps=0",
)


def _flag(name: str, value) -> str:
    return f"--{name}={str(value).lower() if isinstance(value, bool) else value}"


def run_flags(row: table3.Row, seed: int, workdir: str) -> list[str]:
    return [
        f"--flagfile={_RECIPE.value}",
        f"--preset={_PRESET.value}",
        f"--workdir={workdir}",
        f"--seed={seed}",
        f"--train_minutes={_MINUTES.value}",
        *EVALUATION,
        *(_flag(k, v) for k, v in row.settings.items()),
        *_EXTRA.value,
    ]


def finished(workdir: epath.Path) -> dict | None:
    """The run's results.json if it ended with its final evaluation, else None."""
    path = workdir / "results.json"
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # cut short by a kill: the run is rerun, which writes it again
    if not isinstance(results, dict) or results.get("preempted"):
        return None
    return results if "validation_sacrebleu" in results else None


def run_to_its_end(command: list[str]) -> int:
    """Runs a training command; its exit code. A Ctrl-C (which the run gets too)
    or a SIGTERM (passed on to it) waits for the run to save its checkpoint and
    stop, rather than killing it mid-save or leaving it training alone."""
    with subprocess.Popen(command) as process:
        previous = signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.wait()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)


def train(row: table3.Row, seed: int, out: epath.Path) -> dict:
    """Trains (or resumes) one run; returns its figures."""
    workdir = out / "runs" / f"{row.name}-seed{seed}"
    results = finished(workdir)
    if results is None:
        shared_vocab = out / VOCAB_FILE
        workdir.mkdir(parents=True, exist_ok=True)
        if shared_vocab.exists() and not (workdir / VOCAB_FILE).exists():
            shutil.copyfile(shared_vocab, workdir / VOCAB_FILE)
        print(f"== {row.label}, seed {seed}: training in {workdir}", flush=True)
        command = [sys.executable, "-m", "experiments.wmt", *run_flags(row, seed, str(workdir))]
        if run_to_its_end(command) != 0:
            raise cli.UserError(
                f"the run of {row.label} (seed {seed}) failed; its output is above, its "
                f"workdir {workdir}; rerun the same command to resume"
            )
        if not shared_vocab.exists():
            shutil.copyfile(workdir / VOCAB_FILE, shared_vocab)
        results = finished(workdir)
        if results is None:
            raise cli.UserError(f"{workdir} has no final evaluation; rerun to finish it")
    model = record.read_configs(str(workdir)).model
    return {
        "row": row.name,
        "seed": seed,
        "steps": results["step"],
        "train_minutes": results["train_minutes"],
        "validation_perplexity": results["validation_perplexity"],
        "sacrebleu": results["validation_sacrebleu"],
        "chrf": results["validation_chrf"],
        "params": formula_counts(model)["total"],
        "workdir": str(workdir),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; see --help")
    if not os.path.isfile(_RECIPE.value):
        raise cli.UserError(f"--recipe={_RECIPE.value} is not a file; give a flagfile")
    rows = table3.rows([g.strip().upper() for g in _ROWS.value], config.preset(_PRESET.value))
    out = epath.Path(_OUT_DIR.value)
    out.mkdir(parents=True, exist_ok=True)
    results, models, recipes = {}, {}, {}
    for row in rows:
        seeds = (_BASE_SEEDS.value or _SEEDS.value) if row.name == "base" else _SEEDS.value
        results[row.name] = [train(row, seed, out) for seed in range(seeds)]
        configs = record.read_configs(results[row.name][0]["workdir"])
        models[row.name], recipes[row.name] = configs.model, configs.train.label_smoothing
    table = table3.summarize(results, models, recipes)
    (out / "table3.md").write_text(table)
    (out / "table3.json").write_text(json.dumps(results, indent=2))
    title = f"Table 3 at d_model {config.preset(_PRESET.value).d_model}, {_MINUTES.value:g} min"
    table3.plot(results, str(out / "table3.png"), title)
    print(table)
    print(f"wrote {out / 'table3.md'}, {out / 'table3.png'}, {out / 'table3.json'}")


if __name__ == "__main__":
    cli.run(main)
