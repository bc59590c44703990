"""What runs on the VM's workers, and how the code gets there.

Every worker gets the same layout under the login user's home:

  ~/transformer-jax     the code: a clone of --repo at --ref, or a copy of this tree
  ~/transformer-venv    a venv with the project installed, extra [tpu] or [cuda]
  ~/train.log           the training log (appended to by every start)
  ~/train.pid           the training process, for status, stop and double-start checks

The scripts are single lines of bash so that --dry_run prints one pasteable
command per step. TPU and GPU launches share them; they differ only in how
ssh and scp reach the workers, which the caller passes in as a `Remote`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from launch.cli import UserError
from launch.runner import Runner

CODE = "$HOME/transformer-jax"
VENV = "$HOME/transformer-venv"
LOG = "$HOME/train.log"
PID = "$HOME/train.pid"
ARCHIVE = "transformer-jax.tar.gz"  # scp puts relative paths in the home directory
REPO_ROOT = Path(__file__).resolve().parents[1]
# Flags are checked within seconds of the start (after the imports): a run that
# survives this long got past them.
STARTUP_CHECK_SECONDS = 20
# Seconds `stop` waits for the checkpoint after SIGTERM; a big model to GCS takes a while.
STOP_WAIT_SECONDS = 600

# A PID file survives a stop and start of the VM, and PIDs are reused: the process
# it names must be a training run.
_RUNNING = f'[ -f "{PID}" ] && grep -qa experiments.wmt "/proc/$(cat "{PID}")/cmdline" 2>/dev/null'
# Setup's last step: the versions, and what jax runs on. The CPU alone means the
# accelerator's runtime (libtpu, the NVIDIA driver) is not usable yet.
ACCELERATOR_CHECK = (
    "import sys, jax, transformer; backend = jax.default_backend(); "
    "print(sys.version.split()[0], jax.__version__, backend, jax.device_count()); "
    'sys.exit("jax finds no accelerator here, only the CPU (a GPU VM may still be installing '
    'its driver: run setup again in a few minutes)" if backend == "cpu" else 0)'
)


@dataclasses.dataclass(frozen=True)
class Remote:
    """How to reach a VM: argv builders supplied by launch.tpu or launch.gpu."""

    ssh: Callable[[str, str], list[str]]  # (script, worker: 'all' or an index) -> argv
    scp: Callable[[str, str], list[str]]  # (local file, remote file) -> argv, to every worker
    extra: str  # the pyproject extra that brings the accelerator's jaxlib: tpu or cuda


# ----------------------------------------------------------------------------
# Scripts
# ----------------------------------------------------------------------------


def _fetch_code(repo: str | None, ref: str | None) -> list[str]:
    """Statements that put the code in CODE: a fresh clone, or the copied archive."""
    if repo:
        steps = [f'rm -rf "{CODE}"', f'git clone --quiet {shlex.quote(repo)} "{CODE}"']
        if ref:  # fetching by name works for branches, tags and full commit hashes alike
            steps += [
                f'git -C "{CODE}" fetch --quiet origin {shlex.quote(ref)}',
                f'git -C "{CODE}" checkout --quiet --detach FETCH_HEAD',
            ]
        return steps
    return [
        f'rm -rf "{CODE}"',
        f'mkdir -p "{CODE}"',
        f'tar -xzf "$HOME/{ARCHIVE}" -C "{CODE}"',
        f'rm -f "$HOME/{ARCHIVE}"',
    ]


def setup_script(extra: str, python: str, repo: str | None, ref: str | None) -> str:
    """Installs the project with its [extra] into VENV on one worker."""
    # The TPU and Deep Learning VM images ship Python 3.10; the project needs
    # 3.11+, so uv provides the interpreter for the venv.
    install = f'-e ".[{extra}]" gcsfs'  # gcsfs: how tfds and etils reach gs:// without TF
    steps = [
        "set -euo pipefail",
        f'if {_RUNNING}; then echo "training is running on $(hostname); run stop first" >&2; '
        "exit 1; fi",
        *_fetch_code(repo, ref),
        f'cd "{CODE}"',
        'export PATH="$HOME/.local/bin:$PATH"',
        "command -v uv >/dev/null || python3 -m pip install --user --quiet uv "
        "|| curl -LsSf https://astral.sh/uv/install.sh | sh",
        f'[ -x "{VENV}/bin/python" ] || uv venv --quiet --seed --python {shlex.quote(python)} '
        f'"{VENV}"',
        'constraints=""; if [ -f constraints.txt ]; then constraints="-c constraints.txt"; fi',
        f'"{VENV}/bin/pip" install --quiet $constraints {install}',
        'printf "installed on %s: python, jax, backend, devices: " "$(hostname)"',
        f'"{VENV}/bin/python" -c {shlex.quote(ACCELERATOR_CHECK)}',
    ]
    return "; ".join(steps)


def training_argv(
    flagfile: str, workdir: str, data_dir: str | None, extra_flags: list[str]
) -> list[str]:
    """The training command as run on every worker (python is the venv's)."""
    argv = ["python", "-m", "experiments.wmt", f"--flagfile={flagfile}", f"--workdir={workdir}"]
    if data_dir:
        argv.append(f"--data_dir={data_dir}")
    return argv + extra_flags


def train_script(argv: list[str], check_seconds: int = STARTUP_CHECK_SECONDS) -> str:
    """Starts argv in the background under nohup; a no-op where it already runs.

    The ssh session returns after check_seconds; the process outlives it. If it
    has already died by then (a bad flag, a missing flagfile), the script shows
    the log's tail and fails. Restarting on a fresh VM with the same gs://
    workdir resumes from its latest checkpoint.
    """
    command = f'"{VENV}/bin/python" {shlex.join(argv[1:])}'
    steps = [
        "set -euo pipefail",
        f'cd "{CODE}"',
        f'if {_RUNNING}; then echo "training already running on $(hostname) '
        f'(pid $(cat "{PID}"))"; exit 0; fi',
        f'echo "=== $(date -u +%FT%TZ) start: "{shlex.quote(shlex.join(argv))} >> "{LOG}"',
        f'nohup {command} >> "{LOG}" 2>&1 < /dev/null & pid=$!; echo "$pid" > "{PID}"',
        f"sleep {int(check_seconds)}",
        'if ! kill -0 "$pid" 2>/dev/null; then echo "training exited at once on $(hostname):" >&2; '
        f'tail -n 20 "{LOG}" >&2; exit 1; fi',
        f'echo "training started on $(hostname) (pid $pid), log {LOG}"',
    ]
    return "; ".join(steps)


def stop_script(wait_seconds: int = STOP_WAIT_SECONDS) -> str:
    """SIGTERM to the training process, which saves a checkpoint, then waits for it to exit."""
    return (
        f'if {_RUNNING}; then pid=$(cat "{PID}"); kill -TERM "$pid"; '
        f'echo "SIGTERM sent on $(hostname); waiting for the checkpoint"; '
        f'for _ in $(seq {wait_seconds}); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done; '
        f'if kill -0 "$pid" 2>/dev/null; then echo "still running after {wait_seconds} s" >&2; '
        f'exit 1; fi; echo "stopped on $(hostname)"; '
        f'else echo "no training running on $(hostname)"; fi'
    )


def logs_script(lines: int, follow: bool) -> str:
    """The tail of the training log; -F keeps following across restarts."""
    return f'tail -n {int(lines)}{" -F" if follow else ""} "{LOG}"'


def status_script() -> str:
    """Whether training runs on this worker, and the last lines of its log."""
    return (
        f'if {_RUNNING}; then echo "training: running (pid $(cat "{PID}"))"; '
        f'else echo "training: not running"; fi; tail -n 3 "{LOG}" 2>/dev/null || true'
    )


# ----------------------------------------------------------------------------
# Copying this working tree
# ----------------------------------------------------------------------------


def tree_files(root: Path) -> list[str]:
    """Files git would commit: tracked and untracked-but-not-ignored, that exist."""
    try:
        listing = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        raise UserError(f"{root} is not a git checkout; pass --repo=URL to clone instead") from None
    names = sorted({n for n in listing.decode().split("\0") if n})
    return [n for n in names if (root / n).is_file()]  # deleted but still tracked: skip


def pack_tree(root: Path, archive: Path) -> None:
    """Writes the tree's files (no venvs, workdirs or .git) into a .tar.gz."""
    with tarfile.open(archive, "w:gz") as tar:
        for name in tree_files(root):
            tar.add(root / name, arcname=name, recursive=False)


# ----------------------------------------------------------------------------
# Steps shared by TPU and GPU launches
# ----------------------------------------------------------------------------


def setup(remote: Remote, runner: Runner, python: str, repo: str | None, ref: str | None) -> None:
    """Puts the code on every worker and installs it."""
    if not repo:
        with tempfile.TemporaryDirectory() as tmp:
            archive = os.path.join(tmp, ARCHIVE)
            runner.local(
                f"pack: git -C {REPO_ROOT} ls-files -z -co --exclude-standard"
                f" | tar -C {REPO_ROOT} --null -T - -czf {archive}",
                lambda: pack_tree(REPO_ROOT, Path(archive)),
            )
            runner.run(remote.scp(archive, ARCHIVE))
    runner.run(remote.ssh(setup_script(remote.extra, python, repo, ref), "all"))


def wait_for_ssh(remote: Remote, runner: Runner, attempts: int, pause_seconds: float) -> None:
    """Until a new VM answers ssh: it may still be booting when `create` returns."""
    for attempt in range(1, attempts + 1):
        if runner.succeeds(remote.ssh("true", "all")):
            return
        if attempt < attempts:
            print(f"no ssh yet ({attempt}/{attempts}); next try in {pause_seconds:g} s", flush=True)
            time.sleep(pause_seconds)
    raise UserError(
        f"the VM did not answer ssh in {attempts} tries; check it in the console, then run setup"
    )


def train(remote: Remote, runner: Runner, argv: list[str]) -> None:
    """Starts training on every worker."""
    runner.run(remote.ssh(train_script(argv), "all"))


def stop(remote: Remote, runner: Runner) -> None:
    """Checkpoints and stops training on every worker."""
    runner.run(remote.ssh(stop_script(), "all"))


def logs(remote: Remote, runner: Runner, lines: int, follow: bool, worker: str = "0") -> None:
    """Prints (or streams) one worker's log; worker 0 is the one that logs progress."""
    try:
        runner.run(remote.ssh(logs_script(lines, follow), worker))
    except KeyboardInterrupt:  # how one leaves --follow: not an error
        if not follow:
            raise


def training_status(remote: Remote, runner: Runner) -> None:
    """Prints whether worker 0 trains, and its latest log lines."""
    runner.run(remote.ssh(status_script(), "0"))


def flag_value(flags: list[str], name: str) -> str | None:
    """The value of --name=value in a flag list (the last one wins, as in absl)."""
    values = [f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}=")]
    return values[-1] if values else None


def check_local_path(flag: str, value: str | None) -> None:
    """A local path must be absolute: relative ones would land in CODE, which setup replaces."""
    if value and not value.startswith(("gs://", "/")):
        raise UserError(
            f"--{flag}={value}: give gs://BUCKET/PATH or an absolute path on the VM "
            f"(a relative one would sit inside {CODE}, which setup replaces)"
        )


def check_flagfile(flagfile: str, repo: str | None) -> str:
    """The flagfile as the VM's copy names it, relative to the repository root: a
    path of this tree is made relative; a flagfile of a cloned repo is checked
    on the VM. An absolute path elsewhere would not exist there."""
    if os.path.isabs(flagfile):
        inside = os.path.relpath(os.path.realpath(flagfile), REPO_ROOT.resolve())
        if repo or inside.startswith(".."):
            raise UserError(
                f"--flagfile={flagfile}: give a path relative to the repository root "
                "(the VM has its own copy of the tree, not this machine's files)"
            )
        flagfile = inside
    if not repo and not (REPO_ROOT / flagfile).is_file():
        raise UserError(f"--flagfile={flagfile} not found under {REPO_ROOT}")
    return flagfile
