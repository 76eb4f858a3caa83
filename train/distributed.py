"""Joining a multi-process run: one JAX controller process per host (or per GPU), all running the
same command, joined by `jax.distributed` before any device is touched.

How a process learns that it is one of several, first match wins:
  explicit  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID,
            all three (what `python -m launch.local` and the plain multi-node recipe set);
  SLURM     a job step of more than one task (srun), SLURM's own variables;
  TPU pod   a Cloud TPU VM with more than one worker (TPU_WORKER_HOSTNAMES), found by JAX;
  otherwise one process, and nothing here does anything.
A coordinator that cannot be reached ends the run after `timeout_s` (KILN_DISTRIBUTED_TIMEOUT_S,
default 300) with one line saying so, and processes started with different configs stop at the first
collective check (`check_same`). Process 0 waits as long for the others; after that JAX's runtime
ends every process.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class DistributedError(ValueError):
    """A multi-process run that cannot start: reported as one line."""


def describe(environ: Mapping[str, str] = os.environ) -> dict | None:
    """The arguments of `jax.distributed.initialize` this environment calls for (None: one process)."""
    given = [k for k in EXPLICIT if environ.get(k)]
    if given:
        if len(given) < len(EXPLICIT):
            missing = ", ".join(k for k in EXPLICIT if k not in given)
            raise DistributedError(f"{', '.join(given)} set but {missing} not: a multi-process run needs all of "
                                   f"{', '.join(EXPLICIT)} (python -m launch.local sets them), a single one none")
        try:
            n, i = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
        except ValueError:
            raise DistributedError(f"JAX_NUM_PROCESSES={environ['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                                   f"{environ['JAX_PROCESS_ID']!r} must be integers") from None
        if not 0 <= i < n:
            raise DistributedError(f"JAX_PROCESS_ID={i} is not in [0, JAX_NUM_PROCESSES={n})")
        return dict(coordinator_address=environ["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=i)
    if environ.get("SLURM_JOB_ID") and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return dict(cluster_detection_method="slurm")
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return {}  # JAX's Cloud TPU detection finds the coordinator and this worker's id
    return None


def initialize(timeout_s: int | None = None, environ: Mapping[str, str] = os.environ) -> None:
    """Joins the multi-process run the environment describes (nothing for a single process). Must run
    before the first use of a device; calling it again is harmless."""
    how = describe(environ)
    timeout_s = timeout_s or int(environ.get("KILN_DISTRIBUTED_TIMEOUT_S", "300"))
    if how is None or jax.distributed.is_initialized():
        return
    if jax.config.jax_platforms in (None, "", "cpu") and "coordinator_address" in how:
        # Without it, CPU processes cannot run computations that span them.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if how.get("process_id", 0) > 0:
        # The runtime aborts the process (no Python error) when the coordinator never answers: ask first.
        _wait_for(how["coordinator_address"], how["process_id"], how["num_processes"], timeout_s)
    try:
        jax.distributed.initialize(initialization_timeout=timeout_s, **how)
    except Exception as e:  # noqa: BLE001 - the runtime's errors have no common type; one line says why
        where = (f"coordinator {how['coordinator_address']}, process {how['process_id']} of {how['num_processes']}"
                 if "coordinator_address" in how else f"found by {how.get('cluster_detection_method') or 'Cloud TPU'}")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"could not join the multi-process run ({where}) within {timeout_s}s: {first}. "
                               "Start every process with the same coordinator address and process count, "
                               "each with its own id, and make process 0's host reachable") from None


def _wait_for(address: str, process_id: int, num_processes: int, timeout_s: float) -> None:
    """Returns once something listens at `address` (host:port); DistributedError after `timeout_s`."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(f"process {process_id} of {num_processes} found no coordinator at {address} "
                                       f"within {timeout_s:g}s ({e.strerror or e}): start process 0 with the same "
                                       "JAX_COORDINATOR_ADDRESS, and check that its host and port are reachable") from None
            time.sleep(0.5)


def check_same(label: str, text: str) -> None:
    """DistributedError unless every process passes the same `text` (e.g. its resolved config)."""
    digests = gather_json(hashlib.sha256(text.encode()).hexdigest())
    odd = [p for p, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise DistributedError(f"process {odd[0]}'s {label} differs from process 0's: start every process with "
                               "the same command")


def gather_json(obj: Any) -> list[Any]:
    """Every process's `obj` (JSON-serialisable), in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64))).reshape(-1)
    padded = np.zeros((int(sizes.max()),), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


class Preemption:
    """A pre-emption notice (SIGTERM from a spot VM's shutdown, SLURM or launch.local) turned into one
    step at which every process stops: `reached(step)` is called after every train step and is true,
    on all processes at once, for the step to checkpoint and stop at. Use as a context manager."""

    def __init__(self) -> None:
        self.requested, self._previous = False, None

    def __enter__(self) -> "Preemption":
        # Several processes: JAX's preemption service catches SIGTERM and agrees on the step.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._notice)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _notice(self, signum: int, frame: Any) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested
