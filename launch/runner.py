"""Runs commands, or with --dry_run prints them so they can be pasted into a shell."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Callable

from launch.cli import CommandError, UserError


def _start(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run, with a missing program reported as something to install."""
    try:
        return subprocess.run(argv, **kwargs)
    except FileNotFoundError:
        raise UserError(
            f"{argv[0]} not found on PATH; install the Google Cloud CLI "
            "(https://cloud.google.com/sdk/docs/install) and run gcloud auth login"
        ) from None


class Runner:
    """Runs argv lists in order; stops at the first failure.

    In dry-run mode nothing runs: each command is printed on stdout, one line
    each, exactly as it would be executed.
    """

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def run(self, argv: list[str]) -> None:
        """Runs argv with the terminal attached (gcloud shows its own progress)."""
        if self._announce(argv):
            return
        self._check(argv, _start(argv).returncode)

    def succeeds(self, argv: list[str]) -> bool:
        """Runs argv as `run` does (gcloud may ask to make an ssh key); whether it
        exited 0 (in dry-run mode: True)."""
        if self._announce(argv):
            return True
        return _start(argv).returncode == 0

    def output(self, argv: list[str], dry_run_answer: str = "") -> str:
        """Runs argv and returns its stdout; in dry-run mode returns dry_run_answer."""
        if self._announce(argv):
            if dry_run_answer:
                print(f"# dry run: taken to answer {dry_run_answer}", flush=True)
            return dry_run_answer
        done = _start(argv, stdout=subprocess.PIPE, text=True)
        self._check(argv, done.returncode)
        return done.stdout.strip()

    def local(self, description: str, step: Callable[[], None]) -> None:
        """A step done in Python here (packing files); described in dry-run mode."""
        if self._announce([], note=description):
            return
        step()

    def _announce(self, argv: list[str], note: str = "") -> bool:
        """Prints the command; True when it should not run (dry run)."""
        line = f"# {note}" if note else shlex.join(argv)
        if self.dry_run:
            print(line, flush=True)
        else:
            print(f"+ {line}", file=sys.stderr, flush=True)
        return self.dry_run

    @staticmethod
    def _check(argv: list[str], returncode: int) -> None:
        if returncode != 0:
            shown = shlex.join(argv)
            shown = shown if len(shown) <= 160 else shown[:157] + "..."
            raise CommandError(f"exit status {returncode} from: {shown}")
