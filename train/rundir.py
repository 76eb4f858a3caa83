"""The run directory as a resource: one run at a time, writable, and nothing of a past attempt lost.

- `RunLock`: an exclusive `flock` on `run_dir/.lock`, held for the whole run. The kernel drops it
  when the process dies, so a lock left by a killed run never blocks the restart.
- `set_aside`: files of an attempt that a restart supersedes (metrics of a run killed before its
  first checkpoint, a replaced config.json) move to `run_dir/superseded/<time>/`, never deleted.
- `config_changes`: what a resumed run changes relative to the config it started with, split into
  changes that are only noted and changes that alter the model, the batches or their order.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from typing import Any

LOCK_FILE = ".lock"
SUPERSEDED_DIR = "superseded"

# On resume these keys may change freely (the change is printed): they neither reshape the state
# nor alter which batches come next. Prefixes end with a dot. `model.init_from` only seeds a fresh
# run: a resumed one restores its own checkpoint, so the source moving elsewhere does not matter.
FREE_ON_RESUME = ("run_dir", "optim.", "train.", "checkpoint.", "mesh.", "data.eval_sources.", "loss.z_loss",
                  "model.dtype", "model.remat", "model.scan_layers", "model.init_from", "data.num_workers", "eval.")
# These cannot change at all: the checkpoint's arrays would not fit, or the run would be another stage.
NEVER_ON_RESUME = ("stage", "loss.type", "peft.", "model.")


class RunDirError(RuntimeError):
    """The run directory cannot be used (in use by another process, not writable)."""


class RunLock:
    """Exclusive use of a run directory by one process (the process with index 0 of a run)."""

    def __init__(self, run_dir: str):
        if "://" in run_dir:  # abspath would make "gs://b/r" a local folder named "gs:"
            raise RunDirError(f"run_dir={run_dir!r} is a URL; Kiln writes run directories through the file system: "
                              "mount the bucket (e.g. gcsfuse) and give the mount's path")
        self.run_dir = os.path.abspath(run_dir)
        self.path = os.path.join(self.run_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        make_run_dir(self.run_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"run directory {self.run_dir} cannot be written ({e.strerror or e}); "
                              "fix its permissions or choose another --config.run_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(f"run directory {self.run_dir} is in use by {holder}; wait for that run to end "
                              "or choose another --config.run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, harmless without the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_run_dir(run_dir: str) -> None:
    """RunDirError if `run_dir`, or the nearest of its parents that exists, is a file; creates nothing."""
    path = os.path.abspath(run_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        what = "" if path == os.path.abspath(run_dir) else f" cannot be created: {path}"
        raise RunDirError(f"run directory {run_dir}{what} is a file; choose another --config.run_dir")


def make_run_dir(run_dir: str) -> None:
    """Creates `run_dir` (and its parents); RunDirError when it, or a parent, is a file or cannot be created."""
    check_run_dir(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"run directory {run_dir} cannot be created ({e.strerror or e}); fix its parent's "
                          "permissions or choose another --config.run_dir") from None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"process {info['pid']} on {info['host']} (since {info['started']})"
    except (OSError, ValueError, KeyError):
        return "another process"


def set_aside(run_dir: str, names: list[str]) -> str | None:
    """Moves the `names` that exist in `run_dir` into a new `superseded/<time>/`; returns it (or None)."""
    present = [n for n in names if os.path.exists(os.path.join(run_dir, n))]
    if not present:
        return None
    dest = os.path.join(run_dir, SUPERSEDED_DIR, time.strftime("%Y%m%d-%H%M%S"))
    suffix, base = 1, dest
    while os.path.exists(dest):
        dest, suffix = f"{base}-{suffix}", suffix + 1
    os.makedirs(dest)
    for name in present:
        shutil.move(os.path.join(run_dir, name), os.path.join(dest, name))
    return dest


def read_config(run_dir: str) -> dict[str, Any] | None:
    """The config.json a run directory holds (None if it has none); RunDirError if it cannot be read,
    since the settings a resumed run may not change are then unknown."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} cannot be read ({e}), so a resume cannot be checked against the settings the run "
                          f"started with; restore it (an earlier copy may be in {SUPERSEDED_DIR}/) or move it aside "
                          "to resume unchecked") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{path} holds no config object; restore it or move it aside to resume unchecked")
    return config


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(free, guarded, fixed) lists of "key: old -> new" between two config dicts. Free changes are
    only noted; guarded ones (the data stream, the seed) need `checkpoint.allow_changes`; fixed
    ones (model shape, stage, loss, PEFT) can never apply to a resumed run."""
    a, b = _flatten(old), _flatten(json.loads(json.dumps(new, default=str)))
    free, guarded, fixed = [], [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
        if any(key == p or (p.endswith(".") and key.startswith(p)) for p in FREE_ON_RESUME):
            free.append(line)
        elif any(key == p or (p.endswith(".") and key.startswith(p)) for p in NEVER_ON_RESUME):
            fixed.append(line)
        else:
            guarded.append(line)
    return free, guarded, fixed
