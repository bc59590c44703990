r"""Score a trained model: sacreBLEU, chrF and the paper-style tokenized BLEU.

  python -m experiments.evaluate --workdir=DIR [--split=test] [--average_last=5]
  python -m experiments.evaluate --workdir=DIR --source_file=src.txt --reference_file=ref.txt

Translates a split of the workdir's dataset (or a source file), writes the
hypotheses (one per line) and prints:
  - sacreBLEU on detokenized, cased text (13a tokenization) with its signature,
    the figure to compare with other work;
  - chrF, with its signature;
  - BLEU on Moses-tokenized text with compounds split at hyphens, as the paper
    computed it, which is NOT comparable to sacreBLEU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import flags
from etils import epath

from experiments import cli, config_flags, trained_flags
from transformer import config, metrics, record
from transformer.data import datasets
from transformer.progress import Meter, counted

SPLIT = flags.DEFINE_string("split", "test", "Split of the workdir's dataset to translate.")
SOURCE_FILE = flags.DEFINE_string("source_file", None, "Translate this file instead of a split.")
REFERENCE_FILE = flags.DEFINE_string("reference_file", None, "References for --source_file.")
LIMIT = flags.DEFINE_integer("limit", 0, "Only the first N sentences (0: all).")
HYPOTHESES = flags.DEFINE_string(
    "hypotheses",
    None,
    "Where to write the translations (default: in the workdir, named by the source, the "
    "checkpoints and any decoding setting given that differs from the workdir's).",
)
config_flags.define(config.DataConfig, only=("data_dir",), note=" Default: the training run's.")


def changed_settings(recorded: config.DecodeConfig, used: config.DecodeConfig) -> str:
    """The decoding settings that differ from the workdir's, as a file name's part
    ('.beam_size1.mbr0'; '' for none), so that scoring with other settings does not
    overwrite the hypotheses of the workdir's."""
    parts = []
    for field in dataclasses.fields(used):
        value = getattr(used, field.name)
        if value != getattr(recorded, field.name):
            shown = int(value) if isinstance(value, bool) else value
            parts.append(
                f".{field.name}{shown:g}" if isinstance(value, float) else f".{field.name}{shown}"
            )
    return "".join(parts)


def read_lines(path: str) -> list[str]:
    """The file's lines; invalid UTF-8 is replaced by U+FFFD, with a warning."""
    try:
        with open(path, "rb") as f:
            decoded = [cli.decode_line(raw, first=i == 0) for i, raw in enumerate(f)]
    except OSError as e:
        raise cli.UserError(f"{path} cannot be read: {e.strerror}") from e
    except cli.UserError as e:
        raise cli.UserError(f"{path}: {e}") from None
    lines = [text for text, _ in decoded]
    invalid = [number for number, (_, bad) in enumerate(decoded, 1) if bad]
    if invalid:
        shown = ", ".join(map(str, invalid[:5])) + (", ..." if len(invalid) > 5 else "")
        print(
            f"warning: {path}: invalid UTF-8 replaced by U+FFFD on {len(invalid)} "
            f"line(s) ({shown})",
            file=sys.stderr,
        )
    return lines


def pairs_from_files() -> tuple[list[str], list[str], str]:
    if not REFERENCE_FILE.value:
        raise cli.UserError("--source_file needs --reference_file")
    sources, references = read_lines(SOURCE_FILE.value), read_lines(REFERENCE_FILE.value)
    if len(sources) != len(references):
        raise cli.UserError(
            f"--source_file has {len(sources)} lines but --reference_file has "
            f"{len(references)}; they must be line-aligned"
        )
    return sources, references, os.path.basename(SOURCE_FILE.value)


def pairs_from_split(data) -> tuple[list[str], list[str], str]:
    source = datasets.load_split(data, SPLIT.value)
    n = len(source) if not LIMIT.value else min(LIMIT.value, len(source))
    pairs = source.texts(range(n))
    return [s for s, _ in pairs], [t for _, t in pairs], SPLIT.value


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}")
    if LIMIT.value < 0:
        raise cli.UserError(f"--limit must be >= 0, got {LIMIT.value}")
    if REFERENCE_FILE.value and not SOURCE_FILE.value:
        raise cli.UserError("--reference_file needs --source_file (the sentences it translates)")
    if SOURCE_FILE.value and flags.FLAGS["split"].present:
        raise cli.UserError("--split and --source_file exclude each other; give one")
    if SPLIT.value not in datasets.SPLITS:  # before the model loads
        raise cli.UserError(f"--split must be one of {', '.join(datasets.SPLITS)}")
    if HYPOTHESES.value:
        inputs = tuple(f for f in (SOURCE_FILE.value, REFERENCE_FILE.value) if f)
        cli.check_output_file("hypotheses", HYPOTHESES.value, inputs)
    if SOURCE_FILE.value:
        sources, references, name = pairs_from_files()
        if LIMIT.value:
            sources, references = sources[: LIMIT.value], references[: LIMIT.value]
        if not sources:
            raise cli.UserError(f"--source_file={SOURCE_FILE.value} is empty: nothing to score")
    model = trained_flags.load()
    data = model.data
    data = data.replace(**config_flags.given(config.DataConfig))
    if not SOURCE_FILE.value:
        sources, references, name = pairs_from_split(data)
    steps = f"avg{len(model.steps)}" if len(model.steps) > 1 else model.steps[0]
    settings = changed_settings(
        record.read_configs(trained_flags.WORKDIR.value).decode, model.decode
    )
    tag = f"{name}{f'.first{LIMIT.value}' if LIMIT.value else ''}.{steps}{settings}"
    out = HYPOTHESES.value or os.path.join(trained_flags.WORKDIR.value, f"hypotheses.{tag}.txt")
    local = "://" not in trained_flags.WORKDIR.value
    if not HYPOTHESES.value and local and not os.access(trained_flags.WORKDIR.value, os.W_OK):
        raise cli.UserError(
            f"{trained_flags.WORKDIR.value} is not writable; give --hypotheses=FILE elsewhere"
        )
    # On stderr: stdout carries the scores and their JSON line.
    meter = Meter(f"translating {name}", len(sources), "sentences", stream=sys.stderr)
    translator = trained_flags.translator(model, on_progress=meter.in_proportion(len(sources)))
    hypotheses = translator.translate(sources)
    meter.finish()
    scores = metrics.evaluate_translations(hypotheses, references, data.languages()[1])
    # epath: the workdir, where they go by default, may be gs://.
    epath.Path(out).write_text(
        "".join(" ".join(h.split()) + "\n" for h in hypotheses), encoding="utf-8"
    )
    what = f"{counted(len(sources), 'sentence')}, {model.describe()}"
    print(f"{name}: {what}, {translator.decode.describe()}")
    print(f"sacreBLEU {scores['sacrebleu']:.2f}  ({scores['sacrebleu_signature']})")
    print(f"chrF      {scores['chrf']:.2f}  ({scores['chrf_signature']})")
    print(
        f"tokenized BLEU with compound splitting {scores['paper_bleu_tokenized']:.2f}  "
        "(paper-style; not comparable to sacreBLEU)"
    )
    print(f"hypotheses: {out}")
    print(json.dumps({"source": name, "steps": list(model.steps), **scores}))


if __name__ == "__main__":
    cli.run(main)
