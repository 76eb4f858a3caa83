"""Writes a SLURM batch script that runs one command on every task of a multi-node GPU job, and prints
the `sbatch` command that submits it (it does not submit).

Usage:
    python -m launch.slurm --nodes=4 --gpus_per_node=8 [--per=gpu|node] [--partition=P] \\
        [--time=HH:MM:SS] [--job_name=kiln] [--out=kiln_job.sbatch] [--mesh=PRESET] [--dry-run] \\
        -- kiln train --config=configs/pretrain.py --config.run_dir=/shared/runs/NAME

Submit from the environment kiln is installed in (sbatch passes it on), with run_dir on a file system
every node sees. --per=gpu starts one process per GPU, --per=node one per node holding all its GPUs
(what a mesh preset spanning nodes needs). JAX's SLURM detection (train/distributed.py) finds the
coordinator and each process's id. Pre-emption: 120 s before the time limit SLURM signals the script,
which passes SIGTERM to every task (kiln train saves a checkpoint and exits 0) and requeues the job;
the requeued job resumes from that checkpoint. A job SLURM itself pre-empts (--requeue) gets SIGTERM
in its tasks directly and resumes the same way. `--dry-run` prints the script instead of writing it.
"""
from __future__ import annotations

import os
import re
import shlex
import sys

from launch import launcher

# SLURM signals the batch shell only (B:), and with USR1 rather than TERM so that an `scancel`
# (which sends TERM) cancels for good instead of requeueing. A requeue is asked for after the
# tasks have saved: requeueing a running job would kill them first.
BODY = """\
requeue=0
trap 'requeue=1; kill -TERM "$pid"' USR1
srun --kill-on-bad-exit=1 {command} &
pid=$!
wait "$pid"
status=$?
if [ "$requeue" = 1 ]; then
  wait "$pid"
  status=$?
  [ "$status" = 0 ] && scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
"""


def script(command: list[str], nodes: int, gpus_per_node: int, per: str, job_name: str = "kiln",
           partition: str = "", time: str = "") -> str:
    """The batch script: #SBATCH lines, then `srun COMMAND` on every task with the requeue handler."""
    tasks = gpus_per_node if per == "gpu" else 1
    gpus = "--gpus-per-task=1" if per == "gpu" else f"--gpus-per-node={gpus_per_node}"
    options = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks}", gpus,
               *([f"--partition={partition}"] if partition else []), *([f"--time={time}"] if time else []),
               f"--output={job_name}-%j.out", "--open-mode=append", "--requeue", "--signal=B:USR1@120"]
    # JAX's SLURM detection would keep only GPU number SLURM_LOCALID of those a task sees.
    visible = ",".join(str(i) for i in range(gpus_per_node if per == "node" else 1))
    return "\n".join(["#!/bin/bash", *(f"#SBATCH {o}" for o in options), "",
                      f"export JAX_LOCAL_DEVICE_IDS={visible}", BODY.format(command=shlex.join(command))])


def _written_here(path: str) -> bool:
    """Whether `path` is a batch script this launcher wrote (an earlier one may be replaced; nothing else is)."""
    try:
        with open(path, errors="replace") as f:
            text = f.read(1 << 16)
    except OSError:
        return False
    return text.startswith("#!/bin/bash\n#SBATCH --job-name=") and BODY.splitlines()[1] in text


def main(argv: list[str] | None = None) -> int:
    p = launcher.parser("python -m launch.slurm", __doc__)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus_per_node", type=int, required=True)
    p.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per GPU or per node")
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="", help="the time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--job_name", default="kiln")
    p.add_argument("--out", default="kiln_job.sbatch", help="where to write the script")
    a, command = launcher.parse(p, argv)
    if a.nodes < 1 or a.gpus_per_node < 1:
        p.error("--nodes and --gpus_per_node must be at least 1")
    if a.time and not re.fullmatch(r"(\d+-)?\d+:\d\d:\d\d", a.time):
        p.error(f"--time={a.time!r} is not HH:MM:SS or D-HH:MM:SS")
    if not re.fullmatch(r"[\w.-]+", a.job_name):
        p.error(f"--job_name={a.job_name!r}: use letters, digits, '_', '.' and '-'")
    # A line break would end the #SBATCH lines there (sbatch reads none after a command), a space the option.
    if a.partition and not re.fullmatch(r"[\w.-]+(,[\w.-]+)*", a.partition):
        p.error(f"--partition={a.partition!r}: a partition name (letters, digits, '_', '.', '-'), or several "
                "separated by commas")
    launcher.check_processes(p, a.mesh, a.nodes * (a.gpus_per_node if a.per == "gpu" else 1), "use --per=node")
    text = script(command, a.nodes, a.gpus_per_node, a.per, a.job_name, a.partition, a.time)
    if a.dry_run:
        print(text, end="")
        return 0
    if os.path.isfile(a.out) and not _written_here(a.out):
        p.error(f"--out={a.out} exists and is no script of this launcher's; name a new file (or remove it)")
    try:
        with open(a.out, "w") as f:
            f.write(text)
    except OSError as e:  # a directory, a missing directory: one line, not a traceback
        p.error(f"--out={a.out}: cannot write the script ({e.strerror}); name a file in an existing directory")
    print(f"wrote {a.out}; submit it with:", file=sys.stderr)
    print(shlex.join(["sbatch", a.out]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
