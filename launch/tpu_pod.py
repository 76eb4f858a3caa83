"""Runs one command on every worker of a Cloud TPU VM pod slice: copies the code there, installs it,
then starts the command on all workers at once.

Usage:
    python -m launch.tpu_pod --tpu=NAME --zone=ZONE [--project=P] [--repo_dir=~/kiln] \\
        [--run_root=/mnt/bucket] [--run_name=NAME] [--mesh=PRESET] [--dry-run] \\
        -- kiln train --config=configs/pretrain.py

The steps, each stopping the launch with its exit status if it fails:
  1. `git archive` of HEAD into a tarball: committed code only (commit first), the same on every worker,
     without the virtual environment, runs and caches a copy of the directory would carry;
  2. `gcloud compute tpus tpu-vm scp` of the tarball to every worker (--worker=all);
  3. unpack it into --repo_dir and `pip install -e .[tpu]` into a venv there, on every worker;
  4. the command on every worker, in the foreground (a dropped connection stops it; the same
     launch resumes from the last checkpoint).
JAX finds the coordinator and each worker's id itself (TPU_WORKER_HOSTNAMES, train/distributed.py).
With --run_root the run directory is RUN_ROOT/runs/RUN_NAME (the TPU's name unless --run_name):
RUN_ROOT must be a directory every worker sees at the same path, as a pod's checkpoints need (a
Cloud Storage bucket mounted with gcsfuse, or Filestore/NFS); Kiln writes run directories through
the file system, not gs:// URLs. `--dry-run` prints the commands, one per line.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile

from configs import meshes
from launch import launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def remote_path(path: str) -> str:
    """`path` quoted for the worker's shell, a leading ~/ left for it to expand."""
    if path == "~":  # quoted, it would be a directory named '~'
        return path
    return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


def commands(command: list[str], tpu: str, zone: str, project: str = "", repo_dir: str = "~/kiln") -> list[list[str]]:
    """The commands that copy, install and run `command` on every worker of the pod slice `tpu`."""
    tarball = os.path.join(tempfile.gettempdir(), f"kiln-{tpu}.tar.gz")
    where = [f"--zone={zone}", "--worker=all", *([f"--project={project}"] if project else [])]
    tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    repo = remote_path(repo_dir)
    install = (f"mkdir -p {repo} && tar -xzf kiln.tar.gz -C {repo} && cd {repo} && python3 -m venv .venv "
               '&& . .venv/bin/activate && pip install -q -e ".[tpu]"')
    run = f"cd {repo} && . .venv/bin/activate && {shlex.join(command)}"
    return [["git", "-C", ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"],
            [*tpu_vm, "scp", tarball, f"{tpu}:kiln.tar.gz", *where],
            [*tpu_vm, "ssh", tpu, *where, f"--command={install}"],
            [*tpu_vm, "ssh", tpu, *where, f"--command={run}"]]


def call(step: list[str]) -> int:
    """Runs one step; its exit status, or 127 (the shell's "not found") when its program is missing."""
    try:
        return subprocess.call(step)
    except FileNotFoundError:
        hint = ": install the Google Cloud CLI" if step[0] == "gcloud" else ""
        print(f"launch.tpu_pod: {step[0]} not found{hint}", file=sys.stderr)
        return 127


def main(argv: list[str] | None = None) -> int:
    p = launcher.parser("python -m launch.tpu_pod", __doc__)
    p.add_argument("--tpu", required=True, help="the TPU VM's name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="", help="the Google Cloud project (default: gcloud's)")
    p.add_argument("--repo_dir", default="~/kiln", help="where the code goes on every worker")
    p.add_argument("--run_root", default="", help="a directory shared by every worker (a gcsfuse mount of a bucket): "
                                                  "the run directory goes to RUN_ROOT/runs/RUN_NAME")
    p.add_argument("--run_name", default="", help="the run directory's name under RUN_ROOT/runs (default: --tpu)")
    a, command = launcher.parse(p, argv)
    if a.mesh and meshes.dcn_size(a.mesh) > 1:  # a multislice job (queued resources), not one pod slice
        p.error(f"--mesh={a.mesh} spans {meshes.dcn_size(a.mesh)} slices; this launcher runs on one")
    if a.run_root:
        if "://" in a.run_root:
            p.error(f"--run_root={a.run_root!r} is a URL: mount the bucket on every worker (gcsfuse) and give the "
                    "mount's path")
        if not a.run_root.startswith("/"):  # inside each worker's code directory (or home): not shared
            p.error(f"--run_root={a.run_root!r} is not an absolute path: each worker would write a run directory "
                    "of its own under its --repo_dir or home; give the shared mount's path, such as /mnt/bucket")
        if any(arg.startswith("--config.run_dir=") for arg in command):
            p.error("give either --run_root or --config.run_dir, not both")
        command += [f"--config.run_dir={a.run_root.rstrip('/')}/runs/{a.run_name or a.tpu}"]
    steps = commands(command, a.tpu, a.zone, a.project, a.repo_dir)
    for i, step in enumerate(steps, 1):
        print(shlex.join(step), flush=True)
        if not a.dry_run:
            status = call(step)
            if status:
                print(f"launch.tpu_pod: step {i} of {len(steps)} exited with status {status}", file=sys.stderr)
                return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
