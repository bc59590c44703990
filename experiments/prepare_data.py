r"""Build a dataset's array_record files once, before training (e.g. into a gs:// data_dir).

  python -m experiments.prepare_data --dataset=ding_de_en
  python -m experiments.prepare_data --dataset=wmt14_translate/de-en --data_dir=gs://BUCKET/tfds \
      [--manual_dir=DIR_WITH_ARCHIVES]

Training prepares the data itself when it is missing; this is for building it
on a cheap machine before starting an expensive one. Prints the split sizes.
"""

from __future__ import annotations

from experiments import cli, config_flags
from transformer import config
from transformer.data import datasets

_DEFAULTS = {"dataset": "ding_de_en"}  # the one corpus that builds without a download
config_flags.define(
    config.DataConfig, only=("dataset", "data_dir", "manual_dir"), defaults=_DEFAULTS
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}")
    given = config_flags.given(config.DataConfig)
    a, b = config.DATASETS[given.get("dataset", _DEFAULTS["dataset"])]
    data = config_flags.update(config.DataConfig(**_DEFAULTS, direction=f"{b}-{a}"))
    datasets.prepare(data)
    sizes = {split: len(datasets.load_split(data, split)) for split in datasets.SPLITS}
    print(f"{data.dataset}: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))


if __name__ == "__main__":
    cli.run(main)
