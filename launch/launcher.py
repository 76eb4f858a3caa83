"""What the cluster launchers (launch.tpu_pod, launch.slurm, launch.multinode) share: their own flags,
then `--` and the command every process runs, with the `--mesh=PRESET` overrides (configs/meshes.py)
appended; and starting processes on this machine and supervising them as launch.local does.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

from configs import meshes


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every launcher has: --mesh and --dry-run."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", default="", help=f"a mesh preset: {', '.join(meshes.PRESETS)}")
    p.add_argument("--dry-run", action="store_true", dest="dry_run", help="print the commands and exit")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's flags (before `--`) and the command after it, the mesh preset's overrides appended
    (so that they win over the config file's mesh)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        p.error("give the command to run after --, e.g. -- kiln train --config=configs/pretrain.py")
    if args.mesh:
        try:
            command += meshes.overrides(args.mesh)
        except ValueError as e:
            p.error(str(e))
    return args, command


def check_processes(p: argparse.ArgumentParser, mesh: str, processes: int, hint: str) -> None:
    """An argparse error when a preset spanning several nodes meets another process count: make_mesh
    tells the nodes apart by process, so the run would stop at its first step, after the queue."""
    nodes = meshes.dcn_size(mesh) if mesh else 1
    if nodes > 1 and nodes != processes:
        p.error(f"--mesh={mesh} spans {nodes} nodes over the network, one process each, but this starts "
                f"{processes} processes: {hint}")


def check_port(p: argparse.ArgumentParser, flag: str, port: str) -> None:
    """An argparse error for a port that is no TCP port: every process would fail to connect, after starting."""
    if not port.isdigit() or not 0 < int(port) < 65536:
        p.error(f"{flag}: the port {port!r} is not a TCP port (1 to 65535)")


def env_line(env: dict[str, str], command: list[str], log: str | None = None) -> str:
    """One process as a shell line: its variables, its command and where its output goes."""
    out = f" > {shlex.quote(log)} 2>&1" if log else ""
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(command) + out


def supervise(command: list[str], envs: list[dict[str, str]], logs: list[str | None]) -> int:
    """Runs `command` once per entry of `envs` (added to this environment), output to `logs` (None: this
    terminal). SIGINT / SIGTERM are passed on to every process (a pre-empted run saves and stops); when
    one fails the others are stopped, since they would wait for it at their next collective. Returns
    the first failure's exit status, else 0."""
    procs = []
    for env, log in zip(envs, logs):
        out = open(log, "w") if log else None
        procs.append(subprocess.Popen(command, env={**os.environ, **env}, stdout=out,
                                      stderr=subprocess.STDOUT if out else None))
        if out:
            out.close()  # the child has its own copy

    def forward(signum: int, _frame: object = None) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        while None in [proc.poll() for proc in procs]:  # a list: poll every process (any() stops early)
            failed = [proc.returncode for proc in procs if proc.returncode not in (None, 0)]
            if failed and not status:
                status = failed[0]
                forward(signal.SIGTERM)
            time.sleep(0.2)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return status or next((proc.returncode for proc in procs if proc.returncode), 0)


def start_here(prog: str, command: list[str], envs: list[dict[str, str]], logs: list[str | None], log_dir: str,
               dry_run: bool) -> int:
    """Prints each process's line (dry run), or starts and supervises the processes on this machine; a
    failure is reported with where the other processes' logs are."""
    if dry_run:
        for env, log in zip(envs, logs):
            print(env_line(env, command, log))
        return 0
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as e:  # a file of that name, say: before any process starts, not a traceback
        print(f"{prog}: error: --log_dir={log_dir}: cannot make the directory ({e.strerror}); name a directory",
              file=sys.stderr)
        return 2
    status = supervise(command, envs, logs)
    if status:
        print(f"{prog}: a process exited with status {status}; the others' logs are in {log_dir}", file=sys.stderr)
    return status
