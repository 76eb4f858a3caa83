"""Next-token cross-entropy (pre-training, SFT), with optional z-loss (PaLM, section 5)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from train.losses import register


def token_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood of each target, log of the softmax normaliser), both [B, T] float32."""
    logits = logits_BTV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def logit_stats(model: nnx.Module, fn: Callable[..., Any], tokens_BT: jax.Array, positions_BT: jax.Array,
                segment_ids_BT: jax.Array, *per_position_BT: jax.Array, dropout_key: jax.Array | None = None) -> Any:
    """`fn(logits, *per_position)` over a batch: through `Transformer.logit_stats` (in chunks when the
    model's `logits_chunk` says so), or on the logits of any model that only maps tokens to logits."""
    if getattr(getattr(model, "cfg", None), "logits_chunk", 0):
        return model.logit_stats(fn, tokens_BT, positions_BT, segment_ids_BT, *per_position_BT,
                                 dropout_key=dropout_key)
    return fn(model(tokens_BT, positions_BT, segment_ids_BT, dropout_key=dropout_key), *per_position_BT)


def forward_nll(model: nnx.Module, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(nll [B,T], log_z [B,T], mask [B,T]) for a batch with tokens/targets/loss_mask/positions/segment_ids.
    `dropout_key` switches on the model's (adapter) dropout: training passes one, evaluation none."""
    nll, log_z = logit_stats(model, token_nll, batch["tokens"], batch["positions"], batch["segment_ids"],
                             batch["targets"], dropout_key=dropout_key)
    return nll, log_z, batch["loss_mask"].astype(jnp.float32)


@register("next_token", kinds=("pretrain", "sft"))
def make_next_token(cfg: Any):
    z_coef = float(cfg.get("z_loss", 0.0))

    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], rngs: nnx.Rngs):
        nll, log_z, mask = forward_nll(model, batch, None if rngs is None else rngs.dropout())
        ce_sum = jnp.sum(nll * mask)
        metrics = {"weight": jnp.sum(mask), "ce": ce_sum}
        if not z_coef:
            return ce_sum, metrics
        # The z-loss term as it enters the loss (coef * sum log_z^2), so loss = ce + z_loss (T5X, MaxText).
        metrics["z_loss"] = z_coef * jnp.sum(jnp.square(log_z) * mask)
        return ce_sum + metrics["z_loss"], metrics

    return loss_fn
