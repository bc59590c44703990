"""The entry points run with tcmalloc on a Linux CPU host that has it.

XLA:CPU allocates a computation's scratch memory afresh at every execution and
frees it after: for the CPU demo's training step, one 585 MB block. glibc's
malloc serves a block that large from its worker thread with mmap and returns it
with munmap, so every step faults in 143,000 zeroed pages, and a fifth of the
process's CPU time went to the kernel. tcmalloc keeps freed blocks for reuse. On a
2-core Xeon, the demo's training ran 1.32x (float32) and 1.43x (bfloat16) more
steps per second with it, with the same losses; its final evaluation took 6%
less; peak memory grew by about half a GiB (docs/performance.md).

Only the program's start can choose the allocator (LD_PRELOAD). So when an
entry point is started with `python -m experiments.X` or `python -m
benchmarks.X`, the package's import calls `use_tcmalloc`, which starts the same
command again, in the same process, with tcmalloc preloaded, if all of these
hold: the host is Linux; tcmalloc is installed (Debian and Ubuntu:
`apt-get install libtcmalloc-minimal4`); no accelerator plugin for JAX is
installed (what bounds a GPU or TPU step is not the host's malloc, and it was
not measured there); LD_PRELOAD is unset (a preload of the user's stays); and
TRANSFORMER_ALLOCATOR is not `system` (the opt-out; `tcmalloc` or unset is the
default, anything else stops the program with a one-line error).

`python -m experiments.allocator` prints the allocator an entry point runs
with here.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import sys

OPT_OUT = "TRANSFORMER_ALLOCATOR"  # "system": keep the C library's malloc

# Installed with jax[cuda12], jax[cuda13], jax[rocm] or jax[tpu].
_ACCELERATOR_PLUGINS = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_rocm60_plugin",
    "jax_rocm7_plugin",
    "libtpu",
)


def in_use() -> str:
    """'tcmalloc', 'jemalloc' or 'system': the allocator mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in mapped:
            return name
    return "system"


def describe() -> str:
    """A line for a run's log: the allocator in use and, where glibc's, why."""
    used = in_use()
    if used != "system":
        return used
    if os.environ.get(OPT_OUT) == "system":
        return f"the C library's ({OPT_OUT}=system)"
    if sys.platform.startswith("linux") and tcmalloc_library() is None:
        return (
            "the C library's; with tcmalloc installed (Debian, Ubuntu: "
            "apt-get install libtcmalloc-minimal4) CPU steps run about 1.3x faster"
        )
    return "the C library's"


def tcmalloc_library() -> str | None:
    """The name of an installed tcmalloc (the minimal build first), or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def _accelerator_plugin() -> str | None:
    for name in _ACCELERATOR_PLUGINS:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _wanted() -> str | None:
    """The tcmalloc to restart with, or None where the process should go on as it is."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT) == "system":
        return None
    if os.environ.get("LD_PRELOAD"):  # the user's choice, or this module's restart
        return None
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and platforms != "cpu":
        return None
    if _accelerator_plugin() is not None:
        return None
    return tcmalloc_library()


def use_tcmalloc() -> None:
    """Restarts this command with tcmalloc preloaded where the module docstring says.

    Only while Python locates the module of `python -m` (sys.argv[0] is '-m' then):
    an import by a test run or by a user's program never restarts their process.
    """
    if sys.argv[:1] != ["-m"] or not getattr(sys, "orig_argv", None):
        return
    if os.environ.get(OPT_OUT, "tcmalloc") not in ("tcmalloc", "system"):
        program = _module_run()  # as cli.fail names it
        sys.exit(
            f"{program}: error: {OPT_OUT}={os.environ[OPT_OUT]!r}: set it to 'system' to "
            "keep the C library's malloc, or unset it to use tcmalloc where it is installed"
        )
    library = _wanted()
    if library is None:
        return
    env = dict(os.environ, LD_PRELOAD=library)
    # gperftools prints a line for every allocation above 1 GiB by default; the
    # base model's scratch blocks are larger than that, and are expected.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # the interpreter cannot be started again: go on as we are
        return


def _module_run() -> str:
    """The module of `python -m NAME` (or `-mNAME`), from the interpreter's arguments."""
    args = sys.orig_argv[1:]
    for i, arg in enumerate(args):
        if arg.startswith("-m"):
            return arg[2:] or (args[i + 1] if i + 1 < len(args) else "python")
    return "python"
