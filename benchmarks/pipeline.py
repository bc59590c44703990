r"""Input pipeline speed: target tokens/s of the training batches, without a model.

  python -m benchmarks.pipeline --vocab_size=8000                  # the demo's 48 x 64 rows
  python -m benchmarks.pipeline --vocab_size=8000 --producers=ids:t1,ids:w2,text:t1

Each --producers entry is measured in its own process, one after the other:
`ids` batches are laid out from the prepared token ids (what training reads),
`text` batches are read as text and tokenized per batch (what training did
before the ids were prepared); `tN` is N threads in the consuming process, `wN`
N grain worker processes. The first run builds ding_de_en, trains the
vocabulary in --workdir and prepares the ids, none of which is timed. Prints
one JSON line per entry: target (non-PAD) tokens/s and batches/s (median of
--repeats timed passes of --batches batches each), row fill, peak RSS.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from absl import flags

import benchmarks
from benchmarks import peak_rss_gib
from experiments import cli, config_flags
from transformer import config
from transformer.data import datasets, pipeline, token_ids

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/pipeline_bench", "Vocabulary folder.")
# The CPU demo's corpus and batch shape (experiments/configs/ding_deen_cpu.flags).
DEMO = config.DataConfig(
    dataset="ding_de_en", direction="de-en", batch_rows=48, row_length=64, max_len=64,
    vocab_sample_size=300_000,
)  # fmt: skip
config_flags.define(
    config.DataConfig, only=("data_dir", "batch_rows", "row_length"),
    defaults=dataclasses.asdict(DEMO),
)  # fmt: skip
config_flags.define(config.ModelConfig, only=("vocab_size",), defaults={"vocab_size": 8000})
_PRODUCERS = flags.DEFINE_list(
    "producers", ["ids:t1", "ids:w1", "ids:w2", "text:t1", "text:t2"],
    "What to measure: SOURCE:tN (N threads) or SOURCE:wN (N worker processes), "
    "SOURCE ids or text.",
)  # fmt: skip
_BATCHES = flags.DEFINE_integer("batches", 400, "Batches per timed pass.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes.", lower_bound=1)
_ONE = flags.DEFINE_string("one", None, "Internal: measure this one entry in this process.")


class TextBatches(pipeline.TrainBatches):
    """The batches of the plan read as text and tokenized per batch (the old path)."""

    def __getitem__(self, n):
        if isinstance(n, slice):
            return self.slice(n)
        _, length, rows = self.plan.batch(int(n))
        example_ids, local_rows = pipeline.local_rows(rows)
        source, vocab = self.text
        pairs = pipeline.tokenize(vocab, source.texts(example_ids), self.plan.max_len)
        sources, targets = (token_ids.Ragged.from_lists(side) for side in zip(*pairs, strict=True))
        return pipeline.layout(sources, targets, local_rows, length, packed=True)


def parse(entry: str) -> tuple[str, int, int]:
    """'ids:w2' -> ('ids', threads 1, workers 2); a UserError names a malformed entry."""
    source, _, producers = entry.partition(":")
    kind, count = producers[:1], producers[1:]
    if source not in ("ids", "text") or kind not in ("t", "w") or not count.isdigit():
        raise cli.UserError(f"--producers: {entry!r} is not ids|text:tN|wN, e.g. ids:w2")
    if int(count) < 1:
        raise cli.UserError(f"--producers: {entry!r} needs at least one producer")
    return (source, int(count), -1) if kind == "t" else (source, 1, int(count))


def data_config(threads: int, workers: int) -> config.DataConfig:
    data = DEMO.replace(**config_flags.given(config.DataConfig))
    changes = dict(max_len=data.row_length, num_threads=threads, data_workers=workers)
    return data.replace(**changes).validate()


def measure(entry: str) -> dict:
    source_kind, threads, workers = parse(entry)
    data = data_config(threads, workers)
    vocab_size = flags.FLAGS.vocab_size
    train = pipeline.train_data(data, _WORKDIR.value, vocab_size, data.row_length, seed=0)
    if source_kind == "text":
        text = (datasets.load_split(data, "train"), train.vocab)
        train.dataset = TextBatches(train.dataset.ids, train.plan, 0, 1, text)
    iterator = train.iterator()
    next(iterator)  # producers started, first batch made
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
    if hasattr(iterator, "close"):
        iterator.close()
    return {
        "benchmark": "pipeline", "dataset": data.dataset, "producers": entry,
        "batch_rows": data.batch_rows, "row_length": data.row_length, "cpus": os.cpu_count(),
        "target_tokens_per_s": round(statistics.median(rates)),
        "batches_per_s": round(_BATCHES.value / statistics.median(seconds), 1),
        "row_fill": round(float(np.mean(fills)), 4),
        "peak_rss_gib": round(peak_rss_gib(), 3),
    }  # fmt: skip


def main(argv):
    del argv
    if _ONE.value:
        print(json.dumps(measure(_ONE.value)), flush=True)
        return
    entries = _PRODUCERS.value
    for entry in entries:
        parse(entry)  # every entry checked before anything is measured
    # Built (untimed) once here, so that no measured process builds it.
    data = data_config(1, -1)
    pipeline.train_data(data, _WORKDIR.value, flags.FLAGS.vocab_size, data.row_length, seed=0)
    passed = [a for a in sys.argv[1:] if not a.startswith("--producers")]
    for entry in entries:
        command = [sys.executable, "-m", "benchmarks.pipeline", *passed, f"--one={entry}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise cli.UserError(f"{entry}: {result.stderr.strip().splitlines()[-1]}")
        print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    benchmarks.run(main)
