r"""Translate text with a trained model, one output line per input line.

  python -m experiments.translate --workdir=DIR < in.txt > out.txt
  python -m experiments.translate --workdir=DIR --input=in.txt --output=out.txt \
      [--step=N | --average_last=5] [--beam_size=4 --length_penalty=0.6]
      [--no_repeat_ngram=0 --mbr=0 --mbr_samples=0]

The workdir holds the model config, vocabulary and checkpoints, so nothing
else is needed. Whatever the input, there is exactly one output line per input
line, in order: an empty line gives an empty line; a line longer than the
model's max length is translated in pieces (warned about on stderr); invalid
UTF-8 is replaced by U+FFFD (warned about); a UTF-8 byte-order mark opening
the input is dropped, a UTF-16 one refused; an empty input gives no output and
a warning. --input may be a pipe (/dev/stdin, <(...)), read once. A bad
--output (a folder, the input itself, a training workdir's own files) is
refused before the model loads, and a failed or interrupted run (Ctrl-C,
SIGTERM) leaves no partial file behind; an --output that is a link is written
through; one that names stdout (-, /dev/stdout, the file `>>` appends to)
writes to it. Input is read and translated in chunks, so a file of any size
runs in bounded memory; sentences within a chunk are batched by length.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections.abc import Iterator
from typing import BinaryIO, TextIO

from absl import flags

from experiments import cli, trained_flags
from transformer.progress import Meter
from transformer.translation import Translator

INPUT = flags.DEFINE_string("input", None, "File to translate (default: stdin).")
OUTPUT = flags.DEFINE_string("output", None, "File to write (default, or -: stdout).")
CHUNK_LINES = flags.DEFINE_integer(
    "chunk_lines", 2000, "Lines read and translated at a time (bounds memory)."
)
BATCH_TOKENS = flags.DEFINE_integer(
    "decode_batch_tokens", 4096, "Padded source tokens per decoding batch (memory, speed)."
)

# Characters that would end a line in the output (a byte-fallback model can
# produce them): each becomes a space so that line counts always match.
_LINE_BREAKS = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


SHOWN_INVALID_LINES = 5  # named one by one; a whole file in another encoding is then counted
ICONV_HINT = " (is the input UTF-8? iconv -f latin1 -t utf-8 converts Latin-1)"


def read_chunks(stream: BinaryIO, size: int) -> Iterator[list[tuple[int, str, bool]]]:
    """Chunks of (line number, text, had invalid UTF-8) from a byte stream."""
    chunk, number = [], 0
    for raw in stream:
        number += 1
        chunk.append((number, *cli.decode_line(raw, first=number == 1)))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def one_line(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text)


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def translate_stream(
    translator: Translator, source: BinaryIO, sink: TextIO, chunk_lines: int, meter
) -> int:
    """Translates every line of `source` into `sink`; returns the number of lines.

    `meter` (a progress.Meter, or None) counts lines, a chunk's in proportion to
    the share of its sentences translated so far.
    """
    total, invalid_lines = 0, 0
    for chunk in read_chunks(source, chunk_lines):
        for number, _, invalid in chunk:
            invalid_lines += invalid
            if invalid and invalid_lines <= SHOWN_INVALID_LINES:
                hint = ICONV_HINT if invalid_lines == 1 else ""
                warn(f"line {number}: invalid UTF-8 replaced by U+FFFD{hint}")
        numbers = [number for number, _, _ in chunk]
        translator.on_split = lambda i, pieces, numbers=numbers: warn(
            f"line {numbers[i]}: longer than the model's "
            f"{translator.max_source_tokens} tokens, translated in {pieces} pieces"
        )
        if meter is not None:
            translator.on_progress = meter.in_proportion(len(chunk), before=total)
        outputs = translator.translate([text for _, text, _ in chunk])
        sink.writelines(one_line(out) + "\n" for out in outputs)
        sink.flush()
        total += len(chunk)
        if meter is not None:
            meter.update(total, meter.total)
    if meter is not None:
        meter.finish()
    if invalid_lines > SHOWN_INVALID_LINES:
        warn(f"{invalid_lines:,} lines in all held invalid UTF-8, replaced by U+FFFD")
    return total


def _open_input(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise cli.UserError(f"--input={path} cannot be read: {e.strerror}") from e


def _is_stdout(path: str) -> bool:
    """`-`, /dev/stdout, or any name of the file that stdout already is (`>> F`
    with --output=F): written as stdout, never replaced."""
    if path == "-":
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError):
        return False


def _sink_path(path: str) -> str | None:
    """Where the translations are written and then renamed into `path`: beside
    the file a link points to (the link stays a link), or None for what is not
    a file to replace (a terminal, a pipe, /dev/stdout): written directly."""
    real = os.path.realpath(path)
    if os.path.exists(real) and not os.path.isfile(real):
        return None
    return f"{real}.partial"


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the partial file is removed


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {argv[1:]}; text comes on stdin or --input")
    if CHUNK_LINES.value < 1 or BATCH_TOKENS.value < 1:
        raise cli.UserError("--chunk_lines and --decode_batch_tokens must be positive")
    output = None if OUTPUT.value is None or _is_stdout(OUTPUT.value) else OUTPUT.value
    if output is not None:
        # Without --input, stdin is the input: `--output=F < F` would empty F.
        cli.check_output_file("output", output, (INPUT.value or "/dev/stdin",))
        partial = _sink_path(output)
        if (
            partial
            and INPUT.value
            and os.path.exists(partial)
            and os.path.samefile(partial, INPUT.value)
        ):
            raise cli.UserError(
                f"--input={INPUT.value} is where --output={output} is written until "
                "complete; rename the input or give another output"
            )
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with contextlib.ExitStack() as stack:
        # Opened once, before the model loads: a pipe or FIFO (--input=/dev/stdin,
        # <(...)) can be read only once, and a missing file is refused at once.
        source = stack.enter_context(_open_input(INPUT.value)) if INPUT.value else sys.stdin.buffer
        model = trained_flags.load()
        translator = trained_flags.translator(model, tokens_per_batch=BATCH_TOKENS.value)
        meter = None
        if INPUT.value:  # on stderr: stdout may be carrying the translations
            # A regular file is counted first, for the ETA; a stream cannot be read twice.
            total = _count_lines(INPUT.value) if os.path.isfile(INPUT.value) else None
            meter = Meter("translating", total, "lines", stream=sys.stderr)
        # A named output is written beside its place and renamed when complete:
        # an interrupted run leaves an earlier file of that name untouched.
        partial = _sink_path(output) if output else None
        try:
            if partial:
                sink = stack.enter_context(open(partial, "w", encoding="utf-8"))
            elif output:
                sink = stack.enter_context(open(output, "w", encoding="utf-8"))
            else:
                sys.stdout.reconfigure(encoding="utf-8")
                sink = sys.stdout
            lines = translate_stream(translator, source, sink, CHUNK_LINES.value, meter)
            if partial:
                sink.close()
                os.replace(partial, partial.removesuffix(".partial"))
        except BaseException:  # a full disk, Ctrl-C: no half-written file is left behind
            if partial and os.path.exists(partial):
                os.remove(partial)
            raise
    if lines == 0:
        warn("the input was empty: nothing to translate")


if __name__ == "__main__":
    cli.run(main)
