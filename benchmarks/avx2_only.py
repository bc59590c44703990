r"""Runs a command as it runs on a CPU with AVX2 but no AVX-512 (so no bfloat16 instructions).

  python -m benchmarks.avx2_only -- python -m experiments.wmt --flagfile=... --workdir=...
  python -m benchmarks.avx2_only --check     # one JSON line: what a command sees under it

Most laptops and CI machines have such a CPU: float32 only. The project's figures for
them need one, and hosts with AVX-512 are what one often gets. This makes one of those
answer as the other would, on a Linux x86-64 host whose CPU and kernel offer CPUID
faulting (`cpuid_fault` in /proc/cpuinfo), run as root:

- Every CPUID instruction the command's processes execute traps, and is answered
  without AVX-512, AVX512-BF16/FP16, AMX and AVX-VNNI (benchmarks/avx2_only.c, built
  with the host's C compiler into ~/.cache/transformer and preloaded). So XLA's code
  generator, its matmul libraries (YNNPACK, XNNPACK, oneDNN), numpy and glibc all
  take their AVX2 paths.
- /proc/cpuinfo, in a private mount namespace of the command, lists the same flags
  without those, so `--dtype=auto` finds no bfloat16 instructions, as on such a host.
- tcmalloc is preloaded beside it where installed (the entry points would restart
  with it, but do not once LD_PRELOAD is set).

What it does not change is the core: its clock, caches and memory stay this host's.
A Zen 4 core executes a 512-bit FMA as two 256-bit halves, so its float32 matmuls run
at the same rate with AVX2 code; an Intel core with two 512-bit FMA units loses up to
half. The emulated host is this core without those instructions, not another CPU.
The command replaces this process: its signals and exit status are its own.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from absl import flags

import benchmarks
from experiments import tcmalloc
from experiments.cli import UserError
from transformer import flops

SOURCE = Path(__file__).with_name("avx2_only.c")
HIDDEN_FLAGS = re.compile(r"\s(?:avx512\w*|amx\w*|avx_vnni\w*)(?=\s|$)")
# glibc chooses its string functions at start-up, before the preload can answer CPUID.
GLIBC_TUNABLES = "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD"

_CHECK = flags.DEFINE_bool("check", False, "Print what a command run under it sees; run none.")

# What --check runs under the emulation: the CPU features three libraries read.
_PROBE = r"""
import json
from numpy._core._multiarray_umath import __cpu_features__ as numpy_features
from transformer import flops
print(json.dumps({
    "numpy_avx2": numpy_features["AVX2"],
    "numpy_avx512f": numpy_features["AVX512F"],
    "numpy_avx512bf16": numpy_features["AVX512BF16"],
    "cpuinfo_bfloat16": flops.cpu_has_bfloat16(),
    "float32_gflops": round(flops.measured_matmul_peak("float32") / 1e9, 1),
    "bfloat16_gflops": round(flops.measured_matmul_peak("bfloat16") / 1e9, 1),
    "auto_dtype": flops.fastest_dtype(),
}))
"""


def masked_cpuinfo(cpuinfo: str) -> str:
    """/proc/cpuinfo's text with AVX-512, AMX and AVX-VNNI left out of its flags lines."""
    lines = []
    for line in cpuinfo.splitlines(keepends=True):
        if line.split(":", 1)[0].strip() == "flags":
            line = HIDDEN_FLAGS.sub("", line)
        lines.append(line)
    return "".join(lines)


def check_host() -> str:
    """The C compiler to build the preload with; UserError where this host cannot emulate."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise UserError(f"needs Linux on x86-64, this is {sys.platform} on {platform.machine()}")
    if "cpuid_fault" not in (flops.cpu_flags() or set()):
        raise UserError(
            "this CPU or kernel offers no CPUID faulting: run it on a host whose "
            "/proc/cpuinfo lists cpuid_fault"
        )
    if os.geteuid() != 0:
        raise UserError("needs root, to give the command its own /proc/cpuinfo: run it with sudo")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise UserError("needs a C compiler to build its preload: apt-get install gcc")
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            raise UserError(f"needs {tool} (util-linux): apt-get install util-linux")
    # Root in a container may still be refused a mount namespace (no CAP_SYS_ADMIN).
    probe = ["unshare", "--mount", "--propagation", "private"]
    probe += ["mount", "--bind", "/proc/cpuinfo", "/proc/cpuinfo"]
    refused = subprocess.run(probe, capture_output=True, text=True)
    if refused.returncode != 0:
        why = " ".join(refused.stderr.split()) or f"exit status {refused.returncode}"
        raise UserError(
            f"cannot give the command its own /proc/cpuinfo here ({why}): run it as root "
            "on the host, or in a container with CAP_SYS_ADMIN"
        )
    return compiler


def _preload(compiler: str) -> str:
    """The preload built from SOURCE, kept in the user's cache (one per source text)."""
    source = SOURCE.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "transformer"
    built = cache / f"avx2_only-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if built.exists():
        return str(built)
    cache.mkdir(parents=True, exist_ok=True)
    partial = built.with_suffix(f".{os.getpid()}.partial")
    result = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE), "-ldl"],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        first = (result.stderr.strip().splitlines() or ["no output"])[0]
        raise UserError(f"could not build {SOURCE.name} with {compiler}: {first}")
    os.replace(partial, built)
    return str(built)


def exec_under_emulation(command: list[str]) -> None:
    """Replaces this process with command under the emulation (so signals and the exit
    status are the command's own)."""
    preload = _preload(check_host())
    cpuinfo = Path(preload).with_name(f"cpuinfo-{os.getpid()}")
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        cpuinfo.write_text(masked_cpuinfo(f.read()), encoding="utf-8")
    libraries = [preload]
    if os.environ.get(tcmalloc.OPT_OUT) != "system" and tcmalloc.tcmalloc_library():
        libraries.append(tcmalloc.tcmalloc_library())
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), GLIBC_TUNABLES]))
    env = dict(
        os.environ, LD_PRELOAD=" ".join(libraries), GLIBC_TUNABLES=tunables,
        TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=str(1 << 40),
    )  # fmt: skip
    # The mounted copy needs no name once mounted: the shell removes it, then becomes the command.
    script = 'mount --bind "$1" /proc/cpuinfo && rm -f "$1" && shift && exec "$@"'
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "avx2_only"]
    argv.append(str(cpuinfo))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe("unshare", [*argv, *command], env)


def main(argv: list[str]) -> None:
    command = argv[1:]
    if _CHECK.value:
        if command:
            raise UserError("--check runs its own probe: give it no command")
        command = [sys.executable, "-c", _PROBE]
    elif not command:
        raise UserError("no command: python -m benchmarks.avx2_only -- COMMAND [ARGS...]")
    elif shutil.which(command[0]) is None:
        raise UserError(f"{command[0]}: no such program on PATH, or not executable")
    exec_under_emulation(command)


if __name__ == "__main__":
    benchmarks.run(main)
