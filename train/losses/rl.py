"""Reinforcement learning from rewards: PPO (Schulman et al., 2017; InstructGPT) and the critic-free
group methods GRPO (DeepSeekMath), Dr. GRPO and RLOO, as pure functions and two stage losses.

Arrays are per token, [..., T] aligned with the batch's `targets` (position t holds the log-prob of
target t, the value after reading tokens[..t], the reward for emitting target t); `mask` marks the
completion tokens that count. The rollout (train/rollout.py) fills the batch:
  old_logps   the sampling policy's log-probs (at the sampling temperature), when the loss needs them
  ref_logps   the reference policy's, when a KL term is on (loss.beta > 0)
  advantages  per token (GRPO: the sequence's group advantage on every completion token; PPO: GAE)
  returns, old_values   PPO's value targets and the value model's estimates at rollout time

Losses, per token, with ratio ρ = exp(logp − old_logp) and advantage A:
  policy   max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high))          clipped surrogate (DAPO: ε_high > ε_low)
  kl       β · k3(ref ‖ π) = β · (exp(ref − logp) − (ref − logp) − 1)   GRPO only; PPO puts its KL in the reward
  value    c_v · ½ max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±ε_v)   PPO only
aggregated over the step by `loss.aggregation`: grpo (mean over each sequence's tokens, then over
sequences), dapo (mean over every token of the step), dr_grpo (sum over tokens divided by
sequences × max_new_tokens: no length bias).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model.actor_critic import policy_of
from train.losses import register
from train.losses.next_token import logit_stats

ADVANTAGES = ("grpo", "dr_grpo", "rloo")
AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k3")
STD_EPS = 1e-4  # GRPO's (r − mean) / (std + ε)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al., 2016) over the last axis: (advantages,
    returns = advantages + values), both 0 where `mask` is 0. The episode ends after each row's last
    valid token (no bootstrapping past it): A_t = δ_t + γλ·A_{t+1}, δ_t = r_t + γ·V_{t+1} − V_t."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    r, v, m = f32(rewards), f32(values), f32(mask)
    next_m = jnp.concatenate([m[..., 1:], jnp.zeros_like(m[..., :1])], axis=-1)
    next_v = jnp.concatenate([v[..., 1:], jnp.zeros_like(v[..., :1])], axis=-1) * next_m
    delta = r + gamma * next_v - v

    def back(carry, xs):
        d, nm = xs
        adv = d + gamma * lam * nm * carry
        return adv, adv

    time_first = lambda x: jnp.moveaxis(x, -1, 0)  # noqa: E731
    _, adv = jax.lax.scan(back, jnp.zeros_like(delta[..., 0]), (time_first(delta), time_first(next_m)), reverse=True)
    adv = jnp.moveaxis(adv, 0, -1) * m
    return adv, (adv + v) * m


def group_advantages(rewards: jax.Array, group_size: int, *, method: str = "grpo") -> jax.Array:
    """Per-sample advantages [N] of rewards [N] in consecutive groups of `group_size` (the samples of
    one prompt): grpo (r − mean) / (std + 1e-4) with the unbiased std; dr_grpo r − mean (Dr. GRPO,
    unscaled); rloo r − mean of the group's other samples (RLOO's leave-one-out baseline)."""
    if method not in ADVANTAGES:
        raise ValueError(f"unknown advantage method {method!r}; expected one of {', '.join(ADVANTAGES)}")
    r = jnp.asarray(rewards, jnp.float32)
    if group_size < 2 or r.shape[0] % group_size:
        raise ValueError(f"group advantages need groups of at least 2 samples dividing the {r.shape[0]} rewards; "
                         f"got group_size={group_size}")
    groups = r.reshape(-1, group_size)
    mean = groups.mean(axis=1, keepdims=True)
    if method == "grpo":
        out = (groups - mean) / (groups.std(axis=1, ddof=1, keepdims=True) + STD_EPS)
    elif method == "dr_grpo":
        out = groups - mean
    else:
        out = (groups - mean) * group_size / (group_size - 1)
    return out.reshape(r.shape)


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x − mean) / std over the valid tokens (PPO's advantage normalisation); 0 elsewhere."""
    m = jnp.asarray(mask, jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    mean = jnp.sum(x * m) / n
    var = jnp.sum(jnp.square(x - mean) * m) / n
    return (x - mean) * jax.lax.rsqrt(var + eps) * m


def kl_penalty(logps: jax.Array, ref_logps: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token estimate of KL(π ‖ ref) from samples of π (Schulman's k1 = log π/ref, or the
    unbiased, non-negative k3 = ref/π − log(ref/π) − 1)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    log_ratio = jnp.asarray(ref_logps, jnp.float32) - jnp.asarray(logps, jnp.float32)
    return -log_ratio if estimator == "k1" else jnp.exp(log_ratio) - log_ratio - 1.0


def adaptive_kl_coef(coef: float, kl: float, target: float, samples: int, horizon: int) -> float:
    """The KL coefficient after a rollout of `samples` replies whose mean KL per reply was `kl`
    (Ziegler et al., 2019): proportional control towards `target`, the error clipped to ±20%."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * samples / horizon)


def clipped_policy_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, *, clip_low: float,
                        clip_high: float) -> tuple[jax.Array, jax.Array]:
    """(per-token clipped surrogate loss, whether the clipped branch was taken) — PPO's objective,
    negated; ε_low and ε_high may differ (DAPO's clip-higher)."""
    ratio = jnp.exp(jnp.asarray(logps, jnp.float32) - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, *, clip: float) -> jax.Array:
    """Per-token ½ max((V − R)², (V_old + clip(V − V_old, ±clip) − R)²) (PPO's value loss; clip 0: unclipped)."""
    values = jnp.asarray(values, jnp.float32)
    loss = jnp.square(values - returns)
    if clip > 0:
        loss = jnp.maximum(loss, jnp.square(old_values + jnp.clip(values - old_values, -clip, clip) - returns))
    return 0.5 * loss


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, max_len: int) -> tuple[jax.Array, jax.Array]:
    """(loss sum, weight) of per-token losses [N, T] for the shared step, which divides the sum by the
    weight of the whole step: grpo (per-sequence means; weight: sequences), dapo (weight: tokens),
    dr_grpo (token sum; weight: sequences × max_len)."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss.aggregation {mode!r}; expected one of {', '.join(AGGREGATIONS)}")
    m = jnp.asarray(mask, jnp.float32)
    tokens = m.sum(axis=-1)
    has = (tokens > 0).astype(jnp.float32)
    if mode == "grpo":
        return jnp.sum(jnp.sum(per_token * m, axis=-1) / jnp.maximum(tokens, 1.0)), jnp.sum(has)
    total = jnp.sum(per_token * m)
    return total, (jnp.sum(m) if mode == "dapo" else jnp.sum(has) * max_len)


def token_logps(model: nnx.Module, batch: dict[str, jax.Array], temperature: float,
                dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(log-prob of each target, entropy of the next-token distribution), both [B, T] float32, of the
    policy's distribution at `temperature`: the one the rollout sampled from."""
    def stats(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = logits.astype(jnp.float32) / temperature
        log_z = jax.nn.logsumexp(z, axis=-1)
        logps = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0] - log_z
        return logps, log_z - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)

    return logit_stats(policy_of(model), stats, batch["tokens"], batch["positions"], batch["segment_ids"],
                       batch["targets"], dropout_key=dropout_key)


def _token_mean(x: jax.Array, mask: jax.Array, weight: jax.Array) -> jax.Array:
    """The masked mean of `x`, scaled by this micro-batch's weight (the step divides it out again)."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0) * weight


def _policy_terms(cfg: Any, max_len: int, model: nnx.Module, batch: dict[str, jax.Array], rngs: nnx.Rngs | None,
                  kl_in_loss: bool) -> tuple[jax.Array, jax.Array, dict[str, jax.Array], jax.Array]:
    """(per-token policy loss, mask, metrics without the weight, weight) shared by GRPO and PPO."""
    logps, entropy = token_logps(model, batch, float(cfg.temperature), None if rngs is None else rngs.dropout())
    mask = batch["loss_mask"].astype(jnp.float32)
    # One update per rollout: the old policy is this one (ratio exactly 1, gradient that of the log-prob).
    old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logps)
    per_token, clipped = clipped_policy_loss(logps, old, batch["advantages"], clip_low=float(cfg.clip_eps_low),
                                             clip_high=float(cfg.clip_eps_high))
    _, weight = aggregate(per_token, mask, cfg.aggregation, max_len)
    metrics = {"entropy": _token_mean(entropy, mask, weight), "clip_frac": _token_mean(clipped, mask, weight),
               "ratio": _token_mean(jnp.exp(logps - old), mask, weight)}
    if "ref_logps" in batch:
        kl = kl_penalty(logps, batch["ref_logps"], cfg.kl_estimator)
        metrics["kl"] = _token_mean(kl, mask, weight)
        if kl_in_loss:
            per_token = per_token + float(cfg.beta) * kl
    return per_token, mask, metrics, weight


def make_rl_loss(cfg: Any, max_len: int, *, value: bool):
    """The GRPO (`value` False: KL in the loss) or PPO (`value` True: value loss, KL in the reward) loss."""
    value_coef, value_clip = float(cfg.value_coef), float(cfg.value_clip)

    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], rngs: nnx.Rngs | None):
        per_token, mask, metrics, weight = _policy_terms(cfg, max_len, model, batch, rngs, kl_in_loss=not value)
        loss_sum, _ = aggregate(per_token, mask, cfg.aggregation, max_len)
        metrics["pg_loss"] = loss_sum
        if value:
            values = model.value.values(batch["tokens"], batch["positions"], batch["segment_ids"])
            v_loss = clipped_value_loss(values, batch["old_values"], batch["returns"], clip=value_clip)
            v_sum, _ = aggregate(v_loss, mask, cfg.aggregation, max_len)
            metrics["value_loss"] = v_sum
            loss_sum = loss_sum + value_coef * v_sum
        return loss_sum, dict(metrics, weight=weight)

    return loss_fn


@register("grpo", kinds=("prompts",))
def make_grpo(cfg: Any):
    return make_rl_loss(cfg, int(cfg.max_len), value=False)


@register("ppo", kinds=("prompts",))
def make_ppo(cfg: Any):
    return make_rl_loss(cfg, int(cfg.max_len), value=True)
