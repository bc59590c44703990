"""The analytic FLOPs count behind MFU, against the matmuls the model really runs."""

import math
import types

import jax
import jax.numpy as jnp
import pytest

from transformer import config, flops
from transformer.model import Transformer


def _matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general in a jaxpr, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs = eqn.invars[0].aval.shape
            (contract, _), _ = eqn.params["dimension_numbers"]
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += _matmul_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += _matmul_flops(sub)
    return total


@pytest.mark.parametrize(
    "changes",
    [
        {},
        # Unequal everything: heads x d_k != d_model, d_v != d_k, 3 encoder vs 1 decoder layer.
        dict(num_heads=2, d_k=12, d_v=20, d_ff=48, num_encoder_layers=3, num_decoder_layers=1),
    ],
)
def test_forward_flops_equal_the_models_matmuls(changes):
    cfg = config.preset("tiny").replace(vocab_size=300, dropout=0.0, **changes)
    rows, source_len, target_len = 3, 11, 7
    model = Transformer(cfg)
    inputs = jnp.ones((rows, source_len), jnp.int32)
    targets = jnp.ones((rows, target_len), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), inputs, targets)["params"]
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, inputs, targets))(params)
    counted = _matmul_flops(jaxpr.jaxpr)
    assert flops.forward_flops(cfg, rows, source_len, target_len) == counted
    # Without the attention scores, the quadratic part is gone and the rest stays.
    scores = flops.forward_flops(cfg, rows, source_len, target_len, attention_scores=False)
    assert 0 < scores < counted


def test_a_cpu_peak_counts_one_measurement_per_process(monkeypatch):
    monkeypatch.setattr(flops, "measured_matmul_peak", lambda dtype="float32", **_: 1e11)
    assert flops.device_peak("float32")[0] == 1e11  # 8 forced devices share the cores
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert flops.device_peak("float32")[0] == 2e11  # two hosts have twice the cores


def test_a_given_peak_is_not_measured_and_counts_once_per_process(monkeypatch):
    def measured(*args, **kwargs):
        raise AssertionError("measured a peak that was given")

    monkeypatch.setattr(flops, "measured_matmul_peak", measured)
    assert flops.device_peak("bfloat16", given=3e11) == (3e11, "given")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert flops.device_peak("bfloat16", given=3e11)[0] == 6e11


def test_the_measured_peak_is_the_fastest_repeat_not_a_slowed_one(monkeypatch):
    # Repeats of 1 s, 4 s (another process took the cores) and 2 s: the peak is
    # what the machine can do, 2 * 16^3 FLOPs in 1 s. The clock is flops' own:
    # jax reads time.perf_counter too, while it compiles and caches the matmul.
    clock = iter([0.0, 1.0, 10.0, 14.0, 20.0, 22.0])
    monkeypatch.setattr(flops, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert flops.measured_matmul_peak("float32", size=16, repeats=3) == 2 * 16**3
