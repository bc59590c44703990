r"""Why attention divides by sqrt(d_k): softmax statistics against d_k, with and without it.

  python -m experiments.attention_scaling                       # d_k = 8, 16, ..., 1024
  python -m experiments.attention_scaling --d_k=16,64,256 --keys=128 --json

Prints a table (or JSON lines with --json) and writes attention_scaling.png,
attention_scaling.csv and attention_scaling.json to --out_dir. The argument
and what each column means are in transformer/analysis/scaling.py.
"""

from __future__ import annotations

import json
import os

from absl import flags

from experiments import cli
from transformer.analysis import scaling

_OUT_DIR = flags.DEFINE_string("out_dir", "attention_scaling", "Where the plot and table go.")
_D_K = flags.DEFINE_list(
    "d_k", [str(d) for d in scaling.DEFAULT_D_KS], "Query/key sizes to compare, e.g. 8,64,512."
)
_QUERIES = flags.DEFINE_integer("queries", 512, "Random queries per d_k.", lower_bound=1)
_KEYS = flags.DEFINE_integer("keys", 64, "Keys per query (S).", lower_bound=2)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_JSON = flags.DEFINE_bool("json", False, "Print JSON lines instead of a table.")


def parse_d_ks(values: list[str]) -> tuple[int, ...]:
    """['64', '8'] -> (8, 64); anything but positive integers is a UserError."""
    try:
        d_ks = [int(v) for v in values]
    except ValueError:
        d_ks = []
    if not d_ks or min(d_ks) < 1:
        raise cli.UserError(
            f"--d_k={','.join(values)} is not a list of positive integers; "
            "give sizes such as --d_k=8,64,512"
        )
    return tuple(sorted(set(d_ks)))


def make_out_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise cli.UserError(f"cannot create --out_dir={path}: {e.strerror}") from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; see --help")
    d_ks = parse_d_ks(_D_K.value)
    make_out_dir(_OUT_DIR.value)  # before the sweep, so a bad path fails at once
    rows = scaling.sweep(d_ks, _QUERIES.value, _KEYS.value, _SEED.value)
    if _JSON.value:
        for row in rows:
            print(json.dumps(row.flat()))
    else:
        print(scaling.format_table(rows))
        print(scaling.summary(rows, _QUERIES.value))
    paths = scaling.save_table(rows, _OUT_DIR.value) + [scaling.save_plot(rows, _OUT_DIR.value)]
    if not _JSON.value:  # JSON lines stay machine-readable
        print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    cli.run(main)
