r"""Train on a Cloud TPU VM: create it, install, train, watch, delete.

  python -m launch.tpu up --name=ende-base --zone=us-central2-b --accelerator_type=v4-8 \
      --flagfile=experiments/configs/wmt14_ende_base.flags \
      --workdir=gs://BUCKET/ende_base --data_dir=gs://BUCKET/tfds --spot
  python -m launch.tpu logs --name=ende-base --zone=us-central2-b --follow
  python -m launch.tpu delete --name=ende-base --zone=us-central2-b

Commands: create (the VM, or with --queued a queued resource), setup (code
and venv on every worker), train (start in the background on every worker),
up (all three), logs, status, stop (SIGTERM: checkpoint, then exit), delete.
--dry_run prints each gcloud command instead of running it.

After a preemption, delete the VM and run `up` again with the same --workdir:
training resumes from the latest checkpoint there.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

from launch import accelerators, cli, remote
from launch.cli import UserError
from launch.runner import Runner

PROGRAM = "launch.tpu"
COMMANDS = ("create", "setup", "train", "up", "logs", "status", "stop", "delete")
_QUEUED_FAILED = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")


def parse_flags(argv: list[str]) -> argparse.Namespace:
    """The command and its flags; usage errors end the program in one line."""
    parser = cli.Parser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=COMMANDS)
    cli.add_common_flags(parser)
    parser.add_argument(
        "--accelerator_type", default="v4-8", help=f"TPU slice: {accelerators.EXAMPLES}."
    )
    parser.add_argument("--version", help="TPU software version (default: the generation's).")
    parser.add_argument("--queued", action="store_true", help="Create via a queued resource.")
    parser.add_argument("--worker", default="0", help="logs: which worker's log.")
    parser.add_argument(
        "--wait_minutes", type=float, default=0, help="up --queued: give up after (0: never)."
    )
    parser.add_argument("--poll_seconds", type=float, default=60, help="up --queued: poll every.")
    return parser.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Tpu:
    """One TPU VM (or queued resource) and how gcloud addresses it."""

    name: str
    zone: str
    project: str | None
    accelerator: accelerators.TpuType
    version: str
    spot: bool
    queued: bool

    def gcloud(self, *words: str) -> list[str]:
        """`gcloud compute tpus WORDS --zone=Z [--project=P]`."""
        argv = ["gcloud", "compute", "tpus", *words, f"--zone={self.zone}"]
        return argv + ([f"--project={self.project}"] if self.project else [])

    def create(self) -> list[str]:
        if self.queued:  # the queued resource and its node share the name
            argv = self.gcloud("queued-resources", "create", self.name, f"--node-id={self.name}")
            argv.append(f"--runtime-version={self.version}")
        else:
            argv = self.gcloud("tpu-vm", "create", self.name, f"--version={self.version}")
        argv.append(f"--accelerator-type={self.accelerator.name}")
        return argv + (["--spot"] if self.spot else [])

    def delete(self) -> list[str]:
        if self.queued:  # --force deletes the TPU node along with the queued resource
            return self.gcloud("queued-resources", "delete", self.name, "--quiet", "--force")
        return self.gcloud("tpu-vm", "delete", self.name, "--quiet")

    def describe(self) -> list[str]:
        """Its state and accelerator type, tab-separated."""
        return self.gcloud("tpu-vm", "describe", self.name, "--format=value(state,acceleratorType)")

    def describe_type(self) -> list[str]:
        return self.gcloud("tpu-vm", "describe", self.name, "--format=value(acceleratorType)")

    def describe_queued(self) -> list[str]:
        return self.gcloud("queued-resources", "describe", self.name, "--format=value(state.state)")

    def ssh(self, script: str, worker: str) -> list[str]:
        return self.gcloud("tpu-vm", "ssh", self.name, f"--worker={worker}", f"--command={script}")

    def scp(self, local: str, dest: str) -> list[str]:
        return self.gcloud("tpu-vm", "scp", local, f"{self.name}:{dest}", "--worker=all")

    def remote(self) -> remote.Remote:
        return remote.Remote(ssh=self.ssh, scp=self.scp, extra="tpu")


def make_tpu(flags: argparse.Namespace) -> Tpu:
    """The Tpu the flags describe; UserError on a bad name or accelerator type."""
    cli.check_name(flags.name)
    accelerator = accelerators.parse(flags.accelerator_type)
    version = flags.version or accelerator.runtime_version
    return Tpu(
        flags.name, flags.zone, flags.project, accelerator, version, flags.spot, flags.queued
    )


def training_argv(flags: argparse.Namespace, tpu: Tpu, warn: bool = True) -> list[str]:
    """The validated training command; every host must reach the workdir and the data."""
    if not flags.workdir:
        raise UserError("--workdir is required to train: gs://BUCKET/PATH")
    extra = cli.extra_flags(flags.extra_flags)
    hosts = tpu.accelerator.hosts
    if hosts > 1:
        why = f"{tpu.accelerator.name} has {hosts} hosts that all read and write it, so"
        cli.check_gcs("workdir", flags.workdir, why)
        data_dir = flags.data_dir or remote.flag_value(extra, "data_dir")
        cli.check_gcs("data_dir", data_dir, why)
    elif tpu.spot:
        why = "a spot TPU loses its disk when preempted; to resume,"
        cli.check_gcs("workdir", flags.workdir, why)
        data_dir = flags.data_dir or remote.flag_value(extra, "data_dir")
        if warn and not (data_dir or "").startswith("gs://"):
            print(
                f"{PROGRAM}: warning: the data directory is on the TPU's disk, which a "
                "preemption deletes: each restart builds the dataset again (WMT: hours); "
                "--data_dir=gs://BUCKET/tfds keeps it",
                file=sys.stderr,
                flush=True,
            )
    remote.check_local_path("workdir", flags.workdir)
    remote.check_local_path("data_dir", flags.data_dir)
    flagfile = remote.check_flagfile(flags.flagfile, flags.repo)
    return remote.training_argv(flagfile, flags.workdir, flags.data_dir, extra)


def as_created(tpu: Tpu, runner: Runner) -> Tpu:
    """The Tpu with the accelerator type the VM has (gcloud's answer), whatever
    --accelerator_type says: `train` acts on a VM that exists."""
    actual = runner.output(tpu.describe_type(), dry_run_answer=tpu.accelerator.name)
    if not actual or actual == tpu.accelerator.name:
        return tpu
    return dataclasses.replace(tpu, accelerator=accelerators.parse(actual.rsplit("/", 1)[-1]))


DESCRIBE_TRIES = 5  # failed polls in a row that end a queued wait


def wait_until_active(tpu: Tpu, runner: Runner, wait_minutes: float, poll_seconds: float) -> None:
    """Polls a queued resource until its TPU exists (spot capacity can take hours)."""
    deadline = time.monotonic() + (wait_minutes * 60 if wait_minutes else math.inf)
    failures = 0
    while True:
        try:
            state = runner.output(tpu.describe_queued(), dry_run_answer="ACTIVE")
            failures = 0
        except cli.CommandError as e:  # a network or token hiccup in an hours-long wait
            failures += 1
            if failures >= DESCRIBE_TRIES:
                raise UserError(
                    f"queued resource {tpu.name} could not be described {failures} times in "
                    f"a row ({e}); once it is ACTIVE, run setup, then train"
                ) from None
            state = "unknown (describe failed)"
        if state == "ACTIVE":
            return
        if state in _QUEUED_FAILED:
            raise UserError(f"queued resource {tpu.name} is {state}; delete it and try again")
        if time.monotonic() > deadline:
            raise UserError(f"queued resource {tpu.name} still {state} after {wait_minutes} min")
        print(
            f"queued resource {tpu.name}: {state}; next check in {poll_seconds:g} s",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(poll_seconds)


def status(tpu: Tpu, runner: Runner) -> None:
    """State of the queued resource and VM, then of training on worker 0."""
    if tpu.queued:
        state = runner.output(tpu.describe_queued(), dry_run_answer="ACTIVE")
        print(f"queued resource {tpu.name}: {state}", flush=True)
        if state != "ACTIVE":
            return
    state, *kind = runner.output(tpu.describe(), dry_run_answer="READY").split() or ["UNKNOWN"]
    print(f"TPU {tpu.name} ({kind[0] if kind else tpu.accelerator.name}): {state}", flush=True)
    if state == "READY":
        remote.training_status(tpu.remote(), runner)


def main(argv: list[str]) -> None:
    flags = parse_flags(argv)
    tpu = make_tpu(flags)
    cli.check_source(flags.repo, flags.ref)
    command = flags.command
    if flags.wait_minutes < 0 or flags.poll_seconds <= 0:
        raise UserError("--wait_minutes must be >= 0 (0: never give up), --poll_seconds > 0")
    # Checked before any gcloud command; `train` again against the VM's own type.
    train_argv = (
        training_argv(flags, tpu, warn=command == "up") if command in ("train", "up") else []
    )
    runner = Runner(flags.dry_run)
    if command == "train":
        tpu = as_created(tpu, runner)
        train_argv = training_argv(flags, tpu)
    if command in ("create", "up"):
        runner.run(tpu.create())
        if tpu.queued and command == "up":
            wait_until_active(tpu, runner, flags.wait_minutes, flags.poll_seconds)
    if command in ("setup", "up"):
        remote.setup(tpu.remote(), runner, flags.python, flags.repo, flags.ref)
    if command in ("train", "up"):
        remote.train(tpu.remote(), runner, train_argv)
    if command == "logs":
        remote.logs(tpu.remote(), runner, flags.lines, flags.follow, flags.worker)
    if command == "status":
        status(tpu, runner)
    if command == "stop":
        remote.stop(tpu.remote(), runner)
    if command == "delete":
        runner.run(tpu.delete())


if __name__ == "__main__":
    cli.run(PROGRAM, main, sys.argv[1:])
