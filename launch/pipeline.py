"""`kiln pipeline --config=configs/recipes/NAME.py[:variant] [--config.KEY=VALUE ...]`

Runs a recipe: named stages in order, each one Kiln command on a stage config with overrides.
A recipe module defines `get_config(variant)` (its own settings: `run_dir` and whatever its stages
are built from, overridable with --config.KEY=VALUE) and `stages(config)`, the ordered list of

    {"name": ..., "command": "train" | "generate" | "eval", "config": "configs/STAGE.py[:variant]",
     "overrides": ["KEY=VALUE", ...], "checkpoint": ...}    (checkpoint: eval only, the model evaluated)

In overrides and `checkpoint`, `@NAME` stands for the run directory of the earlier stage NAME and
`@NAME/FILE` for a file in it, so a stage takes an earlier one's model (`model.init_from=@sft`) or
data (`data.sources.train.path=@rs/sft.jsonl`). Each stage runs in `run_dir/NAME`. Re-running the
same command skips finished stages (a train stage whose checkpoint reached train.steps, a generate
or eval stage whose results.json exists) and resumes the interrupted one from its checkpoint.
Writes `results.json` and `results.md` (one row per stage: its final metrics and wall time) into
`run_dir` after every stage.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

from launch import eval as eval_cli
from launch.config import ConfigError, apply_override, load_config, load_module
from launch.train import split_args
from train import checkpoint, records, rejection, rundir, trainer

COMMANDS = ("train", "generate", "eval")
_REF = re.compile(r"@([A-Za-z0-9_\-]+)")


def main(argv: list[str]) -> int:
    spec, overrides, other = split_args(argv, "kiln pipeline", __doc__)
    if other:
        raise ConfigError(f"unknown argument {other[0]!r}; recipe values are set with --config.KEY=VALUE")
    recipe, stages = load_recipe(spec, overrides)
    results = run(recipe, stages)
    print(markdown(results))
    return 0


def load_recipe(spec: str, overrides: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    """(the recipe's settings with overrides applied, its checked list of stages)."""
    path, _, variant = spec.partition(":")
    module = load_module(path, "recipe", ("get_config", "stages"))
    config = module.get_config(variant) if variant else module.get_config()
    for item in overrides:
        apply_override(config, item)
    stages = list(module.stages(config))
    names: set[str] = set()
    for i, stage in enumerate(stages):
        where = f"{path}: stage {i} ({stage.get('name', '?')})"
        if stage.get("command") not in COMMANDS:
            raise ConfigError(f"{where}: command must be one of {', '.join(COMMANDS)}, got {stage.get('command')!r}")
        if not stage.get("name") or stage["name"] in names:
            raise ConfigError(f"{where}: every stage needs a name of its own")
        if (stage["command"] == "eval") != ("checkpoint" in stage):
            raise ConfigError(f"{where}: an eval stage names its `checkpoint`, and only an eval stage does")
        for ref in _REF.findall(" ".join(stage.get("overrides", ())) + " " + stage.get("checkpoint", "")):
            if ref not in names:
                raise ConfigError(f"{where}: @{ref} names no earlier stage")
        names.add(stage["name"])
    return config, stages


def run(recipe: Any, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs (or skips) every stage in order; returns the results (also written to run_dir)."""
    root = recipe.run_dir
    os.makedirs(root, exist_ok=True)
    lock = rundir.RunLock(root)  # one runner per pipeline directory (each stage locks its own)
    lock.acquire()
    try:
        done = {r["stage"]: r for r in _read_results(root)}
        results: dict[str, Any] = {"recipe": recipe.to_dict(), "stages": []}
        started = time.perf_counter()
        for i, stage in enumerate(stages):
            name, command, where = stage["name"], stage["command"], os.path.join(root, stage["name"])
            resolve = lambda text: _REF.sub(lambda m: os.path.join(root, m.group(1)), text)  # noqa: E731
            config = load_config(stage["config"], [f"--config.{resolve(o)}" for o in stage.get("overrides", ())]
                                 + [f"--config.run_dir={where}"])
            label = f"[{i + 1}/{len(stages)}] {name}: kiln {command} {stage['config']}"
            if finished(command, config):
                print(f"{label}: finished earlier, skipped", flush=True)
                seconds = done[name]["seconds"] if name in done else 0.0
            else:
                print(f"{label} (pipeline {(time.perf_counter() - started) / 60:.1f} min so far)", flush=True)
                t0 = time.perf_counter()
                if command == "train":
                    trainer.train(config)
                elif command == "generate":
                    rejection.run(config)
                else:
                    eval_cli.run(config, resolve(stage["checkpoint"]))
                seconds = time.perf_counter() - t0
            done[name] = {"stage": name, "command": command, "config": stage["config"], "run_dir": where,
                          "seconds": seconds, "metrics": _metrics(command, where)}
            results = {"recipe": recipe.to_dict(), "stages": [done[s["name"]] for s in stages if s["name"] in done]}
            records.write_json_atomic(os.path.join(root, "results.json"), results)
            records.write_text_atomic(os.path.join(root, "results.md"), markdown(results) + "\n")
        return results
    finally:
        lock.release()


def finished(command: str, config: Any) -> bool:
    """Whether a stage's run is done: a train run's checkpoint reached train.steps, a generate or eval
    run wrote its results.json."""
    if command == "train":
        try:  # a stage stopped before its first checkpoint has an empty checkpoints/ directory
            return checkpoint.latest_step(config.run_dir) >= config.train.steps
        except (checkpoint.CheckpointError, FileNotFoundError):
            return False
    return os.path.isfile(os.path.join(config.run_dir, "results.json"))


def _metrics(command: str, run_dir: str) -> dict[str, float]:
    """A finished stage's headline numbers, from the files it wrote: a train stage's last eval row
    and last train row (its keys under train/) of metrics.jsonl; a generate stage's results; an eval
    stage's text metrics and each setting's accuracy, with `accuracy` the best setting's."""
    if command == "train":
        return train_metrics(run_dir)
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    if command == "generate":
        return {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
    metrics = {k: float(v) for k, v in results["metrics"].items()}
    for row in results["tasks"]:
        setting = f"{row['shots']}shot{'_cot' if row['chain_of_thought'] else ''}"
        metrics[f"{row['task']}/{setting}/accuracy"] = float(row["accuracy"])
    if results["tasks"]:
        metrics["accuracy"] = max(float(row["accuracy"]) for row in results["tasks"])
    return metrics


def train_metrics(run_dir: str) -> dict[str, float]:
    """A finished train run's last value of every metric in metrics.jsonl: eval/... keys as they are,
    training's under train/."""
    out: dict[str, float] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for row in map(json.loads, f):
            out.update({k if k.startswith("eval/") else f"train/{k}": float(v) for k, v in row.items()
                        if isinstance(v, (int, float)) and k != "step"})
    return out


def _read_results(root: str) -> list[dict[str, Any]]:
    path = os.path.join(root, "results.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)["stages"]


def markdown(results: dict[str, Any]) -> str:
    """One row per stage: its command, wall time and headline metrics."""
    keys = ("accuracy", "eval/loss", "eval/accuracy", "eval/rewards/accuracies", "pass@1", "best_of_k", "kept_fraction",
            "train/loss")
    lines = ["| stage | command | minutes | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for r in results["stages"]:
        cells = [f"{r['metrics'][k]:.3f}" if k in r["metrics"] else "" for k in keys]
        lines.append(f"| {r['stage']} | {r['command']} | {r['seconds'] / 60:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
