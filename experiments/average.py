r"""Average the parameters of the last K checkpoints into a new workdir.

  python -m experiments.average --workdir=DIR --last=5 [--output=DIR/average_last5]

The paper evaluates the base model with the mean of its last 5 checkpoints
(written at 10-minute intervals) and the big model with the last 20. The
output is a workdir of its own (config, vocabulary, one checkpoint), so that
  python -m experiments.translate --workdir=DIR/average_last5
  python -m experiments.evaluate --workdir=DIR/average_last5
use it. (Both also take --average_last=K to average on the fly.)
"""

from __future__ import annotations

import os

from absl import flags

from experiments import cli
from transformer import trained

WORKDIR = flags.DEFINE_string("workdir", None, "The workdir that experiments.wmt trained in.")
LAST = flags.DEFINE_integer("last", 5, "How many of the newest checkpoints to average.")
OUTPUT = flags.DEFINE_string("output", None, "New workdir for the average (default: in workdir).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}")
    if not WORKDIR.value:
        raise cli.UserError("--workdir is required: the directory experiments.wmt trained in")
    if LAST.value < 1:
        raise cli.UserError(f"--last must be >= 1, got {LAST.value}")
    output = OUTPUT.value or os.path.join(WORKDIR.value, f"average_last{LAST.value}")
    part = cli.workdir_part(output)
    if part is not None:
        raise cli.UserError(f"--output={output} would overwrite {part}; choose a new folder")
    result = trained.write_average(WORKDIR.value, LAST.value, output)
    print(f"averaged the parameters of steps {', '.join(map(str, result.steps))} into {output}")


if __name__ == "__main__":
    cli.run(main)
