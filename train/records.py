"""Run-directory records: config.json, env.json, metrics.jsonl, TensorBoard events and the progress bar."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "sentencepiece", "ml-collections",
            "numpy", "kiln-lm")


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON through a temporary file and a rename, so a kill never leaves half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    """Writes text through a temporary file and a rename, so a kill never leaves half a file; on a
    failure (a full disk, `path` a directory) the temporary file is removed and `path` is untouched."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise


def git_revision() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """Versions, devices and revision: enough to tell two runs' set-ups apart."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "device_count": len(devices), "process_count": jax.process_count(), "git_revision": git_revision()}


def write_run_files(run_dir: str, config: ConfigDict) -> None:
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run_dir, "config.json"), config.to_dict())
    write_json_atomic(os.path.join(run_dir, "env.json"), environment())


def _fmt(value: Any, spec: str) -> str:
    """`value` formatted by `spec`; "nan" for a missing or non-finite number, so that display never fails."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return format(value, spec)
    return "nan" if value is None or isinstance(value, float) else str(value)


def _clean(value: Any) -> Any:
    """A JSON-safe metric: numbers as float (None when not finite: JSON has no NaN), text as is."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value if value is None or isinstance(value, str) else str(value)
    return number if math.isfinite(number) else None


class MetricsLogger:
    """Appends rows to metrics.jsonl (a resumed run continues the same file) and TensorBoard; process 0 only."""

    def __init__(self, run_dir: str, total_steps: int, start_step: int = 0, progress: bool = True):
        self.active = jax.process_index() == 0
        self.bar = None
        if not self.active:
            return
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        from tensorboardX import SummaryWriter  # heavy import, only on the writing process

        self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr)

    def log(self, step: int, row: dict[str, Any]) -> None:
        if not self.active:
            return
        clean = {"step": step, **{k: _clean(v) for k, v in row.items()}}
        self.file.write(json.dumps(clean) + "\n")
        for key, value in clean.items():
            if key != "step" and isinstance(value, float):
                self.tb.add_scalar(key, value, step)
        if self.bar is not None and "loss" in clean:
            self.bar.set_postfix(loss=_fmt(clean["loss"], ".4f"), tok_s=_fmt(clean.get("tokens_per_s"), ".0f"),
                                 mfu=_fmt(clean.get("mfu"), ".1%"), refresh=False)
        elif any(k.startswith("eval/") for k in clean):
            self.message(f"step {step}: " + ", ".join(f"{k}={_fmt(v, '.4f')}" for k, v in clean.items()
                                                      if k.startswith("eval/")))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
        self.file.close()
