"""Configs: presets, validation, and the one-line errors of the model flags."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest

from transformer import config


@pytest.mark.parametrize("name", list(config.PRESETS))
def test_presets_validate(name):
    assert config.preset(name).validate() is config.preset(name)


def test_table3_rows_change_only_what_the_paper_changes():
    base = config.preset("base")
    assert config.preset("dk16").replace(d_k=64) == base  # row B: d_k only, d_v stays 64
    assert config.preset("dk16").d_v == 64
    for name in ("h1", "h4", "h16", "h32"):  # row A: constant computation
        c = config.preset(name)
        assert c.num_heads * c.d_k == c.num_heads * c.d_v == 512
    assert config.preset("big").dropout == 0.3
    assert config.preset("learned_pos").positional == "learned"
    assert config.recipe("ls0.2").label_smoothing == 0.2
    assert config.recipe("base").label_smoothing == 0.1
    assert config.preset("ls0.2") == base


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"d_model": 0}, "d_model"),
        ({"num_heads": -1}, "num_heads"),
        ({"dropout": 1.0}, "dropout"),
        ({"layer_norm": "middle"}, "layer_norm"),
        ({"dtype": "float16"}, "dtype"),
        ({"positional": "rotary"}, "positional"),
        ({"vocab_size": 3}, "vocab_size"),
    ],
)
def test_invalid_model_config_names_the_setting(changes, named):
    with pytest.raises(config.ConfigError, match=named):
        config.preset("base").replace(**changes).validate()


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"steps": 0}, "steps"),
        ({"warmup_steps": -5}, "warmup_steps"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"learning_rate_scale": 0.0}, "learning_rate_scale"),
        ({"final_eval_split": "train"}, "final_eval_split must be one of"),
    ],
)
def test_invalid_train_config_names_the_setting(changes, named):
    with pytest.raises(config.ConfigError, match=named):
        config.TrainConfig(**changes).validate()


def test_subword_sampling_with_a_bpe_vocabulary_is_refused():
    # Once a traceback from SentencePiece's NBestEncode, after all of the data's preparation.
    with pytest.raises(config.ConfigError, match="subword_sampling needs vocab_model unigram"):
        config.DataConfig(vocab_model="bpe", subword_sampling=0.1).validate()
    config.DataConfig(vocab_model="unigram", subword_sampling=0.1).validate()


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"beam_size": 0}, "beam_size must be a positive integer"),
        ({"length_penalty": -0.1}, "length_penalty must be a finite number >= 0"),
        ({"length_penalty": float("inf")}, "length_penalty must be a finite number >= 0"),
        ({"length_penalty": "0.6"}, "length_penalty must be a finite number >= 0"),  # by hand
        ({"max_extra": 0}, "max_extra must be a positive integer"),
        ({"no_repeat_ngram": -1}, "no_repeat_ngram"),
        ({"mbr": 1}, "from 2 to beam_size=4"),
        ({"mbr": 5}, "from 2 to beam_size=4"),
        ({"mbr_samples": 4}, "mbr_samples needs mbr >= 2"),
        ({"mbr": 2, "mbr_samples": -1}, "mbr_samples must be an integer >= 0"),
        ({"mbr_epsilon": 1.0}, r"mbr_epsilon must be in \[0, 1\)"),
        (
            {"mbr": 2, "mbr_samples": 1, "mbr_sample_candidates": True},
            "mbr_sample_candidates needs mbr_samples >= 2",
        ),
        ({"mbr_beta": 0.0}, "mbr_beta must be a finite number > 0"),
        ({"mbr_beta": float("nan")}, "mbr_beta must be a finite number > 0"),
        ({"mbr_utility": "bleu"}, "mbr_utility must be one of 'chrf', 'chrf\\+\\+'"),
    ],
)
def test_invalid_decode_config_names_the_setting(changes, named):
    with pytest.raises(config.ConfigError, match=named):
        config.DecodeConfig(**changes).validate()


@pytest.mark.parametrize(
    "cls", [config.ModelConfig, config.TrainConfig, config.DecodeConfig, config.DataConfig]
)
def test_every_setting_has_a_help_line_and_its_default_passes_its_check(cls):
    for field in dataclasses.fields(cls):
        assert field.metadata.get("help", "").endswith((".", ")")), field.name
    cls().validate()


def _check_only(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "experiments.wmt", "--check_only", *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_flags_change_only_what_they_name_over_the_presets(tmp_path):
    big = _check_only("--preset=big")
    assert big["model"] == dataclasses.asdict(config.preset("big"))
    assert big["decode"] == dataclasses.asdict(config.DecodeConfig())
    # A D row's recipe sets label smoothing; a flag, given or in a flagfile, wins over it.
    assert _check_only("--preset=ls0.2")["train"]["label_smoothing"] == 0.2
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--preset=ls0.2\n--label_smoothing=0.05\n--beam_size=6\n--dropout=0.3\n")
    given = _check_only(f"--flagfile={flagfile}")
    assert given["train"]["label_smoothing"] == 0.05
    assert given["decode"]["beam_size"] == 6 and given["model"]["dropout"] == 0.3
    assert given["model"]["d_model"] == 512 and given["train"]["steps"] == 100_000
    # --num_layers after the demo's flagfile sets both sides; a side's own flag, that side.
    demo = pathlib.Path(__file__).parents[1] / "experiments/configs/ding_deen_cpu.flags"
    deeper = _check_only(f"--flagfile={demo}", "--num_layers=4", "--num_decoder_layers=1")
    assert (deeper["model"]["num_encoder_layers"], deeper["model"]["num_decoder_layers"]) == (4, 1)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(config.ConfigError, match="tiny"):
        config.preset("huge")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset=huge"], "--preset"),
        (["--num_heads=7"], "not divisible by --num_heads=7"),
        (["--d_model=0"], "d_model"),
        (["--dropout=1.5"], "dropout"),
        (["--flagfile=/nonexistent.flags"], "flagfile"),
    ],
)
def test_bad_model_flags_exit_1_with_one_line(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.params", *args], capture_output=True, text=True
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].startswith("experiments.params: error:") and "ERROR" not in lines[0]


def test_heads_override_derives_head_sizes():
    result = subprocess.run(
        [sys.executable, "-m", "experiments.params", "--num_heads=16", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    # d_k = d_v = 512 / 16 = 32 keeps the attention at 4 (d^2 + d) parameters.
    assert '"component": "multi-head attention", "formula": 1050624' in result.stdout


def test_the_error_line_stays_whole_while_other_threads_print():
    # An asynchronous checkpoint save that fails prints tracebacks from its own
    # threads while the main thread reports the error; they must not split our line
    # nor follow it. (Before the fix: "    raise Runtime-c: error: ..." every time.)
    script = """
import sys, threading, time
from experiments import cli

def noise():
    while True:
        sys.stderr.write("Traceback (most recent call last):\\n    raise Runtime")
        time.sleep(0.0005)

for _ in range(2):
    threading.Thread(target=noise, daemon=True).start()
cli.fail("disk full; free space, then rerun")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last == "-c: error: disk full; free space, then rerun", result.stderr[-500:]
