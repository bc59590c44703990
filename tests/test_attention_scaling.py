"""Why 1/sqrt(d_k): the measured statistics follow the paper's argument; the entry point runs."""

import csv
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from transformer import attention
from transformer.analysis import scaling

D_KS = scaling.DEFAULT_D_KS  # 8 .. 1024
NUM_KEYS = 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def rows() -> dict[int, scaling.ScalingRow]:
    # 256 queries x 64 keys: about 16k logits per d_k, enough for the bands below.
    return {r.d_k: r for r in scaling.sweep(D_KS, num_queries=256, num_keys=NUM_KEYS, seed=0)}


def _column(rows, which: str, field: str) -> np.ndarray:
    return np.array([getattr(getattr(rows[d], which), field) for d in D_KS])


def _spread(values: np.ndarray) -> float:
    """(max - min) / mean: how far a curve is from flat."""
    return float((values.max() - values.min()) / values.mean())


def test_unscaled_logit_variance_is_d_k(rows):
    """Footnote 4: d_k independent unit-variance products sum to variance d_k."""
    var_over_d_k = _column(rows, "unscaled", "logit_std") ** 2 / np.array(D_KS)
    assert np.all(np.abs(var_over_d_k - 1) < 0.1), var_over_d_k
    ratio = rows[1024].unscaled.logit_std / rows[16].unscaled.logit_std
    assert 7.2 < ratio < 8.8, ratio  # sqrt(1024 / 16) = 8


def test_unscaled_softmax_saturates_and_its_gradient_vanishes(rows):
    max_weight = _column(rows, "unscaled", "max_weight")
    entropy = _column(rows, "unscaled", "entropy")
    grad_norm = _column(rows, "unscaled", "grad_norm")
    assert np.all(np.diff(max_weight) > 0), max_weight
    assert np.all(np.diff(entropy) < 0), entropy
    # The gradient is also small for near-uniform weights and peaks where the logit
    # std is about 3, between d_k = 8 and 16 here, so it falls monotonically from 16.
    assert np.all(np.diff(grad_norm[1:]) < 0), grad_norm
    assert max_weight[-1] > 0.9
    assert entropy[-1] < 0.1 * math.log(NUM_KEYS)  # uniform weights would give log S
    assert grad_norm[-1] < 0.3 * grad_norm[0], grad_norm
    assert rows[1024].unscaled.grad_norm < 0.45 * rows[1024].scaled.grad_norm


def test_scaled_statistics_stay_flat_across_d_k(rows):
    std = _column(rows, "scaled", "logit_std")
    assert np.all(np.abs(std - 1) < 0.05), std
    max_weight = _column(rows, "scaled", "max_weight")
    assert _spread(max_weight) < 0.15, max_weight
    assert max_weight.max() < 0.2  # far from one-hot (1.0); uniform is 1/64
    assert _spread(_column(rows, "scaled", "entropy")) < 0.05
    assert _spread(_column(rows, "scaled", "grad_norm")) < 0.1


def test_scaled_weights_are_the_models_attention_weights():
    """The 'scaled' case is exactly what transformer/attention.py computes."""
    rng = np.random.default_rng(1)
    query = jax.numpy.asarray(rng.standard_normal((4, 32)), jax.numpy.float32)  # [T, K]
    key = jax.numpy.asarray(rng.standard_normal((4, 8, 32)), jax.numpy.float32)  # [T, S, K]
    ours = jax.nn.softmax(scaling.dot_product_logits(query, key, scaled=True), axis=-1)
    # As the model's shapes: batch = T, one query and one head each.
    model = attention.dot_product_attention_weights(query[:, None, None], key[:, :, None], None)
    np.testing.assert_allclose(ours, model[:, 0, 0], rtol=1e-5, atol=1e-6)  # [T, S]


def test_table_has_one_line_per_d_k(rows):
    lines = scaling.format_table(list(rows.values())).splitlines()
    assert [int(line.split()[0]) for line in lines[2:]] == list(D_KS)
    assert len({len(line) for line in lines}) == 1  # aligned columns


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.attention_scaling", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_entry_point_writes_plot_and_table(tmp_path):
    out_dir = tmp_path / "out"
    result = _run(f"--out_dir={out_dir}", "--d_k=8,64,512", "--queries=128")
    assert result.returncode == 0, result.stderr
    png = (out_dir / "attention_scaling.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    with open(out_dir / "attention_scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["d_k"]) for r in table] == [8, 64, 512]
    assert float(table[-1]["logit_std_unscaled"]) > 15  # sqrt(512) ~ 22.6
    saved = json.loads((out_dir / "attention_scaling.json").read_text())
    assert [r["d_k"] for r in saved] == [8, 64, 512]
    printed = [line.split()[0] for line in result.stdout.splitlines()[2:5]]
    assert printed == ["8", "64", "512"]


@pytest.mark.parametrize("bad", ["--d_k=0", "--d_k=abc"])
def test_bad_d_k_is_a_one_line_error(tmp_path, bad):
    out_dir = tmp_path / "out"
    result = _run(f"--out_dir={out_dir}", bad)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("experiments.attention_scaling: error: --d_k=")
    assert not out_dir.exists()  # nothing written for a rejected command
