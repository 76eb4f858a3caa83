"""`kiln train --config=configs/STAGE.py[:variant] [--config.KEY=VALUE ...]`: one stage."""
from __future__ import annotations

import os
import sys

from launch.config import ConfigError, load_config
from train import distributed
from train.checkpoint import CheckpointError
from train.rundir import RunDirError
from train.trainer import TrainingError, train


def split_args(argv: list[str], prog: str, doc: str | None = None) -> tuple[str, list[str], list[str]]:
    """(config spec, --config.* overrides, other --name=value args) from the command line; -h
    prints `doc` (default: kiln train's)."""
    spec, overrides, other = None, [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config" and args or arg.startswith("--config="):
            given = args.pop(0) if arg == "--config" else arg.split("=", 1)[1]
            if spec not in (None, given):  # the last would win in silence
                raise ConfigError(f"--config is given twice ({spec} and {given}); give one config")
            spec = given
        elif arg.startswith("--config."):
            overrides.append(arg)
        elif arg in ("-h", "--help"):
            print(f"usage: {prog} --config=FILE.py[:variant] [--config.KEY=VALUE ...] [--debug]\n\n{doc or __doc__}")
            sys.exit(0)
        else:
            other.append(arg)
    if not spec:
        raise ConfigError(f"{prog} needs --config=FILE.py[:variant]")
    return spec, overrides, other


def main(argv: list[str]) -> int:
    spec, overrides, other = split_args(argv, "kiln train")
    if other:
        raise ConfigError(f"unknown argument {other[0]!r}; config values are set with --config.KEY=VALUE")
    distributed.initialize()  # a no-op unless the environment describes a multi-process run
    config = load_config(spec, overrides)
    distributed.check_same("config", config.to_json(sort_keys=True))
    try:
        last = train(config)
    except (TrainingError, RunDirError) as e:
        print(f"kiln train: error: {e}", file=sys.stderr)
        return 1
    except CheckpointError as e:
        print(f"kiln train: error: {e}", file=sys.stderr, flush=True)
        # A failed asynchronous orbax write leaves threads that wait minutes for signals that never
        # come; the error is reported and the last good checkpoint is intact, so leave now.
        sys.stdout.flush()
        os._exit(1)
    if "preempted_at" in last:
        print(f"stopped {config.stage} at step {last['preempted_at']} of {config.train.steps} (pre-empted) in "
              f"{config.run_dir}; run the same command to resume")
        return 0
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k in ("loss", "tokens_per_s", "mfu")
                        or k.startswith("eval/") and k.count("/") == 1)
    print(f"finished {config.stage}: {config.train.steps} steps in {config.run_dir}: {summary}")
    return 0
