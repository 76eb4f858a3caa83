"""The plain multi-node recipe, for clusters without SLURM ("torchrun-style"): run this on every node,
each with its own --node_rank, and it starts --processes_per_node processes here, all joined by
`jax.distributed` through the coordinator, which process 0 (on the node of rank 0) serves.

Usage (two nodes of 8 GPUs, one process per GPU; node0 is the first node's address):
    node0$ python -m launch.multinode --nodes=2 --node_rank=0 --coordinator=node0:8476 \\
               --processes_per_node=8 -- kiln train --config=configs/pretrain.py
    node1$ python -m launch.multinode --nodes=2 --node_rank=1 --coordinator=node0:8476 \\
               --processes_per_node=8 -- kiln train --config=configs/pretrain.py

Local process j of node i gets JAX_COORDINATOR_ADDRESS=HOST:PORT, JAX_NUM_PROCESSES=N*P and
JAX_PROCESS_ID=i*P+j (train/distributed.py), and with several processes per node
CUDA_VISIBLE_DEVICES=j, one GPU each (ignored on other hardware). Local process 0 writes to this
terminal, the others to --log_dir/process_ID.log. Signals, failures and the exit status are handled
as in launch.local. `--dry-run` prints each process's command line with its variables.
"""
from __future__ import annotations

import os
import shutil
import sys

from launch import launcher


def environments(nodes: int, node_rank: int, coordinator: str, per_node: int) -> list[dict[str, str]]:
    """The variables of this node's processes (on top of this process's environment)."""
    envs = []
    for j in range(per_node):
        env = {"JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": str(nodes * per_node),
               "JAX_PROCESS_ID": str(node_rank * per_node + j)}
        if per_node > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(j)
        envs.append(env)
    return envs


def main(argv: list[str] | None = None) -> int:
    p = launcher.parser("python -m launch.multinode", __doc__)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--node_rank", type=int, required=True, help="this node's rank, 0 .. nodes-1")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of process 0 (on the node of rank 0)")
    p.add_argument("--processes_per_node", type=int, default=1)
    p.add_argument("--log_dir", default="", help="where local processes 1.. write (default: the temp directory)")
    a, command = launcher.parse(p, argv)
    host, _, port = a.coordinator.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--coordinator={a.coordinator!r} is not HOST:PORT")
    launcher.check_port(p, f"--coordinator={a.coordinator}", port)
    if a.nodes < 1 or a.processes_per_node < 1 or not 0 <= a.node_rank < a.nodes:
        p.error("--nodes and --processes_per_node must be at least 1, and --node_rank in [0, nodes)")
    launcher.check_processes(p, a.mesh, a.nodes * a.processes_per_node, "use --processes_per_node=1")
    envs = environments(a.nodes, a.node_rank, a.coordinator, a.processes_per_node)
    log_dir = a.log_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kiln_multinode_{os.getpid()}")
    logs = [None] + [os.path.join(log_dir, f"process_{env['JAX_PROCESS_ID']}.log") for env in envs[1:]]
    if not a.dry_run and not shutil.which(command[0]):
        p.error(f"{command[0]!r} not found: activate the environment kiln is installed in")
    return launcher.start_here("launch.multinode", command, envs, logs, log_dir, a.dry_run)


if __name__ == "__main__":
    sys.exit(main())
