"""`kiln sweep --config=configs/sweeps/NAME.py[:variant] [--config.KEY=VALUE ...] [--print]`

Runs an ablation: one training config at every point of a grid (or a list of points), for every
seed, one run after another, then tabulates and plots the metrics it names. A sweep module defines
`get_config(variant)` returning:

    run_dir   where each run goes (run_dir/POINT/seed_S) and the results are written
    base      the stage config, "configs/STAGE.py[:variant]"
    overrides ["KEY=VALUE", ...] for every run
    grid      ((KEY, (VALUE, ...)), ...): every combination is a point; or
    points    ({KEY: VALUE, ...}, ...): the points themselves (a point may set several keys)
    labels    optional names of the points (default: their keys' last parts and values)
    seeds     (0, 1, ...): each point runs once per seed (the config's `seed`)
    metrics   ("eval/loss", ...): read from each run's metrics.jsonl (its last value of each)
    plot      {"x": KEY or "" (the points in order), "y": (METRIC, ...), "series": KEY or ""}

Re-running the same command skips finished runs (checkpoint at train.steps) and resumes an
interrupted one. `--print` prints one `kiln train` command per run instead of running them, for a
cluster's scheduler. Writes `results.json` (per point: the runs' metrics, mean and std over seeds),
`results.md` (mean ± std per point) and `results.png` into run_dir.
"""
from __future__ import annotations

import itertools
import math
import os
import re
import shlex
import sys
import time
from typing import Any

import numpy as np

from launch.config import ConfigError, apply_override, load_config, load_module
from launch.stage_results import changed_since, finished, train_metrics
from launch.train import split_args
from train import records, rundir, trainer


def main(argv: list[str]) -> int:
    spec, overrides, other = split_args(argv, "kiln sweep", __doc__)
    if [a for a in other if a != "--print"]:
        raise ConfigError(f"unknown argument {other[0]!r}; sweep values are set with --config.KEY=VALUE, "
                          "--print prints the commands")
    sweep = load_sweep(spec, overrides)
    runs = plan(sweep)
    if "--print" in other:
        for _, _, args in runs:
            print(shlex.join(["kiln", "train", f"--config={sweep.base}", *args]))
        return 0
    results = run(sweep, runs)
    if "preempted" in results:
        print(f"stopped the sweep in {results['preempted']['run_dir']} at step {results['preempted']['step']} "
              "(pre-empted); run the same command to resume")
        return 0
    print(markdown(results))
    return 0


def load_sweep(spec: str, overrides: list[str]) -> Any:
    """The sweep's settings with `--config.KEY=VALUE` overrides applied; ConfigError if malformed."""
    path, _, variant = spec.partition(":")
    config = load_module(path, "sweep", ("get_config",)).get_config(variant)
    for item in overrides:
        apply_override(config, item, keys_in=f"{path}'s get_config")
    for key in ("run_dir", "base", "seeds", "metrics"):
        if key not in config or config[key] in ("", (), None):
            raise ConfigError(f"{path}: a sweep sets {key!r}")
    if ("grid" in config) == ("points" in config):
        raise ConfigError(f"{path}: a sweep sets either 'grid' or 'points'")
    # An empty grid would run the base config alone (or nothing at all) under the sweep's name.
    if "grid" in config and (not config.grid or any(not values for _, values in config.grid)):
        raise ConfigError(f"{path}: the sweep's grid is empty; give each key at least one value, as "
                          "grid=((KEY, (VALUE, ...)), ...)")
    if len(set(config.seeds)) != len(config.seeds):  # one run directory per seed: a repeat would count twice
        raise ConfigError(f"{path}: the sweep's seeds repeat ({', '.join(map(str, config.seeds))}); list each once")
    if "points" in config and not config.points:
        raise ConfigError(f"{path}: the sweep's points are empty; give at least one {{KEY: VALUE}} point")
    return config


def points(sweep: Any) -> list[tuple[str, dict[str, Any]]]:
    """The sweep's points in order: (name, {KEY: VALUE})."""
    if "points" in sweep:
        found = [dict(p) for p in sweep.points]
    else:
        keys = [k for k, _ in sweep.grid]
        found = [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in sweep.grid))]
    labels = list(sweep.get("labels", ())) or [
        "_".join(f"{k.split('.')[-1]}={v}" for k, v in p.items()) or "base" for p in found]
    names = [re.sub(r"[^A-Za-z0-9=._-]", "-", label) for label in labels]  # each a directory name
    if len(labels) != len(found) or len(set(names)) != len(names):
        raise ConfigError(f"a sweep's labels name each of its {len(found)} points once (as directory names: "
                          f"{', '.join(names)})")
    return list(zip(names, found))


def plan(sweep: Any) -> list[tuple[str, int, list[str]]]:
    """(point name, seed, --config arguments) of every run; each is checked as `kiln train` would."""
    out = []
    for name, point in points(sweep):
        for seed in sweep.seeds:
            run_dir = os.path.join(sweep.run_dir, name, f"seed_{seed}")
            args = [f"--config.{o}" for o in sweep.overrides] + [f"--config.{k}={v}" for k, v in point.items()]
            args += [f"--config.seed={seed}", f"--config.run_dir={run_dir}"]
            load_config(sweep.base, args)  # a bad point stops the sweep before any run
            out.append((name, seed, args))
    return out


def run(sweep: Any, runs: list[tuple[str, int, list[str]]]) -> dict[str, Any]:
    """Runs (or skips) every run in order; returns the results (also written to run_dir)."""
    lock = rundir.RunLock(sweep.run_dir)  # one sweep per directory; creates it
    lock.acquire()
    try:
        done: dict[str, dict[str, float]] = {}
        started = time.perf_counter()
        for i, (name, seed, args) in enumerate(runs):
            config = load_config(sweep.base, args)
            label = f"[{i + 1}/{len(runs)}] {name} seed {seed}"
            if finished("train", config):
                print(f"{label}: finished earlier{changed_since(config)}, skipped", flush=True)
            else:
                print(f"{label} (sweep {(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)
                stopped_at = trainer.train(config).get("preempted_at")
                if stopped_at:  # the machine is going away: the later runs wait for the resume
                    return {"preempted": {"run_dir": config.run_dir, "step": stopped_at}}
            done[config.run_dir] = train_metrics(config.run_dir)
            results = summarise(sweep, runs, done)
            records.write_json_atomic(os.path.join(sweep.run_dir, "results.json"), results)
            records.write_text_atomic(os.path.join(sweep.run_dir, "results.md"), markdown(results) + "\n")
        plot(results, sweep, os.path.join(sweep.run_dir, "results.png"))
        return results
    finally:
        lock.release()


def summarise(sweep: Any, runs: list[tuple[str, int, list[str]]], done: dict[str, dict[str, float]]
              ) -> dict[str, Any]:
    """Per point: its runs' metrics and their mean and (sample) std over seeds, for the runs done."""
    out = []
    for name, point in points(sweep):
        rows = [{"seed": seed, "run_dir": run_dir,
                 "metrics": {m: done[run_dir].get(m, math.nan) for m in sweep.metrics}}
                for n, seed, args in runs if n == name
                for run_dir in [args[-1].split("=", 1)[1]] if run_dir in done]
        if not rows:
            continue
        values = {m: np.array([r["metrics"][m] for r in rows], float) for m in sweep.metrics}
        out.append({"point": name, "overrides": point, "runs": rows,
                    "mean": {m: float(v.mean()) for m, v in values.items()},
                    "std": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()}})
    return {"sweep": sweep.to_dict(), "points": out}


def markdown(results: dict[str, Any]) -> str:
    """One row per point: mean ± std over seeds of each metric."""
    metrics = list(results["sweep"]["metrics"])
    lines = ["| point | seeds | " + " | ".join(metrics) + " |", "|---" * (2 + len(metrics)) + "|"]
    for p in results["points"]:
        cells = [f"{p['mean'][m]:.4f} ± {p['std'][m]:.4f}" for m in metrics]
        lines.append(f"| {p['point']} | {len(p['runs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], sweep: Any, path: str) -> None:
    """Each y metric against x (a key's value, or the points in order), a line per series value,
    error bars the std over seeds; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = sweep.get("plot", {})
    x_key, series_key = spec.get("x", ""), spec.get("series", "")
    ys = list(spec.get("y", ())) or list(sweep.metrics)
    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 4), squeeze=False)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for p in results["points"]:
        groups.setdefault(p["overrides"].get(series_key, "") if series_key else "", []).append(p)
    for ax, metric in zip(axes[0], ys):
        for label, pts in groups.items():
            xs = [p["overrides"].get(x_key) if x_key else p["point"] for p in pts]
            ax.errorbar([str(x) for x in xs] if not all(isinstance(x, (int, float)) for x in xs) else xs,
                        [p["mean"][metric] for p in pts], yerr=[p["std"][metric] for p in pts], marker="o",
                        capsize=3, label=f"{series_key}={label}" if series_key else None)
        ax.set_xlabel(x_key or "point")
        ax.set_ylabel(metric)
        ax.tick_params(axis="x", labelrotation=30)
        if series_key:
            ax.legend()
    fig.suptitle(os.path.basename(os.path.normpath(sweep.run_dir)))
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
