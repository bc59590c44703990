"""Table 3 as a command (experiments.table3) and Table 1 measured (benchmarks.table1)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_module

from transformer import config, metrics, record
from transformer.analysis import table3

# ----------------------------------------------------------------------------
# Rows at a smaller width
# ----------------------------------------------------------------------------


def test_rows_scale_the_papers_changes_to_the_width():
    width = config.preset("cpu")  # d_model 192 = 0.375 x 512, N 3 = 0.5 x 6
    rows = {r.name: r.settings for r in table3.rows(["A", "C", "D"], width)}
    depths = {"num_encoder_layers": 3, "num_decoder_layers": 3}  # the preset's, not the flagfile's
    assert rows["base"] == {"num_heads": 8, "d_k": 24, "d_v": 24, **depths}
    assert all(set(depths) <= set(settings) for settings in rows.values())
    # (A): the computation stays constant, d_k = d_v = d_model / h.
    for heads in (1, 4, 16, 32):
        assert rows[f"h{heads}"] == {
            "num_heads": heads,
            "d_k": 192 // heads,
            "d_v": 192 // heads,
            **depths,
        }
    assert rows["n8"]["num_encoder_layers"] == rows["n8"]["num_decoder_layers"] == 4
    assert rows["d1024"]["d_model"] == 384 and rows["d1024"]["d_k"] == 48
    assert rows["ff4096"]["d_ff"] == 1536
    assert rows["ls0.2"]["label_smoothing"] == 0.2 and rows["drop0"]["dropout"] == 0.0
    assert "dk16" not in rows and "learned_pos" not in rows and "big" not in rows


def test_every_row_makes_a_valid_model_at_the_cpu_width():
    width = config.preset("cpu")
    model_fields = {f for f in config.ModelConfig.__dataclass_fields__}
    for row in table3.rows(list(table3.GROUPS), width):
        changes = {k: v for k, v in row.settings.items() if k in model_fields}
        config.changed_model(width, changes)  # raises ConfigError if not


def test_unknown_groups_and_widths_are_refused():
    with pytest.raises(config.ConfigError, match="unknown Table 3 rows F"):
        table3.rows(["A", "F"], config.preset("cpu"))
    with pytest.raises(config.ConfigError, match="divisible by 32"):
        table3.rows(["A"], config.preset("cpu").replace(d_model=200))


def _runs(perplexities, bleus):
    return [
        {"validation_perplexity": p, "sacrebleu": b, "chrf": 20.0, "params": 1e6, "steps": 10}
        for p, b in zip(perplexities, bleus, strict=True)
    ]


def test_the_table_marks_rows_within_the_seeds_noise():
    tiny = config.preset("tiny")
    results = {
        "base": _runs([10.0, 11.0], [5.0, 6.0]),
        "h1": _runs([10.4, 10.8], [5.2, 5.9]),  # inside the spread
        "h4": _runs([20.0, 20.5], [1.0, 1.2]),  # far outside
    }
    table = table3.summarize(results, dict.fromkeys(results, tiny), dict.fromkeys(results, 0.1))
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if "|" in line}
    assert lines["(A) h=1"].rstrip(" |").endswith("within noise")
    assert "within noise" not in lines["(A) h=4"]
    assert "10.50 ± 0.50" in lines["base"] and "Seeds: 2 seeds" in table
    one = table3.summarize({"base": _runs([10.0], [5.0])}, {"base": tiny}, {"base": 0.1})
    assert "One seed per row" in one and "±" not in one


def test_seeds_of_the_base_row_alone_measure_the_noise():
    tiny = config.preset("tiny")
    results = {
        "base": _runs([10.0, 11.0, 10.5], [5.0, 6.0, 5.5]),  # range 1.0 each
        "h1": _runs([11.4], [5.0]),  # perplexity 0.9 above base's mean: within
        "h4": _runs([11.6], [5.5]),  # perplexity 1.1 above: outside
    }
    table = table3.summarize(results, dict.fromkeys(results, tiny), dict.fromkeys(results, 0.1))
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if "|" in line}
    assert "within noise" in lines["(A) h=1"] and "within noise" not in lines["(A) h=4"]
    assert "base 3 seeds, the other rows 1" in table


# ----------------------------------------------------------------------------
# The command, end to end on the tiny model
# ----------------------------------------------------------------------------


def test_table3_trains_each_row_once_and_writes_its_table(ding_sample, tmp_path):
    out = tmp_path / "t3"
    args = [
        "--rows=E",
        "--preset=tiny",
        f"--out_dir={out}",
        "--train_minutes=5",
        "--wmt_flags=" + ",".join([
            f"--manual_dir={ding_sample.manual_dir}", f"--data_dir={ding_sample.data_dir}",
            "--vocab_size=350", "--max_len=32", "--row_length=32", "--batch_rows=8",
            "--steps=3", "--warmup_steps=2", "--log_every=1", "--checkpoint_minutes=0",
            "--peak_tflops=0.1",
        ]),
    ]  # fmt: skip
    first = run_module("experiments.table3", *args).stdout.decode()
    assert first.count("== ") == 2  # base and (E), one seed each
    runs = json.loads((out / "table3.json").read_text())
    assert list(runs) == ["base", "learned_pos"]
    for (row,) in runs.values():
        assert row["steps"] == 3 and row["validation_perplexity"] > 1
    base_params, learned_params = runs["base"][0]["params"], runs["learned_pos"][0]["params"]
    assert learned_params == base_params + 2 * 32 * 32  # two learned tables [max_len, d_model]
    vocab = (out / "vocab.model").read_bytes()
    assert (out / "runs/learned_pos-seed0/vocab.model").read_bytes() == vocab
    table = (out / "table3.md").read_text()
    assert "(E) learned positions" in table and "One seed per row" in table
    assert (out / "table3.png").read_bytes()[:4] == b"\x89PNG"
    # experiments.compare reads the same figures off the workdirs.
    workdirs = [r[0]["workdir"] for r in runs.values()]
    compared = run_module("experiments.compare", "--workdirs=" + ",".join(workdirs))
    lines = compared.stdout.decode().splitlines()[2:]
    for line, (row,) in zip(lines, runs.values(), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["workdir"] and cells[1].startswith("transformer, d_model 32")
        assert cells[3] == "3" and cells[7] == "validation"
        assert cells[6] == f"{row['validation_perplexity']:.2f}"
        assert cells[8] == f"{row['sacrebleu']:.2f}" and cells[9] == f"{row['chrf']:.2f}"
    again = run_module("experiments.table3", *args).stdout.decode()
    assert "== " not in again  # nothing trained twice
    assert (out / "table3.md").read_text() == table


_CHILD = """
import pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
def save(*_):
    time.sleep(0.5)  # a checkpoint's save
    (folder / "saved").write_text("yes")
    sys.exit(3)
signal.signal(signal.SIGTERM, save)
(folder / "ready").write_text("yes")
time.sleep(60)
"""


def test_a_sigterm_to_table3_waits_for_its_run_to_save(tmp_path):
    command = [sys.executable, "-c", _CHILD, str(tmp_path)]
    parent = subprocess.Popen([
        sys.executable, "-c", "import sys; from experiments.table3 import run_to_its_end; "
        f"sys.exit(run_to_its_end({command!r}))",
    ])  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 3  # the run's own exit, after its save
        assert (tmp_path / "saved").read_text() == "yes"
    finally:
        parent.kill()
        subprocess.run(["pkill", "-f", str(tmp_path)], check=False)  # an orphaned run


def test_a_results_file_cut_short_is_a_run_to_finish(tmp_path):
    from etils import epath

    from experiments.table3 import finished

    (tmp_path / "results.json").write_text('{"step": 3, "validation_sac')
    assert finished(epath.Path(tmp_path)) is None
    (tmp_path / "results.json").write_text('{"step": 3, "validation_sacrebleu": 1.5}')
    assert finished(epath.Path(tmp_path)) == {"step": 3, "validation_sacrebleu": 1.5}


def test_compare_names_a_workdir_without_results(tmp_path):
    result = run_module("experiments.compare", f"--workdirs={tmp_path}", check=False)
    assert result.returncode == 1
    assert "has no results.json" in result.stderr.decode().strip()
    result = run_module("experiments.compare", f"--workdirs={tmp_path},", check=False)
    assert result.returncode == 1
    assert "--workdirs has an empty name" in result.stderr.decode().strip()


def test_compare_reads_what_a_killed_run_left_and_names_damage(tmp_path):
    from experiments import cli, compare

    configs = record.Configs(
        config.preset("tiny"), config.DataConfig(), config.TrainConfig(), config.DecodeConfig()
    )
    record.write_config(str(tmp_path), configs)
    results = {"step": 3, "train_minutes": 0.5, "validation_perplexity": 9.0,
               "test_sacrebleu": 1.0, "test_chrf": 20.0}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results))
    # A run killed mid-write left a torn last line; the resumed run's records follow it.
    first = json.dumps({"step": 1, "train/target_tokens_per_second": 100.0})
    (tmp_path / "metrics.jsonl").write_text(first + '\n{"step": 2, "train/targ')
    writer = metrics.SummaryWriter(str(tmp_path))
    writer.write(3, {"target_tokens_per_second": 300.0}, prefix="train/")
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 2, "train/targ' and json.loads(lines[2])["step"] == 3
    assert compare.row(str(tmp_path))["target_tokens_per_second"] == 200.0
    (tmp_path / "results.json").write_text(json.dumps({**results, "test_chrf": None}))
    with pytest.raises(cli.UserError, match="results.json lacks a number for chrf"):
        compare.row(str(tmp_path))
    (tmp_path / "results.json").write_text('{"step": 3, "te')
    with pytest.raises(cli.UserError, match="results.json is not valid JSON"):
        compare.row(str(tmp_path))


def test_table3_refuses_a_bad_row_at_once(tmp_path):
    result = run_module("experiments.table3", "--rows=Z", f"--out_dir={tmp_path}", check=False)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "unknown Table 3 rows Z" in lines[0]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------
# Table 1: one layer's time and sequential steps against n
# ----------------------------------------------------------------------------


def test_table1_counts_sequential_steps_and_writes_its_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.table1", "--lengths=4,16", "--d_model=16",
         "--num_heads=2", "--rows=2", "--repeats=1", f"--out_dir={tmp_path}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    points = {(p["layer"], p["n"]): p for p in map(json.loads, result.stdout.splitlines())}
    assert points[("self-attention", 4)]["sequential_steps"] == 1
    assert points[("self-attention", 16)]["sequential_steps"] == 1
    assert points[("recurrent", 4)]["sequential_steps"] == 4
    assert points[("recurrent", 16)]["sequential_steps"] == 16
    assert points[("recurrent", 16)]["flops"] == 16 * 16 * 16**2 * 2  # 16 n D^2, 2 rows
    assert "| recurrent | O(n d^2) | O(n) | O(n) | 4 / 16 |" in (tmp_path / "table1.md").read_text()
    assert (tmp_path / "table1.png").read_bytes()[:4] == b"\x89PNG"
