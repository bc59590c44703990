"""The entry points restart with tcmalloc on a Linux CPU host that has it
(experiments/tcmalloc.py), and only there; each case runs a real `python -m`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_module, tiny_training_args

from experiments import tcmalloc

needs_tcmalloc = pytest.mark.skipif(
    tcmalloc.tcmalloc_library() is None,
    reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4; .ci/run does)",
)


def allocator_of(**changes: str) -> str:
    """What `python -m experiments.allocator` reports, started with the environment
    changed (and no LD_PRELOAD or opt-out inherited from this process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", tcmalloc.OPT_OUT)}
    env.update(changes)
    result = subprocess.run(
        [sys.executable, "-m", "experiments.allocator"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


@needs_tcmalloc
def test_an_entry_point_runs_with_tcmalloc():
    assert allocator_of() == "tcmalloc"


@needs_tcmalloc
def test_the_opt_out_keeps_the_c_librarys_malloc():
    assert allocator_of(TRANSFORMER_ALLOCATOR="system") == "system"


@pytest.mark.parametrize("module", [["-m", "experiments.allocator"], ["-mexperiments.allocator"]])
def test_a_bad_opt_out_value_is_a_one_line_error(module):
    env = dict(os.environ, TRANSFORMER_ALLOCATOR="glibc")
    result = subprocess.run([sys.executable, *module], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "experiments.allocator: error: TRANSFORMER_ALLOCATOR='glibc': set it to 'system' "
        "to keep the C library's malloc, or unset it to use tcmalloc where it is installed"
    ]


@needs_tcmalloc
def test_a_preload_of_the_users_is_left_alone():
    assert allocator_of(LD_PRELOAD="libm.so.6") == "system"


@needs_tcmalloc
def test_an_accelerator_platform_keeps_the_c_librarys_malloc():
    assert allocator_of(JAX_PLATFORMS="tpu") == "system"
    assert allocator_of(JAX_PLATFORMS="cpu") == "tcmalloc"


@needs_tcmalloc
def test_importing_the_package_does_not_restart_the_importer():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", tcmalloc.OPT_OUT)}
    code = "import experiments; print(experiments.tcmalloc.in_use())"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "system"


@needs_tcmalloc
def test_the_restart_keeps_the_command_line():
    flagfile = Path(__file__).parents[1] / "experiments/configs/ding_deen_cpu.flags"
    result = run_module(
        "experiments.wmt", f"--flagfile={flagfile}", "--batch_rows=24", "--check_only"
    )
    assert json.loads(result.stdout)["data"]["batch_rows"] == 24


@needs_tcmalloc
def test_training_says_which_allocator_it_runs_with(ding_sample, tmp_path):
    result = run_module("experiments.wmt", *tiny_training_args(ding_sample, tmp_path / "w", 1))
    assert "memory allocator: tcmalloc" in result.stdout.decode()
    args = tiny_training_args(ding_sample, tmp_path / "w2", 1)
    result = run_module("experiments.wmt", *args, env={tcmalloc.OPT_OUT: "system"})
    assert (
        "memory allocator: the C library's (TRANSFORMER_ALLOCATOR=system)" in result.stdout.decode()
    )
