"""The frozen reference policy of a preference stage (DPO and its variants).

DPO measures the policy against the model it started from. The reference is computed beside the
step: before each step (and each evaluation batch) one jitted forward pass of the reference adds
`ref_chosen_logps` / `ref_rejected_logps` [B] (log-probs summed over each reply's trained tokens)
to the batch, so the loss reads them from the batch as it reads the ones precomputed into the data
(`kiln data reference`, `loss.reference=data`: then no reference model is built). The reference is:
- with LoRA or prompt / prefix tuning: the frozen base itself with the adapters off (no copy);
- otherwise a copy of the starting weights (those of `model.init_from`, or the fresh
  initialisation), taken before any checkpoint is restored, so a resumed run keeps the same one.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer
from train.losses.dpo import sequence_logps


class Reference:
    """Adds the reference's sequence log-probs to device batches that lack them."""

    def __init__(self, cfg: ModelConfig, model: Transformer, *, peft: bool):
        base_cfg = cfg.replace(lora=None, prefix=None)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(base_cfg, rngs=nnx.Rngs(0))))
        # The base's weights without adapters or prompt/prefix. With PEFT they are the policy's frozen
        # arrays, shared; otherwise copied, because every step donates the policy's arrays.
        weights = _only(nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(abstract))
        if not peft:
            weights = jax.tree.map(jnp.copy, weights)
        nnx.replace_by_pure_dict(abstract, weights)
        self.state = abstract

        def logps(state: nnx.State, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
            chosen, rejected, _, _ = sequence_logps(nnx.merge(graphdef, state), batch)
            return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)

        self._logps = jax.jit(logps)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        chosen, rejected = self._logps(self.state, {k: v for k, v in batch.items() if k.startswith(("chosen_", "rejected_"))})
        return dict(batch, ref_chosen_logps=chosen, ref_rejected_logps=rejected)


def _only(weights: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """`weights` restricted to the keys of `like`, recursively (LoRA adapters nest inside layers)."""
    return {k: _only(weights[k], v) if isinstance(v, dict) else weights[k] for k, v in like.items()}
