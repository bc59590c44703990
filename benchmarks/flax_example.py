r"""Our training step and beam search against the Flax WMT example's, same shapes, same CPU.

  python -m benchmarks.flax_example --example=PATH/flax/examples/wmt
  python -m benchmarks.flax_example --example=... --what=step --sizes=tiny,small,base --rounds=3
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.flax_example \
      --example=... --what=step --mesh=data:-1   # our step data-parallel over 2 CPU devices

--example is the example's folder in a checkout of Flax (it is not part of
the flax package, and this project ships none of its code); its models.py and
decode.py are loaded from there. Its step is rebuilt here as the example's
train.py computes it: the model's logits,
label-smoothed cross entropy against dense one-hot soft targets, a weighted
mean, AdamW(0.9, 0.98, 1e-9, weight decay 0), the loss and accuracy again
for the metrics. Both models are pre-LN with tied embeddings, float32,
dropout 0.1 on residuals and embeddings, none on attention weights, batches of
packed rows (4 examples a row). Each size and side runs in its own process,
sides alternating, --rounds times; prints one JSON line per run (median step
time of --repeats steps after a warm-up, peak RSS, and the temporary memory
XLA planned for the program: program_temp_mib) and one per size with the
medians and the speedup (the example's time over ours). Each round also times
the matmul floor: the step's dense matmuls alone (forward and both gradients,
the shapes `dense_matmuls` lists), or the beam search's (`search_matmuls`), so
the line's speedup_bound, the example's time over the floor, is the most that
a step or search doing these matmuls in float32 could gain over the example's
on this host. And the parts outside those matmuls, each kind timed alone
(`step_parts_floor`, `search_parts_floor`): speedup_with_parts_alone is the
example's time over the floor and the parts together, an estimate of the most
a step or search doing all of them could gain here. It is not a strict bound:
in a step XLA fuses some parts with their neighbours.

Beam search (--what=beam): the base model, float32, random parameters, 32
sources of 25 tokens, beam 4, alpha 0.6, exactly 40 output positions on both
sides: ours through transformer/decoding.py with early_stop=False (every
sentence searches to its max length), the example's (no EOS id, so nothing
ends) through its decode.beam_search driven
as its train.py's predict_step drives it (the source encoded once, the
decoder re-projecting the encoder output every step).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

import benchmarks
from benchmarks import peak_rss_gib
from experiments import cli
from transformer import attention, config, decoding, sharding, train
from transformer.config import EOS_ID
from transformer.data.batching import random_packed
from transformer.model import Transformer

_EXAMPLE = flags.DEFINE_string("example", None, "The Flax WMT example's folder.")
_WHAT = flags.DEFINE_list("what", ["step", "beam"], "step and/or beam.")
_SIZES = flags.DEFINE_list("sizes", ["tiny", "small", "base"], "Sizes of the step comparison.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Runs of each side per size.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed steps per run.", lower_bound=1)
# A CPU has one device unless XLA_FLAGS=--xla_force_host_platform_device_count=N gives it N.
_MESH = flags.DEFINE_string("mesh", "data:-1", "Our step's mesh over this process's devices.")
_ONE = flags.DEFINE_string("one", None, "Internal: SIDE:WHAT:SIZE measured in this process.")

# d_model, layers each side, heads, vocabulary, rows, row length
SIZES = {
    "tiny": (128, 2, 4, 8000, 64, 64),
    "small": (256, 3, 4, 8000, 32, 128),
    "base": (512, 6, 8, 37000, 8, 128),
}
SMOOTHING = 0.1
BEAM, SOURCES, SOURCE_LENGTH, OUTPUT_STEPS = 4, 32, 25, 40


def _load(name: str):
    """The example's module `name`.py, loaded from --example."""
    spec = importlib.util.spec_from_file_location(
        f"flax_wmt_{name}", os.path.join(_EXAMPLE.value, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sources(vocab: int) -> jax.Array:
    inputs = np.random.default_rng(0).integers(4, vocab, (SOURCES, SOURCE_LENGTH))
    inputs[:, -1] = EOS_ID
    return jnp.asarray(inputs, jnp.int32)


# XLA's temporary buffers of the last program `_timed` or `_timed_search` compiled, in
# bytes: the memory a step or search needs beside its inputs, as the compiler plans it.
# Unlike the peak RSS, it does not move with the allocator or the threads' timing.
_program_temp_bytes: list[int] = []


def _compiled(lowered):
    compiled = lowered.compile()
    _program_temp_bytes.append(compiled.memory_analysis().temp_size_in_bytes)
    return compiled


def _random_operands():
    """operand(*shape): standard normal float32 arrays, the same sequence in every process."""
    rng = np.random.default_rng(0)
    return lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))


def _timed(step, state, args, repeats: int) -> tuple[float, float]:
    """(compile seconds, median seconds per step) of a jitted step(state, *args)."""
    start = time.perf_counter()
    compiled = _compiled(step.lower(state, *args))
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, *args)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = compiled(state, *args)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def _our_config(size: str) -> config.ModelConfig:
    d, layers, heads, vocab, _, length = SIZES[size]
    return config.preset("base").replace(
        d_model=d, d_ff=4 * d, num_heads=heads, d_k=d // heads, d_v=d // heads,
        num_encoder_layers=layers, num_decoder_layers=layers, vocab_size=vocab,
        layer_norm="pre", dropout=0.1, dtype="float32", max_len=max(length, 64),
    )  # fmt: skip


def _example_config(models, size: str, **changes):
    d, layers, heads, vocab, _, length = SIZES[size]
    return models.TransformerConfig(
        vocab_size=vocab, output_vocab_size=vocab, share_embeddings=True,
        logits_via_embedding=True, emb_dim=d, num_heads=heads, num_layers=layers,
        qkv_dim=d, mlp_dim=4 * d, max_len=max(length, 64), dropout_rate=0.1,
        attention_dropout_rate=0.0, **changes,
    )  # fmt: skip


def our_step(size: str) -> tuple[float, float]:
    _, _, _, vocab, rows, length = SIZES[size]
    model_cfg = _our_config(size)
    train_cfg = config.TrainConfig(label_smoothing=SMOOTHING)
    mesh = sharding.make_mesh(sharding.parse_mesh(_MESH.value, jax.device_count()))
    model, optimizer = Transformer(model_cfg), train.make_optimizer(model_cfg, train_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
        state, shardings = train.create_state(model, optimizer, 0, mesh)
        step = train.jit_train_step(model, optimizer, train_cfg, mesh, shardings)
        batch = sharding.global_batch(mesh, random_packed(rows, length, vocab))
        return _timed(step, state, (batch, np.float32(1.0)), _REPEATS.value)


def _example_loss(logits, targets, weights):
    """The example's label-smoothed loss: dense soft targets, summed, and its weight."""
    vocab = logits.shape[-1]
    confidence, low = 1.0 - SMOOTHING, SMOOTHING / (vocab - 1)
    constant = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
    loss = -jnp.sum(soft * nn.log_softmax(logits), axis=-1) - constant
    return jnp.sum(loss * weights), jnp.sum(weights)


def example_step(size: str) -> tuple[float, float]:
    models = _load("models")
    _, _, _, vocab, rows, length = SIZES[size]
    model = models.Transformer(_example_config(models, size, deterministic=False))
    batch = {k: jnp.asarray(v) for k, v in random_packed(rows, length, vocab).items()}
    keys = ("inputs_positions", "targets_positions", "inputs_segmentation", "targets_segmentation")
    extra = {k: batch[k] for k in keys}
    params = model.init(jax.random.key(0), batch["inputs"], batch["targets"], **extra)["params"]
    peak, warmup = 0.0625, 1000  # the example's defaults: rsqrt after a linear warmup
    rsqrt = lambda c: peak * (c + warmup) ** -0.5 * warmup**0.5  # noqa: E731
    schedule = optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), rsqrt], [warmup])
    optimizer = optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0)
    state = (params, optimizer.init(params), jnp.zeros((), jnp.int32))

    def step(state, batch, rng):
        params, opt_state, count = state
        weights = (batch["targets"] > 0).astype(jnp.float32)

        def loss_fn(params):
            logits = model.apply(
                {"params": params}, batch["inputs"], batch["targets"],
                **{k: batch[k] for k in keys},
                rngs={"dropout": jax.random.fold_in(rng, count)},
            )  # fmt: skip
            loss, weight = _example_loss(logits, batch["targets"], weights)
            return loss / weight, logits

        (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        loss, weight = _example_loss(logits, batch["targets"], weights)
        accuracy = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * weights)
        metrics = {"loss": loss, "accuracy": accuracy, "denominator": weight}
        return (optax.apply_updates(params, updates), opt_state, count + 1), metrics

    jitted = jax.jit(step, donate_argnums=0)
    return _timed(jitted, state, (batch, jax.random.key(1)), _REPEATS.value)


def _timed_search(search, *args) -> tuple[float, float]:
    """(compile seconds, median seconds) of a jitted search(*args), --repeats runs."""
    start = time.perf_counter()
    compiled = _compiled(jax.jit(search).lower(*args))
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times)


def our_beam(size: str) -> tuple[float, float]:
    model = Transformer(_our_config(size).replace(dropout=0.0))
    tokens = jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens, tokens)["params"])
    inputs = _sources(model.config.vocab_size)

    def search(params, inputs):
        step_fn, cache = decoding.model_step(
            model, params, inputs, SOURCES * BEAM, OUTPUT_STEPS, normalized=False
        )
        max_lengths = jnp.full((SOURCES,), OUTPUT_STEPS)
        tokens, _, _ = decoding.beam_search(
            step_fn, decoding.reorder_cache, cache, max_lengths,
            length=OUTPUT_STEPS, beam_size=BEAM, alpha=0.6, early_stop=False,
        )  # fmt: skip
        return tokens[:, 0]

    return _timed_search(search, params, inputs)


def example_beam(size: str) -> tuple[float, float]:
    models, decode = _load("models"), _load("decode")
    cfg = _example_config(models, size, deterministic=True, decode=True)
    model = models.Transformer(cfg)
    inputs = _sources(cfg.vocab_size)
    length = OUTPUT_STEPS + 1  # the example decodes max_decode_len - 1 positions
    variables = model.init(
        jax.random.key(0), jnp.ones(inputs.shape, jnp.float32), jnp.ones((SOURCES, length))
    )
    params, cache = variables["params"], variables["cache"]

    def search(params, cache, inputs):
        encoded = model.apply({"params": params}, inputs, method=models.Transformer.encode)
        encoded = decode.flat_batch_beam_expand(encoded, BEAM)
        raw = decode.flat_batch_beam_expand(inputs, BEAM)

        def tokens_to_logits(ids, flat_cache):
            logits, new = model.apply(
                {"params": params, "cache": flat_cache}, encoded, raw, ids,
                mutable=["cache"], method=models.Transformer.decode,
            )  # fmt: skip
            return logits[:, 0], new["cache"]

        # eos_id -1 is never produced: every sentence runs all positions, as ours.
        seqs, _ = decode.beam_search(
            inputs, cache, tokens_to_logits, beam_size=BEAM, alpha=0.6, eos_id=-1,
            max_decode_len=length,
        )  # fmt: skip
        return seqs[:, -1, 1:]

    return _timed_search(search, params, cache, inputs)


def dense_matmuls(size: str) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of every dense matmul in the forward pass of a step at
    `size`: each layer's projections and feed-forward, the tied output layer.
    Attention's QK^T and weights x V (rows x length^2, a few percent here) are left out."""
    d, layers, _, vocab, rows, length = SIZES[size]
    n = rows * length  # tokens on each side
    encoder = [(n, d, d)] * 4 + [(n, d, 4 * d), (n, 4 * d, d)]
    decoder = [(n, d, d)] * 8 + [(n, d, 4 * d), (n, 4 * d, d)]  # self- and cross-attention
    return layers * (encoder + decoder) + [(n, d, vocab)]


def matmul_floor(size: str) -> tuple[float, float]:
    """The step's dense matmuls alone, forward and both gradients, in one jitted
    function on random float32 operands: a floor for any step at `size` on this
    host (no attention, normalisation, dropout, loss or optimizer)."""
    shapes = dense_matmuls(size)
    operand = _random_operands()

    operands = [(operand(n, k), operand(k, m), operand(n, m)) for n, k, m in shapes]

    def matmuls(state, operands):
        out = [(x @ w, g @ w.T, x.T @ g) for x, w, g in operands]  # forward, d input, d weight
        return state, out

    return _timed(jax.jit(matmuls), jnp.zeros(()), (operands,), _REPEATS.value)


def search_matmuls(size: str) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(rows, in, out) of the dense matmuls of our beam search at `size`: those
    run once (the encoder, and the decoder's cross-attention keys and values of
    each source) and those of every output position (each decoder layer's
    projections and feed-forward layer at B*W rows, then the output layer)."""
    d, layers, _, vocab, _, _ = SIZES[size]
    n, rows = SOURCES * SOURCE_LENGTH, SOURCES * BEAM
    once = layers * ([(n, d, d)] * 4 + [(n, d, 4 * d), (n, 4 * d, d)] + [(n, d, d)] * 2)
    position = layers * ([(rows, d, d)] * 6 + [(rows, d, 4 * d), (rows, 4 * d, d)])
    return once, position + [(rows, d, vocab)]


def search_matmul_floor(size: str) -> tuple[float, float]:
    """The beam search's dense matmuls alone: those run once, then OUTPUT_STEPS
    times those of a position, chained (each product feeds the next, so that
    none is hoisted out of the loop), on random float32 operands: a floor for
    any search of these shapes on this host (no attention, normalisation,
    top-k or bookkeeping)."""
    once, position = search_matmuls(size)
    rng = np.random.default_rng(0)

    def weight(k, m):  # scaled so that the chained activations stay near 1
        return jnp.asarray(rng.standard_normal((k, m), np.float32) / np.sqrt(k))

    inputs = [jnp.asarray(rng.standard_normal((n, k), np.float32)) for n, k, _ in once]
    once_weights = [weight(k, m) for _, k, m in once]
    weights = [weight(k, m) for _, k, m in position]
    start = jnp.asarray(rng.standard_normal((position[0][0], position[0][1]), np.float32))

    def search(state, inputs, once_weights, weights, start):
        encoded = [x @ w for x, w in zip(inputs, once_weights, strict=True)]

        def one_position(_, h):
            for w in weights:
                h = h @ w
            return h[:, : start.shape[1]]  # the next position's input, from the logits

        return state, (encoded, jax.lax.fori_loop(0, OUTPUT_STEPS, one_position, start))

    args = (inputs, once_weights, weights, start)
    return _timed(jax.jit(search), jnp.zeros(()), args, _REPEATS.value)


def step_parts(size: str) -> dict[str, int]:
    """How many times a step at `size` runs each part outside the dense matmuls
    (pre-LN, tied embeddings, dropout on residuals and embeddings)."""
    layers = SIZES[size][1]
    return {
        "attention": 3 * layers,  # self-attention on both sides, cross-attention
        "layer_norm": 5 * layers + 2,  # before every sublayer, after each stack
        "dropout": 5 * layers + 2,  # after every sublayer, on both embeddings
        "bias_relu": 2 * layers,  # the feed-forward layers' first half
        "loss": 1,
        "adam": 1,
    }


def _vjp_all(f, cotangent, *operands):
    """f's output and its gradients with respect to every operand."""
    out, pull = jax.vjp(f, *operands)
    return out, pull(cotangent)


def step_parts_floor(size: str) -> tuple[float, float, dict[str, float]]:
    """The parts of a step at `size` outside its dense matmuls, each kind timed
    alone (forward and gradients, all its instances in one jitted function, on
    random float32 operands): the attentions' QK^T, masked softmax and x V
    (packed rows' masks); the layer norms; dropout (the masks drawn); the
    feed-forward's bias and ReLU; the loss over the logits; the Adam update of
    every parameter. With the matmul floor, an estimate of what a step of these
    shapes cannot skip, as this host runs each part alone (the attentions'
    transposes to heads-major and back included; the embedding lookups, the
    residual sums and the other bias additions left out). Not a strict bound:
    in a step XLA fuses some of them with their neighbours."""
    from transformer.dropout import Dropout

    d, layers, heads, vocab, rows, length = SIZES[size]
    counts = step_parts(size)
    operand = _random_operands()

    batch = {k: jnp.asarray(v) for k, v in random_packed(rows, length, vocab).items()}
    source, target = batch["inputs_segmentation"], batch["targets_segmentation"]
    masks = [
        attention.segment_mask(source, source),  # the encoder's self-attention
        attention.combine_masks(
            attention.causal_mask(length), attention.segment_mask(target, target)
        ),  # the decoder's self-attention
        attention.segment_mask(target, source),  # the decoder's cross-attention
    ] * layers
    heads_shape = (rows, length, heads, d // heads)
    width = (rows, length, d)
    norm, dropout = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32), Dropout(0.1)
    norm_params = norm.init(jax.random.key(0), jnp.zeros((1, d)))

    def attend(mask):
        return lambda q, k, v: attention.dot_product_attention(q, k, v, mask)[0]

    def dropped(i):
        key = jax.random.key(i)
        return lambda x: dropout.apply({}, x, deterministic=False, rngs={"dropout": key})

    def loss(logits):
        return train.cross_entropy_sums(logits, batch["targets"], SMOOTHING)["loss"]

    model_cfg = _our_config(size)
    tokens = jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(Transformer(model_cfg).init(jax.random.key(0), tokens, tokens)["params"])
    optimizer = train.make_optimizer(model_cfg, config.TrainConfig(label_smoothing=SMOOTHING))
    gradients = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

    def adam(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # kind -> [(function, cotangent or None, operands)]: distinct operands for each
    # instance, so that XLA cannot merge them into one
    parts = {
        "attention": [
            (attend(m), operand(*heads_shape), [operand(*heads_shape) for _ in range(3)])
            for m in masks
        ],
        "layer_norm": [
            (norm.apply, operand(*width), [norm_params, operand(*width)])
            for _ in range(counts["layer_norm"])
        ],
        "dropout": [
            (dropped(i), operand(*width), [operand(*width)]) for i in range(counts["dropout"])
        ],
        "bias_relu": [
            (
                lambda x, b: jax.nn.relu(x + b),
                operand(rows * length, 4 * d),
                [operand(rows * length, 4 * d), operand(4 * d)],
            )
            for _ in range(counts["bias_relu"])
        ],
        "loss": [(loss, jnp.ones(()), [operand(rows, length, vocab)])],
        "adam": [(adam, None, [params, optimizer.init(params), gradients])],
    }
    assert {k: len(v) for k, v in parts.items()} == counts
    compile_s, seconds = 0.0, {}
    for kind, instances in parts.items():
        functions = [f for f, _, _ in instances]

        def run(state, operands, functions=functions):
            return state, [
                f(*ops) if g is None else _vjp_all(f, g, *ops)
                for f, (g, ops) in zip(functions, operands, strict=True)
            ]

        operands = [(g, ops) for _, g, ops in instances]
        c, s = _timed(jax.jit(run), jnp.zeros(()), (operands,), _REPEATS.value)
        compile_s, seconds[kind] = compile_s + c, s
    return compile_s, sum(seconds.values()), seconds


def search_parts_floor(size: str) -> tuple[float, float, dict[str, float]]:
    """The parts of our beam search at `size` outside its dense matmuls, each
    kind timed alone over the OUTPUT_STEPS positions (a loop, random float32
    operands): every decoder layer's self-attention over its cache, as the
    search reads it (`attention.cached_self_attention`, the prefix that holds
    the position), and its cross-attention over the sources; the 2W best
    extensions of each sentence's beams from the output layer's logits
    (`decoding.best_extensions`, normalising them). Every hypothesis must read
    its cache and its logits at every position; the cache writes, the layer
    norms and the bookkeeping are left out."""
    d, layers, heads, vocab, _, _ = SIZES[size]
    size_k, rows = d // heads, SOURCES * BEAM
    operand = _random_operands()

    query = operand(rows, 1, heads, size_k)
    cache = [
        (operand(SOURCES, heads, size_k, OUTPUT_STEPS * BEAM),  # keys [B, N, K, L*W]
         operand(SOURCES, heads, OUTPUT_STEPS * BEAM, size_k))
        for _ in range(layers)
    ]  # fmt: skip
    beams = np.random.default_rng(1).integers(0, BEAM, (SOURCES, BEAM, OUTPUT_STEPS))
    lineage = jnp.asarray(beams, jnp.int32)
    prefixes = attention.prefix_parts(BEAM, OUTPUT_STEPS)
    source = [
        (operand(SOURCES, heads, size_k, SOURCE_LENGTH),  # keys [B, N, K, S]
         operand(SOURCES, heads, SOURCE_LENGTH, size_k))
        for _ in range(layers)
    ]  # fmt: skip
    source_mask = attention.padding_mask(_sources(vocab))
    # Logits of their own at every position, as the search reads them (not from a cache).
    logits = operand(OUTPUT_STEPS, SOURCES, BEAM, vocab)

    def self_attention(state, cache, lineage, query):
        def position(step, q):
            for key, value in cache:
                q = attention.cached_self_attention(q, key, value, lineage, step, prefixes)[0]
            return q

        return state, jax.lax.fori_loop(0, OUTPUT_STEPS, position, query)

    def cross_attention(state, source, query):
        def position(_, q):
            for key, value in source:
                q = q.reshape(SOURCES, BEAM, heads, size_k)
                q = attention.dot_product_attention(
                    q, key, value, source_mask, heads_major=True, transposed_keys=True
                )[0].reshape(rows, 1, heads, size_k)
            return q

        return state, jax.lax.fori_loop(0, OUTPUT_STEPS, position, query)

    def extensions(state, logits):
        def position(step, best):  # all three outputs kept, as the search uses them
            only_eos = jnp.full((SOURCES,), step + 1 >= OUTPUT_STEPS)
            return decoding.best_extensions(
                best[0][:, :BEAM], logits[step], 2 * BEAM, normalized=False, only_eos=only_eos
            )

        start = (jnp.zeros((SOURCES, 2 * BEAM)),) + (jnp.zeros((SOURCES, 2 * BEAM), jnp.int32),) * 2
        return state, jax.lax.fori_loop(0, OUTPUT_STEPS, position, start)

    kinds = {
        "self_attention": (self_attention, (cache, lineage, query)),
        "cross_attention": (cross_attention, (source, query)),
        "best_extensions": (extensions, (logits,)),
    }
    compile_s, seconds = 0.0, {}
    for kind, (function, args) in kinds.items():
        c, s = _timed(jax.jit(function), jnp.zeros(()), args, _REPEATS.value)
        compile_s, seconds[kind] = compile_s + c, s
    return compile_s, sum(seconds.values()), seconds


MEASURES = {
    ("ours", "step"): our_step, ("theirs", "step"): example_step,
    ("floor", "step"): matmul_floor, ("floor", "beam"): search_matmul_floor,
    ("parts", "step"): step_parts_floor, ("parts", "beam"): search_parts_floor,
    ("ours", "beam"): our_beam, ("theirs", "beam"): example_beam,
}  # fmt: skip


def measure(one: str) -> dict:
    side, what, size = one.split(":")
    compile_s, seconds, *parts = MEASURES[side, what](size)
    _, _, _, _, rows, length = SIZES[size]
    work = rows * length if what == "step" else SOURCES * OUTPUT_STEPS
    rate = {("target_tokens_per_s" if what == "step" else "output_tokens_per_s"):
            round(work / seconds, 1),
            "program_temp_mib": round(_program_temp_bytes[-1] / 2**20, 1),
            } if side in ("ours", "theirs") else {}  # fmt: skip
    return {
        "benchmark": "flax_example", "side": side, "what": what, "size": size,
        "compile_s": round(compile_s, 2), "seconds": round(seconds, 4),
        **rate,
        "peak_rss_gib": round(peak_rss_gib(), 3), "cpus": os.cpu_count(),
        **({"parts": {k: round(v, 4) for k, v in parts[0].items()}} if parts else {}),
    }  # fmt: skip


def main(argv):
    del argv
    try:
        sharding.parse_mesh(_MESH.value, jax.device_count())
    except config.ConfigError as e:
        raise cli.UserError(f"--mesh={_MESH.value}: {e}") from None
    example = _EXAMPLE.value
    if not example or not all(
        os.path.isfile(os.path.join(example, f"{n}.py")) for n in ("models", "decode")
    ):
        given = f"--example={example}" if example else "--example is required"
        raise cli.UserError(
            f"{given}: give the Flax WMT example's folder, with its models.py "
            "and decode.py (flax/examples/wmt in a checkout of Flax)"
        )
    for size in _SIZES.value:
        if size not in SIZES:
            raise cli.UserError(f"--sizes takes {', '.join(SIZES)}, got {size!r}")
    for what in _WHAT.value:
        if what not in ("step", "beam"):
            raise cli.UserError(f"--what takes step and/or beam, got {what!r}")
    if _ONE.value:
        print(json.dumps(measure(_ONE.value)), flush=True)
        return
    plan = [("step", s) for s in _SIZES.value if "step" in _WHAT.value]
    plan += [("beam", "base")] if "beam" in _WHAT.value else []
    for what, size in plan:
        compare(what, size)


def compare(what: str, size: str) -> None:
    """Every side, alternating, each run in its own process; then the medians."""
    sides = ("ours", "theirs", "floor", "parts")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(_ROUNDS.value):
        for side in sides:
            command = [sys.executable, "-m", "benchmarks.flax_example",
                       f"--example={_EXAMPLE.value}", f"--repeats={_REPEATS.value}",
                       f"--mesh={_MESH.value}", f"--one={side}:{what}:{size}"]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                last = result.stderr.strip().splitlines()[-1]
                raise cli.UserError(f"{side}:{what}:{size}: {last}")
            runs[side].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[side][-1]), flush=True)
    median = {s: round(statistics.median(r["seconds"] for r in runs[s]), 4) for s in runs}
    rss = {s: max(r["peak_rss_gib"] for r in runs[s]) for s in runs}
    # The most that a step or search doing these matmuls could gain over the example's,
    # then (an estimate) doing the other parts too, as this host runs each alone:
    with_parts = median["floor"] + median["parts"]
    parts = {k: round(statistics.median(r["parts"][k] for r in runs["parts"]), 4)
             for k in runs["parts"][0]["parts"]}  # fmt: skip
    floor = {"matmul_floor_seconds": median["floor"],
             "speedup_bound": round(median["theirs"] / median["floor"], 3),
             "parts_seconds": median["parts"], "parts": parts,
             "speedup_with_parts_alone": round(median["theirs"] / with_parts, 3)}  # fmt: skip
    print(json.dumps({
        "benchmark": "flax_example", "what": what, "size": size,
        "ours_seconds": median["ours"], "example_seconds": median["theirs"],
        "speedup": round(median["theirs"] / median["ours"], 3), **floor,
        "ours_peak_rss_gib": rss["ours"], "example_peak_rss_gib": rss["theirs"],
        "ours_program_temp_mib": runs["ours"][0]["program_temp_mib"],
        "example_program_temp_mib": runs["theirs"][0]["program_temp_mib"],
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    benchmarks.run(main)
