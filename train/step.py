"""The one train step every stage shares, and the state it updates.

The step gets the stage's `loss_fn` and never anything stage-specific. Gradients are summed over
micro-batches (a `lax.scan`) and divided by the loss weight of the whole step, so accumulation
gives the update of one big batch. A step whose loss or gradient is not finite (or whose batch
has no loss tokens) leaves parameters and optimizer state untouched and is counted.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from model.sharding import constrain
from train.losses import LossFn
from train.optim import applied_lr


class TrainState(NamedTuple):
    """Everything a step changes: checkpointed whole, so a resumed run continues exactly."""

    step: jax.Array  # [] int32
    params: nnx.State  # the trainable parameters only
    opt_state: Any
    rng: jax.Array  # raw key data (uint32), so orbax can store it
    nonfinite_streak: jax.Array  # [] int32: consecutive skipped steps
    nonfinite_total: jax.Array  # [] int32


def init_state(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh TrainState; the optimizer state inherits the parameters' shardings."""
    def zero() -> jax.Array:  # distinct buffers: the step donates each one
        return jnp.zeros((), jnp.int32)
    opt_state = jax.jit(tx.init, out_shardings=optimizer_shardings(params, tx))(params)
    return TrainState(step=zero(), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(jax.random.key(seed)), nonfinite_streak=zero(), nonfinite_total=zero())


def optimizer_shardings(params: nnx.State, tx: optax.GradientTransformation) -> Any:
    """Shardings for `tx.init(params)`: each moment like the parameter it belongs to (its path ends in
    the parameter's path), scalars (counts) replicated. Left to the compiler, the zero-initialised
    moments came out replicated: under FSDP every device then held the whole optimizer state.
    None when the parameters are not on a mesh."""
    leaves = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_leaves_with_path(params)}
    named = [x.sharding for x in leaves.values() if isinstance(x.sharding, NamedSharding)]
    if not named:
        return None
    replicated = NamedSharding(named[0].mesh, PartitionSpec())

    def like_param(path, x):
        key = jax.tree_util.keystr(path)
        owner = [k for k, p in leaves.items() if key.endswith(k) and p.shape == x.shape]
        return leaves[max(owner, key=len)].sharding if owner else replicated

    return jax.tree_util.tree_map_with_path(like_param, jax.eval_shape(tx.init, params))


def split_micro(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
    """[B, ...] -> [accum, B/accum, ...]; micro-batch i takes rows i, i+accum, ... so each spans every device."""
    def one(x: jax.Array) -> jax.Array:
        micro = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return constrain(micro, (None, "batch") + (None,) * (x.ndim - 1))
    return {k: one(v) for k, v in batch.items()}


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    grad_accum: int = 1):
    """`step(state, frozen, batch) -> (state, metrics)`, a pure function ready for `jax.jit`."""

    def micro_grads(params, frozen, batch, key):
        def objective(p):
            model = nnx.merge(graphdef, p, frozen)
            loss_sum, metrics = loss_fn(model, batch, nnx.Rngs(key))
            return loss_sum, dict(metrics, loss=loss_sum)
        (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, sums

    def step(state: TrainState, frozen: nnx.State, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if grad_accum == 1:
            grads, sums = micro_grads(state.params, frozen, batch, key)
        else:
            micro = split_micro(batch, grad_accum)
            first = jax.tree.map(lambda x: x[0], micro)
            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_grads, state.params, frozen, first, key))

            def body(acc, xs):
                mb, i = xs
                g, m = micro_grads(state.params, frozen, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, acc, (g, m)), None

            (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum)))
        weight = sums.pop("weight")
        grads = jax.tree.map(lambda g: g / weight, grads)
        metrics = {k: v / weight for k, v in sums.items()}
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & (weight > 0)

        def keep_if_ok(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
        new_state = TrainState(step=state.step + 1, params=keep_if_ok(params, state.params),
                               opt_state=keep_if_ok(opt_state, state.opt_state), rng=state.rng,
                               nonfinite_streak=streak, nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
        # The LR this update used (a skipped step: the one it would have used, which the next step uses).
        metrics.update(weight=weight, grad_norm=grad_norm, lr=applied_lr(opt_state), skipped=~ok,
                       nonfinite_streak=streak)
        return new_state, metrics

    return step
