"""Reward-model objective: the Bradley–Terry pairwise loss (InstructGPT; Llama 2 adds a per-pair
margin), with reward centring (Eisenstein et al., 2023) that keeps the scores near zero.

P(chosen preferred) = σ(r_chosen − r_rejected − margin), so the loss is its negative log-likelihood;
the centring term c · mean((r_c + r_r)²) pins the free additive constant of the rewards.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def bradley_terry_loss(chosen_rewards: jax.Array, rejected_rewards: jax.Array, *, margin: jax.Array | float | None = None,
                       center_coef: float = 0.0) -> jax.Array:
    """Mean over pairs of −log σ(r_c − r_r − margin) + center_coef · (r_c + r_r)². Rewards [N];
    `margin` a scalar or one per pair [N] (None: 0)."""
    chosen = jnp.asarray(chosen_rewards, jnp.float32)
    rejected = jnp.asarray(rejected_rewards, jnp.float32)
    diff = chosen - rejected
    if margin is not None:
        diff = diff - jnp.asarray(margin, jnp.float32)
    loss = -jax.nn.log_sigmoid(diff)
    if center_coef:
        loss = loss + center_coef * jnp.square(chosen + rejected)
    return jnp.mean(loss)


def pair_metrics(chosen_rewards: jax.Array, rejected_rewards: jax.Array) -> dict[str, jax.Array]:
    """Per-batch means: accuracy (chosen scored strictly higher), margin, reward mean and std over both."""
    chosen = jnp.asarray(chosen_rewards, jnp.float32)
    rejected = jnp.asarray(rejected_rewards, jnp.float32)
    both = jnp.concatenate([chosen, rejected])
    return {"accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)), "margin": jnp.mean(chosen - rejected),
            "reward_mean": jnp.mean(both), "reward_std": jnp.std(both)}
