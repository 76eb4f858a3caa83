"""Reward-model objective: the Bradley–Terry pairwise loss (InstructGPT; Llama 2 adds a per-pair
margin), with reward centring (Eisenstein et al., 2023) that keeps the scores near zero.

P(chosen preferred) = σ(r_chosen − r_rejected − margin), so the loss is its negative log-likelihood;
the centring term c · mean((r_c + r_r)²) pins the free additive constant of the rewards.

The `reward` loss trains a model with a reward head (`Transformer.rewards`) on preference batches:
chosen and rejected run as one batch of 2B rows, each scored after its last token (the reply's
end-of-turn), and the loss is summed over pairs (the step divides by the pair count).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from train.losses import register


def bradley_terry_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *, margin: jax.Array | float | None = None,
                       center_coef: float = 0.0) -> jax.Array:
    """Mean over pairs of −log σ(r_c − r_r − margin) + center_coef · (r_c + r_r)². Rewards [N];
    `margin` a scalar or one per pair [N] (None: 0)."""
    return jnp.mean(pair_losses(chosen_rewards, rejected_rewards, margin=margin, center_coef=center_coef))


def pair_losses(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *, margin: jax.Array | float | None = None,
                center_coef: float = 0.0) -> jax.Array:
    """`bradley_terry_loss` before the mean: one loss per pair [N]."""
    chosen = jnp.asarray(chosen_rewards, jnp.float32)
    rejected = jnp.asarray(rejected_rewards, jnp.float32)
    diff = chosen - rejected
    if margin is not None:
        diff = diff - jnp.asarray(margin, jnp.float32)
    loss = -jax.nn.log_sigmoid(diff)
    if center_coef:
        loss = loss + center_coef * jnp.square(chosen + rejected)
    return loss


def whole_sequences(batch: dict[str, jax.Array], side: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens, positions, segment ids) [B, T] of the `side` ("chosen"/"rejected") sequences, whole:
    a row's inputs plus its last target (the inputs stop one token short of the end)."""
    tokens, targets = batch[f"{side}_tokens"], batch[f"{side}_targets"]
    segments, positions = batch[f"{side}_segment_ids"], batch[f"{side}_positions"]
    B, T = tokens.shape
    n_B = jnp.sum(segments > 0, axis=1)  # right-padded: the row's tokens are [0, n)
    room_B = n_B < T  # a row filled to the end was cut: it keeps its inputs
    at_B = jnp.minimum(n_B, T - 1)
    rows = jnp.arange(B)
    last_B = targets[rows, jnp.maximum(n_B - 1, 0)]
    tokens = tokens.at[rows, at_B].set(jnp.where(room_B, last_B, tokens[rows, at_B]))
    segments = segments.at[rows, at_B].set(jnp.where(room_B & (n_B > 0), 1, segments[rows, at_B]))
    positions = positions.at[rows, at_B].set(jnp.where(room_B, n_B, positions[rows, at_B]))
    return tokens, positions, segments


def pair_rewards(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(chosen rewards [B], rejected rewards [B]) of a preference batch, in one pass over 2B rows."""
    chosen, rejected = whole_sequences(batch, "chosen"), whole_sequences(batch, "rejected")
    tokens, positions, segments = (jnp.concatenate([c, r]) for c, r in zip(chosen, rejected))
    rewards = model.rewards(tokens, positions, segments)
    B = batch["chosen_tokens"].shape[0]
    return rewards[:B], rewards[B:]


@register("reward", kinds=("preference",))
def make_reward(cfg: Any):
    """Bradley–Terry with each pair's `margin` from the data if the pairs carry one, else the constant
    `loss.margin`, and `loss.center_coef`; metrics summed over pairs (accuracy, margin, chosen /
    rejected rewards; reward_std is the batch's, times its pairs)."""
    constant, center = float(cfg.get("margin", 0.0)), float(cfg.get("center_coef", 0.0))

    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], rngs: nnx.Rngs):
        del rngs  # no dropout in a reward model's forward pass
        if "margin" in batch and constant:
            raise ValueError("the pairs carry their own margins; leave loss.margin at 0")
        margin = batch["margin"] if "margin" in batch else (constant or None)
        chosen, rejected = pair_rewards(model, batch)
        valid = (jnp.sum(batch["chosen_loss_mask"], axis=1) > 0).astype(jnp.float32)  # padding slots hold no pair
        n = jnp.sum(valid)
        both = jnp.concatenate([chosen, rejected])
        both_valid = jnp.concatenate([valid, valid])
        mean = jnp.sum(both * both_valid) / jnp.maximum(2 * n, 1)
        std = jnp.sqrt(jnp.sum(jnp.square(both - mean) * both_valid) / jnp.maximum(2 * n, 1))
        metrics = {"weight": n, "accuracy": jnp.sum((chosen > rejected) * valid),
                   "margin": jnp.sum((chosen - rejected) * valid), "rewards/chosen": jnp.sum(chosen * valid),
                   "rewards/rejected": jnp.sum(rejected * valid), "reward_std": std * n}
        return jnp.sum(pair_losses(chosen, rejected, margin=margin, center_coef=center) * valid), metrics

    return loss_fn
