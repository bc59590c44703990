"""What the person running a command sees: one-line messages and progress meters.

A `Meter` reports a phase that takes more than a few seconds (building the
corpus, sampling text for the vocabulary, tokenizing, translating a split):
done / total, rate and ETA. On a terminal it is one bar redrawn in place; in a
log (output not a terminal) it is one line every `every_s` seconds and a last
one at the end. Only process 0 prints.
"""

from __future__ import annotations

import functools
import logging as pylogging
import sys
import time
from typing import TextIO

import jax
from absl import logging

_to_stderr = False


def to_stderr() -> None:
    """Messages and meters go to stderr from now on: for commands whose stdout is
    data (the benchmarks' JSON lines)."""
    global _to_stderr
    _to_stderr = True


def _stream() -> TextIO:
    return sys.stderr if _to_stderr else sys.stdout


class _Hidden(pylogging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@functools.cache
def hide_library_warning(prefix: str) -> None:
    """Drops the absl-logged messages whose format string starts with `prefix`: a
    library's warning that would come before the one line that says what matters
    (added once per prefix)."""
    logging.get_absl_logger().addFilter(_Hidden(prefix))


def say(message: str) -> None:
    """A line for the person running the command (process 0 only)."""
    if jax.process_index() == 0:
        print(message, file=_stream(), flush=True)


def counted(number: float, noun: str) -> str:
    """'1 minute', '30 minutes', '1,030 sentences'."""
    text = f"{number:,}" if isinstance(number, int) else f"{number:g}"
    return f"{text} {noun if number == 1 else noun + 's'}"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


RATE_AFTER_S = 1.0  # a meter shows its rate and ETA once it has run this long


class Meter:
    """`label: [#####     ] 520/1000 sentences, 43.2 sentences/s, ETA 0m11s`."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: str,
        *,
        every_s: float = 10.0,
        first_at_once: bool = False,
        stream: TextIO | None = None,
    ):
        """first_at_once: a log gets the first update at once, not after every_s
        (for a meter created late in its phase, or that advances seldom)."""
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = _stream() if stream is None else stream
        self.live = self.stream.isatty()
        self.done, self.start = 0, time.monotonic()
        self.last_shown = self.start - every_s if first_at_once else self.start
        self.shown_done = None
        self.enabled = jax.process_index() == 0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.live or now - self.last_shown >= self.every_s:
            self.last_shown = now
            self._show(final=False)

    def update(self, done: int, total: int) -> None:
        """Sets the count (for callers that learn the total as they go)."""
        self.total = total
        self.advance(done - self.done)

    def in_proportion(self, size: int, before: int = 0):
        """A translator's (pieces done, of) on `size` texts, after `before` counted
        already -> this meter's count: it decodes the distinct texts, long ones in
        pieces, not the lines given."""
        return lambda done, of: self.update(before + size * done // max(of, 1), self.total)

    def finish(self) -> None:
        """The last line: what was done, in how long (unless a log has it already)."""
        if self.live or self.shown_done != self.done:
            self._show(final=True)

    def line(self, final: bool = False) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done:,}" if self.total is None else f"{self.done:,}/{self.total:,}"
        text = f"{self.label}: {count} {self.unit}"
        if not final and elapsed < RATE_AFTER_S:
            return text  # a rate from the first instants (1 round in 40 us) says nothing
        text += f", {rate:,.1f} {self.unit}/s"
        if self.total and self.done < self.total and rate > 0:
            text += f", ETA {format_duration((self.total - self.done) / rate)}"
        elif self.done and (not self.total or self.done >= self.total):
            text += f", {format_duration(elapsed)}"
        return text

    def _show(self, final: bool) -> None:
        if not self.enabled:
            return
        self.shown_done = self.done
        text = self.line(final)
        if self.live and self.total:
            filled = int(20 * min(self.done / self.total, 1.0))
            text = text.replace(": ", f": [{'#' * filled}{' ' * (20 - filled)}] ", 1)
        end = "\n" if final or not self.live else "\r"
        print(text, end=end, file=self.stream, flush=True)
