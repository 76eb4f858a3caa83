"""Building blocks: annotated parameters, RMSNorm, the gated MLP and the token embedding.

Every parameter is created through `param`, which records one logical axis name per dimension
(see `model.sharding`). Modules take a `stack` shape: the decoder builds all layers at once with a
leading `layers` axis, so the same module code serves the scanned and the unrolled forward pass.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model import lora
from model.config import ModelConfig
from model.sharding import constrain

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], axes: tuple[str, ...],
          cfg: ModelConfig, stack: tuple[int, ...] = ()) -> nnx.Param:
    """A parameter of `shape` (behind the `stack` dims) with logical axis names."""
    full_axes = ("layers",) * len(stack) + axes
    return nnx.Param(init(rngs.params(), (*stack, *shape), jnp.dtype(cfg.param_dtype)), axes=full_axes)


def normal(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


zeros: Initializer = jax.nn.initializers.zeros
ones: Initializer = jax.nn.initializers.ones


def dense(x: jax.Array, w: jax.Array, *, transpose_w: bool = False, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x [..., E] times w [E, *out] (w [*out, E] with `transpose_w`): [..., *out], as one 2-D matmul
    over x's flattened leading axes.

    Flat, a weight's gradient contracts one axis of rows. Contracting batch and sequence as two axes
    (an einsum "bte,ef->btf") makes XLA's CPU backend write a transposed copy of the activation's
    gradient for every weight gradient: the SwiGLU MLP's forward and backward took 140 ms instead of
    91 (8 x 256 rows, 384 -> 1024; docs/performance.md).
    """
    E = x.shape[-1]
    rows = x.reshape(-1, E)
    if transpose_w:
        out = w.shape[:-1]
        y = jax.lax.dot_general(rows, w.reshape(-1, E), (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)
    else:
        out = w.shape[1:]
        y = jnp.dot(rows, w.reshape(E, -1), preferred_element_type=out_dtype)
    return y.reshape(*x.shape[:-1], *out)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """x with each element zeroed with probability `rate` and the rest scaled by 1 / (1 - rate), so the
    expectation is x; x itself without a key (evaluation, sampling) or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    return {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }[name]


class RMSNorm(nnx.Module):
    """RMSNorm in float32. Llama: cast, then times w. Gemma: times (1 + w) in float32, then cast."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        self.eps = cfg.norm_eps
        self.plus_one = cfg.norm_plus_one
        self.scale = param(rngs, zeros if cfg.norm_plus_one else ones, (cfg.d_model,), ("norm",), cfg, stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = self.scale[...]
        if self.plus_one:
            return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        return normed.astype(x.dtype) * w.astype(x.dtype)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) — SwiGLU for Llama, GeGLU for Gemma."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        init = normal(cfg.init_std)
        E, F = cfg.d_model, cfg.d_ff
        self.dtype = jnp.dtype(cfg.dtype)
        self.act = activation(cfg.act)
        self.gate = param(rngs, init, (E, F), ("embed", "mlp"), cfg, stack)
        self.up = param(rngs, init, (E, F), ("embed", "mlp"), cfg, stack)
        self.down = param(rngs, init, (F, E), ("mlp", "embed"), cfg, stack)
        if cfg.mlp_bias:
            self.gate_bias = param(rngs, zeros, (F,), ("mlp",), cfg, stack)
            self.up_bias = param(rngs, zeros, (F,), ("mlp",), cfg, stack)
            self.down_bias = param(rngs, zeros, (E,), ("embed",), cfg, stack)
        self.has_bias = cfg.mlp_bias

    def __call__(self, x_BTE: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """`key`: LoRA dropout (training)."""
        dt = self.dtype
        gate_BTF = lora.apply(self, "gate", x_BTE, dense(x_BTE, self.gate[...].astype(dt)), key)
        up_BTF = lora.apply(self, "up", x_BTE, dense(x_BTE, self.up[...].astype(dt)), key)
        if self.has_bias:
            gate_BTF = gate_BTF + self.gate_bias[...].astype(dt)
            up_BTF = up_BTF + self.up_bias[...].astype(dt)
        h_BTF = constrain(self.act(gate_BTF) * up_BTF, ("batch", "act_seq", "act_mlp"))
        h_BTF = checkpoint_name(h_BTF, "mlp_hidden")
        out_BTE = lora.apply(self, "down", h_BTF, dense(h_BTF, self.down[...].astype(dt)), key)
        if self.has_bias:
            out_BTE = out_BTE + self.down_bias[...].astype(dt)
        return out_BTE


class Embed(nnx.Module):
    """Token embedding table [vocab, d_model]; also the output projection when embeddings are tied."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        self.table = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], tokens_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTE: jax.Array) -> jax.Array:
        """Logits in float32 from the transposed table."""
        return dense(x_BTE, self.table[...].astype(self.dtype), transpose_w=True, out_dtype=jnp.float32)
