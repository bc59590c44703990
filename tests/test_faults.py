"""The fault suite: real training processes killed, preempted, fed corrupt checkpoints, NaNs,
a full disk and bad input; each must lose nothing beyond the last checkpoint interval.

Every case runs `python -m experiments.wmt` (tiny model, sample corpus) as a
subprocess, as a user would. The slow ones run in CI (.ci/run runs all marks).
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from conftest import run_module, tiny_training_args
from etils import epath

from transformer import record, trained


def _env() -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.wmt", *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _losses(workdir) -> dict[int, float]:
    path = os.path.join(workdir, "metrics.jsonl")
    lines = [json.loads(line) for line in open(path)]
    return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}


def _steps(workdir) -> list[int]:
    folder = os.path.join(workdir, "checkpoints")
    return (
        sorted(int(p) for p in os.listdir(folder) if p.isdigit()) if os.path.isdir(folder) else []
    )


def _final_params(workdir):
    config = record.read_configs(str(workdir)).model
    return trained.load_params(str(workdir), config, _steps(workdir)[-1])


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _wait_for_step(proc, workdir, step: int, timeout: float = 300) -> None:
    """Blocks until the run has logged `step` (metrics.jsonl) or ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path) and step in _losses(workdir):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached; stderr: {proc.stderr.read()[-2000:]}")


def _one_line_error(result) -> str:
    stderr = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    lines = stderr.strip().splitlines()
    assert result.returncode == 1, stderr[-2000:]
    assert lines and lines[-1].startswith("experiments.wmt: error:"), stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def uninterrupted(ding_sample, tmp_path_factory):
    """A 24-step run with checkpoints every 4 steps, never interrupted: the reference."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_module("experiments.wmt", *tiny_training_args(ding_sample, workdir, 24))
    return workdir


# ----------------------------------------------------------------------------
# 1. kill -9, at random points, also while a checkpoint is being written
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_gives_the_same_parameters(
    ding_sample, uninterrupted, tmp_path
):
    workdir = tmp_path / "killed"
    args = tiny_training_args(ding_sample, workdir, 24)
    rng = random.Random(0)
    kills = 0
    for target in sorted(rng.sample(range(3, 22), 3)):
        proc = _start(args)
        _wait_for_step(proc, workdir, target)
        time.sleep(rng.uniform(0, 0.3))  # anywhere: mid-step, mid-save, mid-log
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    result = run_module("experiments.wmt", *args)
    assert kills == 3 and "resumed from step" in result.stdout.decode()
    assert _steps(workdir)[-1] == 24
    assert not [p for p in os.listdir(workdir / "checkpoints") if "tmp" in p]
    _assert_same_params(_final_params(workdir), _final_params(uninterrupted))
    # Every step was trained, some twice (after a kill): the losses agree with the reference.
    expected, got = _losses(uninterrupted), _losses(workdir)
    assert sorted(got) == list(range(1, 25))
    np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=1e-6)


@pytest.mark.slow
def test_a_half_written_checkpoint_is_ignored_and_cleaned_up(ding_sample, uninterrupted, tmp_path):
    workdir = tmp_path / "half"
    args = tiny_training_args(ding_sample, workdir, 24)
    run_module("experiments.wmt", *args, "--steps=8")  # checkpoints 4, 8
    # What orbax leaves when killed while writing step 12: a temporary folder.
    partial = workdir / "checkpoints" / "12.orbax-checkpoint-tmp-1234567"
    shutil.copytree(workdir / "checkpoints" / "8", partial)
    (partial / "params").rename(partial / "params_incomplete")
    result = run_module("experiments.wmt", *args)
    assert "resumed from step 8" in result.stdout.decode()
    assert not partial.exists()
    _assert_same_params(_final_params(workdir), _final_params(uninterrupted))


# ----------------------------------------------------------------------------
# 2. SIGTERM: the preemption notice of a spot VM
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_0(ding_sample, uninterrupted, tmp_path):
    workdir = tmp_path / "preempted"
    args = [*tiny_training_args(ding_sample, workdir, 24), "--checkpoint_every=100"]
    proc = _start(args)
    _wait_for_step(proc, workdir, 7)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 0
    saved = _steps(workdir)
    assert len(saved) == 1 and saved[0] >= 7  # the step it was at, not an older one
    result = run_module("experiments.wmt", *args)
    assert f"resumed from step {saved[0]}" in result.stdout.decode()
    _assert_same_params(_final_params(workdir), _final_params(uninterrupted))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_is_answered_within_three_steps_of_the_last_finished_one(
    ding_sample, tmp_path, stop
):
    """No progress line forces a wait here (log_every is large): only the loop's bound on
    steps in flight keeps the devices' queue short, so the save comes at once. A first
    Ctrl-C (SIGINT) is answered as SIGTERM is."""
    workdir = tmp_path / "bounded"
    args = [
        *tiny_training_args(ding_sample, workdir, 100_000, checkpoint_every=0),
        "--log_every=100000",
        "--batch_rows=32",
    ]
    proc = _start(args)
    for line in proc.stdout:
        if line.startswith("first step compiled"):
            break
    time.sleep(2)
    proc.send_signal(stop)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    finished = [line for line in out.splitlines() if line.startswith(f"{stop.name} received after")]
    assert len(finished) == 1, out
    signalled = int(finished[0].split()[4].rstrip(":"))
    assert signalled > 1  # it was training, several steps done
    assert 0 <= _steps(workdir)[-1] - signalled <= 3


def test_sigterm_during_the_final_evaluation_stops_it(ding_sample, uninterrupted, tmp_path):
    """The last checkpoint is saved before the final evaluation, which a spot VM's
    notice then ends (once: a 'saving a checkpoint' line, and minutes more of it)."""
    workdir = tmp_path / "evaluating"
    shutil.copytree(uninterrupted, workdir)
    slow_decoding = ["--beam_size=8", "--mbr=8", "--mbr_samples=64"]
    args = [*tiny_training_args(ding_sample, workdir, 24), "--final_eval_split=test"]
    proc = _start([*args, *slow_decoding])
    for line in proc.stdout:
        if line.startswith("step 24 is at or past --steps=24"):
            break
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert time.monotonic() - signalled < 20
    assert "SIGTERM received during the final evaluation: stopped; step 24 is saved" in out
    assert "test: sacreBLEU" not in out and "saving a checkpoint" not in out
    assert json.loads((workdir / "results.json").read_text())["preempted"] is True
    assert _steps(workdir)[-1] == 24


# ----------------------------------------------------------------------------
# 3. Corrupt checkpoints
# ----------------------------------------------------------------------------


def _contents(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(root, n), folder): open(os.path.join(root, n), "rb").read()
        for root, _, names in os.walk(folder)
        for n in names
    }


def _array_files(step_dir) -> list[str]:
    files = []
    for root, _, names in os.walk(step_dir / "params"):
        files += [os.path.join(root, n) for n in names if os.path.getsize(os.path.join(root, n))]
    return sorted(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "alter", "no_manifest", "empty"])
def test_a_corrupt_latest_checkpoint_is_named_and_fallback_is_explicit(
    ding_sample, uninterrupted, tmp_path, damage
):
    workdir = tmp_path / "corrupt"
    shutil.copytree(uninterrupted, workdir)
    latest = workdir / "checkpoints" / "24"
    target = _array_files(latest)[-1]  # the largest data file: the array bytes
    data = open(target, "rb").read()
    if damage == "truncate":
        open(target, "wb").write(data[: len(data) // 2])
    elif damage == "no_manifest":
        os.remove(latest / "params" / "manifest.ocdbt")
    elif damage == "empty":  # a folder under a step's name that orbax did not write
        shutil.rmtree(latest)
        latest.mkdir()
    else:
        middle = len(data) // 2
        open(target, "wb").write(
            data[:middle]
            + bytes(b ^ 0xFF for b in data[middle : middle + 64])
            + data[middle + 64 :]
        )
    before = sorted(os.listdir(workdir / "checkpoints"))
    latest_before = tmp_path / "damaged_24"
    shutil.copytree(latest, latest_before)
    args = [*tiny_training_args(ding_sample, workdir, 28)]
    result = run_module("experiments.wmt", *args, check=False)
    line = _one_line_error(result)
    assert str(latest) in line and "--fallback_checkpoint" in line
    assert "tensorstore_spec" not in line and "driver" not in line  # no TensorStore dump
    if damage == "empty":
        assert "is incomplete: it has no " in line
        assert "_CHECKPOINT_METADATA" not in result.stderr.decode()  # orbax's warnings
    assert sorted(os.listdir(workdir / "checkpoints")) == before  # nothing deleted
    if damage in ("truncate", "no_manifest"):  # the fallback itself: as for "alter"
        return
    result = run_module("experiments.wmt", *args, "--fallback_checkpoint")
    assert "resumed from step 20" in result.stdout.decode()
    # The damaged folder is kept aside, as it was; the run saved a new step 24, then 28.
    aside = workdir / "checkpoints" / "24.unreadable"
    assert aside.is_dir() and _contents(aside) == _contents(latest_before)
    assert _steps(workdir)[-2:] == [24, 28]


def test_a_fallback_with_no_readable_checkpoint_moves_none_aside(
    ding_sample, uninterrupted, tmp_path
):
    workdir = tmp_path / "all_bad"
    shutil.copytree(uninterrupted, workdir)
    for step in _steps(workdir):
        os.remove(workdir / "checkpoints" / str(step) / "params" / "manifest.ocdbt")
    before = _contents(workdir / "checkpoints")
    args = [*tiny_training_args(ding_sample, workdir, 28), "--fallback_checkpoint"]
    line = _one_line_error(run_module("experiments.wmt", *args, check=False))
    assert "can be restored, so none was moved aside" in line
    # Once all were renamed *.unreadable, and the next run trained from step 0.
    assert _contents(workdir / "checkpoints") == before


def test_checkpoints_of_other_flags_are_refused_not_moved_aside(
    ding_sample, uninterrupted, tmp_path
):
    """Without config.json to compare with, the checkpoint's own arrays tell another
    model; that is no damage, and --fallback_checkpoint moves nothing for it."""
    workdir = tmp_path / "other_model"
    shutil.copytree(uninterrupted, workdir)
    os.remove(workdir / "config.json")
    before = _contents(workdir / "checkpoints")
    for extra in ([], ["--fallback_checkpoint"]):
        args = [*tiny_training_args(ding_sample, workdir, 28), "--d_ff=96", *extra]
        line = _one_line_error(run_module("experiments.wmt", *args, check=False))
        assert "written with other model or optimizer flags; rerun with those" in line
        assert "--fallback_checkpoint" not in line
    assert _contents(workdir / "checkpoints") == before


# ----------------------------------------------------------------------------
# 4. NaN / inf
# ----------------------------------------------------------------------------


def test_a_nan_stops_the_run_with_its_step_and_keeps_the_last_good_checkpoint(
    ding_sample, uninterrupted, tmp_path
):
    workdir = tmp_path / "nan"
    shutil.copytree(uninterrupted, workdir)
    good = _final_params(workdir)
    # A learning rate of 1e30 blows the parameters up within a step or two.
    args = [*tiny_training_args(ding_sample, workdir, 40), "--learning_rate_scale=1e30"]
    line = _one_line_error(run_module("experiments.wmt", *args, check=False))
    found = re.search(r"not finite at step (\d+)", line)
    assert found and 25 <= int(found[1]) <= 26, line  # within a step of the resume at 24
    assert "the last good checkpoint is step 24" in line
    assert _steps(workdir)[-1] == 24
    _assert_same_params(_final_params(workdir), good)


def test_nan_policy_skip_skips_bad_steps_and_goes_on(ding_sample, tmp_path):
    workdir = tmp_path / "skip"
    args = [
        *tiny_training_args(ding_sample, workdir, 6),
        "--learning_rate_scale=1e30",
        "--nan_policy=skip",
    ]
    run_module("experiments.wmt", *args)
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    skipped = sum(r.get("train/skipped_steps", 0) for r in records)
    assert skipped >= 1
    assert _steps(workdir)[-1] == 6
    for leaf in jax.tree.leaves(_final_params(workdir)):
        assert np.isfinite(np.asarray(leaf)).all()


# ----------------------------------------------------------------------------
# 5. A full disk
# ----------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_gives_a_clear_error_and_keeps_earlier_checkpoints(ding_sample, tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    # Room for the vocabulary, the length index and a couple of checkpoints, not more.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(mount)], check=True)
    try:
        workdir = mount / "run"
        args = [*tiny_training_args(ding_sample, workdir, 400)]
        result = run_module("experiments.wmt", *args, check=False)
        line = _one_line_error(result)
        # The checkpoint write or the TensorBoard writer, whichever meets the full disk first.
        assert "No space left on device" in line or "disk full" in line
        steps = _steps(workdir)
        assert steps, "no checkpoint was completed before the disk filled"
        params = _final_params(workdir)  # the newest complete checkpoint still restores
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_run_record_is_replaced_whole_or_not_at_all(tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        results = mount / "results.json"
        record.write_whole(epath.Path(results), '{"step": 1}')
        with pytest.raises(OSError, match="No space left on device"):
            record.write_whole(epath.Path(results), json.dumps({"step": 2, "pad": "x" * 100_000}))
        assert results.read_text() == '{"step": 1}'  # the earlier record, whole
        assert os.listdir(mount) == ["results.json"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ----------------------------------------------------------------------------
# 6. Bad data
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no dictionary lines"),
        ("this line has no separator\nnor this one\n", "holds no dictionary lines"),
    ],
)
def test_an_empty_or_malformed_corpus_gives_one_line(tmp_path, content, message):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "de-en").write_text(content, encoding="utf-8")
    result = run_module(
        "experiments.wmt",
        "--dataset=ding_de_en",
        "--direction=de-en",
        "--preset=tiny",
        f"--manual_dir={manual}",
        f"--data_dir={tmp_path / 'tfds'}",
        "--vocab_size=350",
        "--max_len=32",
        "--row_length=32",
        "--batch_rows=8",
        "--steps=2",
        f"--workdir={tmp_path / 'w'}",
        check=False,
    )
    assert message in _one_line_error(result)


# ----------------------------------------------------------------------------
# 7. A large input into translate: streamed, one line out per line in
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_translate_streams_a_100000_line_input_chunk_by_chunk(trained_workdir):
    """Memory stays bounded because translation streams: the first chunk's lines
    come out while the rest of the input has not been written yet (a translator
    that read all its input first would wait here, and the test would time out)."""
    lines = ["", "Der Hund sieht das Haus.", "  ", "\x00\x01 kaputt", "Die Katze."]
    text = [lines[i % len(lines)] + "\n" for i in range(100_000)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.translate", f"--workdir={trained_workdir}"]
        + ["--beam_size=1", "--chunk_lines=5000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
        encoding="utf-8",
    )
    timer = threading.Timer(600, proc.kill)  # a translator that does not stream
    timer.start()
    try:
        proc.stdin.writelines(text[:5000])
        proc.stdin.flush()
        first = [proc.stdout.readline() for _ in range(5000)]
        assert all(line.endswith("\n") for line in first), "it stopped before a chunk's end"

        def write_the_rest():  # while this thread reads: both pipes are bounded
            proc.stdin.writelines(text[5000:])
            proc.stdin.close()

        writer = threading.Thread(target=write_the_rest)
        writer.start()
        outputs = [line.rstrip("\n") for line in first + proc.stdout.readlines()]
        writer.join()
        assert proc.wait() == 0
    finally:
        timer.cancel()
        proc.kill()
    assert len(outputs) == 100_000
    assert outputs[0] == "" and outputs[2] == "" and outputs[5] == ""
    assert outputs[1] == outputs[6] and outputs[1].strip()
