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


def row(workdir: str) -> dict:
    """The figures of one finished workdir; a UserError if it has none."""
    path = epath.Path(workdir)
    if not (path / "results.json").exists():
        raise cli.UserError(f"{workdir} has no results.json: train it to the end first")
    results = json.loads((path / "results.json").read_text())
    split = next((k[: -len("_sacrebleu")] for k in results if k.endswith("_sacrebleu")), None)
    if split is None or results.get("preempted"):
        raise cli.UserError(f"{workdir} has no final evaluation: rerun its command to finish it")
    model = record.read_configs(workdir).model
    rates = [
        r["train/target_tokens_per_second"]
        for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
        if "train/target_tokens_per_second" in r
    ]
    return {
        "workdir": workdir,
        "model": f"{model.architecture}, d_model {model.d_model}, "
        f"{model.num_encoder_layers}+{model.num_decoder_layers} layers",
        "params": formula_counts(model)["total"],
        "steps": results["step"],
        "train_minutes": results["train_minutes"],
        "target_tokens_per_second": statistics.median(rates) if rates else float("nan"),
        "validation_perplexity": results["validation_perplexity"],
        "split": split,
        "sacrebleu": results[f"{split}_sacrebleu"],
        "chrf": results[f"{split}_chrf"],
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
    print(table([row(w) for w in _WORKDIRS.value]))


if __name__ == "__main__":
    cli.run(main)
