"""What a finished stage or run left behind, for `kiln pipeline` and `kiln sweep`: whether it is done
(`finished`, and `changed_since` for the settings a re-run would skip it with), its headline numbers
(`stage_metrics`, `train_metrics`), and a recipe's results table (`result_rows`, `stages_done`, `read_results`,
`markdown`, `plot`).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from data import tokenizer as tokenizers
from launch.config import ConfigError
from train import build, checkpoint, rejection, rundir


def result_rows(stages: list[dict[str, Any]], done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished stages' rows in order; a helper's metrics (and time) join the stage it is part of."""
    by_stage = {}
    for s in stages:
        if s["name"] in done and not s.get("part_of"):
            by_stage[s["name"]] = dict(done[s["name"]], metrics=dict(done[s["name"]]["metrics"]), parts=[])
    for s in stages:
        owner = s.get("part_of")
        if owner in by_stage and s["name"] in done:
            helper = done[s["name"]]
            by_stage[owner]["metrics"].update({f"{s['name']}/{k}": v for k, v in helper["metrics"].items()})
            by_stage[owner]["seconds"] += helper["seconds"]
            by_stage[owner]["parts"].append(s["name"])
            by_stage[owner].setdefault("part_seconds", {})[s["name"]] = helper["seconds"]
    return list(by_stage.values())


def stages_done(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each stage's own entry (time and metrics) from the rows of an earlier results.json, helpers split
    out of the stage they joined, so a re-run that repeats only one of the two counts each time once."""
    done = {}
    for row in rows:
        parts = row.get("part_seconds", {})
        done[row["stage"]] = dict(row, seconds=row["seconds"] - sum(parts.values()))
        for helper, seconds in parts.items():
            prefix = f"{helper}/"
            done[helper] = {"stage": helper, "seconds": seconds,
                            "metrics": {k[len(prefix):]: v for k, v in row["metrics"].items() if k.startswith(prefix)}}
    return done


def finished(command: str, config: Any) -> bool:
    """Whether a stage's run is done: a train run's checkpoint reached train.steps, a generate or eval
    run wrote its results.json (ValueError for a generate run's, made with other settings)."""
    if command == "tokenizer":
        return os.path.isfile(os.path.join(config.run_dir, "tokenizer.model"))
    if command == "train":
        try:  # a stage stopped before its first checkpoint has an empty checkpoints/ directory
            return checkpoint.latest_step(config.run_dir) >= config.train.steps
        except (checkpoint.CheckpointError, FileNotFoundError):
            return False
    done = os.path.isfile(os.path.join(config.run_dir, "results.json"))
    if done and command == "generate":
        rejection.check_settings(config)
    return done


def changed_since(config: Any) -> str:
    """For a finished run that a re-run skips: "" when its config.json matches `config`, else a note
    of what differs (optimizer, steps, evaluation: its results stand, from other settings). ConfigError
    when the model, stage, loss, data or seed differ: the recipe would build on another model than it
    names."""
    started_with = rundir.read_config(config.run_dir)
    if started_with is None:
        return ""
    config = config.copy_and_resolve_references()
    try:
        config.data.tokenizer = build.tokenizer_name(config)  # as the run recorded it: "auto" made concrete
    except ValueError:  # the source cannot say (any more): compared as written
        pass
    free, guarded, fixed = rundir.config_changes(started_with, config.to_dict())
    if fixed or guarded:
        raise ConfigError(f"{config.run_dir} finished with other settings ({(fixed + guarded)[0]}), which the run "
                          f"it is reused for would not have; move {config.run_dir} aside to run it again, or undo "
                          "the change")
    return f" with other settings ({'; '.join(free)}; move {config.run_dir} aside to run it again)" if free else ""


def stage_metrics(command: str, run_dir: str) -> dict[str, float]:
    """A finished stage's headline numbers, from the files it wrote: a train stage's last eval row
    and last train row (its keys under train/) of metrics.jsonl; a generate stage's results; an eval
    stage's text metrics and each setting's accuracy, with `accuracy` the best setting's."""
    if command == "train":
        return train_metrics(run_dir)
    if command == "tokenizer":
        return {"vocab_size": float(tokenizers.load(os.path.join(run_dir, "tokenizer.model")).vocab_size)}
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
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):  # the last row, torn by a kill while it was written
                break
            raise ValueError(f"{path} line {n}: not a JSON row; delete the line to go on") from None
        out.update({k if k.startswith("eval/") else f"train/{k}": float(v) for k, v in row.items()
                    if isinstance(v, (int, float)) and k != "step"})
    return out


def read_results(root: str) -> list[dict[str, Any]]:
    """The stage rows of an earlier results.json; one that cannot be read is set aside with a warning
    (the stages' own outputs rebuild every row but the times of the stages skipped)."""
    path = os.path.join(root, "results.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            return list(json.load(f)["stages"])
    except (ValueError, KeyError, TypeError) as e:
        dest = rundir.set_aside(root, ["results.json", "results.md"])
        print(f"warning: {path} cannot be read ({e}); moved it to {dest} and rebuilt it from the stages' outputs",
              file=sys.stderr, flush=True)
        return []


def plot(results: dict[str, Any], path: str) -> None:
    """A bar chart of held-out accuracy by stage (stages without an accuracy are left out), written
    atomically; nothing when no stage has one."""
    rows = [r for r in results["stages"] if "accuracy" in r["metrics"]]
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 4))
    values = [100 * r["metrics"]["accuracy"] for r in rows]
    ax.bar([r["stage"] for r in rows], values, color="tab:blue")
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("held-out accuracy, best setting (%)")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def markdown(results: dict[str, Any]) -> str:
    """One row per stage: its command, wall time and headline metrics."""
    keys = ("accuracy", "pair_accuracy", "eval/loss", "eval/rewards/accuracies", "train/reward/mean", "pass@1",
            "best_of_k", "kept_fraction", "train/loss")
    lines = ["| stage | command | minutes | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
    for r in results["stages"]:
        # A helper's figures (rs_generate/pass@1, ...) fill its stage's empty columns.
        m = r["metrics"]
        found = {k: m[k] if k in m else next((m[f"{p}/{k}"] for p in r.get("parts", ()) if f"{p}/{k}" in m), None)
                 for k in keys}
        cells = ["" if found[k] is None else f"{found[k]:.3f}" for k in keys]
        lines.append(f"| {r['stage']} | {r['command']} | {r['seconds'] / 60:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
