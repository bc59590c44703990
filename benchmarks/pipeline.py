r"""Input pipeline speed: batches/s and tokens/s of the training batches, without a model.

  python -m benchmarks.pipeline --workdir=/tmp/pipeline_bench [--batches=200]
  python -m benchmarks.pipeline --workdir=W --flagfile=experiments/configs/ding_deen_cpu.flags

Reads, tokenizes and packs batches of the ding_de_en training split as the
training loop gets them (the grain iterator with its reader threads). The
first run builds the dataset and trains the vocabulary in the workdir, which
is not timed. Prints one JSON line: target (non-PAD) tokens/s, all tokens/s,
row fill, median over --repeats timed passes of --batches batches each.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
from absl import flags

from benchmarks import peak_rss_gib
from experiments import cli
from transformer import config
from transformer.data import pipeline

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/pipeline_bench", "Vocabulary and index cache.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4000, "SentencePiece vocabulary size.", lower_bound=1)
_ROWS = flags.DEFINE_integer("batch_rows", 48, "Rows per batch.", lower_bound=1)
_LENGTH = flags.DEFINE_integer("row_length", 64, "Tokens per row.", lower_bound=1)
_THREADS = flags.DEFINE_integer("num_threads", 2, "Reader threads.", lower_bound=1)
_BATCHES = flags.DEFINE_integer("batches", 200, "Batches per timed pass.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes.", lower_bound=1)


def main(argv):
    del argv
    data = config.DataConfig(
        dataset="ding_de_en", direction="de-en", data_dir=_DATA_DIR.value,
        batching="packed", batch_rows=_ROWS.value, row_length=_LENGTH.value,
        max_len=_LENGTH.value, num_threads=_THREADS.value, vocab_sample_size=300_000,
    ).validate()  # fmt: skip
    train = pipeline.train_data(data, _WORKDIR.value, _VOCAB.value, _LENGTH.value, seed=0)
    iterator = train.iterator()
    next(iterator)  # threads started, first batch read
    rates, seconds, fills = [], [], []
    for _ in range(_REPEATS.value):
        targets, start = 0, time.perf_counter()
        for _ in range(_BATCHES.value):
            batch = next(iterator)
            real = int(np.count_nonzero(batch["targets"]))
            targets += real
            fills.append(real / batch["targets"].size)
        seconds.append(time.perf_counter() - start)
        rates.append(targets / seconds[-1])
    rate = statistics.median(rates)
    print(json.dumps({
        "benchmark": "pipeline",
        "dataset": data.dataset,
        "batch_rows": _ROWS.value,
        "row_length": _LENGTH.value,
        "num_threads": _THREADS.value,
        "target_tokens_per_s": round(rate, 1),
        "batches_per_s": round(_BATCHES.value / statistics.median(seconds), 2),
        "row_fill": round(float(np.mean(fills)), 4),
        "peak_rss_gib": round(peak_rss_gib(), 3),
    }))  # fmt: skip


if __name__ == "__main__":
    cli.run(main)
