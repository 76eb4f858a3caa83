"""Learning-rate schedules and the AdamW optimizer with global-norm clipping (optax)."""
from __future__ import annotations

from typing import Any

import jax
import optax
from flax import nnx


def schedule(cfg: Any, total_steps: int) -> optax.Schedule:
    """The `optim.schedule` LR curve over `total_steps`, always with a linear warmup from 0.

    constant: warmup, then `lr`. cosine: warmup, then cosine to `lr * min_lr_ratio`.
    linear: warmup, then linear to `lr * min_lr_ratio` (annealing uses min_lr_ratio 0).
    wsd (warmup-stable-decay): warmup, `lr` until the last `decay_fraction` of the run, then linear decay.
    A fresh warmup on a loaded model is the LR re-warming of continued training.
    """
    lr, warmup = cfg.lr, min(cfg.warmup_steps, total_steps)
    end = lr * cfg.min_lr_ratio
    rest = max(total_steps - warmup, 1)
    ramp = optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, rest)
    elif cfg.schedule == "wsd":
        # The decay ends at the end of the run, so it is cut to what the warmup leaves.
        decay = min(max(int(round(total_steps * cfg.decay_fraction)), 1), rest)
        stable = rest - decay
        after = optax.join_schedules([optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [stable])
    else:
        raise ValueError(f"unknown optim.schedule {cfg.schedule!r}")
    return optax.join_schedules([ramp, after], [warmup])


def decay_mask(params: nnx.State) -> nnx.State:
    """Weight decay on matrices only: not on norms' scales or biases.

    A matrix has two or more feature axes besides the stacked `layers` axis; heads x head_dim is one
    feature axis split for sharding, so q/k/v biases ([heads, head_dim]) are vectors and not decayed.
    """
    def one(var: nnx.Variable) -> nnx.Variable:
        axes = var.get_metadata().get("axes") or ()
        return var.replace(len([a for a in axes if a not in ("layers", "head_dim")]) >= 2)
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer(cfg: Any, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and the LR schedule, for `optim.*`."""
    lr = schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    # inject_hyperparams records in the optimizer state the LR each update used: the step logs that,
    # not the schedule at the step count, which runs ahead of the updates after skipped steps.
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    parts.append(adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask(params)))
    return optax.chain(*parts)


def applied_lr(opt_state: Any) -> jax.Array:
    """The learning rate of the last update `opt_state` went through (0 before the first)."""
    def recorded(x: Any) -> bool:
        return isinstance(x, optax.InjectStatefulHyperparamsState)
    for node in jax.tree.leaves(opt_state, is_leaf=recorded):
        if recorded(node):
            return node.hyperparams["learning_rate"]
    raise ValueError("the optimizer state records no learning rate (no inject_hyperparams)")
