r"""Trained workdirs side by side: a Markdown table of what each run did and scored.

  python -m experiments.compare --workdirs=workdirs/ding,workdirs/ding_lstm

One line per workdir: its architecture and parameters, its steps and training
minutes, its median training throughput (target tokens/s over the logged
intervals), its validation perplexity and its final split's sacreBLEU and
chrF, all read from the workdir (config.json, metrics.jsonl, results.json).
"""

from __future__ import annotations

import json
import statistics

from absl import flags
from etils import epath

from experiments import cli
from transformer import record
from transformer.analysis.params import formula_counts

_WORKDIRS = flags.DEFINE_list("workdirs", [], "Workdirs that experiments.wmt finished.")

HEADER = (
    "| workdir | model | params | steps | train minutes | target tokens/s "
    "| val PPL | split | sacreBLEU | chrF |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _results(workdir: str) -> dict:
    path = epath.Path(workdir) / "results.json"
    if not path.exists():
        raise cli.UserError(f"{workdir} has no results.json: train it to the end first")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise cli.UserError(f"{path} is not valid JSON ({e}); rerun its command") from e
    if not isinstance(results, dict):
        raise cli.UserError(f"{path} is not a run's results; rerun its command")
    return results


def _rates(workdir: str) -> list[float]:
    """Training throughput of each logged interval; lines that are not a record
    (a run killed mid-write) are skipped."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rates = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            rate = json.loads(line).get("train/target_tokens_per_second")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(rate, int | float):
            rates.append(float(rate))
    return rates


def row(workdir: str) -> dict:
    """The figures of one finished workdir; a UserError if it has none."""
    results = _results(workdir)
    split = next((k[: -len("_sacrebleu")] for k in results if k.endswith("_sacrebleu")), None)
    if split is None or results.get("preempted"):
        raise cli.UserError(
            f"{workdir} has no final evaluation: rerun its command to finish it "
            "(with a --final_eval_split, where it was given none)"
        )
    model = record.read_configs(workdir).model
    rates = _rates(workdir)
    figures = {
        "steps": results.get("step"),
        "train_minutes": results.get("train_minutes"),
        "validation_perplexity": results.get("validation_perplexity"),
        "sacrebleu": results.get(f"{split}_sacrebleu"),
        "chrf": results.get(f"{split}_chrf"),
    }
    bad = [k for k, v in figures.items() if not isinstance(v, int | float) or isinstance(v, bool)]
    if bad:
        raise cli.UserError(
            f"{workdir}/results.json lacks a number for {', '.join(bad)}; rerun its command"
        )
    return {
        "workdir": workdir,
        "model": f"{model.architecture}, d_model {model.d_model}, "
        f"{model.num_encoder_layers}+{model.num_decoder_layers} layers",
        "params": formula_counts(model)["total"],
        "target_tokens_per_second": statistics.median(rates) if rates else float("nan"),
        "split": split,
        **figures,
    }


def table(rows: list[dict]) -> str:
    lines = [HEADER]
    for r in rows:
        lines.append(
            f"| {r['workdir']} | {r['model']} | {r['params'] / 1e6:.2f}M | {r['steps']:,} "
            f"| {r['train_minutes']:.1f} | {r['target_tokens_per_second']:,.0f} "
            f"| {r['validation_perplexity']:.2f} | {r['split']} | {r['sacrebleu']:.2f} "
            f"| {r['chrf']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; see --help")
    if not _WORKDIRS.value:
        raise cli.UserError("--workdirs is required: finished workdirs, separated by commas")
    if "" in _WORKDIRS.value:
        raise cli.UserError("--workdirs has an empty name (a stray comma?)")
    print(table([row(w) for w in _WORKDIRS.value]))


if __name__ == "__main__":
    cli.run(main)
