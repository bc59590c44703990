r"""Decoding speed: sentences/s and generated tokens/s, greedy and beam search.

  python -m benchmarks.decode --preset=base --batch=1,32,128 --beam_size=1,4 --steps=40
  python -m benchmarks.decode --preset=base --batch=32 --beam_size=4 --naive

Random parameters and random sources of --source_length tokens. To time a
fixed amount of work, EOS is made impossible until the last of --steps output
positions, so every hypothesis runs exactly --steps steps (early stopping
cannot shorten a run). One JSON line per configuration: median of --repeats
timed runs after a compile run.

--naive also times a straightforward decoder, for comparison: it projects the
source keys/values of every layer again at every step, keeps them per beam,
and gathers the whole cache (source keys/values included) when beams are
reordered. Ours projects them once per sentence and moves no key or value:
only a table of beam indices follows the beams.
"""

from __future__ import annotations

import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import benchmarks
from benchmarks import eos_only_at_the_end, peak_rss_gib, positive_ints
from experiments import cli, model_flags
from transformer import decoding, flops
from transformer.architecture import build
from transformer.config import EOS_ID
from transformer.model import Transformer

_BATCHES = flags.DEFINE_list("batch", ["1", "32", "128"], "Sentences per batch.")
_BEAMS = flags.DEFINE_list("beam_size", ["1", "4"], "Beam sizes (1: greedy).")
_SOURCE_LENGTH = flags.DEFINE_integer(
    "source_length", 25, "Source tokens per sentence.", lower_bound=1
)
_STEPS = flags.DEFINE_integer("steps", 40, "Output positions decoded per sentence.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per configuration.", lower_bound=1)
_NAIVE = flags.DEFINE_bool("naive", False, "Also time the straightforward decoder.")


def naive_step(model: Transformer, params, inputs: jax.Array, hypotheses: int, length: int):
    """(step_fn, cache, reorder) recomputing source keys/values each step, cache per beam."""
    beams = hypotheses // inputs.shape[0]
    tiled = jnp.repeat(inputs, beams, axis=0)  # [B*W, S]: the source copied per beam
    encoded = model.apply({"params": params}, tiled, method=Transformer.encode)

    def fresh_cache():
        _, variables = model.apply(
            {"params": params}, encoded, hypotheses, length,
            method=Transformer.init_cache, mutable=["cache"],
        )  # fmt: skip
        return variables["cache"]

    def step_fn(cache, tokens, step):
        projected = fresh_cache()  # the source keys/values, projected again

        def merge(path, carried, new):
            names = {getattr(k, "key", None) for k in path}
            return new if "cross_attention" in names else carried

        cache = jax.tree_util.tree_map_with_path(merge, cache, projected)
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tiled, tokens, step,
            method=Transformer.decode_step, mutable=["cache"],
        )  # fmt: skip
        # The same normalisation as ours: the variants differ only in the cache.
        return decoding.log_softmax_grouped(logits[:, 0], inputs.shape[0]), variables["cache"]

    def reorder_everything(cache, rows):
        """Copies every key and value; the lineage stays the identity (row i is hypothesis i)."""

        def gather(path, leaf):
            names = {getattr(k, "key", None) for k in path}
            return leaf if "lineage" in names else jnp.take(leaf, rows, axis=0)

        return jax.tree_util.tree_map_with_path(gather, cache)

    return step_fn, fresh_cache(), reorder_everything


def search(model, params, inputs, beam: int, steps: int, naive: bool):
    hypotheses = inputs.shape[0] * beam
    if naive:
        step_fn, cache, reorder = naive_step(model, params, inputs, hypotheses, steps)
    else:
        step_fn, cache = decoding.model_step(
            model, params, inputs, hypotheses, steps, normalized=beam == 1
        )
        reorder = decoding.reorder_cache
    step_fn = eos_only_at_the_end(step_fn, steps)
    max_lengths = jnp.full((inputs.shape[0],), steps)
    if beam == 1 and not naive:
        return decoding.greedy_search(step_fn, cache, max_lengths, length=steps)
    tokens, _, _ = decoding.beam_search(
        step_fn, reorder, cache, max_lengths, length=steps, beam_size=beam, alpha=0.6
    )
    return tokens[:, 0]


def measure(model, params, batch: int, beam: int, naive: bool) -> dict:
    rng = np.random.default_rng(0)
    inputs = rng.integers(4, model.config.vocab_size, (batch, _SOURCE_LENGTH.value))
    inputs[:, -1] = EOS_ID
    inputs = jnp.asarray(inputs, jnp.int32)
    run = jax.jit(lambda p, x: search(model, p, x, beam, _STEPS.value, naive))
    start = time.perf_counter()
    compiled = run.lower(params, inputs).compile()
    compile_s = time.perf_counter() - start
    tokens = jax.block_until_ready(compiled(params, inputs))
    assert int((tokens[:, -1] == EOS_ID).sum()) == batch  # every sentence ran all steps
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, inputs))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "benchmark": "decode",
        "variant": "naive" if naive else "ours",
        "search": "greedy" if beam == 1 else f"beam{beam}",
        "preset": model_flags.preset_name(),
        "dtype": model.config.dtype,
        "batch": batch,
        "source_length": _SOURCE_LENGTH.value,
        "steps": _STEPS.value,
        "device": jax.devices()[0].device_kind,
        "compile_s": round(compile_s, 2),
        "seconds": round(seconds, 4),
        "sentences_per_s": round(batch / seconds, 2),
        "generated_tokens_per_s": round(batch * _STEPS.value / seconds, 1),
        "peak_rss_gib": round(peak_rss_gib(), 3),
    }


def main(argv):
    del argv
    batches, beams = (
        positive_ints("batch", _BATCHES.value),
        positive_ints("beam_size", _BEAMS.value),
    )
    model_cfg = model_flags.model_config()  # --preset and any model setting; --dtype=auto:
    if model_flags.dtype_is_auto():  # the faster one here
        model_cfg = model_cfg.replace(dtype=flops.fastest_dtype())
    model_cfg = model_cfg.replace(max_len=max(model_cfg.max_len, _STEPS.value))
    if _NAIVE.value and model_cfg.architecture != "transformer":
        raise cli.UserError("--naive times the Transformer's straightforward decoder; drop it here")
    model = build(model_cfg)
    tokens = jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens, tokens)["params"])
    for batch in batches:
        for beam in beams:
            variants = (False, True) if _NAIVE.value else (False,)
            for naive in variants:
                print(json.dumps(measure(model, params, batch, beam, naive)), flush=True)


if __name__ == "__main__":
    benchmarks.run(main)
