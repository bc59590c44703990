r"""Attention heatmaps of a trained model translating one sentence.

  python -m experiments.attention_maps --workdir=DIR --sentence="Das Haus ist schön." \
      [--out_dir=DIR/attention_maps] [--beam_size=4]

Translates the sentence, then writes one PNG per attention layer (encoder
self-attention, decoder self-attention, encoder-decoder attention), a panel per
head, with the SentencePiece tokens on the axes, like the paper's Figures 3-5.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from experiments import cli, trained_flags
from transformer.analysis import attention_maps
from transformer.config import EOS_ID

SENTENCE = flags.DEFINE_string("sentence", None, "The sentence to translate and draw.")
OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the PNGs go (default: in the workdir).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}")
    if not SENTENCE.value or not SENTENCE.value.strip():
        raise cli.UserError('--sentence is required, e.g. --sentence="Das Haus ist schön."')
    # The shell hands over bytes; absl keeps those that are not UTF-8 as surrogates.
    sentence, invalid = cli.decode_line(SENTENCE.value.encode("utf-8", "surrogateescape"))
    if invalid:
        print("warning: --sentence: invalid UTF-8 replaced by U+FFFD", file=sys.stderr)
    out_dir = OUT_DIR.value or os.path.join(trained_flags.WORKDIR.value or "", "attention_maps")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise cli.UserError(f"--out_dir={out_dir} is a file; give a folder for the PNGs")
    part = cli.workdir_part(out_dir)
    if part is not None:
        raise cli.UserError(f"--out_dir={out_dir} would write into {part}; give another folder")
    model = trained_flags.load()
    vocab, max_tokens = model.vocab, model.model.config.max_len - 1
    source_ids = vocab.encode(sentence)
    if len(source_ids) > max_tokens:
        raise cli.UserError(
            f"--sentence has {len(source_ids)} tokens; the model takes at most {max_tokens}"
        )
    translator = trained_flags.translator(model)
    translation = translator.translate([sentence])[0]
    target_ids = vocab.encode(translation)[:max_tokens]
    paths = attention_maps.write_maps(
        model.model,
        model.params,
        source_ids + [EOS_ID],
        target_ids + [EOS_ID],
        vocab.pieces(source_ids) + ["</s>"],
        vocab.pieces(target_ids) + ["</s>"],
        out_dir,
    )
    print(f"translation: {translation}")
    print(f"wrote {len(paths)} attention maps to {out_dir}")


if __name__ == "__main__":
    cli.run(main)
