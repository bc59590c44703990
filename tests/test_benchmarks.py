"""The benchmark scripts refuse bad flags before measuring anything, and measure what they say."""

import json
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
        ("flax_example", [], "--example is required: give the Flax WMT example's folder"),
        ("flax_example", ["--mesh=data:3"], "--mesh=data:3: mesh 'data:3' has 3 devices"),
        ("avx2_only", [], "no command: python -m benchmarks.avx2_only -- COMMAND"),
        ("avx2_only", ["--check", "--", "true"], "--check runs its own probe"),
        ("avx2_only", ["--", "/nonexistent/tool"], "/nonexistent/tool: no such program on PATH"),
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


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_the_step_parts_are_those_the_model_runs(size):
    """benchmarks.flax_example times `step_parts` of each kind outside the matmuls:
    the counts must be those of a training forward pass of the model at that size,
    counted by intercepting its modules (dropout: only those that draw a mask)."""
    import collections

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from benchmarks import flax_example
    from transformer.attention import MultiHeadAttention
    from transformer.dropout import Dropout
    from transformer.model import FeedForward, Transformer

    model = Transformer(flax_example._our_config(size))
    tokens = jnp.ones((2, 8), jnp.int32)
    calls = collections.Counter()

    def count(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__":
            if isinstance(module, MultiHeadAttention):
                calls["attention"] += 1
            elif isinstance(module, nn.LayerNorm):
                calls["layer_norm"] += 1
            elif isinstance(module, FeedForward):
                calls["bias_relu"] += 1
            elif isinstance(module, Dropout) and module.rate > 0:
                calls["dropout"] += 1
        return next_fun(*args, **kwargs)

    def forward():
        variables = model.init(jax.random.key(0), tokens, tokens)
        calls.clear()  # count the training pass only, not the initialization
        with nn.intercept_methods(count):
            rngs = {"dropout": jax.random.key(1)}
            return model.apply(variables, tokens, tokens, deterministic=False, rngs=rngs)

    jax.eval_shape(forward)
    expected = dict(flax_example.step_parts(size))
    assert expected.pop("loss") == 1 and expected.pop("adam") == 1
    assert dict(calls) == expected


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_the_search_floor_multiplies_every_weight_matrix_of_the_search(size):
    """benchmarks.flax_example's beam floor times the shapes `search_matmuls` lists:
    once per search, each weight matrix of the encoder and the decoder's
    cross-attention keys and values at the sources' tokens; at every position,
    each other decoder matrix and the tied output layer at B*W rows."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from benchmarks import flax_example
    from transformer.model import Transformer

    model = Transformer(flax_example._our_config(size))
    tokens = jnp.ones((1, 8), jnp.int32)
    init = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens))
    params = nn.unbox(init["params"])
    once = per_position = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(key, "key", "")) for key in path]
        size_of = leaf.size
        if names[-1] == "embedding":
            per_position += size_of
        elif names[-1] in ("kernel", "wi", "wo"):
            in_cross_kv = "cross_attention" in names and names[-2] in ("key", "value")
            if names[0] == "encoder" or in_cross_kv:
                once += size_of
            else:
                per_position += size_of
    listed_once, listed_position = flax_example.search_matmuls(size)
    sources = flax_example.SOURCES * flax_example.SOURCE_LENGTH
    hypotheses = flax_example.SOURCES * flax_example.BEAM
    assert all(n == sources for n, _, _ in listed_once)
    assert all(n == hypotheses for n, _, _ in listed_position)
    assert sum(k * m for _, k, m in listed_once) == once
    assert sum(k * m for _, k, m in listed_position) == per_position


def test_the_pipeline_benchmark_prints_only_json_on_stdout(ding_sample, tmp_path):
    """On a first run it trains a vocabulary and writes token ids, saying so on stderr:
    stdout stays one JSON line per measurement, for `| jq`."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.pipeline", f"--data_dir={ding_sample.data_dir}",
         f"--workdir={tmp_path}", "--vocab_size=350", "--batch_rows=8", "--row_length=32",
         "--producers=ids:t1,text:t1", "--batches=3", "--repeats=1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "vocabulary of 350 pieces written" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["producers"] for r in lines] == ["ids:t1", "text:t1"]
    # Real rows were measured: every batch holds target tokens.
    assert all(r["target_tokens_per_s"] > 0 and 0 < r["row_fill"] <= 1 for r in lines)


def test_importing_a_benchmark_leaves_messages_on_stdout():
    """Only a benchmark run as a command sends its messages to stderr: importing one
    (as the floor tests here do) must not move the messages of everything else."""
    from benchmarks import flax_example  # noqa: F401
    from transformer import progress

    assert progress.Meter("x", None, "y").stream is sys.stdout
