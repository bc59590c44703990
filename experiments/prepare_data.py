r"""Build a dataset's array_record files once, before training (e.g. into a gs:// data_dir).

  python -m experiments.prepare_data --dataset=ding_de_en
  python -m experiments.prepare_data --dataset=wmt14_translate/de-en --data_dir=gs://BUCKET/tfds \
      [--manual_dir=DIR_WITH_ARCHIVES]

Training prepares the data itself when it is missing; this is for building it
on a cheap machine before starting an expensive one. Prints the split sizes.
"""

from __future__ import annotations

from absl import flags

from experiments import cli
from transformer import config
from transformer.data import datasets

DATASET = flags.DEFINE_enum("dataset", "ding_de_en", list(config.DATASETS), "Corpus to build.")
DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (local or gs://).")
MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Downloaded archives or the Ding file.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}")
    a, b = config.DATASETS[DATASET.value]
    data = config.DataConfig(
        dataset=DATASET.value, direction=f"{b}-{a}", data_dir=DATA_DIR.value,
        manual_dir=MANUAL_DIR.value,
    )  # fmt: skip
    datasets.prepare(data)
    sizes = {split: len(datasets.load_split(data, split)) for split in datasets.SPLITS}
    print(f"{DATASET.value}: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))


if __name__ == "__main__":
    cli.run(main)
