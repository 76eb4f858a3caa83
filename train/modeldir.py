"""What a model path names: a Kiln run, its `checkpoints` directory or one step directory, or a Hugging
Face directory; and what a Kiln run recorded about its model (its training config, its tokenizer)."""
from __future__ import annotations

import json
import os
from typing import Any

from data.sources import expand_path


def locate(path: str) -> tuple[str, int | None]:
    """(CheckpointManager directory, step or None for the latest) for a run directory, its
    `checkpoints` directory, or one step directory such as `run/checkpoints/20`. `$VARS` and `~`
    are expanded."""
    path = os.path.abspath(expand_path(path, "checkpoint"))
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "params")):
        return os.path.dirname(path), int(name)
    inner = os.path.join(path, "checkpoints")
    return (inner if os.path.isdir(inner) else path), None


def is_hf_dir(path: str) -> bool:
    """A Hugging Face directory (config.json, no Kiln checkpoints) rather than a Kiln run or checkpoint."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(os.path.join(path, "checkpoints"))


def run_config(path: str) -> dict[str, Any] | None:
    """The training config.json of the Kiln run that checkpoint `path` belongs to, with its `run_dir`
    (None for a bare checkpoint directory or a Hugging Face directory)."""
    if is_hf_dir(path):
        return None
    directory = locate(path)[0]
    run_dir = os.path.dirname(directory) if os.path.basename(directory) == "checkpoints" else directory
    config = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            return dict(json.load(f), run_dir=run_dir)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config}: cannot read the run's config ({e})") from None


def tokenizer_of(path: str) -> str | None:
    """The tokenizer the model in `path` was trained with, as a `data.tokenizer` value: "byte" or a
    path (a run's trained tokenizer.model, the Hugging Face directory itself); None when `path` does
    not say (a bare checkpoint directory)."""
    if is_hf_dir(path):
        return path
    config = run_config(path)
    if config is None:
        return None
    name = config.get("data", {}).get("tokenizer", "byte")
    return os.path.join(config["run_dir"], "tokenizer.model") if name == "train" else name
