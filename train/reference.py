"""The frozen reference policy of a preference stage (DPO and its variants).

DPO measures the policy against the model it started from. The reference is computed beside the
step: before each step (and each evaluation batch) one jitted forward pass of the reference adds
`ref_chosen_logps` / `ref_rejected_logps` [B] (log-probs summed over each reply's trained tokens)
to the batch, so the loss reads them from the batch as it reads the ones precomputed into the data
(`kiln data reference`, `loss.reference=data`: then no reference model is built).

The reference is the starting policy exactly: the frozen part of the model (shared with the policy,
never copied) and a copy of the trainable part as it was before the first step and before any
checkpoint is restored, so a resumed run keeps the same reference. Full fine-tuning thus copies
every weight; LoRA copies only its adapters, which start at B = 0, so the reference is the base
with the adapters off (and an SFT model's adapters when DPO continues them); prompt and prefix
tuning copy their starting prompt or prefix.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from train.losses.dpo import sequence_logps


class Reference:
    """Adds the starting policy's sequence log-probs to device batches."""

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, chunks: int = 1):
        """`chunks`: the step's gradient-accumulation count; the reference runs that many pieces of
        the batch one after another, so its logits take no more memory than the step's own."""
        # A copy: every train step donates (and replaces) the policy's trainable arrays.
        self.params, self.frozen = jax.tree.map(jnp.copy, params), frozen

        def logps(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
            model = nnx.merge(graphdef, params, frozen)
            if chunks == 1:
                return sequence_logps(model, batch)[:2]
            pieces = {k: v.reshape(chunks, v.shape[0] // chunks, *v.shape[1:]) for k, v in batch.items()}
            chosen, rejected = jax.lax.map(lambda piece: sequence_logps(model, piece)[:2], pieces)
            return chosen.reshape(-1), rejected.reshape(-1)

        self._logps = jax.jit(logps)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        pairs = {k: v for k, v in batch.items() if k.startswith(("chosen_", "rejected_"))}
        chosen, rejected = self._logps(self.params, self.frozen, pairs)
        return dict(batch, ref_chosen_logps=chosen, ref_rejected_logps=rejected)
