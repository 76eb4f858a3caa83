"""`kiln pipeline --config=configs/recipes/NAME.py[:variant] [--config.KEY=VALUE ...]`

Runs a recipe: named stages in order, each one Kiln command on a stage config with overrides.
A recipe module defines `get_config(variant)` (its own settings: `run_dir` and whatever its stages
are built from, overridable with --config.KEY=VALUE) and `stages(config)`, the ordered list of

    {"name": ..., "command": "tokenizer" | "train" | "generate" | "eval", "config": "configs/STAGE.py[:variant]",
     "overrides": ["KEY=VALUE", ...], "checkpoint": ...}    (checkpoint: eval only, the model evaluated)

and optionally
    "evaluate": {"config": "configs/eval.py[:variant]", "overrides": [...]}   the stage's model is
                 evaluated into NAME/eval when it is done; the results join the stage's metrics
    "part_of":  NAME   a helper of a later stage: its metrics join that stage's row, prefixed "NAME/"
    "minutes":  the stage's expected wall time, for the pipeline's ETA

`tokenizer` trains the sentencepiece tokenizer its config's data settings describe into
NAME/tokenizer.model (what `data.tokenizer=train` would train inside a run).

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

from launch import eval as eval_cli, stage_results
from ml_collections import ConfigDict

from data import tokenizer as tokenizers
from launch.config import ConfigError, apply_override, load_config, load_module
from launch.train import split_args
from train import preflight, records, rejection, rundir, trainer

COMMANDS = ("tokenizer", "train", "generate", "eval")
STAGE_FIELDS = ("name", "command", "config", "overrides", "checkpoint", "evaluate", "part_of", "minutes")
EVALUATE_FIELDS = ("config", "overrides")
# The files a stage of each command writes into its directory (a train stage's directory is its run).
WRITES = {"tokenizer": ("tokenizer.model",), "generate": rejection.OUTPUTS, "eval": ("results.json", "results.md")}
# The stage of the configs that commands other than train and tokenizer run (train runs the others).
STAGE_OF = {"generate": "rejection_sampling", "eval": "eval"}
_REF = re.compile(r"@([A-Za-z0-9_\-]+)")
_FILE_REF = re.compile(r"@([A-Za-z0-9_\-]+)/([^/\s]+)")


def main(argv: list[str]) -> int:
    spec, overrides, other = split_args(argv, "kiln pipeline", __doc__)
    if other:
        raise ConfigError(f"unknown argument {other[0]!r}; recipe values are set with --config.KEY=VALUE")
    recipe, stages = load_recipe(spec, overrides)
    results = run(recipe, stages)
    if "preempted" in results:
        print(f"stopped the pipeline in stage {results['preempted']['stage']} at step {results['preempted']['step']} "
              f"(pre-empted) in {recipe.run_dir}; run the same command to resume")
        return 0
    print(stage_results.markdown(results))
    return 0


def load_recipe(spec: str, overrides: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    """(the recipe's settings with overrides applied, its checked list of stages)."""
    path, _, variant = spec.partition(":")
    module = load_module(path, "recipe", ("get_config", "stages"))
    config = module.get_config(variant) if variant else module.get_config()
    for item in overrides:
        apply_override(config, item, keys_in=f"{path}'s get_config")
    stages = module.stages(config)
    if not isinstance(stages, (list, tuple)):
        raise ConfigError(f"{path}: stages(config) must return a list of stage dicts, got {type(stages).__name__}")
    stages = list(stages)
    commands: dict[str, str] = {}
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise ConfigError(f"{path}: stage {i} is {type(stage).__name__}, not a dict of stage fields")
        where = f"{path}: stage {i} ({stage.get('name', '?')})"
        _check_fields(where, stage, STAGE_FIELDS)
        if "evaluate" in stage:
            if not isinstance(stage["evaluate"], dict):
                raise ConfigError(f"{where}: `evaluate` must be a dict of {' and '.join(EVALUATE_FIELDS)}")
            _check_fields(f"{where}: evaluate", stage["evaluate"], EVALUATE_FIELDS)
        if stage.get("command") not in COMMANDS:
            raise ConfigError(f"{where}: command must be one of {', '.join(COMMANDS)}, got {stage.get('command')!r}")
        if not stage.get("name") or stage["name"] in commands:
            raise ConfigError(f"{where}: every stage needs a name of its own")
        # The name is the stage's directory in run_dir and what @NAME refers to.
        if not _REF.fullmatch(f"@{stage['name']}") or stage["name"] == rundir.SUPERSEDED_DIR:
            raise ConfigError(f"{where}: a stage's name is its directory: letters, digits, _ and - only, and not "
                              f"{rundir.SUPERSEDED_DIR!r}")
        if (stage["command"] == "eval") != ("checkpoint" in stage):
            raise ConfigError(f"{where}: an eval stage names its `checkpoint`, and only an eval stage does")
        for field, kinds, what in (("checkpoint", str, "a run directory such as '@sft'"),
                                   ("part_of", str, "the name of a later stage"),
                                   ("minutes", (int, float), "a number of minutes")):
            if field in stage and not isinstance(stage[field], kinds):
                raise ConfigError(f"{where}: `{field}` must be {what}, got {stage[field]!r}")
        evaluate = stage.get("evaluate", {})
        if evaluate and stage["command"] != "train":
            raise ConfigError(f"{where}: only a train stage has a model to `evaluate`")
        if stage.get("part_of") and stage.get("part_of") not in {s.get("name") for s in stages[i + 1:]}:
            raise ConfigError(f"{where}: part_of={stage['part_of']!r} names no later stage")
        refs = " ".join([*stage.get("overrides", ()), *evaluate.get("overrides", ()), stage.get("checkpoint", "")])
        for ref in _REF.findall(refs):
            if ref not in commands:
                raise ConfigError(f"{where}: @{ref} names no earlier stage")
        for ref, name in _FILE_REF.findall(refs):  # a typo here would fail only once the stages before had run
            if commands[ref] in WRITES and name not in WRITES[commands[ref]]:
                raise ConfigError(f"{where}: @{ref}/{name} is no file of stage {ref}, whose kiln {commands[ref]} "
                                  f"writes {', '.join(WRITES[commands[ref]])}")
        commands[stage["name"]] = stage["command"]
    # A typo in a late stage's settings, a config its command does not run, or a reward model to evaluate
    # stops the pipeline now, not after the stages before it ran.
    trained: dict[str, Any] = {}  # stage name -> its config
    for i, stage in enumerate(stages):
        where = f"{path}: stage {i} ({stage['name']})"
        runs = {os.path.join(config.run_dir, n): c for n, c in trained.items() if commands[n] != "tokenizer"}
        for spec, command in ((stage, stage["command"]), (stage.get("evaluate"), "eval")):
            if spec is None:
                continue
            try:
                stage_config = load_config(spec["config"], _overrides(spec, config.run_dir))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            runner = next((c for c, kind in STAGE_OF.items() if kind == stage_config.stage), "train")
            if command != "tokenizer" and command != runner:
                raise ConfigError(f"{where}: {spec['config']} is a config of stage {stage_config.stage!r}, which kiln "
                                  f"{runner} runs, not kiln {command}")
            try:  # @rm as a policy's start, or @sft as rollout.reward
                preflight.check_earlier_runs(stage_config, runs)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
            trained.setdefault(stage["name"], stage_config)
        evaluated = [stage["name"]] if "evaluate" in stage else _REF.findall(stage.get("checkpoint", ""))
        for name in evaluated:
            if name in trained and trained[name].stage == "reward":
                raise ConfigError(f"{where}: {name} is a reward model, which kiln eval does not evaluate (it writes "
                                  "no replies); its held-out pair accuracy is in its own metrics")
    return config, stages


def _check_fields(where: str, spec: dict[str, Any], fields: tuple[str, ...]) -> None:
    """ConfigError for a stage (or its `evaluate`) with a field it does not know (a misspelt one was ignored,
    and the stage ran without what it set), without its `config`, or with overrides that are not a list of
    KEY=VALUE strings."""
    unknown = [k for k in spec if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; the fields are {', '.join(fields)}")
    if not isinstance(spec.get("config"), str) or not spec["config"]:
        raise ConfigError(f"{where}: `config` must name a config file, such as configs/sft.py:smoke")
    overrides = spec.get("overrides", ())
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{where}: `overrides` must be a list of 'KEY=VALUE' strings, got {overrides!r}")


def run(recipe: Any, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs (or skips) every stage in order; returns the results (also written to run_dir)."""
    root = recipe.run_dir
    lock = rundir.RunLock(root)  # one runner per pipeline directory (each stage locks its own); creates it
    lock.acquire()
    try:
        done = stage_results.stages_done(stage_results.read_results(root))
        results: dict[str, Any] = {"recipe": json.loads(recipe.to_json()), "stages": []}
        started = time.perf_counter()
        for i, stage in enumerate(stages):
            name, command, where = stage["name"], stage["command"], os.path.join(root, stage["name"])
            config = load_config(stage["config"], _overrides(stage, root) + [f"--config.run_dir={where}"])
            label = f"[{i + 1}/{len(stages)}] {name}: kiln {command} {stage['config']}"
            evaluation = _evaluation(stage, where, root)
            if stage_results.finished(command, config) and (evaluation is None
                                                             or stage_results.finished("eval", evaluation)):
                print(f"{label}: finished earlier{stage_results.changed_since(config)}, skipped", flush=True)
                seconds = done[name]["seconds"] if name in done else 0.0
            else:
                print(f"{label} ({_progress(stages, i, time.perf_counter() - started)})", flush=True)
                t0 = time.perf_counter()
                stopped_at = _run_stage(command, config, stage, root)
                if stopped_at:  # a later stage must not start from an unfinished model
                    return dict(results, preempted={"stage": name, "step": stopped_at})
                if evaluation is not None:
                    eval_cli.run(evaluation, where)
                seconds = time.perf_counter() - t0
            metrics = stage_results.stage_metrics(command, where)
            if evaluation is not None:
                metrics.update(stage_results.stage_metrics("eval", evaluation.run_dir))
            if config.stage == "reward" and "eval/accuracy" in metrics:
                metrics["pair_accuracy"] = metrics["eval/accuracy"]  # a reward model's held-out pair accuracy
            done[name] = {"stage": name, "command": command, "config": stage["config"], "run_dir": where,
                          "seconds": seconds, "metrics": metrics}
            results = {"recipe": json.loads(recipe.to_json()), "stages": stage_results.result_rows(stages, done)}
            records.write_json_atomic(os.path.join(root, "results.json"), results)
            records.write_text_atomic(os.path.join(root, "results.md"), stage_results.markdown(results) + "\n")
        stage_results.plot(results, os.path.join(root, "results.png"))
        return results
    finally:
        lock.release()


def _run_stage(command: str, config: Any, stage: dict[str, Any], root: str) -> int | None:
    """Runs one stage; the step a pre-empted train stage stopped at (None otherwise)."""
    if command == "tokenizer":
        os.makedirs(config.run_dir, exist_ok=True)
        tokenizers.resolve(ConfigDict(dict(config.data.to_dict(), tokenizer="train")), config.run_dir)
    elif command == "train":
        return trainer.train(config).get("preempted_at")
    elif command == "generate":
        preflight.check_sampling(config)  # as `kiln generate` does, now that the earlier stages' files exist
        rejection.run(config)
    else:
        eval_cli.run(config, _resolve(stage["checkpoint"], root))
    return None


def _evaluation(stage: dict[str, Any], where: str, root: str) -> Any:
    """The eval config of a stage's `evaluate` (None without one), writing into NAME/eval."""
    if "evaluate" not in stage:
        return None
    spec = stage["evaluate"]
    return load_config(spec["config"], _overrides(spec, root) + [f"--config.run_dir={os.path.join(where, 'eval')}"])


def _overrides(spec: dict[str, Any], root: str) -> list[str]:
    """A stage's (or its evaluation's) overrides as --config flags, each @NAME made the stage's directory."""
    return [f"--config.{_resolve(o, root)}" for o in spec.get("overrides", ())]


def _resolve(text: str, root: str) -> str:
    """`text` with every @NAME replaced by root/NAME, the directory stage NAME runs in."""
    return _REF.sub(lambda m: os.path.join(root, m.group(1)), text)


def _progress(stages: list[dict[str, Any]], i: int, elapsed: float) -> str:
    """'pipeline 3.2 min so far, about 9 min left' (the left part from the stages' expected minutes)."""
    text = f"pipeline {elapsed / 60:.1f} min so far"
    left = sum(float(s.get("minutes", 0)) for s in stages[i:])
    return text + (f", about {left:.0f} min left" if left else "")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
