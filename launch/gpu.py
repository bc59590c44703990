r"""Train on a Compute Engine VM with NVIDIA GPUs: the single-host sibling of launch.tpu.

  python -m launch.gpu up --name=ende-base-gpu --zone=us-central1-a \
      --machine_type=a2-highgpu-8g --gpu=nvidia-tesla-a100:8 \
      --flagfile=experiments/configs/wmt14_ende_base.flags \
      --workdir=gs://BUCKET/ende_base_gpu --data_dir=gs://BUCKET/tfds --spot

Commands: create, setup ('.[cuda]' into a venv), train, up (all three), logs,
status, stop (SIGTERM: checkpoint, then exit), start (a stopped VM), delete.
A spot VM is stopped, not deleted, when preempted: `start` it, then `train`
again, and training resumes from the workdir (its disk survives a stop).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from launch import cli, remote
from launch.cli import UserError
from launch.runner import Runner

PROGRAM = "launch.gpu"
COMMANDS = ("create", "setup", "train", "up", "logs", "status", "stop", "start", "delete")
# A Deep Learning VM image with the NVIDIA driver installed (CUDA comes from the jax wheels).
IMAGE_FAMILY = "common-cu128-ubuntu-2204-nvidia-570"
IMAGE_PROJECT = "deeplearning-platform-release"
SSH_TRIES = 40  # `up` gives a new VM 10 minutes (at --poll_seconds=15) to answer ssh
_GPU = re.compile(r"^(nvidia-[a-z0-9-]+):(\d+)$")


def parse_flags(argv: list[str]) -> argparse.Namespace:
    """The command and its flags; usage errors end the program in one line."""
    parser = cli.Parser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=COMMANDS)
    cli.add_common_flags(parser)
    parser.add_argument("--machine_type", default="g2-standard-8", help="e.g. a2-highgpu-8g.")
    parser.add_argument("--gpu", default="nvidia-l4:1", help="TYPE:COUNT, e.g. nvidia-tesla-a100:8")
    parser.add_argument("--image_family", default=IMAGE_FAMILY, help="Boot image family.")
    parser.add_argument("--image_project", default=IMAGE_PROJECT, help="Its project.")
    parser.add_argument("--disk_gb", type=int, default=200, help="Boot disk size in GB.")
    parser.add_argument(
        "--poll_seconds", type=float, default=15, help="up: seconds between ssh tries of a new VM."
    )
    return parser.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class GpuVm:
    """One GPU VM and how gcloud addresses it."""

    name: str
    zone: str
    project: str | None
    machine_type: str
    gpu_type: str
    gpu_count: int
    image_family: str
    image_project: str
    disk_gb: int
    spot: bool

    def gcloud(self, *words: str) -> list[str]:
        """`gcloud compute WORDS --zone=Z [--project=P]`."""
        argv = ["gcloud", "compute", *words, f"--zone={self.zone}"]
        return argv + ([f"--project={self.project}"] if self.project else [])

    def create(self) -> list[str]:
        argv = self.gcloud("instances", "create", self.name)
        argv += [
            f"--machine-type={self.machine_type}",
            f"--accelerator=type={self.gpu_type},count={self.gpu_count}",
            "--maintenance-policy=TERMINATE",  # GPUs cannot live-migrate
            f"--image-family={self.image_family}",
            f"--image-project={self.image_project}",
            f"--boot-disk-size={self.disk_gb}GB",
            "--scopes=cloud-platform",  # to read and write the gs:// workdir and data
            "--metadata=install-nvidia-driver=True",
        ]
        if self.spot:  # STOP keeps the disk, so a preempted run can be started again
            argv += ["--provisioning-model=SPOT", "--instance-termination-action=STOP"]
        return argv

    def delete(self) -> list[str]:
        return self.gcloud("instances", "delete", self.name, "--quiet")

    def start(self) -> list[str]:
        return self.gcloud("instances", "start", self.name)

    def describe(self) -> list[str]:
        return self.gcloud("instances", "describe", self.name, "--format=value(status)")

    def ssh(self, script: str, worker: str) -> list[str]:
        del worker  # one host
        return self.gcloud("ssh", self.name, f"--command={script}")

    def scp(self, local: str, dest: str) -> list[str]:
        return self.gcloud("scp", local, f"{self.name}:{dest}")

    def remote(self) -> remote.Remote:
        return remote.Remote(ssh=self.ssh, scp=self.scp, extra="cuda")


def make_vm(flags: argparse.Namespace) -> GpuVm:
    """The GpuVm the flags describe; UserError on a bad name or --gpu."""
    cli.check_name(flags.name)
    match = _GPU.match(flags.gpu)
    if not match or int(match.group(2)) < 1:
        raise UserError(f"--gpu={flags.gpu!r} is not TYPE:COUNT, e.g. nvidia-l4:1")
    return GpuVm(
        flags.name,
        flags.zone,
        flags.project,
        flags.machine_type,
        match.group(1),
        int(match.group(2)),
        flags.image_family,
        flags.image_project,
        flags.disk_gb,
        flags.spot,
    )


def training_argv(flags: argparse.Namespace) -> list[str]:
    """The validated training command (one host: a local workdir is allowed)."""
    if not flags.workdir:
        raise UserError("--workdir is required to train: gs://BUCKET/PATH or a path on the VM")
    remote.check_local_path("workdir", flags.workdir)
    remote.check_local_path("data_dir", flags.data_dir)
    flagfile = remote.check_flagfile(flags.flagfile, flags.repo)
    extra = cli.extra_flags(flags.extra_flags)
    return remote.training_argv(flagfile, flags.workdir, flags.data_dir, extra)


def status(vm: GpuVm, runner: Runner) -> None:
    """The VM's state, then training's on it."""
    state = runner.output(vm.describe(), dry_run_answer="RUNNING")
    print(f"VM {vm.name} ({vm.machine_type}, {vm.gpu_count}x {vm.gpu_type}): {state}", flush=True)
    if state == "RUNNING":
        remote.training_status(vm.remote(), runner)


def main(argv: list[str]) -> None:
    flags = parse_flags(argv)
    vm = make_vm(flags)
    cli.check_source(flags.repo, flags.ref)
    command = flags.command
    train_argv = training_argv(flags) if command in ("train", "up") else []
    runner = Runner(flags.dry_run)
    if command in ("create", "up"):
        runner.run(vm.create())
    if command == "up":  # the VM boots (and installs its driver) after create returns
        remote.wait_for_ssh(vm.remote(), runner, SSH_TRIES, flags.poll_seconds)
    if command == "start":
        runner.run(vm.start())
    if command in ("setup", "up"):
        remote.setup(vm.remote(), runner, flags.python, flags.repo, flags.ref)
    if command in ("train", "up"):
        remote.train(vm.remote(), runner, train_argv)
    if command == "logs":
        remote.logs(vm.remote(), runner, flags.lines, flags.follow)
    if command == "status":
        status(vm, runner)
    if command == "stop":
        remote.stop(vm.remote(), runner)
    if command == "delete":
        runner.run(vm.delete())


if __name__ == "__main__":
    cli.run(PROGRAM, main, sys.argv[1:])
