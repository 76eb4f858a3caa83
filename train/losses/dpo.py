"""Preference optimisation losses: DPO and its variants against a reference, and the reference-free
SimPO and ORPO. Every function returns one loss per pair; the stage averages (or sums) them.

With Δ = (π_c − ref_c) − (π_r − ref_r), the difference of the policy's and the reference's
log-ratios of chosen over rejected (sequence log-probs summed over completion tokens):
  sigmoid  −(1−ε) log σ(βΔ) − ε log σ(−βΔ)           DPO (Rafailov et al., 2023); ε > 0: conservative DPO
  hinge    max(0, 1 − βΔ)                           SLiC-style hinge (Zhao et al., 2023)
  ipo      (Δ − 1/(2β))²                            IPO (Azar et al., 2023), on length-normalised log-probs
  robust   [−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε)  unbiased under label noise ε (Chowdhury et al., 2024)

The `dpo` stage loss (`loss.type=dpo`) picks one by `loss.preference_type` — one of the above, or
`simpo` / `orpo`, which need no reference — and adds `loss.nll_coef` times the chosen reply's
per-token NLL (Llama 3 uses 0.2; ORPO's own loss is that NLL plus its odds-ratio term, so 1).
Reference log-probs come in the batch (`ref_chosen_logps`, `ref_rejected_logps`: see
train/reference.py). Metrics carry TRL's names; rewards are β times the policy-reference log-ratio
of the summed log-probs (also for IPO, whose loss uses per-token ones; reference-free losses: β
times the length-normalised log-prob).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from train.losses import register
from train.losses.next_token import logit_stats, token_nll

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
REFERENCE_FREE = ("simpo", "orpo")


def preference_loss(policy_chosen_logps: jax.Array, policy_rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
                    ref_rejected_logps: jax.Array, *, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> jax.Array:
    """Per-pair losses [N] of `loss_type` (see the module docstring) at temperature `beta`.
    `label_smoothing` ε is the assumed fraction of flipped labels (sigmoid and robust only)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    eps = float(label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")
    if eps and loss_type in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing applies to the sigmoid and robust losses, not {loss_type}")
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    delta = (f32(policy_chosen_logps) - f32(ref_chosen_logps)) - (f32(policy_rejected_logps) - f32(ref_rejected_logps))
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * delta)
    if loss_type == "ipo":
        return jnp.square(delta - 1.0 / (2.0 * beta))
    agree, disagree = jax.nn.log_sigmoid(beta * delta), jax.nn.log_sigmoid(-beta * delta)
    if loss_type == "sigmoid":
        return -(1.0 - eps) * agree - eps * disagree
    return (-(1.0 - eps) * agree + eps * disagree) / (1.0 - 2.0 * eps)


def simpo_loss(chosen_avg_logps: jax.Array, rejected_avg_logps: jax.Array, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> jax.Array:
    """SimPO (Meng et al., 2024), per pair: −log σ(β·(c − r) − γ) on length-normalised log-probs,
    with no reference; `label_smoothing` as in conservative DPO."""
    z = beta * (jnp.asarray(chosen_avg_logps, jnp.float32) - jnp.asarray(rejected_avg_logps, jnp.float32)) - gamma
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def orpo_loss(chosen_avg_logps: jax.Array, rejected_avg_logps: jax.Array, *, lam: float) -> jax.Array:
    """ORPO's odds-ratio term (Hong et al., 2024), per pair: −λ log σ(log odds(c) − log odds(r)), where
    odds(y) = P / (1 − P) with P the length-normalised sequence probability. ORPO's full loss adds the
    chosen reply's NLL (the stage's NLL term with coefficient 1)."""
    def log_odds(avg_logp: jax.Array) -> jax.Array:
        logp = jnp.minimum(jnp.asarray(avg_logp, jnp.float32), -1e-6)  # P < 1, so log(1 - P) is finite
        # log(1 − P) without cancellation (Mächler's log1mexp): 1 − exp(logp) loses its digits as P → 1
        # (a confident reply), so near 0 take log(−expm1(logp)), and log1p(−exp(logp)) elsewhere.
        log1m = jnp.where(logp > -jnp.log(2.0), jnp.log(-jnp.expm1(logp)), jnp.log1p(-jnp.exp(logp)))
        return logp - log1m
    return -lam * jax.nn.log_sigmoid(log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps))


def sequence_logps(model: nnx.Module, batch: dict[str, jax.Array], dropout_key: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(chosen log-prob sums [B], rejected log-prob sums [B], chosen token counts [B], rejected token
    counts [B]) of a preference batch, over each reply's loss-masked targets. Chosen and rejected rows
    run as one concatenated batch of 2B rows: one forward pass for both."""
    keys = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
    both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys}
    nll, _ = logit_stats(model, token_nll, both["tokens"], both["positions"], both["segment_ids"], both["targets"],
                         dropout_key=dropout_key)
    mask = both["loss_mask"].astype(jnp.float32)
    sums, counts = -jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)
    B = batch["chosen_tokens"].shape[0]
    return sums[:B], sums[B:], counts[:B], counts[B:]


def needs_reference(preference_type: str) -> bool:
    """Whether `loss.preference_type` compares against a reference model."""
    if preference_type not in LOSS_TYPES + REFERENCE_FREE:
        raise ValueError(f"unknown loss.preference_type {preference_type!r}; expected one of "
                         f"{', '.join(LOSS_TYPES + REFERENCE_FREE)}")
    return preference_type not in REFERENCE_FREE


@register("dpo", kinds=("preference",))
def make_dpo(cfg: Any):
    kind, beta, eps = str(cfg.preference_type), float(cfg.beta), float(cfg.label_smoothing)
    nll_coef, gamma = float(cfg.nll_coef), float(cfg.simpo_gamma)
    with_reference = needs_reference(kind)

    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], rngs: nnx.Rngs):
        pc, pr, nc, nr = sequence_logps(model, batch, None if rngs is None else rngs.dropout())
        valid = ((nc > 0) & (nr > 0)).astype(jnp.float32)  # batch padding slots hold no pair
        nc, nr = jnp.maximum(nc, 1.0), jnp.maximum(nr, 1.0)
        if with_reference:
            if "ref_chosen_logps" not in batch:
                raise ValueError(f"loss.preference_type={kind} needs reference log-probs and the batch has none: with "
                                 "loss.reference=data every pair must carry them (kiln data reference)")
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            if kind == "ipo":  # IPO's margin is defined on length-normalised log-probs
                losses = preference_loss(pc / nc, pr / nr, rc / nc, rr / nr, beta=beta, loss_type=kind)
            else:
                losses = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=kind, label_smoothing=eps)
            reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
        else:
            losses = (simpo_loss(pc / nc, pr / nr, beta=beta, gamma=gamma, label_smoothing=eps) if kind == "simpo"
                      else orpo_loss(pc / nc, pr / nr, lam=beta))
            reward_c, reward_r = beta * pc / nc, beta * pr / nr
        metrics = {"weight": jnp.sum(valid), "rewards/chosen": jnp.sum(reward_c * valid),
                   "rewards/rejected": jnp.sum(reward_r * valid),
                   "rewards/accuracies": jnp.sum((reward_c > reward_r) * valid),
                   "rewards/margins": jnp.sum((reward_c - reward_r) * valid),
                   "logps/chosen": jnp.sum(pc * valid), "logps/rejected": jnp.sum(pr * valid)}
        if nll_coef:
            metrics["nll_loss"] = jnp.sum(-pc / nc * valid)
            losses = losses + nll_coef * (-pc / nc)
        return jnp.sum(losses * valid), metrics

    return loss_fn
