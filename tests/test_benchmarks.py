"""The benchmark scripts refuse bad flags before measuring anything, and measure what they say."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("decode", ["--beam_size=4,0"], "--beam_size takes positive integers"),
        ("decode", ["--steps=0"], "--steps=0"),
        ("decode", ["--preset=huge", "--batch=1"], "--preset=huge: value should be one of"),
        ("train_step", ["--dtype=float16"], "--dtype takes float32 and/or bfloat16"),
        ("train_step", ["--rows=8,-1"], "--rows takes positive integers"),
        ("scaling", ["--sweep_rows=2,x"], "--sweep_rows takes positive integers"),
        ("pipeline", ["--repeats=0"], "--repeats=0"),
        ("pipeline", ["--producers=ids:t1,ids:x2"], "'ids:x2' is not ids|text:tN|wN"),
        ("pipeline", ["--producers=text:w0"], "'text:w0' needs at least one producer"),
        ("loop", ["--steps=5"], "--steps=5"),
        ("flax_example", ["--example=/nonexistent"], "give the Flax WMT example's folder"),
    ],
)
def test_a_bad_flag_exits_1_with_one_line_and_measures_nothing(script, args, message):
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", *args], capture_output=True, text=True
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].startswith(f"benchmarks.{script}: error:")
    assert result.stdout == ""  # not even the matmul peak


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_the_matmul_floor_multiplies_every_dense_matmul_of_the_step(size):
    """benchmarks.flax_example's floor times the shapes `dense_matmuls` lists: their
    FLOPs must be the model's forward pass without attention scores (flops.py)."""
    from benchmarks import flax_example
    from transformer import flops

    *_, rows, length = flax_example.SIZES[size]
    listed = sum(2 * n * k * m for n, k, m in flax_example.dense_matmuls(size))
    model = flax_example._our_config(size)
    assert listed == flops.forward_flops(model, rows, length, length, attention_scores=False)
