"""What the launch scripts share: one-line errors, flags, checks of names and paths.

Like the experiment scripts, a mistake the user can fix ends the program with
one line `<program>: error: <what is wrong>` on stderr and exit code 1, before
any gcloud command has run.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Callable
from typing import NoReturn

# GCE and TPU resource names: lowercase letter first, then lowercase, digits, dashes.
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class UserError(Exception):
    """Something the user can correct; the message says what and how."""


class CommandError(Exception):
    """A gcloud (or other) command exited with a non-zero status."""


def fail(program: str, message: str) -> NoReturn:
    """Prints `program: error: message` as one line and exits with status 1."""
    print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(1)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit 1, like every other error."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog.split()[0], f"{message} (see --help)")


def run(program: str, main: Callable[[list[str]], None], argv: list[str]) -> None:
    """Calls main(argv), turning UserError and CommandError into one-line exits."""
    try:
        main(argv)
    except (UserError, CommandError) as e:
        fail(program, str(e))
    except KeyboardInterrupt:
        fail(program, "interrupted")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that TPU and GPU launches have in common."""
    parser.add_argument("--name", required=True, help="VM name (lowercase, digits, dashes).")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e).")
    parser.add_argument("--project", help="Google Cloud project (default: gcloud's).")
    parser.add_argument("--dry_run", action="store_true", help="Print commands, run nothing.")
    parser.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, preemptible.")
    parser.add_argument("--repo", help="git URL to clone on the VM (default: copy this tree).")
    parser.add_argument("--ref", help="branch, tag or commit of --repo (default: its HEAD).")
    parser.add_argument("--python", default="3.12", help="Python version of the VM's venv.")
    parser.add_argument(
        "--flagfile",
        default="experiments/configs/wmt14_ende_base.flags",
        help="Training flagfile, relative to the repository root.",
    )
    parser.add_argument("--workdir", help="Checkpoints and logs: gs://BUCKET/PATH.")
    parser.add_argument("--data_dir", help="TFDS data directory, e.g. gs://BUCKET/tfds.")
    parser.add_argument("--extra_flags", default="", help="More flags for experiments.wmt.")
    parser.add_argument("--follow", action="store_true", help="logs: keep streaming (tail -F).")
    parser.add_argument("--lines", type=int, default=100, help="logs: lines to show.")


def check_name(name: str) -> None:
    """VM names follow GCE rules; catching it here beats a gcloud API error."""
    if not _NAME.match(name):
        raise UserError(
            f"--name={name!r} is not a valid VM name: use 1-63 lowercase letters, "
            "digits and dashes, starting with a letter"
        )


def check_source(repo: str | None, ref: str | None) -> None:
    """--ref only means something together with --repo."""
    if ref and not repo:
        raise UserError("--ref needs --repo (without --repo this working tree is copied)")


# Paths the launcher checks (GCS where every host or a spot VM's successor reads them).
OWN_FLAGS = ("workdir", "data_dir")


def extra_flags(text: str) -> list[str]:
    """--extra_flags split like a shell would; each must be an --flag."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise UserError(f"--extra_flags cannot be split: {e}") from None
    for word in words:
        if not word.startswith("--"):
            raise UserError(f"--extra_flags: {word!r} is not a flag; write --name=value")
        name = word[2:].split("=", 1)[0]
        if name in OWN_FLAGS:  # the launcher checks these paths: given here, unchecked
            raise UserError(f"--extra_flags: give {name} as the launcher's own --{name}")
    return words


def check_gcs(flag: str, value: str | None, why: str) -> None:
    """Paths every host must see (or that must outlive the VM) have to be on GCS."""
    if not value or not value.startswith("gs://"):
        shown = f"={value}" if value else " is missing"
        raise UserError(f"--{flag}{shown}: {why} it must be gs://BUCKET/PATH")
