"""How every entry point starts and fails: absl flags, one-line errors, exit code 1.

A problem the user can fix (a bad flag, missing data, a checkpoint that does
not match) is reported as one line `<program>: error: <what is wrong>` on
stderr, with exit code 1 and no traceback.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

from absl import app, flags, logging

from transformer.checkpoint import CHECKPOINTS, CheckpointError
from transformer.config import ConfigError
from transformer.data import DataError
from transformer.data.vocab import VOCAB_FILE
from transformer.record import CONFIG_FILE


class UserError(Exception):
    """Something the user can correct; the message says what and how."""


def decode_line(raw: bytes, first: bool = False) -> tuple[str, bool]:
    """A line of input without its line ending, and whether it held invalid UTF-8
    (replaced by U+FFFD). The first line of a file loses a UTF-8 byte-order
    mark, which editors on Windows write and which is not text; a UTF-16 one
    (Notepad's "Unicode", PowerShell 5's `>`) is refused."""
    raw = raw.rstrip(b"\n").rstrip(b"\r")
    if first:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # whatever followed would be garbage
            raise UserError(
                "the input is UTF-16 (it opens with a UTF-16 byte-order mark), not UTF-8; "
                "convert it first: iconv -f utf-16 -t utf-8 IN > OUT"
            )
        raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


# What a training workdir holds of its own (transformer/record.py): never an output.
WORKDIR_FILES = (CONFIG_FILE, VOCAB_FILE, "results.json", "metrics.jsonl")


def workdir_part(path: str) -> str | None:
    """What of a training workdir `path` would overwrite, or None: one of its
    own files, or anything in its checkpoints folder."""
    real = os.path.realpath(path)
    parent, name = os.path.split(real)
    if name in WORKDIR_FILES and os.path.isfile(os.path.join(parent, CONFIG_FILE)):
        return f"{parent}'s {name}"
    while real != os.path.dirname(real):
        above, folder = os.path.split(real)
        if folder == CHECKPOINTS and os.path.isfile(os.path.join(above, CONFIG_FILE)):
            return f"the checkpoints of {above}"
        real = above
    return None


def check_output_file(flag: str, path: str, inputs: tuple[str, ...] = ()) -> None:
    """Refuses, before any work, an output path that cannot be written as a file,
    that is one of `inputs`, or that is part of a training workdir. A device or
    pipe (/dev/stdout, /dev/null, a FIFO) only has to be writable."""
    if os.path.isdir(path):
        raise UserError(f"--{flag}={path} is a folder; give the name of a file to write")
    if os.path.exists(path) and not os.path.isfile(path):
        if not os.access(path, os.W_OK):
            raise UserError(f"--{flag}={path} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"--{flag}={path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--{flag}={path}: the folder {parent} is not writable")
    for source in inputs:
        if os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
            raise UserError(f"--{flag}={path} is also the input; write to another file")
    part = workdir_part(path)
    if part is not None:
        raise UserError(f"--{flag}={path} would overwrite {part}; write to another file")


# With several processes, process 0 hosts jax's coordination service. Leaving at
# once, it would take the service from peers still on their way out of the same
# error, whose clients then abort (SIGABRT, pages of noise): it leaves last.
COORDINATOR_EXIT_GRACE_S = 2.0
_leave_last = False


def leave_last() -> None:
    """Marks this process as the host of jax's coordination service (process 0 of
    several): `fail` gives the others a moment to exit first."""
    global _leave_last
    _leave_last = True


def fail(message: str, code: int = 1) -> None:
    """Prints the one-line error and exits with status `code` (1: what to fix is said)."""
    first_line = " ".join(str(message).split())
    sys.stdout.flush()
    # Other threads (a failed asynchronous orbax save, asyncio) may be printing
    # tracebacks right now. Send their further output to /dev/null, Python's and the
    # C level alike; flushing the old stream waits (under its lock) for a write that
    # is in flight. Then our line goes out in one write on the saved descriptor, so
    # nothing can run into it or follow it.
    old = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stderr = open(devnull, "w", closefd=False)
    real = os.dup(2)
    os.dup2(devnull, 2)
    try:
        old.flush()
    except (OSError, ValueError):
        pass
    # Another thread may have stopped mid-line; start ours on a line of its own.
    lead = "\n" if threading.active_count() > 1 else ""
    line = f"{lead}{_program()}: error: {first_line}\n"
    try:  # a path given in bytes that are not UTF-8 comes back as they were
        data = line.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = line.encode("utf-8", "backslashreplace")
    os.write(real, data)
    if _leave_last:
        time.sleep(COORDINATOR_EXIT_GRACE_S)
    # Exit now: the interpreter's shutdown would wait for those threads.
    os._exit(code)


def _program() -> str:
    """'experiments.wmt' when run with python -m, else the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return spec.name
    return os.path.basename(sys.argv[0]) if sys.argv else "experiments"


_HELP = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e).removeprefix("ERROR:: "))
    except SystemExit as e:  # absl exits 1 after printing the help asked for
        if e.code == 1 and any(arg in _HELP for arg in argv[1:]):
            sys.exit(0)
        raise


# Flags that name a file or folder. The shell leaves `--workdir=~/w` as it is
# (a ~ is expanded only at a word's start), and tfds would expand a data_dir's
# ~ for its downloads but not for the dataset: expanded here, for all of them.
PATH_FLAGS = (
    "workdir", "init_from", "data_dir", "manual_dir", "input", "output", "hypotheses",
    "source_file", "reference_file", "out_dir", "recipe", "compilation_cache", "workdirs",
)  # fmt: skip


def define_compilation_cache_flag() -> flags.FlagHolder:
    """--compilation_cache of the entry points that compile for a workdir."""
    return flags.DEFINE_string(
        "compilation_cache",
        "auto",
        "Where compiled programs are kept for the next run on this workdir: a folder "
        "(gs:// too), 'off', or 'auto': WORKDIR/compilation_cache on TPUs and GPUs, so "
        "that a restart does not compile again; off on CPUs. JAX_COMPILATION_CACHE_DIR, "
        "where set, takes auto's place.",
    )


def compilation_cache_dir(setting: str, workdir: str, backend: str) -> str | None:
    """The folder of jax's persistent compilation cache for --compilation_cache,
    or None for none. Auto keeps it on accelerators only: there a large model
    compiles for a minute or more at every start (64 s for base on an H100), and
    a spot VM starts often. On a CPU the demo's programs compile in seconds, and
    XLA:CPU refuses programs compiled on another CPU, which a shared workdir
    would hold."""
    if setting == "off":
        return None
    if setting != "auto":
        return setting
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    return None if backend == "cpu" else os.path.join(workdir, "compilation_cache")


def use_compilation_cache(setting: str, workdir: str) -> None:
    """Points jax's compilation cache where --compilation_cache says; call it before
    anything compiles (and, in a run of several processes, after jax.distributed
    is initialized: this starts the backend). A local folder that cannot be
    made is a UserError."""
    import jax

    cache = compilation_cache_dir(setting, workdir, jax.default_backend())
    if cache and "://" not in cache:
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError as e:
            if setting != "auto":
                given = f"--compilation_cache={cache}"
            elif cache == os.environ.get("JAX_COMPILATION_CACHE_DIR"):
                given = f"JAX_COMPILATION_CACHE_DIR={cache}"
            else:
                given = f"the compilation cache {cache} (--compilation_cache=auto)"
            raise UserError(
                f"{given}: cannot make that folder ({e.strerror}); "
                "give another with --compilation_cache, or off"
            ) from None
    jax.config.update("jax_compilation_cache_dir", cache)
    if cache:
        logging.info("compiled programs are kept in %s", cache)


def _expand_home() -> None:
    for name in PATH_FLAGS:
        value = flags.FLAGS[name].value if name in flags.FLAGS else None
        if isinstance(value, str):
            flags.FLAGS[name].value = os.path.expanduser(value)
        elif isinstance(value, list):  # a list of paths
            flags.FLAGS[name].value = [os.path.expanduser(v) for v in value]


def run(main: Callable[[list[str]], None]) -> None:
    """app.run with one-line errors for bad flags, configs and UserError."""

    def guarded(argv):
        # Library logs (orbax, grain, tfds) only from WARNING up unless --verbosity
        # is given; progress and results are printed.
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        _expand_home()
        try:
            return main(argv)
        except (ConfigError, UserError, DataError, CheckpointError) as e:
            fail(str(e))
        except KeyboardInterrupt:  # Ctrl-C (or SIGTERM where an entry point maps it)
            fail("interrupted", code=130)
        except ImportError as e:  # etils and tfds reach gs:// through gcsfs, an extra
            if "gcsfs" not in str(e):
                raise
            fail("a gs:// path needs gcsfs: pip install gcsfs (the [tpu] and [cuda] extras do)")
        except BrokenPipeError:  # the reader went away (| head): nothing left to say
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            os._exit(1)
        except OSError as e:  # a full disk, a missing or unwritable path
            if isinstance(e, FileExistsError) and os.path.isfile(e.filename or ""):
                fail(f"{e.filename} is a file, not a folder; give a folder's path")
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            fail(f"{e.strerror or e}{where}; check the path and free space, then rerun")

    app.run(guarded, flags_parser=_parse_flags)
