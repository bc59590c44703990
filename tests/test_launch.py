"""Launch scripts: the gcloud commands they run, dry runs, bad input, the scripts run on VMs.

The launchers run as real subprocesses with a fake `gcloud` first on PATH; it
records its arguments (and, for scp, the archive's file names) as JSON lines.
The bash that would run on the VMs runs here for real, in a scratch HOME.
"""

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from launch import accelerators, remote  # noqa: E402
from launch.cli import UserError  # noqa: E402

BASE = "experiments/configs/wmt14_ende_base.flags"
BIG = "experiments/configs/wmt14_ende_big.flags"

FAKE_GCLOUD = """\
#!{python}
import json, os, sys, tarfile, time
args = sys.argv[1:]
record = {{"argv": args}}
if "scp" in args:
    archive = next(a for a in args if a.endswith(".tar.gz") and ":" not in a)
    with tarfile.open(archive) as tar:
        record["archive"] = tar.getnames()
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
if "--command=true" in args:  # a new VM that answers ssh only from the N+1th try
    with open(os.environ["FAKE_GCLOUD_LOG"]) as log:
        tries = sum('"--command=true"' in line for line in log)
    if tries <= int(os.environ.get("FAKE_GCLOUD_SSH_FAILS", "0")):
        sys.exit(255)
if "describe" in args and "queued-resources" in args:  # the first N polls fail
    with open(os.environ["FAKE_GCLOUD_LOG"]) as log:
        polls = sum('"describe"' in line and "queued-resources" in line for line in log)
    if polls <= int(os.environ.get("FAKE_GCLOUD_DESCRIBE_FAILS", "0")):
        sys.exit(1)
if "describe" in args:
    default = "READY"  # a TPU VM's state; a queued resource's and an instance's differ
    default = "ACTIVE" if "queued-resources" in args else default
    default = "RUNNING" if "instances" in args else default
    state = os.environ.get("FAKE_GCLOUD_STATE", default)
    kind = os.environ.get("FAKE_GCLOUD_TYPE", "")  # a TPU VM's acceleratorType
    asked = next((a for a in args if a.startswith("--format=")), "")
    if "acceleratorType" in asked:
        print(f"{{state}}\t{{kind}}" if "state" in asked else kind)
    else:
        print(state)
time.sleep(float(os.environ.get("FAKE_GCLOUD_SLEEP", "0")))  # streaming, as logs --follow
sys.exit(int(os.environ.get("FAKE_GCLOUD_EXIT", "0")))
"""


class Gcloud:
    """A fake gcloud in a temp dir, and the launchers run against it."""

    def __init__(self, tmp_path: Path):
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        script = bin_dir / "gcloud"
        script.write_text(FAKE_GCLOUD.format(python=sys.executable))
        script.chmod(0o755)
        self.log = tmp_path / "gcloud_calls.jsonl"
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "FAKE_GCLOUD_LOG": str(self.log),
        }

    def launch(self, module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        """Runs `python -m launch.<module> ARGS` from the repository root."""
        return subprocess.run(
            [sys.executable, "-m", f"launch.{module}", *args],
            cwd=REPO,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def argvs(self) -> list[list[str]]:
        return [call["argv"] for call in self.calls()]


@pytest.fixture
def gcloud(tmp_path) -> Gcloud:
    return Gcloud(tmp_path)


def tpu(gcloud: Gcloud, *args: str, **env: str) -> subprocess.CompletedProcess:
    """launch.tpu with a name and zone; asserts success."""
    done = gcloud.launch("tpu", *args, "--name=ende", "--zone=us-central2-b", **env)
    assert done.returncode == 0, done.stderr
    return done


def option(argv: list[str], name: str) -> str:
    """The value of --name=value in argv (exactly one)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


# ----------------------------------------------------------------------------
# Accelerator types
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, hosts, version",
    [
        ("v4-8", 1, "tpu-ubuntu2204-base"),
        ("v4-16", 2, "tpu-ubuntu2204-base"),
        ("v4-32", 4, "tpu-ubuntu2204-base"),
        ("v3-8", 1, "tpu-ubuntu2204-base"),
        ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
        ("v5e-4", 1, "v2-alpha-tpuv5-lite"),
        ("v5p-8", 1, "v2-alpha-tpuv5"),
        ("v5p-16", 2, "v2-alpha-tpuv5"),
        ("v6e-8", 1, "v2-alpha-tpuv6e"),
        ("v6e-32", 8, "v2-alpha-tpuv6e"),
    ],
)
def test_accelerator_hosts_and_runtime(name, hosts, version):
    tpu_type = accelerators.parse(name)
    assert (tpu_type.hosts, tpu_type.runtime_version) == (hosts, version)


def test_v5e_is_spelled_v5litepod_for_gcloud():
    assert accelerators.parse("v5e-8").name == "v5litepod-8"


@pytest.mark.parametrize(
    "name", ["v4", "tpu-8", "v9-8", "v4-12", "v5litepod-6", "v4-8x", "v5litepod-12", "v6e-20"]
)
def test_malformed_accelerator_types_are_refused(name):
    with pytest.raises(UserError, match="accelerator_type"):
        accelerators.parse(name)


# ----------------------------------------------------------------------------
# TPU commands
# ----------------------------------------------------------------------------


def test_create_v4_8(gcloud):
    tpu(gcloud, "create", "--accelerator_type=v4-8", "--project=my-proj")
    [argv] = gcloud.argvs()
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "create", "ende"]
    assert option(argv, "zone") == "us-central2-b"
    assert option(argv, "accelerator-type") == "v4-8"
    assert option(argv, "version") == "tpu-ubuntu2204-base"
    assert option(argv, "project") == "my-proj"
    assert "--spot" not in argv


def test_create_v5e_spot_with_runtime_override(gcloud):
    tpu(gcloud, "create", "--accelerator_type=v5litepod-8", "--spot")
    tpu(gcloud, "create", "--accelerator_type=v5e-8", "--version=v2-alpha-tpuv5-lite-next")
    first, second = gcloud.argvs()
    assert option(first, "accelerator-type") == "v5litepod-8"
    assert option(first, "version") == "v2-alpha-tpuv5-lite"
    assert "--spot" in first
    assert option(second, "accelerator-type") == "v5litepod-8"
    assert option(second, "version") == "v2-alpha-tpuv5-lite-next"


def test_create_queued_resource(gcloud):
    tpu(gcloud, "create", "--queued", "--spot", "--accelerator_type=v6e-8")
    [argv] = gcloud.argvs()
    assert argv[:5] == ["compute", "tpus", "queued-resources", "create", "ende"]
    assert option(argv, "node-id") == "ende"
    assert option(argv, "runtime-version") == "v2-alpha-tpuv6e"
    assert option(argv, "accelerator-type") == "v6e-8"
    assert "--spot" in argv


def test_setup_clones_repo_and_installs_tpu_extra_on_all_workers(gcloud):
    tpu(gcloud, "setup", "--repo=https://github.com/me/transformer-jax.git", "--ref=v1.0")
    [argv] = gcloud.argvs()  # cloning: nothing is copied
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "ende"]
    assert option(argv, "worker") == "all"
    script = option(argv, "command")
    assert "git clone --quiet https://github.com/me/transformer-jax.git" in script
    assert "fetch --quiet origin v1.0" in script
    assert '/bin/pip" install' in script and '-e ".[tpu]"' in script


def test_setup_copies_the_working_tree_to_all_workers(gcloud):
    tpu(gcloud, "setup")
    scp, ssh = gcloud.calls()
    assert scp["argv"][:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert "ende:transformer-jax.tar.gz" in scp["argv"]
    assert option(scp["argv"], "worker") == "all"
    files = set(scp["archive"])
    assert {"launch/tpu.py", "experiments/wmt.py", BASE, "pyproject.toml"} <= files
    assert not [f for f in files if f.startswith((".git/", ".venv/")) or "__pycache__" in f]
    assert option(ssh["argv"], "worker") == "all"
    assert 'tar -xzf "$HOME/transformer-jax.tar.gz"' in option(ssh["argv"], "command")


def test_train_multi_host_passes_flagfile_and_gcs_workdir_to_every_worker(gcloud):
    tpu(
        gcloud,
        "train",
        "--accelerator_type=v4-32",
        f"--flagfile={BIG}",
        "--workdir=gs://bucket/ende_big",
        "--data_dir=gs://bucket/tfds",
        "--extra_flags=--mesh=data:-1 --eval_every=2000",
    )
    describe, argv = gcloud.argvs()  # the VM's own type, then training
    assert describe[2:5] == ["tpu-vm", "describe", "ende"]
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "ende"]
    assert option(argv, "worker") == "all"
    script = option(argv, "command")
    expected = (
        f'nohup "$HOME/transformer-venv/bin/python" -m experiments.wmt --flagfile={BIG} '
        "--workdir=gs://bucket/ende_big --data_dir=gs://bucket/tfds "
        "--mesh=data:-1 --eval_every=2000 "
        '>> "$HOME/train.log" 2>&1 < /dev/null &'
    )
    assert expected in script


def test_up_creates_sets_up_and_trains_in_order(gcloud):
    tpu(gcloud, "up", "--accelerator_type=v4-8", "--spot", "--workdir=gs://b/run")
    create, scp, setup, train = gcloud.argvs()
    assert create[3] == "create" and "--spot" in create
    assert scp[3] == "scp"
    assert '-e ".[tpu]"' in option(setup, "command")
    assert "--workdir=gs://b/run" in option(train, "command")


def test_up_queued_waits_for_the_queued_resource(gcloud):
    tpu(gcloud, "up", "--queued", "--workdir=gs://b/run", "--repo=https://example.com/r.git")
    create, describe, setup, train = gcloud.argvs()
    assert create[2:4] == ["queued-resources", "create"]
    assert describe[2:4] == ["queued-resources", "describe"]
    assert option(setup, "worker") == option(train, "worker") == "all"


def test_up_queued_polls_on_through_failed_polls_but_not_forever(gcloud):
    args = ["up", "--name=ende", "--zone=z", "--queued", "--workdir=gs://b/run",
            "--repo=https://example.com/r.git", "--poll_seconds=0.01"]  # fmt: skip
    done = gcloud.launch("tpu", *args, FAKE_GCLOUD_DESCRIBE_FAILS="2")
    assert done.returncode == 0, done.stderr
    assert [argv[3] for argv in gcloud.argvs()][:5] == ["create", *["describe"] * 3, "ssh"]
    done = gcloud.launch("tpu", *args, FAKE_GCLOUD_DESCRIBE_FAILS="99")
    assert done.returncode == 1
    assert "could not be described 5 times in a row" in done.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "state, message", [("FAILED", "is FAILED"), ("WAITING_FOR_RESOURCES", "still WAITING")]
)
def test_up_queued_gives_up_on_failure_or_timeout(gcloud, state, message):
    done = gcloud.launch(
        "tpu", "up", "--name=ende", "--zone=z", "--queued", "--workdir=gs://b/run",
        "--wait_minutes=0.0005", "--poll_seconds=0.01", FAKE_GCLOUD_STATE=state,
    )  # fmt: skip
    assert done.returncode == 1
    assert message in done.stderr.splitlines()[-1]
    assert [argv[3] for argv in gcloud.argvs()][:2] == ["create", "describe"]
    assert "ssh" not in {argv[3] for argv in gcloud.argvs()}


def test_logs_follow_worker_0(gcloud):
    tpu(gcloud, "logs", "--follow", "--lines=20")
    [argv] = gcloud.argvs()
    assert option(argv, "worker") == "0"
    assert option(argv, "command") == 'tail -n 20 -F "$HOME/train.log"'


def test_status_describes_then_asks_worker_0(gcloud):
    done = tpu(gcloud, "status", FAKE_GCLOUD_TYPE="v5litepod-16")
    describe, ssh = gcloud.argvs()
    assert describe[2:5] == ["tpu-vm", "describe", "ende"]
    assert option(ssh, "worker") == "0"
    # The VM's type, not --accelerator_type's default (once "v4-8" for every TPU).
    assert "TPU ende (v5litepod-16): READY" in done.stdout


def test_train_checks_the_workdir_against_the_vms_own_type(gcloud):
    # --accelerator_type left at v4-8: the VM, a 4-host v4-32, needs a gs:// workdir.
    done = gcloud.launch(
        "tpu", "train", "--name=ende", "--zone=z", "--workdir=/home/me/run",
        FAKE_GCLOUD_TYPE="v4-32",
    )  # fmt: skip
    assert done.returncode == 1 and "v4-32 has 4 hosts" in done.stderr, done.stderr
    assert [argv[3] for argv in gcloud.argvs()] == ["describe"]  # no training started


def test_an_absolute_flagfile_is_made_relative_or_refused(gcloud, tmp_path):
    tpu(gcloud, "train", f"--flagfile={REPO / BIG}", "--workdir=gs://b/run")
    assert f"--flagfile={BIG} " in option(gcloud.argvs()[-1], "command")
    elsewhere = tmp_path / "my.flags"
    elsewhere.write_text("--steps=5\n")
    done = gcloud.launch("tpu", "train", "--name=ende", "--zone=z", f"--flagfile={elsewhere}",
                         "--workdir=gs://b/run")  # fmt: skip
    assert done.returncode == 1 and "give a path relative to the repository root" in done.stderr


# SIGINT as an interactive shell leaves it to what it starts: not ignored, not blocked.
# The suite may run with it ignored (a script's background jobs start so), and the
# launcher would inherit that and never see the Ctrl-C. This resets it, then execs
# the command given after it (no preexec_fn: that forks the multithreaded test process).
AS_FROM_A_TERMINAL = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_leaving_logs_follow_with_ctrl_c_is_not_an_error(gcloud):
    process = subprocess.Popen(
        [sys.executable, "-c", AS_FROM_A_TERMINAL,
         "-m", "launch.tpu", "logs", "--follow", "--name=ende", "--zone=z"],
        cwd=REPO, env={**gcloud.env, "FAKE_GCLOUD_SLEEP": "60"}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not gcloud.calls() and time.monotonic() < deadline:  # gcloud is streaming
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's process group
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0 and "error" not in err, err  # once: "error: interrupted"


def test_status_of_a_preempted_tpu_does_not_ssh(gcloud):
    done = tpu(gcloud, "status", FAKE_GCLOUD_STATE="PREEMPTED")
    assert [argv[3] for argv in gcloud.argvs()] == ["describe"]
    assert "PREEMPTED" in done.stdout


def test_stop_signals_every_worker(gcloud):
    tpu(gcloud, "stop")
    [argv] = gcloud.argvs()
    assert option(argv, "worker") == "all"
    assert 'kill -TERM "$pid"' in option(argv, "command")


def test_delete_is_quiet(gcloud):
    tpu(gcloud, "delete")
    tpu(gcloud, "delete", "--queued")
    vm, queued = gcloud.argvs()
    assert vm[:5] == ["compute", "tpus", "tpu-vm", "delete", "ende"] and "--quiet" in vm
    assert queued[2:4] == ["queued-resources", "delete"]
    assert "--quiet" in queued and "--force" in queued


def test_dry_run_prints_every_command_and_runs_none(gcloud):
    done = tpu(gcloud, "up", "--dry_run", "--accelerator_type=v4-16", "--spot",
               "--workdir=gs://b/run", "--data_dir=gs://b/tfds")  # fmt: skip
    assert gcloud.calls() == []
    lines = done.stdout.splitlines()
    assert [line.split()[:5] for line in lines if line.startswith("gcloud")] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ]
    assert "--accelerator-type=v4-16" in lines[0] and "--spot" in lines[0]
    assert "--workdir=gs://b/run" in lines[-1]
    assert done.stderr == ""


def test_a_dry_run_says_which_answers_it_assumed(gcloud):
    done = tpu(gcloud, "status", "--dry_run")
    assert gcloud.calls() == []
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm describe")
    assert lines[1] == "# dry run: taken to answer READY"  # not a state it was told


def test_a_failing_gcloud_stops_the_launch_with_one_line(gcloud):
    done = gcloud.launch(
        "tpu", "up", "--name=ende", "--zone=z", "--workdir=gs://b/r", FAKE_GCLOUD_EXIT="1"
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith(
        "launch.tpu: error: exit status 1 from: gcloud compute tpus tpu-vm create ende"
    )
    assert len(gcloud.calls()) == 1  # nothing after the failed create


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "--zone=z"], "--name"),
        (["create", "--name=Ende_Base", "--zone=z"], "--name='Ende_Base'"),
        (["create", "--name=ende"], "--zone"),
        (["launch", "--name=ende", "--zone=z"], "invalid choice"),
        (["create", "--name=ende", "--zone=z", "--accelerator_type=v4"], "accelerator_type"),
        (["create", "--name=ende", "--zone=z", "--accelerator_type=tpu-8"], "accelerator_type"),
        (["train", "--name=ende", "--zone=z", "--accelerator_type=v4-32",
          "--workdir=/tmp/run", "--data_dir=gs://b/tfds"], "--workdir=/tmp/run"),
        (["train", "--name=ende", "--zone=z", "--accelerator_type=v5litepod-16",
          "--workdir=gs://b/run"], "--data_dir is missing"),
        (["train", "--name=ende", "--zone=z", "--spot", "--workdir=runs/base"], "spot"),
        (["train", "--name=ende", "--zone=z"], "--workdir is required"),
        (["train", "--name=ende", "--zone=z", "--workdir=runs/base"], "absolute path"),
        (["train", "--name=ende", "--zone=z", "--workdir=gs://b/r",
          "--flagfile=experiments/configs/nope.flags"], "nope.flags not found"),
        (["train", "--name=ende", "--zone=z", "--workdir=gs://b/r", "--extra_flags=steps=5"],
         "not a flag"),
        (["train", "--name=ende", "--zone=z", "--workdir=gs://b/r",
          "--extra_flags=--steps=5 --workdir=runs/x"], "give workdir as the launcher's own"),
        (["setup", "--name=ende", "--zone=z", "--ref=main"], "--ref needs --repo"),
        (["up", "--name=ende", "--zone=z", "--queued", "--wait_minutes=-1"],
         "--wait_minutes must be >= 0"),
    ],
)  # fmt: skip
def test_bad_input_exits_1_with_one_line_and_runs_nothing(gcloud, args, message):
    done = gcloud.launch("tpu", *args)
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("launch.tpu: error: ")
    assert message in done.stderr
    assert gcloud.calls() == []


def test_a_spot_tpu_without_a_gcs_data_dir_is_warned_about(gcloud):
    done = tpu(gcloud, "train", "--accelerator_type=v4-8", "--spot", "--workdir=gs://b/run")
    assert done.stderr.count("warning: the data directory is on the TPU's disk") == 1
    done = tpu(gcloud, "train", "--spot", "--workdir=gs://b/run", "--data_dir=gs://b/tfds")
    assert "warning" not in done.stderr


def test_single_host_on_demand_may_use_a_local_workdir(gcloud):
    tpu(gcloud, "train", "--accelerator_type=v5litepod-8", "--workdir=/home/me/runs/base")
    assert "--workdir=/home/me/runs/base" in option(gcloud.argvs()[-1], "command")


# ----------------------------------------------------------------------------
# GPU commands
# ----------------------------------------------------------------------------


def test_gpu_up_spot(gcloud):
    done = gcloud.launch(
        "gpu", "up", "--name=ende-gpu", "--zone=us-central1-a", "--spot",
        "--machine_type=a2-highgpu-8g", "--gpu=nvidia-tesla-a100:8",
        f"--flagfile={BASE}", "--workdir=gs://b/gpu", "--repo=https://example.com/r.git",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    create, ready, setup, train = gcloud.argvs()
    assert create[:4] == ["compute", "instances", "create", "ende-gpu"]
    assert ready[:3] == ["compute", "ssh", "ende-gpu"] and option(ready, "command") == "true"
    assert option(create, "machine-type") == "a2-highgpu-8g"
    assert option(create, "accelerator") == "type=nvidia-tesla-a100,count=8"
    assert option(create, "provisioning-model") == "SPOT"
    assert option(create, "zone") == "us-central1-a"
    assert setup[:3] == ["compute", "ssh", "ende-gpu"]
    assert '-e ".[cuda]"' in option(setup, "command")
    assert f"--flagfile={BASE} --workdir=gs://b/gpu" in option(train, "command")


def test_gpu_up_waits_for_the_new_vm_to_answer_ssh(gcloud):
    args = ["gpu", "up", "--name=g", "--zone=z", "--workdir=gs://b/g", "--poll_seconds=0.01"]
    args.append("--repo=https://example.com/r.git")
    done = gcloud.launch(*args, FAKE_GCLOUD_SSH_FAILS="2")
    assert done.returncode == 0, done.stderr
    steps = [option(a, "command")[:8] if a[1] == "ssh" else a[2] for a in gcloud.argvs()]
    assert steps[:4] == ["create", "true", "true", "true"]  # then setup and train
    assert len(steps) == 6 and "no ssh yet (2/40)" in done.stdout


def test_gpu_up_gives_up_on_a_vm_that_never_answers(gcloud):
    args = ["gpu", "up", "--name=g", "--zone=z", "--workdir=gs://b/g", "--poll_seconds=0"]
    done = gcloud.launch(*args, "--repo=https://example.com/r.git", FAKE_GCLOUD_SSH_FAILS="99")
    assert done.returncode == 1
    assert "did not answer ssh in 40 tries" in done.stderr.splitlines()[-1]
    assert len(gcloud.argvs()) == 41  # create, then the tries: no setup


def test_gpu_start_status_and_delete(gcloud):
    for command in ("start", "status", "delete"):
        done = gcloud.launch("gpu", command, "--name=g", "--zone=z")
        assert done.returncode == 0, done.stderr
    start, describe, status_ssh, delete = gcloud.argvs()
    assert start[:4] == ["compute", "instances", "start", "g"]
    assert describe[:3] == ["compute", "instances", "describe"]
    assert status_ssh[:2] == ["compute", "ssh"]
    assert delete[:4] == ["compute", "instances", "delete", "g"] and "--quiet" in delete


def test_gpu_bad_accelerator_spec(gcloud):
    done = gcloud.launch("gpu", "create", "--name=g", "--zone=z", "--gpu=a100x8")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1
    assert "launch.gpu: error: --gpu='a100x8'" in done.stderr
    assert gcloud.calls() == []


# ----------------------------------------------------------------------------
# The scripts that run on the VMs
# ----------------------------------------------------------------------------

FAKE_TRAINER = """\
#!/bin/bash
# Stands in for the venv's python: records its arguments, "checkpoints" on SIGTERM.
echo "$@" > "$HOME/args"
if [ "$1" = "--fail" ]; then echo "experiments.wmt: error: --fail is not a flag"; exit 1; fi
trap 'echo "checkpoint saved"; exit 0' TERM
echo "training step 1"
while true; do sleep 0.05; done
"""


def bash(script: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script],
        env={**os.environ, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def vm_home(tmp_path) -> Path:
    """A HOME laid out as after setup, with a fake trainer as the venv's python."""
    home = tmp_path / "home"
    (home / "transformer-jax").mkdir(parents=True)
    python = home / "transformer-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_TRAINER)
    python.chmod(0o755)
    yield home
    pid_file = home / "train.pid"
    if pid_file.exists():  # never leave the fake trainer behind
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(path: Path, text: str) -> None:
    deadline = time.monotonic() + 10
    while not (path.exists() and text in path.read_text()):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.05)


def test_train_script_starts_once_in_the_background_and_stop_checkpoints(vm_home):
    argv = remote.training_argv(BASE, "gs://b/run", None, ["--steps=10"])
    started = bash(remote.train_script(argv, check_seconds=1), vm_home)
    assert started.returncode == 0, started.stderr
    assert "training started" in started.stdout
    pid = int((vm_home / "train.pid").read_text())
    _wait_for(vm_home / "args", "--steps=10")
    assert (vm_home / "args").read_text().split() == argv[1:]

    again = bash(remote.train_script(argv, check_seconds=1), vm_home)
    assert "already running on" in again.stdout and str(pid) in again.stdout
    assert f"training: running (pid {pid})" in bash(remote.status_script(), vm_home).stdout

    stopped = bash(remote.stop_script(wait_seconds=20), vm_home)
    assert stopped.returncode == 0 and "stopped on" in stopped.stdout
    log = (vm_home / "train.log").read_text()
    assert "start: python -m experiments.wmt" in log and "checkpoint saved" in log
    assert "training: not running" in bash(remote.status_script(), vm_home).stdout
    assert "checkpoint saved" in bash(remote.logs_script(5, follow=False), vm_home).stdout


@pytest.mark.slow
def test_stop_on_a_vm_saves_a_checkpoint_of_the_real_trainer(ding_sample, tmp_path):
    """The scripts around experiments.wmt itself (the tiny model): started under
    nohup, reported running, and stopped by SIGTERM with a checkpoint saved within
    three steps of the signal."""
    from conftest import tiny_training_args

    home = tmp_path / "home"
    (home / "transformer-venv" / "bin").mkdir(parents=True)
    (home / "transformer-jax").symlink_to(REPO)
    python = home / "transformer-venv" / "bin" / "python"
    python.write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    workdir, log = tmp_path / "run", home / "train.log"
    # No save but the one SIGTERM asks for.
    trainer = tiny_training_args(ding_sample, workdir, 100_000, checkpoint_every=0)
    argv = ["python", "-m", "experiments.wmt", *trainer]
    env = {**os.environ, "HOME": str(home), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}

    def run(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)

    try:
        started = run(remote.train_script(argv, check_seconds=1))
        assert started.returncode == 0 and "training started" in started.stdout, started.stderr
        deadline = time.monotonic() + 300
        while "first step compiled" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        assert "training: running" in run(remote.status_script()).stdout
        stopped = run(remote.stop_script(wait_seconds=120))
        assert stopped.returncode == 0 and "stopped on" in stopped.stdout, stopped.stderr
    finally:
        pid = home / "train.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
    text = log.read_text()
    received = re.search(r"SIGTERM received after step (\d+)", text)
    assert received and "Traceback" not in text, text[-2000:]
    saved = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and 0 <= saved[0] - int(received[1]) <= 3, (saved, received[0])
    assert "training: not running" in run(remote.status_script()).stdout


def test_train_script_fails_when_training_dies_at_once(vm_home):
    done = bash(remote.train_script(["python", "--fail"], check_seconds=1), vm_home)
    assert done.returncode == 1
    assert "training exited at once" in done.stderr
    assert "--fail is not a flag" in done.stderr  # the log's tail


def test_a_stale_pid_file_is_not_taken_for_training(vm_home):
    """train.pid survives a stop and start of the VM, and its PID may now be another
    process's: status, stop and train must not take that one for training."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        (vm_home / "train.pid").write_text(str(other.pid))
        assert "training: not running" in bash(remote.status_script(), vm_home).stdout
        assert "no training running" in bash(remote.stop_script(wait_seconds=1), vm_home).stdout
        argv = remote.training_argv(BASE, "gs://b/run", None, [])
        assert "training started" in bash(remote.train_script(argv, 1), vm_home).stdout
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()


def test_setup_fails_where_jax_finds_only_the_cpu():
    """Setup's last step, run here, where jax has only the CPU (as on a VM whose
    libtpu or NVIDIA driver is missing or still installing)."""
    assert (
        remote.ACCELERATOR_CHECK in shlex.split(remote.setup_script("cuda", "3.12", None, None))[-1]
    )
    done = subprocess.run(
        [sys.executable, "-c", remote.ACCELERATOR_CHECK], cwd=REPO, capture_output=True,
        text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert done.returncode == 1
    assert "jax finds no accelerator here, only the CPU" in done.stderr
    assert done.stdout.split()[2] == "cpu"  # the backend, after python and jax versions


def test_setup_refuses_while_training_runs(vm_home):
    bash(remote.train_script(remote.training_argv(BASE, "/w", None, []), 1), vm_home)
    done = bash(remote.setup_script("tpu", "3.12", None, None), vm_home)
    assert done.returncode == 1 and "run stop first" in done.stderr
    assert (vm_home / "transformer-jax").is_dir()  # the code was not touched


@pytest.mark.parametrize("repo, ref", [(None, None), ("https://x/r.git", None), ("git@x:r", "a b")])
def test_every_remote_script_is_valid_bash(repo, ref):
    scripts = [
        remote.setup_script("cuda", "3.12", repo, ref),
        remote.train_script(remote.training_argv(BASE, "gs://b/it's", "gs://b/d", ["--x=$y"])),
        remote.stop_script(),
        remote.logs_script(10, follow=True),
        remote.status_script(),
    ]
    for script in scripts:
        done = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert done.returncode == 0, (script, done.stderr)


def test_readme_commands_parse(gcloud):
    """Every `python -m launch.*` command in launch/README.md is accepted (as a dry run)."""
    text = (REPO / "launch" / "README.md").read_text()
    commands = [c for c in _shell_commands(text) if c.startswith("python -m launch.")]
    assert len(commands) >= 8
    for command in commands:
        words = shlex.split(command)[2:]
        done = gcloud.launch(words[0].removeprefix("launch."), *words[1:], "--dry_run")
        assert done.returncode == 0, (command, done.stderr)
    assert gcloud.calls() == []


def _shell_commands(markdown: str) -> list[str]:
    """Commands in ```sh blocks, continuation lines joined, comments dropped."""
    blocks, inside, current = [], False, []
    for line in markdown.splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```sh"
            continue
        if inside and not line.lstrip().startswith("#"):
            current.append(line.strip())
            if not line.rstrip().endswith("\\"):
                blocks.append(" ".join(part.rstrip("\\").strip() for part in current))
                current = []
    return [b for b in blocks if b.strip()]
