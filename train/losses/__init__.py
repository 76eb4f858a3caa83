"""Loss registry. A stage's loss is `loss_fn(model, batch, rngs) -> (loss_sum, metrics)`; `rngs` (None: no randomness, as
in evaluation) feeds dropout and sampling.

`loss_sum` is a SUM over the micro-batch's loss units (tokens, pairs, ...), and `metrics["weight"]`
counts those units. The shared train step divides the summed loss, its gradient and every other
metric by the total weight of the whole step, across micro-batches and devices, so gradient
accumulation and sharding never change the token weighting.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

LossFn = Callable[[nnx.Module, dict[str, jax.Array], nnx.Rngs], tuple[jax.Array, dict[str, jax.Array]]]
_REGISTRY: dict[str, Callable[..., LossFn]] = {}
_KINDS: dict[str, tuple[str, ...]] = {}


def register(name: str, kinds: tuple[str, ...]) -> Callable[[Callable[..., LossFn]], Callable[..., LossFn]]:
    """Registers a loss factory `factory(loss_config) -> loss_fn` under `name`; `kinds` are the
    data pipeline kinds (data.pipeline.KINDS) whose batches the loss reads."""
    def wrap(factory: Callable[..., LossFn]) -> Callable[..., LossFn]:
        _REGISTRY[name], _KINDS[name] = factory, kinds
        return factory
    return wrap


def batch_kinds(name: str) -> tuple[str, ...]:
    """The data kinds loss `name` trains on; ValueError naming the known losses if it is unknown."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss.type {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _KINDS[name]


def get(name: str, loss_config: Any) -> LossFn:
    """The loss function `name` configured by the `loss.*` config group."""
    batch_kinds(name)
    return _REGISTRY[name](loss_config)


from train.losses import dpo, next_token, reward, rl, sft  # noqa: E402,F401  (register their losses)
