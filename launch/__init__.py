"""Launching training on Cloud TPU VMs and GPU VMs with gcloud.

`python -m launch.tpu` and `python -m launch.gpu` create a VM, install the
project on every worker, start `experiments.wmt` in the background, show its
log and status, and delete the VM. `--dry_run` prints the commands instead.
"""
