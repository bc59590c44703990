"""Two real JAX processes (2 CPU devices each) train like one process with 4 devices.

The processes meet through jax.distributed (a coordinator on localhost, CPU
collectives over gloo), each reads its own share of every batch, process 0
writes the logs, and orbax saves and restores the checkpoint across both.
"""

import contextlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import tiny_training_args

pytestmark = pytest.mark.slow


# "[Gloo] Rank 5 is connected to 7 peer ranks. Expected number of connected peer ranks is : 7"
_GLOO_FRAGMENTS = (
    r"\[Gloo\] Rank|is connected to|peer ranks\.|Expected number of connected peer ranks is :"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


def _start_two_processes(args: list[str]) -> list[subprocess.Popen]:
    """experiments.wmt as processes 0 and 1 of one run, one CPU device each (gloo's
    collectives cost CPU time with every device: the slice test has two a process)."""
    port = _free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.wmt",
                *args,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def _outputs(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's stdout, once all have ended with exit code 0."""
    outputs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


def _losses(workdir) -> dict[int, float]:
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in lines if "train/loss" in r}


def test_the_hosts_of_a_slice_train_resume_and_equal_one_process(ding_sample, tmp_path):
    """Two workers of a TPU VM slice (two processes, 2 CPU devices each) learn their
    places from the metadata servers, train, resume, and give one process's losses."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    budget = "--train_minutes=60"  # decided by process 0 and shared: all stop and anneal alike
    one_process = [sys.executable, "-m", "experiments.wmt"]
    result = subprocess.run(
        [*one_process, *tiny_training_args(ding_sample, single, 8), budget],
        env=_env(4),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    with _tpu_vm_metadata(2) as endpoints:
        outputs = _outputs(
            _start_on_tpu_vms([*tiny_training_args(ding_sample, multi, 4), budget], endpoints)
        )  # saves step 4
        assert "first step compiled" in outputs[0]
        # A newest step folder that orbax did not write: both processes pass over it
        # to step 4, and one of them moves it aside.
        (multi / "checkpoints" / "6").mkdir()
        args = [*tiny_training_args(ding_sample, multi, 8), budget, "--fallback_checkpoint"]
        outputs += _outputs(_start_on_tpu_vms(args, endpoints))
    assert "resumed from step 4" in outputs[2]
    assert (multi / "checkpoints" / "6.unreadable").is_dir()
    # Only process 0 speaks. Gloo's own connection messages aside: its threads
    # write them piecewise to the same stdout, so two of them can interleave and
    # leave a line like "7"; what remains without their fragments is digits.
    for other in outputs[1::2]:
        assert re.fullmatch(r"[\d\s]*", re.sub(_GLOO_FRAGMENTS, "", other)), other

    records = [json.loads(line) for line in open(multi / "metrics.jsonl")]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 9))  # each once
    expected, got = _losses(single), _losses(multi)
    # One process sums the gradients of its 4 devices in another order than two
    # processes sum theirs across gloo: the float32 losses part by an ulp or so.
    # Steps 5-8 come after the resume: a process that took up another data
    # position, lost Adam's moments or drew other dropout masks would part from
    # the unbroken single-process run by far more than that (test_faults.py checks
    # a one-process resume bit for bit).
    np.testing.assert_allclose(
        [got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)], rtol=2e-5
    )
    steps = sorted(int(p) for p in os.listdir(multi / "checkpoints") if p.isdigit())
    assert steps == [4, 8]


def test_a_signal_to_one_process_and_time_based_saves_stop_both_at_one_step(ding_sample, tmp_path):
    """A save and a stop are collective: each process deciding by its own clock or its
    own SIGTERM (a slice's hosts are signalled one by one) would leave the others
    waiting in a step it never joins. Here only process 1 is signalled, and a save is
    due by the clock every 0.2 s; both agree every loop.AGREE_EVERY steps."""
    import signal
    import time

    from transformer import loop

    workdir = tmp_path / "run"
    args = [
        *tiny_training_args(ding_sample, workdir, 100_000, checkpoint_every=0),
        "--checkpoint_minutes=0.003",
        "--log_every=100000",
    ]
    procs = _start_two_processes(args)

    def saved() -> list[int]:
        folder = workdir / "checkpoints"
        return sorted(int(s) for s in os.listdir(folder) if s.isdigit()) if folder.exists() else []

    try:
        deadline = time.monotonic() + 180
        while len(saved()) < 2 and time.monotonic() < deadline:  # time-based saves, agreed
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    steps = saved()
    assert len(steps) >= 2 and all(s % loop.AGREE_EVERY == 0 for s in steps), steps


def test_a_mesh_whose_rows_do_not_split_over_the_processes_is_refused(ding_sample, tmp_path):
    # data:1,tensor:2 over two hosts of 1 device: both processes would read
    # "their" rows of a batch that has one block of rows, each another batch.
    args = [*tiny_training_args(ding_sample, tmp_path / "run", 2), "--mesh=data:1,tensor:2"]
    procs = _start_two_processes(args)
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errors
    # Process 0 says it in one line; process 1 too, unless the coordinator that
    # process 0 ran went away first and its client said so last.
    assert "is not a multiple of the 2 processes" in errors[0].strip().splitlines()[-1]
    assert "is not a multiple of the 2 processes" in errors[1], errors[1][-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


# What one process of two made of a checkpoint, once per verdict ("bad": it could not
# read it), agreed with the other through jax.distributed; "gone": the process leaves.
_AGREE = """
import os, sys
import jax
# A peer that leaves is noticed by its missing heartbeats: after 10 s, not 100.
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]), heartbeat_timeout_seconds=10)
from transformer import checkpoint
for verdict in sys.argv[3].split(","):
    if verdict == "gone":
        os._exit(0)
    mine = checkpoint.CheckpointError("checkpoint /w/6 is incomplete") if verdict == "bad" else None
    try:
        agreed = checkpoint._unreadable_everywhere("/w/6", mine)
        print("agreed:", "mine" if agreed is mine else agreed, flush=True)
    except checkpoint.CheckpointError as e:
        print("error:", e, flush=True)
"""


def _agree(verdicts_0: str, verdicts_1: str) -> list[tuple[int, list[str]]]:
    """(exit code, verdict lines) of the two processes."""
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _AGREE, address, str(i), verdicts],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for i, verdicts in enumerate((verdicts_0, verdicts_1))
    ]
    try:
        said = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [  # gloo's connection messages aside
        (p.returncode, [line for line in out.splitlines() if line.startswith(("agreed", "error"))])
        for p, out in zip(procs, said, strict=True)
    ]


def test_processes_agree_before_a_checkpoint_is_called_unreadable():
    split = "error: checkpoint /w/6 is unreadable on 1 of 2 processes only"
    for code, lines in _agree("bad,good,bad,good", "bad,good,good,bad"):
        assert code == 0 and len(lines) == 4, lines
        assert lines[0] == "agreed: mine"  # unreadable everywhere: passed over
        assert lines[1] == "agreed: mine"  # read everywhere: None
        assert lines[2].startswith(split) and lines[3].startswith(split)  # nothing moved
    # A peer that leaves: jax ends process 0 before it calls anything unreadable.
    (code, lines), _ = _agree("bad", "gone")
    assert code != 0 and lines == [], lines


# --dtype=auto in a run of two processes: each times its own matmuls, here made to
# disagree (round 1: process 0 finds bfloat16 faster, process 1 float32; round 2
# the other way round).
_AUTO_DTYPE = """
import sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from transformer import flops
flops.cpu_has_bfloat16 = lambda: None
for bf16_faster in (sys.argv[2] == "0", sys.argv[2] == "1"):
    peaks = {"bfloat16": 2e11 if bf16_faster else 1e11, "float32": 1.5e11}
    flops.measured_matmul_peak = lambda dtype="float32", **_: peaks[dtype]
    print("chose", flops.fastest_dtype(), flush=True)
"""


def test_every_process_takes_the_dtype_that_process_0_chose():
    address = f"localhost:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _AUTO_DTYPE, address, str(i)],
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for out in _outputs(procs):  # gloo's connection messages aside
        assert re.findall(r"chose (\w+)", out) == ["bfloat16", "float32"], out


class _Metadata(http.server.BaseHTTPRequestHandler):
    """A TPU VM's metadata server, as far as jax's cluster detection reads it."""

    def do_GET(self):  # noqa: N802 - http.server's name
        value = self.server.attributes.get(self.path.rsplit("/", 1)[-1])
        if value is None or self.headers.get("Metadata-Flavor") != "Google":
            self.send_error(404)
            return
        body = value.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _tpu_vm_metadata(workers: int):
    """One metadata server per worker of a slice whose workers are all this host;
    workers=0: one server that describes no slice (as on a Colab TPU runtime)."""
    servers = []
    for worker in range(max(workers, 1)):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
        endpoints = ",".join(f"w-{i}:{i}:127.0.0.1" for i in range(workers))
        server.attributes = {
            "agent-worker-number": str(worker),
            "worker-network-endpoints": endpoints,
            "tpu-env": "",
        } if workers else {}  # fmt: skip
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    try:
        yield [f"127.0.0.1:{server.server_address[1]}" for server in servers]
    finally:
        for server in servers:
            server.shutdown()


def _start_on_tpu_vms(args: list[str], endpoints: list[str]) -> list[subprocess.Popen]:
    """experiments.wmt on each worker of a TPU VM slice whose metadata servers are
    `endpoints`, all on this host. Here the TPU chips are what cannot exist: jax is
    told to take this host for a TPU VM (JAX_FORCE_TPU_INIT, which also tells it to
    skip the metadata server, undone before the run), and local servers answer for
    it. A slice of several workers has 2 CPU devices a worker, one worker 4."""
    run = (
        "import os, runpy, jax; os.environ.pop('TPU_SKIP_MDS_QUERY', None); "
        "runpy.run_module('experiments.wmt', run_name='__main__', alter_sys=True)"
    )
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-c", run, *args],
            env=dict(
                _env(2 if len(endpoints) > 1 else 4),
                JAX_FORCE_TPU_INIT="1",
                GCE_METADATA_IP=endpoint,
                JAX_COORDINATOR_PORT=str(port),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for endpoint in endpoints
    ]


@pytest.mark.parametrize("workers", [1, 0])
def test_a_single_host_tpu_vm_runs_one_process(ding_sample, tmp_path, workers):
    """On a TPU VM made by `gcloud compute tpus tpu-vm create`, each host learns its
    place in the slice from the VM's metadata server, not from flags or GKE's
    environment (a slice of two: test_the_hosts_of_a_slice_train_resume_and_equal_one_process).
    One host (v4-8) and a VM that describes no slice (Colab) run one process."""
    workdir = tmp_path / "slice"
    with _tpu_vm_metadata(workers) as endpoints:
        (output,) = _outputs(
            _start_on_tpu_vms(tiny_training_args(ding_sample, workdir, 4), endpoints)
        )
    assert "first step compiled" in output
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]
