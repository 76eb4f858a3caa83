"""Eval bits per byte on held-out Tiny Shakespeare reached within a fixed wall-clock budget.

  KILN_DATA_DIR=../shared/data kiln bench shakespeare                 # configs/pretrain.py:shakespeare, 15 min
  kiln bench shakespeare --budget_s=300 --config.train.steps=60        # any override of the variant

Runs `kiln train` on the variant in a fresh run directory, as a user would, and times it from the
command's start: tokenizer training, compilation, evaluation and checkpoints all count. Each eval row
is stamped with the wall time at which it appeared in metrics.jsonl. The verdict is the last eval
reached within `--budget_s`. Prints one row per evaluation, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import positive

CONFIG = "configs/pretrain.py:shakespeare"
METRIC = "eval/bits_per_byte"


def read_rows(path: str, seen: int) -> list[dict]:
    """Complete rows of metrics.jsonl after the first `seen`."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().split("\n")[:-1]]  # a line without its newline is still being written
    return [json.loads(line) for line in lines[seen:]]


def measure(budget_s: float, overrides: list[str], run_dir: str, poll_s: float = 0.5) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "launch.main", "train", f"--config={CONFIG}", f"--config.run_dir={run_dir}",
           "--config.train.progress=false", *overrides]
    metrics = os.path.join(run_dir, "metrics.jsonl")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo)
    rows, evals = [], []
    while True:
        done = proc.poll() is not None
        for row in read_rows(metrics, len(rows)):
            rows.append(row)
            if METRIC in row:
                evals.append(dict(step=row["step"], wall_s=time.perf_counter() - start, bits_per_byte=row[METRIC]))
                print(f"step {row['step']:5d}  {evals[-1]['wall_s']:7.1f}s  eval bits/byte {row[METRIC]:.4f}",
                      flush=True)
        if done:
            break
        time.sleep(poll_s)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"kiln train exited with {proc.returncode}: {' '.join(cmd)}")
    train_rows = [r for r in rows if r.get("tokens_per_s")]
    within = [e for e in evals if e["wall_s"] <= budget_s]
    with open(os.path.join(run_dir, "env.json")) as f:
        env = json.load(f)
    return dict(config=CONFIG, overrides=overrides, budget_s=budget_s, wall_s=wall,
                bits_per_byte=evals[-1]["bits_per_byte"] if evals else None,
                bits_per_byte_within_budget=within[-1]["bits_per_byte"] if within else None,
                evals=evals, steps=rows[-1]["step"] if rows else 0,
                kiln_tokens_per_s=float(np.median([r["tokens_per_s"] for r in train_rows])) if train_rows else None,
                mfu=float(np.median([r["mfu"] for r in train_rows if r.get("mfu")])) if train_rows else None,
                reference_tokens_per_s=None, ratio=None, peak_memory_mb=None,
                device=env.get("device_kind"), versions=env.get("packages", {}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln bench shakespeare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget_s", type=positive(float), default=900.0, help="wall-clock budget in seconds (default 15 min)")
    p.add_argument("--run_dir", default=None, help="keep the run here (default: a temporary directory)")
    a, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        p.error(f"unknown argument {bad[0]!r}; overrides of the variant are --config.KEY=VALUE")
    if not os.environ.get("KILN_DATA_DIR"):
        p.error("KILN_DATA_DIR is not set; point it at the shared data directory (it holds tinyshakespeare.txt)")
    with tempfile.TemporaryDirectory() as tmp:
        row = measure(a.budget_s, overrides, a.run_dir or os.path.join(tmp, "run"))
    verdict = row["bits_per_byte_within_budget"]
    print(f"shakespeare: {row['bits_per_byte']:.4f} eval bits/byte after {row['steps']} steps in {row['wall_s']:.0f}s "
          f"(tokenizer and compilation included); within the {a.budget_s:.0f}s budget: "
          f"{'none' if verdict is None else f'{verdict:.4f}'}; {row['kiln_tokens_per_s']:,.0f} tokens/s")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
