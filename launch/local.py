"""`python -m launch.local --num_processes=N -- kiln train ...`: N processes on this machine, joined
by `jax.distributed` over loopback, each running the same command: how multi-host code paths
(per-process data shards, cooperative checkpoints, collectives across processes) run without a cluster.

Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i
(train/distributed.py) and `--devices_per_process` CPU devices. Process 0 writes to this terminal,
the others to `--log_dir`/process_I.log. SIGINT / SIGTERM are passed on to every process (a pre-empted
run saves and stops, Step 8's preemption path); when one process fails, the others are stopped.
The exit status is the first failure's, else 0. `--dry-run` prints each process's command line.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys

from launch import launcher


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environments(num_processes: int, port: int, devices_per_process: int) -> list[dict[str, str]]:
    """The variables each process is started with (on top of this process's environment)."""
    flags = f"--xla_force_host_platform_device_count={devices_per_process}"
    return [{"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(num_processes),
             "JAX_PROCESS_ID": str(i), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
            for i in range(num_processes)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m launch.local --num_processes=N [--devices_per_process=1] [--log_dir=DIR] "
              "[--dry-run] -- COMMAND ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_processes", type=int, required=True)
    p.add_argument("--devices_per_process", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="the coordinator's port (default: a free one)")
    p.add_argument("--log_dir", default="", help="where processes 1.. write (default: the temp directory)")
    p.add_argument("--dry-run", action="store_true", dest="dry_run")
    a = p.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command or a.num_processes < 1 or a.devices_per_process < 1:
        p.error("give a command after --, and --num_processes and --devices_per_process of at least 1")
    if a.port:  # 0: a free one
        launcher.check_port(p, f"--port={a.port}", str(a.port))
    if not a.dry_run and not shutil.which(command[0]):
        p.error(f"{command[0]!r} not found: activate the environment kiln is installed in")
    envs = environments(a.num_processes, a.port or free_port(), a.devices_per_process)
    log_dir = a.log_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kiln_local_{os.getpid()}")
    logs = [None, *(os.path.join(log_dir, f"process_{i}.log") for i in range(1, a.num_processes))]
    return launcher.start_here("launch.local", command, envs, logs, log_dir, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
