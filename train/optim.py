"""Learning-rate schedules and the AdamW optimizer with global-norm clipping (optax)."""
from __future__ import annotations

from typing import Any, Callable

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
        decay = max(int(round(total_steps * cfg.decay_fraction)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules([optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [stable])
    else:
        raise ValueError(f"unknown optim.schedule {cfg.schedule!r}")
    return optax.join_schedules([ramp, after], [warmup])


def decay_mask(params: nnx.State) -> nnx.State:
    """Weight decay on matrices (two or more non-layer axes) only: not on norms, biases or soft prompts' scales."""
    def one(var: nnx.Variable) -> nnx.Variable:
        axes = var.get_metadata().get("axes") or ()
        return var.replace(len([a for a in axes if a != "layers"]) >= 2)
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer(cfg: Any, total_steps: int, params: nnx.State) -> tuple[optax.GradientTransformation, Callable]:
    """(AdamW with clipping, the LR schedule) for `optim.*`."""
    lr = schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask(params)))
    return optax.chain(*parts), lr
