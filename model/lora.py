"""LoRA (Hu et al., 2021): a trainable low-rank update beside a frozen projection, y = W x + s·B(A x).

An adapter keeps the frozen weight's layout: A has the weight's input dims then the rank
([*in, r]), B the rank then its output dims ([r, *out]), both behind the same leading `layers`
axis as the weight, so scanned and unrolled layers carry adapters exactly as they carry weights.
A starts random and B at zero, so a fresh adapter leaves the model's outputs unchanged. Adapters
are `nnx.LoRAParam`s (a kind of `nnx.Param`): a stage trains only them by splitting on that type,
and they stay float32 whatever the frozen base's dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.config import LORA_TARGETS, DType, LoraConfig, ModelConfig

# Where each target lives: (module attribute of the block, weight name).
SITES = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
         "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}


class LoRA(nnx.Module):
    """The adapter of one projection with input dims `in_shape` and output dims `out_shape`."""

    def __init__(self, lora: LoraConfig, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 in_axes: tuple[str, ...], out_axes: tuple[str, ...], rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.scale, self.dropout = lora.scale, lora.dropout
        r, fan_in, lead = lora.rank, math.prod(in_shape), ("layers",) * len(stack)
        a_shape = (*stack, *in_shape, r)
        if lora.init == "kaiming":  # PEFT's kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = fan_in ** -0.5
            a = jax.random.uniform(rngs.params(), a_shape, jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(rngs.params(), a_shape, jnp.float32) / r
        self.a = nnx.LoRAParam(a, axes=(*lead, *in_axes, "lora_rank"))
        self.b = nnx.LoRAParam(jnp.zeros((*stack, r, *out_shape), jnp.float32), axes=(*lead, "lora_rank", *out_axes))

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """s·B(A x) for `x` [..., *in_shape] -> [..., *out_shape], in x's dtype. `key` turns on dropout
        of the adapter's input (training only)."""
        lead = x.shape[:x.ndim - len(self.in_shape)]
        h = x.reshape(*lead, -1).astype(jnp.float32)
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0.0)
        r = self.a.shape[-1]
        h = h @ self.a[...].reshape(-1, r)
        out = (h @ self.b[...].reshape(r, -1)) * self.scale
        return out.reshape(*lead, *self.out_shape).astype(x.dtype)

    def delta(self) -> jax.Array:
        """The update s·AB in the frozen weight's layout [*stack, *in_shape, *out_shape], float32."""
        r = self.a.shape[-1]
        stack = self.a.shape[:self.a.ndim - len(self.in_shape) - 1]
        a = self.a[...].reshape(*stack, -1, r)
        b = self.b[...].reshape(*stack, r, -1)
        return (jnp.matmul(a, b) * self.scale).reshape(*stack, *self.in_shape, *self.out_shape)


# Input dims of each target's weight after the `layers` axis ([H, D, E] for o; [in, out] otherwise).
_IN_DIMS = {"o": 2}


def attach(model: nnx.Module, rngs: nnx.Rngs) -> None:
    """Gives the decoder's layers an adapter `{weight}_lora` beside each weight `model.cfg.lora`
    targets, shaped and named from that weight. Called once the base is built, so adding adapters
    leaves the base's initialisation unchanged."""
    cfg: LoraConfig = model.cfg.lora
    for target in cfg.targets:
        block_attr, weight = SITES[target]
        module = getattr(model.layers, block_attr)
        w = getattr(module, weight)
        shape, axes, n = w.get_value().shape, w.get_metadata()["axes"], 1 + _IN_DIMS.get(target, 1)
        setattr(module, f"{weight}_lora", LoRA(cfg, shape[1:n], shape[n:], axes[1:n], axes[n:], rngs, shape[:1]))


def apply(module: nnx.Module, name: str, x: jax.Array, y: jax.Array, key: jax.Array | None) -> jax.Array:
    """y (projection `name` of x) plus its adapter's update; y itself when `module` adapts no `name`.
    Each target draws its own dropout mask from `key`."""
    adapter = getattr(module, f"{name}_lora", None)
    if adapter is None:
        return y
    return y + adapter(x, None if key is None else jax.random.fold_in(key, LORA_TARGETS.index(name)))


def adapters(model: nnx.Module) -> dict[str, LoRA]:
    """The model's adapters by target name ("q", "gate", ...); empty for a plain model."""
    found = {}
    for target, (block_attr, weight) in SITES.items():
        adapter = getattr(getattr(model.layers, block_attr), f"{weight}_lora", None)
        if adapter is not None:
            found[target] = adapter
    return found


def merge(model: nnx.Module, dtype: DType | None = None) -> nnx.Module:
    """A plain model (no adapters) whose weights are the base weights plus each adapter's update,
    added in float32 and stored in `dtype` (default: the base's param_dtype; a wider one keeps the
    update's precision over a bfloat16 base)."""
    cfg: ModelConfig = model.cfg
    merged_cfg = cfg.replace(lora=None, param_dtype=dtype or cfg.param_dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: type(model)(merged_cfg, rngs=nnx.Rngs(0))))
    values = jax.tree.map(lambda x: x.astype(merged_cfg.param_dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for target, adapter in adapters(model).items():
        block_attr, weight = SITES[target]
        group = values["layers"][block_attr]
        group[weight] = (group[weight].astype(jnp.float32) + adapter.delta()).astype(merged_cfg.param_dtype)
        group.pop(f"{weight}_lora")
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def count(state: nnx.State) -> int:
    """Number of elements in a state's arrays (abstract shapes are fine)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
