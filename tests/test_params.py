"""Parameter accounting: formula == real model for every preset and option; Table 3."""

import subprocess
import sys

import pytest

from transformer import config
from transformer.analysis.params import COMPONENTS, formula_counts, real_counts

OPTIONS = [
    {},
    {"share_embeddings": False},
    {"tie_output": False},
    {"share_embeddings": False, "tie_output": False},
    {"layer_norm": "pre"},
    {"positional": "learned"},
    {"layer_norm": "pre", "positional": "learned", "tie_output": False},
]


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_formula_equals_real_count_for_every_preset(name):
    c = config.preset(name)
    assert formula_counts(c) == real_counts(c)


@pytest.mark.parametrize("changes", OPTIONS)
@pytest.mark.parametrize("name", ["tiny", "dk16", "big"])
def test_formula_equals_real_count_for_every_option(name, changes):
    c = config.preset(name).replace(**changes)
    assert formula_counts(c) == real_counts(c)


def test_base_components_match_the_paper_formulas():
    counts = formula_counts(config.preset("base"))
    d, f = 512, 2048
    assert counts["multi-head attention"] == 4 * (d * d + d)
    assert counts["feed-forward"] == 2 * d * f + f + d
    assert counts["total"] == 63_082_496
    assert set(counts) == set(COMPONENTS)


@pytest.mark.parametrize("name", [n for n in config.TABLE3 if config.PRESETS[n].paper_params_m])
def test_table3_rows_within_7_percent_of_the_paper(name):
    p = config.PRESETS[name]
    ours = formula_counts(p.model)["total"] / 1e6
    assert abs(ours - p.paper_params_m) / p.paper_params_m < 0.07, (ours, p.paper_params_m)


def test_table3_differences_between_rows_match_the_paper():
    """Rounded totals hide an offset; the changes between rows are closer."""
    base = formula_counts(config.preset("base"))["total"] / 1e6
    for name in ("dk16", "dk32", "n4", "n8", "d1024", "ff4096", "big"):
        p = config.PRESETS[name]
        ours = formula_counts(p.model)["total"] / 1e6 - base
        paper = p.paper_params_m - 65
        assert abs(ours - paper) <= 0.06 * abs(paper) + 1.5, (name, ours, paper)


def test_table3_command_prints_every_row():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.params", "--table3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in config.TABLE3:
        assert config.PRESETS[name].row in out
    assert "214.25M" in out and "213M" in out  # big: ours beside the paper's
    for flag, message in (
        ("--vocab_size=0", "vocab_size must be a positive integer below 2**31, got 0"),
        # Beyond int32: once an OverflowError from jax.eval_shape.
        ("--vocab_size=3000000000", "vocab_size must be a positive integer below 2**31"),
        ("--num_heads=16", "only --vocab_size applies, not --num_heads"),
        ("--num_layers=4", "only --vocab_size applies, not --num_layers"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "experiments.params", "--table3", flag],
            capture_output=True,
            text=True,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], lines


def test_breakdown_command_reports_matching_counts():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.params",
            "--preset=base",
            "--layer_norm=pre",
            "--noshare_embeddings",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "NO" not in out and out.count("yes") == len(COMPONENTS)
    total = formula_counts(config.preset("base").replace(layer_norm="pre", share_embeddings=False))[
        "total"
    ]
    assert f"{total:,}" in out
