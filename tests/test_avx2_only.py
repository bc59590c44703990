"""benchmarks.avx2_only: a command under it sees a CPU without AVX-512, and only that changes."""

import json
import os
import subprocess
import sys

from benchmarks import avx2_only
from experiments.cli import UserError


def _under_it(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.avx2_only", *args], capture_output=True, text=True
    )


def _refusal() -> str | None:
    """Why this host cannot emulate, or None where it can."""
    try:
        avx2_only.check_host()
    except UserError as e:
        return str(e)
    return None


def test_a_command_under_it_finds_avx2_and_no_avx512_anywhere():
    """CPUID (numpy reads it), /proc/cpuinfo (flops.cpu_has_bfloat16 reads it) and so
    --dtype=auto's choice, in a process of its own; where the host cannot emulate, the
    one-line reason and exit 1."""
    result = _under_it("--check")
    reason = _refusal()
    if reason is not None:
        assert result.returncode == 1
        assert result.stderr.strip() == f"benchmarks.avx2_only: error: {reason}"
        return
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["numpy_avx2"] is True
    assert seen["numpy_avx512f"] is False and seen["numpy_avx512bf16"] is False
    assert seen["cpuinfo_bfloat16"] is False
    assert seen["auto_dtype"] == "float32"
    assert seen["float32_gflops"] > 0 and seen["bfloat16_gflops"] > 0


def test_a_real_segfault_still_ends_the_process_and_faulthandler_reports_it():
    """The preload answers the faults of CPUID only; others reach the process's own
    handler (here faulthandler, installed after the preload's) and end it."""
    crash = "import faulthandler, ctypes; faulthandler.enable(); ctypes.string_at(0)"
    result = _under_it("--", sys.executable, "-c", crash)
    if _refusal() is not None:
        assert result.returncode == 1
        return
    assert result.returncode == -11  # the command replaced the tool: its own death
    assert "Fatal Python error: Segmentation fault" in result.stderr


def test_root_without_cap_sys_admin_is_refused_in_one_line_before_anything_runs(tmp_path):
    """As in a container that drops CAP_SYS_ADMIN: no mount namespace, so one line, exit 1,
    and the command never starts."""
    if os.geteuid() != 0:  # refused earlier: needs root
        assert _under_it("--check").returncode == 1
        return
    marker = tmp_path / "ran"
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
         sys.executable, "-m", "benchmarks.avx2_only", "--", "touch", str(marker)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmarks.avx2_only: error:"), result.stderr
    if _refusal() is None:
        assert "CAP_SYS_ADMIN" in lines[0]
    assert not marker.exists()


def test_the_cpuinfo_it_mounts_lists_every_flag_but_avx512_amx_and_avx_vnni():
    cpuinfo = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
        "flags\t\t: fpu sse4_2 avx f16c fma avx2 avx512f avx512dq avx512_bf16 avx_vnni "
        "avx512_fp16 amx_bf16 amx_tile vaes\nvmx flags\t: ept\n\n"
        "processor\t: 1\nflags\t\t: avx2 avx512vl\n"
    )
    assert avx2_only.masked_cpuinfo(cpuinfo) == (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
        "flags\t\t: fpu sse4_2 avx f16c fma avx2 vaes\nvmx flags\t: ept\n\n"
        "processor\t: 1\nflags\t\t: avx2\n"
    )
