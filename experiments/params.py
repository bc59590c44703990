r"""Parameter counts: the formula per component beside the real model, and Table 3.

  python -m experiments.params --preset=base          # breakdown of one model
  python -m experiments.params --preset=big --noshare_embeddings
  python -m experiments.params --table3               # every Table 3 row vs the paper
  python -m experiments.params --preset=cpu --architecture=lstm   # the recurrent baseline

Counts use the preset's vocabulary (37000 shared pieces for the paper's models,
4000 for cpu, 512 for tiny) unless --vocab_size says otherwise.
Nothing is allocated: the real count comes from jax.eval_shape.
"""

from __future__ import annotations

import json

from absl import flags

from experiments import cli, config_flags, model_flags
from transformer import config
from transformer.analysis.params import components, formula_counts, real_counts

_TABLE3 = flags.DEFINE_bool("table3", False, "Print every row of the paper's Table 3.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON lines instead of a table.")


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def print_breakdown(model: config.ModelConfig, as_json: bool) -> None:
    formula, real = formula_counts(model), real_counts(model)
    if as_json:
        for name in components(model):
            print(json.dumps({"component": name, "formula": formula[name], "real": real[name]}))
        return
    print(f"{'component':<24}{'formula':>14}{'real model':>14}  match")
    for name in components(model):
        match = "yes" if formula[name] == real[name] else "NO"
        print(f"{name:<24}{formula[name]:>14,}{real[name]:>14,}  {match}")


def table3_rows(vocab_size: int | None) -> list[dict]:
    rows = []
    for name in config.TABLE3:
        p = config.PRESETS[name]
        model = p.model if vocab_size is None else p.model.replace(vocab_size=vocab_size)
        ours = formula_counts(model)["total"]
        paper = p.paper_params_m or (
            config.PRESETS["base"].paper_params_m
            if p.row.startswith(("(A)", "(D)", "(E)"))
            else None
        )
        rows.append(
            {
                "preset": name,
                "row": p.row,
                "N": model.num_encoder_layers,
                "d_model": model.d_model,
                "d_ff": model.d_ff,
                "h": model.num_heads,
                "d_k": model.d_k,
                "d_v": model.d_v,
                "P_drop": model.dropout,
                "eps_ls": config.recipe(name).label_smoothing,
                "params": ours,
                "real": real_counts(model)["total"],
                "paper_m": paper,
                "diff_pct": None if paper is None else 100 * (ours / 1e6 - paper) / paper,
            }
        )
    return rows


def print_table3(vocab_size: int | None, as_json: bool) -> None:
    rows = table3_rows(vocab_size)
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    print(
        f"{'row':<24}{'N':>3}{'d_model':>8}{'d_ff':>6}{'h':>4}{'d_k':>5}{'d_v':>5}"
        f"{'P_drop':>7}{'eps_ls':>7}{'formula':>10}{'real':>10}{'paper':>8}{'diff':>8}"
    )
    for r in rows:
        paper = "" if r["paper_m"] is None else f"{r['paper_m']:.0f}M"
        diff = "" if r["diff_pct"] is None else f"{r['diff_pct']:+.1f}%"
        print(
            f"{r['row']:<24}{r['N']:>3}{r['d_model']:>8}{r['d_ff']:>6}{r['h']:>4}"
            f"{r['d_k']:>5}{r['d_v']:>5}{r['P_drop']:>7}{r['eps_ls']:>7}"
            f"{_millions(r['params']):>10}{_millions(r['real']):>10}{paper:>8}{diff:>8}"
        )
    print(
        "formula and real: exact counts with a shared vocabulary of "
        f"{vocab_size or config.BASE.vocab_size} and tied embeddings; the paper's "
        "figures are rounded. Rows (A), (D), (E) keep the base model's size."
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; see --help")
    if _TABLE3.value:
        given = config_flags.given(config.ModelConfig)
        others = sorted(set(given) - {"vocab_size"})
        others += [name for name in ("preset", "num_layers") if flags.FLAGS[name].present]
        if others:
            shown = ", ".join(f"--{name}" for name in others)
            raise cli.UserError(
                f"--table3 sets every row's model itself; only --vocab_size applies, not {shown}"
            )
        if "vocab_size" in given:
            config.BASE.replace(vocab_size=given["vocab_size"]).validate()
        print_table3(given.get("vocab_size"), _JSON.value)
    else:
        print_breakdown(model_flags.model_config(), _JSON.value)


if __name__ == "__main__":
    cli.run(main)
