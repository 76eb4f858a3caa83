"""`kiln generate --config=configs/rejection_sampling.py[:variant] [--config.KEY=VALUE ...]`

Rejection sampling, a stage that trains nothing: samples `rollout.num_samples` replies to each prompt
of `data.sources` from the policy `model.init_from`, scores them (`rollout.reward`), and writes
`sft.jsonl` (the best reply per prompt, for configs/sft.py), `pairs.jsonl` (best against worst, for
configs/dpo.py) and `results.json` into `run_dir` (see train/rejection.py). A run directory that
already holds them is not redone. The run directory is locked while it runs.
"""
from __future__ import annotations

import json

import jax

from launch.config import ConfigError, load_config
from launch.train import split_args
from train import distributed, preflight, rejection, rewards, rundir


def main(argv: list[str]) -> int:
    spec, overrides, other = split_args(argv, "kiln generate", __doc__)
    if other:
        raise ConfigError(f"unknown argument {other[0]!r}; config values are set with --config.KEY=VALUE")
    distributed.initialize()  # a no-op unless the environment describes a multi-process run
    config = load_config(spec, overrides)
    distributed.check_same("config", config.to_json(sort_keys=True))
    if config.stage != "rejection_sampling":
        raise ConfigError(f"kiln generate runs stage rejection_sampling, not {config.stage!r} (use kiln train)")
    preflight.check_sampling(config)
    rewards.check(config.rollout.reward)  # in a recipe, the reward model may be an earlier stage's, not there yet
    lock = rundir.RunLock(config.run_dir) if jax.process_index() == 0 else None  # process 0 writes the outputs
    if lock:
        lock.acquire()
    try:
        results = rejection.run(config)
    finally:
        if lock:
            lock.release()
    print(json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}))
    print(f"finished rejection_sampling: {results['sft_examples']} SFT examples and {results['pairs']} pairs in "
          f"{config.run_dir}")
    return 0
