"""The frozen reference policy of a preference stage (DPO and its variants) and of RL.

DPO measures the policy against the model it started from. The reference is computed beside the
step: before each step (and each evaluation batch) one jitted forward pass of the reference adds
`ref_chosen_logps` / `ref_rejected_logps` [B] (log-probs summed over each reply's trained tokens)
to the batch, so the loss reads them from the batch as it reads the ones precomputed into the data
(`kiln data reference`, `loss.reference=data`: then no reference model is built). RL stages
(train/rollout.py) call it once per rollout batch for per-token `ref_logps` instead.

The reference is the starting policy exactly: the frozen part of the model (shared with the policy,
never copied) and a copy of the trainable part as it was before the first step and before any
checkpoint is restored, so a resumed run keeps the same reference. Full fine-tuning thus copies
every weight; LoRA copies only its adapters, which start at B = 0, so the reference is the base
with the adapters off (and an SFT model's adapters when DPO continues them); prompt and prefix
tuning copy their starting prompt or prefix.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from data.sources import expand_path
from train import checkpoint, modeldir
from train.losses.dpo import sequence_logps

Fields = Callable[[nnx.Module, dict[str, jax.Array]], dict[str, jax.Array]]
# Beside precomputed log-probs (`kiln data reference`): the data settings that decide which tokens they score.
SETTINGS_FILE = "reference.json"
ENCODING_KEYS = ("tokenizer", "chat_template", "seq_len", "mask_special_tokens", "truncate")


def encoding(data_cfg: Any) -> dict[str, Any]:
    """The `data.*` settings that turn a pair into the tokens its log-probs sum over (tokenizer made concrete)."""
    return {k: data_cfg[k] for k in ENCODING_KEYS}


def reference_model(config: Any) -> str:
    """The model `model.init_from` names, as a checkpoint directory and step (a Hugging Face directory as
    itself): what precomputed log-probs are recorded as scored under, and DPO's reference."""
    return model_at(expand_path(config.model.init_from, "model.init_from"))


def model_at(path: str) -> str:
    """The model directory `path` names, as its checkpoint directory and latest step (a Hugging Face directory
    as itself), so that one trained on since is told apart."""
    path = os.path.realpath(path)
    if modeldir.is_hf_dir(path):
        return path
    return f"{modeldir.locate(path)[0]} step {checkpoint.latest_step(path)}"


def check_precomputed(config: Any) -> None:
    """ValueError if a source's precomputed reference log-probs were scored on other tokens than this run
    trains on, or under another model than it starts from (DPO's reference): its directory's reference.json
    records other encoding settings or another model (a file without one, the user's own, is taken as it is)."""
    path = config.model.init_from and expand_path(config.model.init_from, "model.init_from")
    start = reference_model(config) if path and os.path.exists(path) else None  # a missing one is named where loaded
    for group in ("sources", "eval_sources"):
        for name, src in config.data[group].items():
            if not src.path:
                continue
            settings = os.path.join(os.path.dirname(expand_path(src.path, f"data.{group}.{name}.path")), SETTINGS_FILE)
            if not os.path.isfile(settings):
                continue
            with open(settings) as f:
                recorded = json.load(f)
            if recorded.get("unfinished"):
                raise ValueError(f"data.{group}.{name}: {settings} says kiln data reference into that directory did "
                                 "not finish (it was stopped), so its files may hold an earlier run's log-probs; "
                                 "compute them again (kiln data reference)")
            now = encoding(config.data)
            for key in ENCODING_KEYS:
                if key in recorded and recorded[key] != now[key]:
                    raise ValueError(f"data.{group}.{name}: its reference log-probs were computed with data.{key}="
                                     f"{recorded[key]!r} ({settings}), and this run has {now[key]!r}, so they score "
                                     "other tokens; train with the settings they were computed with, or compute them "
                                     "again (kiln data reference)")
            if start is not None and recorded.get("model", start) != start:
                raise ValueError(f"data.{group}.{name}: its reference log-probs were computed under the model "
                                 f"{recorded['model']} ({settings}), and this run starts from {start}, its reference; "
                                 f"compute them again with model.init_from={config.model.init_from} (kiln data "
                                 "reference)")


def preference_fields(model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A preference batch's `ref_chosen_logps` / `ref_rejected_logps` [B] under `model`."""
    pairs = {k: v for k, v in batch.items() if k.startswith(("chosen_", "rejected_"))}
    chosen, rejected = sequence_logps(model, pairs)[:2]
    return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}


class Reference:
    """Adds what `fields` computes with the starting policy to device batches (default: the
    preference log-probs of DPO; RL rollouts add per-token `ref_logps`)."""

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, chunks: int = 1,
                 fields: Fields = preference_fields):
        """`chunks`: the step's gradient-accumulation count; the reference runs that many pieces of
        the batch one after another, so its logits take no more memory than the step's own."""
        # A copy: every train step donates (and replaces) the policy's trainable arrays.
        self.params, self.frozen = jax.tree.map(jnp.copy, params), frozen

        def compute(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
            model = nnx.merge(graphdef, params, frozen)
            if chunks == 1:
                return fields(model, batch)
            pieces = {k: v.reshape(chunks, v.shape[0] // chunks, *v.shape[1:]) for k, v in batch.items()}
            out = jax.lax.map(lambda piece: fields(model, piece), pieces)
            return {k: v.reshape(-1, *v.shape[2:]) for k, v in out.items()}

        self._compute = jax.jit(compute)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        arrays = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
        return dict(batch, **self._compute(self.params, self.frozen, arrays))
