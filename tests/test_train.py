"""Training: schedule, loss, steps on 1 and 8 devices, accumulation, resume, flags."""

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import struct
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_training_args

from transformer import checkpoint, config, record, sharding, train
from transformer.architecture import build
from transformer.data import datasets, pipeline
from transformer.model import Transformer

# ----------------------------------------------------------------------------
# Schedule and loss
# ----------------------------------------------------------------------------


def test_schedule_is_the_papers_formula():
    schedule = train.learning_rate_schedule(512, 4000)
    paper = lambda step: 512**-0.5 * min(step**-0.5, step * 4000**-1.5)  # noqa: E731
    for step in (1, 100, 4000, 4001, 100_000):
        assert float(schedule(step - 1)) == pytest.approx(paper(step), rel=1e-5)
    rates = np.asarray(jax.vmap(schedule)(jnp.arange(20_000)))
    assert int(np.argmax(rates)) == 3999  # the peak is at step 4000 = warmup
    assert float(train.learning_rate_schedule(512, 4000, scale=2.0)(99)) == pytest.approx(
        2 * paper(100), rel=1e-5
    )


def test_constant_decay_holds_the_peak_after_the_warmup():
    schedule = train.learning_rate_schedule(512, 4000, decay="constant")
    rsqrt = train.learning_rate_schedule(512, 4000)
    peak = 512**-0.5 * 4000**-0.5
    for step in (1, 100, 3999):  # the warmup is the paper's
        assert float(schedule(step - 1)) == pytest.approx(float(rsqrt(step - 1)), rel=1e-6)
    for step in (4000, 4001, 20_000, 100_000):
        assert float(schedule(step - 1)) == pytest.approx(peak, rel=1e-5)
    assert float(rsqrt(99_999)) < peak / 4  # where the paper's has decayed


def test_cooldown_decays_linearly_to_zero_over_the_last_fraction():
    cfg = config.TrainConfig(steps=1000, cooldown_fraction=0.2)
    factors = [train.cooldown_factor(cfg, step, None) for step in (0, 800, 900, 950, 1000)]
    assert factors == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.0])
    # With a time budget that ends first, the time left sets the factor.
    timed = cfg.replace(train_minutes=30.0)
    assert train.cooldown_factor(timed, 100, minutes_left=3.0) == pytest.approx(0.5)
    assert train.cooldown_factor(timed, 100, minutes_left=10.0) == 1.0
    assert train.cooldown_factor(timed, 950, minutes_left=10.0) == pytest.approx(0.25)
    assert train.cooldown_factor(timed, 100, minutes_left=-1.0) == 0.0
    assert train.cooldown_factor(config.TrainConfig(steps=1000), 999, None) == 1.0


def test_label_smoothed_loss_by_hand():
    probs = [0.1, 0.2, 0.3, 0.4]
    logits = jnp.log(jnp.array([[probs, probs]]))  # [R=1, T=2, V=4]
    targets = jnp.array([[3, 0]])  # the second position is padding
    sums = train.cross_entropy_sums(logits, targets, smoothing=0.1)
    low = 0.1 / 3
    cross_entropy = -(0.9 * math.log(0.4) + low * sum(math.log(p) for p in probs[:3]))
    entropy = -(0.9 * math.log(0.9) + 3 * low * math.log(low))
    assert float(sums["loss"]) == pytest.approx(cross_entropy - entropy, rel=1e-5)
    assert float(sums["nll"]) == pytest.approx(-math.log(0.4), rel=1e-5)
    assert float(sums["tokens"]) == 1.0 and float(sums["correct"]) == 1.0


def test_perfect_prediction_has_zero_smoothed_loss():
    v, eps = 5, 0.1
    target_dist = np.full(v, eps / (v - 1))
    target_dist[2] = 1 - eps
    sums = train.cross_entropy_sums(jnp.log(jnp.array([[target_dist]])), jnp.array([[2]]), eps)
    assert float(sums["loss"]) == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------
# Steps on real batches of the sample corpus
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batches(ding_sample, sample_vocab, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train_batches")
    (workdir / "vocab.model").write_bytes(sample_vocab.proto)
    data = pipeline.train_data(ding_sample, str(workdir), 350, max_len=32, seed=0)
    iterator = data.iterator()
    return [next(iterator) for _ in range(4)]


def _run_steps(model_cfg, train_cfg, batches, mesh_spec="data:1", devices=None, host=False):
    """Losses and final params of training from the same init on a given mesh.

    host: the batches go to the step as the loop gives them on one CPU process,
    as numpy arrays (`sharding.batch_placer`); else as global device arrays.
    """
    devices = jax.devices()[:1] if devices is None else devices
    sizes = sharding.parse_mesh(mesh_spec, len(devices))
    mesh = sharding.make_mesh(sizes, devices)
    model = build(model_cfg)
    optimizer = train.make_optimizer(model_cfg, train_cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
        state, shardings = train.create_state(model, optimizer, train_cfg.seed, mesh)
        step = train.jit_train_step(model, optimizer, train_cfg, mesh, shardings)
        place = functools.partial(sharding.global_batch, mesh)
        if host:
            place = sharding.batch_placer(mesh)
        losses = []
        for batch in batches:
            state, metrics = step(state, place(batch), np.float32(1))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params)


MODEL = config.preset("tiny").replace(vocab_size=350, max_len=32)
TRAIN = config.TrainConfig(warmup_steps=10, learning_rate_scale=5.0)


def test_a_few_steps_reduce_the_loss(batches):
    losses, _ = _run_steps(MODEL, TRAIN, batches * 3)
    assert losses[-1] < losses[0] - 0.3, losses


def _assert_params_close(a, b, atol):
    """Compares parameters after a few Adam steps. Adam's first steps move every
    parameter by about the learning rate whatever the size of its gradient, so
    near-zero gradients turn summation-order rounding into visible differences;
    hence a tolerance well below the step size, not float precision. Attention key
    biases are skipped: softmax ignores them (q.b is the same for every key), their
    gradient is pure rounding noise."""
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        if "['key']['bias']" not in jax.tree_util.keystr(path):
            np.testing.assert_allclose(x, y, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def one_device(batches):
    """Losses and params of the reference run on one device, shared by the meshes."""
    return _run_steps(MODEL, TRAIN, batches)


@pytest.mark.parametrize(
    "mesh_spec, host", [("data:8", False), ("data:4,tensor:2", False), ("data:2,fsdp:4", True)]
)
def test_eight_devices_give_the_same_losses_as_one(batches, one_device, mesh_spec, host):
    """host: the last mesh's rows reach the step as numpy arrays, split by its jit."""
    one, params_one = one_device
    if host:
        placed = sharding.batch_placer(sharding.make_mesh(sharding.parse_mesh(mesh_spec, 8)))
        assert placed(batches[0]) is batches[0]  # a CPU process: no device_put of its own
    eight, params_eight = _run_steps(MODEL, TRAIN, batches, mesh_spec, jax.devices()[:8], host)
    np.testing.assert_allclose(eight, one, rtol=2e-5)
    _assert_params_close(params_one, params_eight, atol=2e-3)


def test_the_lstm_baseline_on_eight_devices_gives_the_same_losses_as_one(batches):
    lstm = MODEL.replace(architecture="lstm")
    one, params_one = _run_steps(lstm, TRAIN, batches[:2])
    eight, params_eight = _run_steps(lstm, TRAIN, batches[:2], "data:4,tensor:2", jax.devices()[:8])
    assert one[1] < one[0]  # it learns
    np.testing.assert_allclose(eight, one, rtol=2e-5)
    _assert_params_close(params_one, params_eight, atol=2e-3)


def test_gradient_accumulation_equals_one_larger_batch(batches):
    model_cfg = MODEL.replace(dropout=0.0)
    model = Transformer(model_cfg)
    batch = jax.tree.map(jnp.asarray, batches[0])
    params = nn.unbox(model.init(jax.random.key(0), batch["inputs"], batch["targets"])["params"])
    grads = jax.jit(train._gradient_sums, static_argnums=(3, 4))
    whole, sums_whole = grads(params, batch, jax.random.key(1), model, TRAIN)
    split, sums_split = grads(
        params, batch, jax.random.key(1), model, TRAIN.replace(grad_accum_steps=4)
    )
    for key in sums_whole:
        assert float(sums_split[key]) == pytest.approx(float(sums_whole[key]), rel=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(whole))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale)
    # And through the whole step: the same losses.
    one, _ = _run_steps(model_cfg, TRAIN, batches[:2])
    four, _ = _run_steps(model_cfg, TRAIN.replace(grad_accum_steps=4), batches[:2])
    np.testing.assert_allclose(four, one, rtol=1e-5)


def test_non_finite_steps_leave_the_state_unchanged(batches):
    model = Transformer(MODEL)
    optimizer = train.make_optimizer(MODEL, TRAIN)
    mesh = sharding.make_mesh(sharding.parse_mesh("data:1", 1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        state, shardings = train.create_state(model, optimizer, 0, mesh)
        step = train.jit_train_step(model, optimizer, TRAIN, mesh, shardings)
        poisoned = jax.tree.map(
            lambda p: p.at[...].set(jnp.nan) if p.ndim == 2 else p, state.params
        )
        before = jax.device_get(poisoned)
        state = state.replace(params=poisoned)
        state, metrics = step(state, sharding.global_batch(mesh, batches[0]), np.float32(1))
    assert int(metrics["nonfinite"]) == 1 and int(state.step) == 1
    for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # The schedule did not advance either: the next step reports the rate it applies.
    with jax.set_mesh(mesh):
        fresh, _ = train.create_state(model, optimizer, 0, mesh)
        state = state.replace(params=fresh.params)
        _, metrics = step(state, sharding.global_batch(mesh, batches[0]), np.float32(1))
    schedule = train.learning_rate_schedule(
        MODEL.d_model, TRAIN.warmup_steps, TRAIN.learning_rate_scale, TRAIN.lr_decay
    )
    assert int(metrics["nonfinite"]) == 0
    np.testing.assert_allclose(metrics["learning_rate"], schedule(0), rtol=1e-6)
    assert schedule(0) != schedule(1)


def test_the_learning_rate_factor_scales_the_update(batches):
    model = Transformer(MODEL)
    optimizer = train.make_optimizer(MODEL, TRAIN)
    step = jax.jit(
        functools.partial(train.train_step, model=model, optimizer=optimizer, train=TRAIN)
    )
    mesh = sharding.make_mesh(sharding.parse_mesh("data:1", 1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        state, _ = train.create_state(model, optimizer, 0, mesh)
    batch = jax.tree.map(jnp.asarray, batches[0])
    before = jax.device_get(state.params)
    moved = {}
    for factor in (1.0, 0.5, 0.0):
        new_state, metrics = step(state, batch, np.float32(factor))
        moved[factor] = jax.tree.map(np.subtract, jax.device_get(new_state.params), before)
        assert float(metrics["learning_rate"]) == pytest.approx(
            factor * float(train.learning_rate_schedule(MODEL.d_model, 10, 5.0)(0)), rel=1e-6
        )
    for full, half, none in zip(*(jax.tree.leaves(moved[f]) for f in (1.0, 0.5, 0.0)), strict=True):
        np.testing.assert_allclose(half, 0.5 * full, rtol=1e-5, atol=1e-9)
        np.testing.assert_array_equal(none, 0.0)
    assert max(float(np.abs(x).max()) for x in jax.tree.leaves(moved[1.0])) > 1e-4


# ----------------------------------------------------------------------------
# The entry point, end to end (subprocesses, tiny model, sample corpus)
# ----------------------------------------------------------------------------

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")


def _wmt(*args, check=True, cwd=None):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.wmt", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def _tiny_args(ding_sample, workdir, steps):
    return tiny_training_args(ding_sample, workdir, steps)


def _losses(workdir):
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}


def test_a_stopped_run_resumes_where_it_stopped(ding_sample, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert "MFU against 0.10 TFLOP/s (given)" in _wmt(*_tiny_args(ding_sample, straight, 12)).stdout
    _wmt(*_tiny_args(ding_sample, resumed, 6))
    second = _wmt(*_tiny_args(ding_sample, resumed, 12))
    assert "resumed from step 6" in second.stdout
    expected, got = _losses(straight), _losses(resumed)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose(
        [got[s] for s in range(7, 13)], [expected[s] for s in range(7, 13)], rtol=1e-6
    )
    results, unbroken = (json.loads((w / "results.json").read_text()) for w in (resumed, straight))
    assert results["step"] == 12
    assert results["validation_loss"] == pytest.approx(unbroken["validation_loss"], rel=1e-5)


def test_a_relative_workdir_saves_resumes_and_translates(ding_sample, tmp_path):
    # As the README's demo command gives it: --workdir=workdirs/ding.
    args = [a for a in _tiny_args(ding_sample, "x", 4) if not a.startswith("--workdir")]
    _wmt(*args, "--checkpoint_every=2", "--workdir=runs/rel", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "runs/rel/checkpoints")) == ["2", "4"]
    resumed = _wmt(*args, "--checkpoint_every=2", "--steps=6", "--workdir=runs/rel", cwd=tmp_path)
    assert "resumed from step 4" in resumed.stdout
    translated = subprocess.run(
        [sys.executable, "-m", "experiments.translate", "--workdir=runs/rel", "--beam_size=1"],
        input="Das Haus.\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert translated.returncode == 0, translated.stderr[-2000:]
    assert len(translated.stdout.splitlines()) == 1


def _flagfile_values(path: str) -> dict[str, str]:
    """--name=value of a flagfile and the flagfiles it names, the last one of a name winning."""
    values = {}
    for line in open(path):
        if not line.startswith("--"):
            continue
        name, equals, value = line.strip().removeprefix("--").partition("=")
        if not equals:  # absl's boolean forms: --name, --noname
            name, value = (name[2:], "false") if name.startswith("no") else (name, "true")
        if name == "flagfile":  # named from the repository's root, as a user runs it
            values.update(_flagfile_values(os.path.join(CONFIGS, "..", "..", value)))
        else:
            values[name] = value
    return values


def _same(flag_value: str, field_value) -> bool:
    if isinstance(field_value, bool):
        return flag_value.lower() in (("true", "1") if field_value else ("false", "0"))
    if isinstance(field_value, int | float):
        return float(flag_value) == field_value
    return flag_value == ("" if field_value is None else str(field_value))


@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_every_shipped_flagfile_validates_and_reaches_the_configs(name):
    path = os.path.join(CONFIGS, name)
    configs = json.loads(_wmt(f"--flagfile={path}", "--check_only").stdout)
    fields = {k: v for section in configs.values() for k, v in section.items()}
    checked = 0
    for flag, value in _flagfile_values(path).items():
        if flag in fields and value != "auto":  # --dtype=auto is resolved on the host
            assert _same(value, fields[flag]), (flag, value, fields[flag])
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset=huge"], "--preset"),
        (["--steps=-5"], "steps must be a positive integer"),
        (["--d_model=30"], "not divisible by --num_heads"),
        (["--dataset=wmt99"], "--dataset"),
        (["--dataset=ding_de_en", "--direction=fr-en"], "direction must be de-en or en-de"),
        (["--batching=packed", "--max_len=512", "--row_length=256"], "row_length"),
        (["--mesh=data:3"], "has 3 devices but there are 1"),
        (["--mesh=data:-1,tensor:2"], "does not divide the 1 devices"),
        (["--mesh=model:2"], "mesh axis 'model' unknown"),
        (["--label_smoothing=1.5"], "label_smoothing"),
        (["--lr_decay=cosine"], "--lr_decay"),
        (["--architecture=auto"], "value should be one of <transformer|lstm>"),
        (["--final_eval_split=bogus"], "--final_eval_split=bogus: value should be one of"),
        (["--final_eval_average_last=6"], "final_eval_average_last (6) exceeds keep_checkpoints"),
        (["--check_only", "--mesh=garbage"], "mesh must look like"),
        (["--check_only", "--mesh=model:2"], "mesh axis 'model' unknown"),
        ([], "--workdir is required"),
        # Once jax.distributed's ValueError, a traceback; -1 was taken for one process.
        (["--num_processes=2", "--process_id=0"], "needs --coordinator_address=HOST:PORT"),
        (
            ["--num_processes=2", "--process_id=3", "--coordinator_address=localhost:1"],
            "--process_id must be from 0 to 1, got 3",
        ),
    ],
)
def test_a_wrong_flag_exits_1_with_one_line(args, message, tmp_path):
    workdir = [] if args == [] else [f"--workdir={tmp_path}"]
    result = _wmt(*args, *workdir, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert message in lines[0] and lines[0].startswith("experiments.wmt: error:")
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("asked", ["--help", "--helpfull"])
def test_help_asked_for_exits_0(asked):
    result = _wmt(asked, check=False)
    assert result.returncode == 0 and "--flagfile" in result.stdout + result.stderr


def test_the_final_evaluation_uses_the_mean_of_the_last_checkpoints(
    ding_sample, trained_workdir, tmp_path
):
    """The paper evaluates a single model, the mean of the last 5 (base) or 20 (big)
    checkpoints. The mean restored into the run's own parameter layout is the one
    experiments.average computes on the host, and the run reports which it used."""
    from transformer import loop, trained

    workdir = str(trained_workdir)  # checkpoints 80, 160, 240
    model = record.read_configs(workdir).model
    params = trained.load_params(workdir, model, 240)
    mean, steps = loop.average_last(workdir, params, 2)
    assert steps == [160, 240]
    expected = trained.average_params(workdir, model, [160, 240])
    for got, want in zip(jax.tree.leaves(mean), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(got, last) for got, last in zip(
        jax.tree.leaves(mean), jax.tree.leaves(params), strict=True
    ))  # fmt: skip

    run = tmp_path / "averaged"
    args = [*tiny_training_args(ding_sample, run, 8), "--final_eval_average_last=2"]
    result = _wmt(*args)
    assert "final evaluation with the mean of checkpoints 4, 8" in result.stdout
    assert json.loads((run / "results.json").read_text())["averaged_steps"] == [4, 8]
    # experiments.evaluate reproduces it: the same mean unless told otherwise.
    (tmp_path / "src.txt").write_text("Das Haus ist schön.\n")
    (tmp_path / "ref.txt").write_text("The house is nice.\n")
    evaluated = subprocess.run(
        [
            sys.executable, "-m", "experiments.evaluate", f"--workdir={run}", "--beam_size=1",
            f"--source_file={tmp_path / 'src.txt'}", f"--reference_file={tmp_path / 'ref.txt'}",
        ],
        capture_output=True, text=True, check=True,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
    )  # fmt: skip
    assert json.loads(evaluated.stdout.splitlines()[-1])["steps"] == [4, 8]


def test_check_only_leaves_the_device_count_to_the_run(tmp_path):
    # A TPU flagfile's mesh is checked on a laptop for its form, not its size.
    mesh = ["--preset=tiny", "--mesh=data:8,tensor:4"]
    assert json.loads(_wmt(*mesh, "--check_only").stdout)["model"]["d_model"] == 32
    run = _wmt(*mesh, f"--workdir={tmp_path / 'w'}", check=False)  # here: 1 device
    assert run.returncode == 1 and "has 32 devices but there are 1" in run.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "config.json is not valid JSON"),
        ('{"model": {}}', "config.json is not a training config"),
    ],
)
def test_a_damaged_config_json_is_named_and_kept(ding_sample, tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    result = _wmt(*_tiny_args(ding_sample, tmp_path, 2), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert message in lines[0]
    assert (tmp_path / "config.json").read_text() == content  # not overwritten
    assert not (tmp_path / "checkpoints").exists()


def test_a_file_as_workdir_is_named(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("keep me")
    result = _wmt("--preset=tiny", f"--workdir={path}", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert f"{path} is a file, not a folder" in lines[0]
    assert path.read_text() == "keep me"


def test_a_workdir_of_another_model_is_refused(ding_sample, tmp_path):
    _wmt(*_tiny_args(ding_sample, tmp_path, 2))
    result = _wmt(*_tiny_args(ding_sample, tmp_path, 4), "--d_ff=128", check=False)
    assert result.returncode == 1
    assert "different config (d_ff)" in result.stderr.strip().splitlines()[-1]
    # The compute dtype is not part of the model: a run may resume with another.
    resumed = _wmt(*_tiny_args(ding_sample, tmp_path, 4), "--dtype=bfloat16", "--remat")
    assert "resumed from step 2" in resumed.stdout
    model = json.loads((tmp_path / "config.json").read_text())["model"]
    assert model["dtype"] == "bfloat16" and model["remat"] is True


def test_a_rerun_keeps_the_workdirs_record_unless_it_trains(ding_sample, tmp_path):
    _wmt(*_tiny_args(ding_sample, tmp_path, 2))
    results, config_json = tmp_path / "results.json", tmp_path / "config.json"
    results.write_text(json.dumps({**json.loads(results.read_text()), "test_sacrebleu": 1.5}))
    # Nothing left to train and no final split: the earlier scores of step 2 stay, and
    # a run stopped by a signal at step 2 is now one that ended there.
    results.write_text(json.dumps({**json.loads(results.read_text()), "preempted": True}))
    for steps in (2, 1):
        rerun = _wmt(*_tiny_args(ding_sample, tmp_path, steps))
        assert f"step 2 is at or past --steps={steps}: nothing to train" in rerun.stdout
        assert json.loads(results.read_text())["test_sacrebleu"] == 1.5
        assert "preempted" not in json.loads(results.read_text())
    recorded = config_json.read_bytes()
    # Another direction is another run.
    args = [a.replace("=de-en", "=en-de") for a in _tiny_args(ding_sample, tmp_path, 4)]
    result = _wmt(*args, check=False)
    assert result.returncode == 1
    assert "trained on other data (direction de-en -> en-de)" in result.stderr.splitlines()[-1]
    # A run that cannot start (its checkpoint is gone) leaves the record as it was.
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "params")
    result = _wmt(*_tiny_args(ding_sample, tmp_path, 4), check=False)
    assert result.returncode == 1 and "checkpoints/2" in result.stderr.splitlines()[-1]
    assert config_json.read_bytes() == recorded
    assert json.loads(results.read_text())["test_sacrebleu"] == 1.5


def test_init_from_is_checked_before_any_work_and_brings_its_vocabulary(ding_sample, tmp_path):
    source, fresh = tmp_path / "source", tmp_path / "fresh"
    _wmt(*_tiny_args(ding_sample, source, 2))
    for flags, message in (
        ([f"--init_from={tmp_path / 'nope'}"], "is not a training workdir"),
        ([f"--init_from={source}", "--d_ff=96"], "trained a model of other shapes (d_ff"),
    ):
        result = _wmt(*_tiny_args(ding_sample, fresh, 2), *flags, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
        assert lines[0].startswith("experiments.wmt: error: --init_from=") and message in lines[0]
        assert not fresh.exists()  # refused before a vocabulary or a step was made
    # A vocabulary sample of another size would train another vocabulary: the
    # parameters index the source's, which the new workdir takes.
    out = _wmt(
        *_tiny_args(ding_sample, fresh, 2), f"--init_from={source}", "--vocab_sample_size=500"
    )
    assert (fresh / "vocab.model").read_bytes() == (source / "vocab.model").read_bytes()
    assert f"initialized parameters from {source} step 2" in out.stdout


def test_every_long_phase_of_a_run_shows_progress(ding_sample, tmp_path):
    # A new workdir trains a vocabulary; a copy of the corpus without the token ids
    # that other runs wrote tokenizes the split again.
    data_dir = tmp_path / "tfds"
    shutil.copytree(ding_sample.data_dir, data_dir, ignore=shutil.ignore_patterns("token_ids"))
    args = [
        *_tiny_args(ding_sample, tmp_path / "run", 2),
        f"--data_dir={data_dir}",
        "--final_eval_split=test",
    ]
    out = _wmt(*args, "--peak_tflops=0").stdout
    assert "MFU against " in out and " TFLOP/s (measured float32 matmul on cpu)" in out, out
    tests = len(datasets.load_split(ding_sample, "test"))
    for line in (
        "training a 350-piece SentencePiece unigram vocabulary on",
        "reading the vocabulary's sample: ",
        "vocabulary of 350 pieces written to",
        "tokenizing the train split: ",
        f"translating the test split: {tests}/{tests} sentences",
    ):
        assert line in out, out


def test_a_resume_with_other_batch_settings_names_them(tmp_path):
    from transformer.loop import Setup

    setup = Setup(
        model=config.preset("tiny"), train=config.TrainConfig(), data=config.DataConfig(),
        decode=config.DecodeConfig(), workdir=str(tmp_path),
    )  # fmt: skip
    record.write_config(str(tmp_path), setup.configs())
    assert record.replanned(str(tmp_path), setup.configs()) == []
    more_rows = setup.data.replace(batch_rows=2 * setup.data.batch_rows)
    other = dataclasses.replace(
        setup, data=more_rows, train=setup.train.replace(seed=3, grad_accum_steps=2, steps=9)
    )
    rows = f"batch_rows {setup.data.batch_rows} -> {more_rows.batch_rows}"
    # Packed rows are whole in every micro-batch: accumulating does not change the plan.
    assert record.replanned(str(tmp_path), other.configs()) == [rows, "seed 0 -> 3"]


def test_a_slow_host_trains_without_dropout(tmp_path, capsys):
    from transformer.loop import Setup, fit_recipe_to_host

    mesh = sharding.make_mesh(sharding.parse_mesh("data:-1", jax.device_count()))
    model = config.preset("tiny").replace(dropout=0.1, relu_dropout=0.1, max_len=32)
    data = config.DataConfig(batch_rows=8, row_length=32, max_len=32)
    recipe = config.TrainConfig(train_minutes=0.01, dropout_min_steps=10_000)
    setup = Setup(
        model=model, train=recipe, data=data, decode=config.DecodeConfig(), workdir=str(tmp_path)
    )
    slow = fit_recipe_to_host(setup, mesh)  # 0.6 s buys no tiny model 10,000 steps
    assert (slow.model.dropout, slow.model.relu_dropout) == (0.0, 0.0)
    assert slow.model.replace(dropout=0.1, relu_dropout=0.1) == model
    assert "training without dropout" in capsys.readouterr().out
    ample = dataclasses.replace(setup, train=recipe.replace(train_minutes=600, dropout_min_steps=2))
    assert fit_recipe_to_host(ample, mesh).model == model
    assert "dropout 0.1 kept" in capsys.readouterr().out
    # Bucketed rows for 3 micro-batches: a multiple of 3 (and of the devices).
    bucketed = dataclasses.replace(
        setup, data=data.replace(batching="bucketed", tokens_per_batch=96),
        train=recipe.replace(grad_accum_steps=3), workdir=str(tmp_path / "bucketed"),
    )  # fmt: skip
    assert fit_recipe_to_host(bucketed, mesh).model == slow.model
    assert "training without dropout" in capsys.readouterr().out
    # A resumed run keeps what its workdir recorded, whatever the host measures now,
    # also when it trains on by steps alone (once refused as a model of other dropout).
    record.write_config(str(tmp_path), slow.configs())
    assert fit_recipe_to_host(ample, mesh).model == slow.model
    by_steps = dataclasses.replace(setup, train=recipe.replace(train_minutes=0))
    assert fit_recipe_to_host(by_steps, mesh).model == slow.model
    assert capsys.readouterr().out == ""


def test_a_config_json_from_before_a_field_existed_still_resumes(tmp_path):
    configs = record.Configs(
        config.preset("tiny"), config.DataConfig(), config.TrainConfig(), config.DecodeConfig()
    )
    record.write_config(str(tmp_path), configs)
    path = tmp_path / "config.json"
    written = json.loads(path.read_text())
    del written["model"]["layer_norm_epsilon"]  # a field with a default: it had that value
    path.write_text(json.dumps(written))
    record.write_config(str(tmp_path), configs)
    assert json.loads(path.read_text())["model"]["layer_norm_epsilon"] == 1e-6
    del written["model"]["d_model"]  # a shape field has no "then": the model is unknown
    path.write_text(json.dumps(written))
    with pytest.raises(checkpoint.CheckpointError, match=r"different config \(d_model\)"):
        record.write_config(str(tmp_path), configs)


def test_a_config_json_with_decoding_in_its_train_record_reads_the_same(tmp_path):
    # Before DecodeConfig, beam size, length penalty and MBR were TrainConfig fields.
    decode = config.DecodeConfig(beam_size=8, length_penalty=2.5, mbr=8, mbr_samples=32)
    configs = record.Configs(
        config.preset("tiny"), config.DataConfig(), config.TrainConfig(), decode
    )
    record.write_config(str(tmp_path), configs)
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    old["train"].update(old.pop("decode"))
    del old["train"]["max_extra"], old["train"]["mbr_seed"]  # not settings back then
    path.write_text(json.dumps(old))
    assert record.read_configs(str(tmp_path)) == configs


def test_the_loop_anneals_the_learning_rate(ding_sample, tmp_path):
    # Warmup 2 then the held peak, decaying over the last half of the run.
    args = ["--cooldown_fraction=0.5", "--lr_decay=constant", "--warmup_steps=2"]
    _wmt(*_tiny_args(ding_sample, tmp_path, 6), *args)
    logged = [
        json.loads(line)["train/learning_rate"]
        for line in open(tmp_path / "metrics.jsonl")
        if "train/learning_rate" in line
    ]
    cfg = config.TrainConfig(steps=6, cooldown_fraction=0.5)
    schedule = train.learning_rate_schedule(config.preset("tiny").d_model, 2, decay="constant")
    expected = [float(schedule(s)) * train.cooldown_factor(cfg, s, None) for s in range(6)]
    np.testing.assert_allclose(logged, expected, rtol=1e-5)
    assert logged[5] < float(schedule(5)) / 2  # the last step runs at a third of the rate
    # TensorBoard holds the same series as metrics.jsonl.
    events = _tensorboard_scalars(tmp_path / "tensorboard")
    np.testing.assert_allclose(events["train/learning_rate"], logged, rtol=1e-6)


def _tensorboard_scalars(folder) -> dict[str, list[float]]:
    """Scalars of the event files in `folder`, read as TFRecords (length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    series = {}
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                series.setdefault(value.tag, []).append(value.simple_value)
    return series


def test_dtype_auto_resolves_to_a_real_dtype(tmp_path):
    configs = json.loads(_wmt("--preset=tiny", "--dtype=auto", "--check_only").stdout)
    assert configs["model"]["dtype"] in ("float32", "bfloat16")


@pytest.mark.parametrize(
    "bf16, f32, expected", [(0.4, 0.2, "bfloat16"), (0.08, 0.13, "float32"), (0.21, 0.2, "float32")]
)
def test_auto_dtype_takes_bfloat16_only_where_clearly_faster(monkeypatch, bf16, f32, expected):
    from transformer import flops

    peaks = {"bfloat16": bf16 * 1e12, "float32": f32 * 1e12}
    monkeypatch.setattr(flops, "measured_matmul_peak", lambda dtype="float32", **_: peaks[dtype])
    monkeypatch.setattr(flops, "cpu_has_bfloat16", lambda: True)
    assert flops.fastest_dtype() == expected


def test_auto_dtype_never_times_bfloat16_on_a_cpu_without_bfloat16_instructions(monkeypatch):
    # An AVX2-only CPU runs bfloat16 in software; on a busy machine one timing
    # once made it look faster than float32 (0.09 against a disturbed float32).
    from transformer import flops

    def measured(dtype="float32", **_):
        raise AssertionError(f"measured {dtype} although the CPU has no bfloat16 instructions")

    monkeypatch.setattr(flops, "measured_matmul_peak", measured)
    monkeypatch.setattr(flops, "cpu_has_bfloat16", lambda: False)
    assert flops.fastest_dtype() == "float32"


_ZEN3 = (
    "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2 sha_ni vaes\nbugs\t\t: sysret_ss_attrs\n"
)
_SAPPHIRE = "flags\t\t: avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile\n"
_ZEN4 = "flags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n"
_GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 sve2\n"
_NEOVERSE_N1 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        (_ZEN3, False),
        (_SAPPHIRE, True),
        (_ZEN4, True),
        (_GRAVITON3, True),
        (_NEOVERSE_N1, False),
        ("processor\t: 0\n", None),
    ],
)
def test_cpu_bfloat16_instructions_are_read_from_cpuinfo(cpuinfo, expected):
    from transformer import flops

    assert flops.cpu_has_bfloat16(cpuinfo) is expected


# ----------------------------------------------------------------------------
# The compilation cache: a resumed run does not compile its step again
# ----------------------------------------------------------------------------


def test_the_compilation_cache_goes_to_the_workdir_on_accelerators_only(monkeypatch):
    from experiments.cli import compilation_cache_dir

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compilation_cache_dir("auto", "gs://b/run", "tpu") == "gs://b/run/compilation_cache"
    assert compilation_cache_dir("auto", "/w", "gpu") == "/w/compilation_cache"
    assert compilation_cache_dir("auto", "/w", "cpu") is None
    assert compilation_cache_dir("off", "/w", "tpu") is None
    assert compilation_cache_dir("/c", "/w", "cpu") == "/c"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/env")  # the user's, in auto's place
    assert compilation_cache_dir("auto", "/w", "tpu") == "/env"
    assert compilation_cache_dir("off", "/w", "tpu") is None
    assert compilation_cache_dir("/c", "/w", "tpu") == "/c"


def test_a_compilation_cache_folder_that_cannot_be_made_is_one_line(ding_sample, tmp_path):
    from conftest import run_module

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    args = tiny_training_args(ding_sample, tmp_path / "run", 4)
    result = run_module(
        "experiments.wmt", *args, f"--compilation_cache={blocker}/cache", check=False
    )
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, lines[-5:]
    assert lines[0].startswith(f"experiments.wmt: error: --compilation_cache={blocker}/cache")
    assert "cannot make that folder" in lines[0] and blocker.read_text() == ""
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_cache_folder_that_cannot_be_made_is_named_as_it_was_given(monkeypatch, tmp_path):
    from experiments import cli

    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/dev/null/env")
    with pytest.raises(cli.UserError, match=r"^JAX_COMPILATION_CACHE_DIR=/dev/null/env: cannot"):
        cli.use_compilation_cache("auto", str(tmp_path))
    with pytest.raises(cli.UserError, match=r"^--compilation_cache=/dev/null/c: cannot make"):
        cli.use_compilation_cache("/dev/null/c", str(tmp_path))


def test_a_resumed_run_reads_its_step_from_the_compilation_cache(ding_sample, tmp_path):
    """--compilation_cache=DIR on this CPU (auto would keep none here): the first
    run writes its programs there, the resumed one finds its train step."""
    from conftest import run_module

    workdir, cache = tmp_path / "run", tmp_path / "cache"
    args = [*tiny_training_args(ding_sample, workdir, 4), f"--compilation_cache={cache}"]
    run_module("experiments.wmt", *args)
    assert any(name.startswith("jit_train_step") for name in os.listdir(cache))
    log = {"JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}  # says which programs it read
    result = run_module("experiments.wmt", *args, "--steps=8", env=log)
    assert "resumed from step 4" in result.stdout.decode()
    assert "Persistent compilation cache hit for 'jit_train_step'" in result.stderr.decode()
    assert not (workdir / "compilation_cache").exists()


# ----------------------------------------------------------------------------
# No retracing: after its first steps, a run compiles nothing more
# ----------------------------------------------------------------------------


def test_compilations_do_not_grow_with_steps(ding_sample, tmp_path, monkeypatch):
    """Compilations (jax.monitoring events; a persistent cache's hits included),
    counted at each report of a 60-step run: none between the first report (step
    10) and the last. The learning rate's factor changes every step (the
    cooldown), and every report fetches and summarizes metrics, so a value or a
    shape that reached a compiled function's signature would show here."""
    from transformer import loop

    compiled, at_report = [], {}

    def listener(event, duration, **kwargs):  # a compilation, or one read from the cache
        if event in (
            "/jax/core/compile/backend_compile_duration",
            "/jax/compilation_cache/cache_retrieval_time_sec",
        ):
            compiled.append(duration)

    real_report = loop.Progress.report

    def counting_report(self, step, minutes_left):
        result = real_report(self, step, minutes_left)
        at_report[step] = len(compiled)
        return result

    monkeypatch.setattr(loop.Progress, "report", counting_report)
    setup = loop.Setup(
        model=config.preset("tiny").replace(vocab_size=350, max_len=32),
        train=config.TrainConfig(
            steps=60, warmup_steps=10, log_every=10, eval_every=0, eval_bleu_sentences=0,
            final_eval_split="", checkpoint_every=0, checkpoint_minutes=0,
            cooldown_fraction=0.5,  # the learning rate's factor changes every step
        ),
        data=ding_sample.replace(batch_rows=8, row_length=32, max_len=32, num_threads=1),
        decode=config.DecodeConfig(),
        workdir=str(tmp_path),
    )  # fmt: skip
    train.training_program.cache_clear()  # the run compiles its step itself
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        loop.train_and_evaluate(setup)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert sorted(at_report) == [10, 20, 30, 40, 50, 60]
    assert at_report[10] > 0  # the counter does see compilations (the train step's own)
    assert at_report[60] == at_report[10], at_report


def test_timing_the_step_on_this_host_compiles_it_for_the_run(
    ding_sample, tmp_path, caplog, capsys
):
    """The step timed to decide on dropout and the run's step are one compilation
    (and so is the state's initialization): seconds of a CPU run saved."""
    from transformer.loop import Setup, train_and_evaluate

    setup = Setup(
        model=config.preset("tiny").replace(vocab_size=350, max_len=32, dropout=0.1),
        train=config.TrainConfig(
            steps=3, warmup_steps=10, log_every=50, eval_every=0, eval_bleu_sentences=0,
            final_eval_split="", checkpoint_every=0, checkpoint_minutes=0,
            train_minutes=600, dropout_min_steps=2,
        ),
        data=ding_sample.replace(batch_rows=8, row_length=32, max_len=32, num_threads=1),
        decode=config.DecodeConfig(),
        workdir=str(tmp_path),
    )  # fmt: skip
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        train_and_evaluate(setup)
    assert "dropout 0.1 kept" in capsys.readouterr().out  # the step was timed
    messages = [record.getMessage() for record in caplog.records]
    compiled = [m.split()[4] for m in messages if m.startswith("Finished XLA compilation of")]
    assert compiled.count("jit(train_step)") == 1, compiled
    assert compiled.count("jit(initial)") == 1, compiled


def test_saving_a_checkpoint_is_not_training_time(ding_sample, tmp_path, monkeypatch):
    """Saves counted against the time budget once: a budget that ran out in the
    save of step n ended the run at n, recorded short of the budget, and a rerun
    trained a step more. Here each save takes ten minutes of the loop's clock."""
    import types

    from transformer import loop

    offset, real_save = [0.0], checkpoint.save

    def ten_minutes_save(*args, **kwargs):
        real_save(*args, **kwargs)
        offset[0] += 600.0

    fake = types.SimpleNamespace(monotonic=lambda: time.monotonic() + offset[0])
    monkeypatch.setattr(loop, "time", fake)
    monkeypatch.setattr(checkpoint, "save", ten_minutes_save)
    setup = loop.Setup(
        model=config.preset("tiny").replace(vocab_size=350, max_len=32, dropout=0.0),
        train=config.TrainConfig(
            steps=2, warmup_steps=10, log_every=50, eval_every=0, eval_bleu_sentences=0,
            final_eval_split="", checkpoint_every=1, checkpoint_minutes=0, train_minutes=5,
        ),
        data=ding_sample.replace(batch_rows=8, row_length=32, max_len=32, num_threads=1),
        decode=config.DecodeConfig(),
        workdir=str(tmp_path),
    )  # fmt: skip
    results = loop.train_and_evaluate(setup)
    assert offset[0] == 1200.0  # two saves, at steps 1 and 2
    assert results["step"] == 2 and results["train_minutes"] < 5


def test_gradient_clipping_scales_the_gradient_and_keeps_adams_state():
    model, params = config.preset("tiny"), {"w": jnp.zeros(3), "b": jnp.zeros(2)}
    plain = train.make_optimizer(model, config.TrainConfig())
    clipped = train.make_optimizer(model, config.TrainConfig(grad_clip_norm=1.0))
    assert jax.tree.structure(clipped.init(params)) == jax.tree.structure(plain.init(params))
    # A first gradient of norm 50 (clipped to 1), then one of norm 0.5 (kept): Adam
    # sees their ratio, so the second update tells clipping from none.
    grads = [{"w": jnp.full(3, 30.0 / 3**0.5), "b": jnp.full(2, 40.0 / 2**0.5)}]
    grads.append(jax.tree.map(lambda g: g / 100, grads[0]))
    by_hand = [jax.tree.map(lambda g: g / 50, grads[0]), grads[1]]

    def updates(optimizer, sequence):
        state, out = optimizer.init(params), []
        for g in sequence:
            u, state = optimizer.update(g, state, params)
            out.append(np.concatenate([np.asarray(u["b"]), np.asarray(u["w"])]))
        return out

    ours, expected, unclipped = (
        updates(clipped, grads),
        updates(plain, by_hand),
        updates(plain, grads),
    )
    np.testing.assert_allclose(ours[1], expected[1], rtol=1e-5)
    assert not np.allclose(ours[1], unclipped[1], rtol=1e-2)
