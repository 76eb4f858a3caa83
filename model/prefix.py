"""Prompt tuning (Lester et al., 2021) and prefix tuning / P-tuning v2 (Li & Liang, 2021; Liu et al., 2022).

Both give every layer's attention N extra key/value slots that every real token may attend to:
- prompt tuning learns N virtual-token embeddings placed before the sequence; their keys and
  values at each layer come from running them through the frozen decoder (causally, among
  themselves), which is exactly what prepending them to every sequence would compute, since a
  prefix never sees what follows it;
- prefix tuning learns the keys and values of every layer directly ([layers, N, kv_heads,
  head_dim], so GQA shares them per kv-head), optionally through an MLP reparameterisation
  during training that `fold` turns into plain prefixes for inference and export.

The prefix sits at positions -N..-1 with segment id PREFIX_SEGMENT, which the attention mask lets
every segment see. So packed documents each see the whole prefix and never each other, real
tokens keep their positions (RoPE depends on distances only), and a KV cache holds the prefix in
its first N slots (`Transformer.init_cache`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig, PrefixConfig

PREFIX_SEGMENT = -1  # segment id of prefix slots: visible to every segment


class PrefixParam(nnx.Param):
    """A trainable prompt- or prefix-tuning parameter (the base stays frozen)."""


def positions(n: int) -> jax.Array:
    """The prefix's positions, -n..-1: before every real token."""
    return jnp.arange(-n, 0, dtype=jnp.int32)


class VirtualTokens(nnx.Module):
    """Prompt tuning's N learned input embeddings [N, d_model]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        p: PrefixConfig = cfg.prefix
        self.embeddings = PrefixParam(jax.random.normal(rngs.params(), (p.num_tokens, cfg.d_model), jnp.float32)
                                      * cfg.init_std, axes=("prefix", "embed"))


class Prefixes(nnx.Module):
    """Prefix tuning's per-layer keys and values, learned directly or through an MLP (`hidden` > 0)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        p: PrefixConfig = cfg.prefix
        N, L, K, D, E = p.num_tokens, cfg.n_layers, cfg.n_kv_heads, cfg.dim_head, cfg.d_model
        self.shape = (L, N, K, D)
        # Real keys and values are x @ W with unit-scale x, so their entries are about init_std * sqrt(E).
        std = cfg.init_std * E ** 0.5
        self.hidden = p.hidden
        if p.hidden:  # the MLP of prefix-tuning's reparameterisation (PEFT's PrefixEncoder): tanh between
            init = jax.nn.initializers.normal(cfg.init_std)
            self.embed = PrefixParam(init(rngs.params(), (N, E), jnp.float32), axes=("prefix", "embed"))
            self.w_in = PrefixParam(init(rngs.params(), (E, p.hidden), jnp.float32), axes=("embed", "mlp"))
            self.b_in = PrefixParam(jnp.zeros((p.hidden,), jnp.float32), axes=("mlp",))
            self.w_out = PrefixParam(jax.random.normal(rngs.params(), (p.hidden, 2 * L * K * D), jnp.float32)
                                     * std / p.hidden ** 0.5, axes=("mlp", None))
            self.b_out = PrefixParam(jnp.zeros((2 * L * K * D,), jnp.float32), axes=(None,))
        else:
            self.k = PrefixParam(jax.random.normal(rngs.params(), self.shape, jnp.float32) * std,
                                 axes=("layers", "prefix", "kv_heads", "head_dim"))
            self.v = PrefixParam(jax.random.normal(rngs.params(), self.shape, jnp.float32) * std,
                                 axes=("layers", "prefix", "kv_heads", "head_dim"))

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        """Keys and values [layers, N, kv_heads, head_dim], float32."""
        if not self.hidden:
            return self.k[...], self.v[...]
        h = jnp.tanh(self.embed[...] @ self.w_in[...] + self.b_in[...])
        kv = (h @ self.w_out[...] + self.b_out[...]).reshape(self.shape[1], 2, self.shape[0], *self.shape[2:])
        return kv[:, 0].swapaxes(0, 1), kv[:, 1].swapaxes(0, 1)


def make(cfg: ModelConfig, rngs: nnx.Rngs) -> VirtualTokens | Prefixes:
    return VirtualTokens(cfg, rngs) if cfg.prefix.kind == "prompt" else Prefixes(cfg, rngs)


def fold(model: nnx.Module) -> nnx.Module:
    """The same model with an MLP-reparameterised prefix replaced by the plain keys and values it
    computes (for inference and export); other models are returned as they are."""
    p: PrefixConfig | None = model.cfg.prefix
    if p is None or p.kind != "prefix" or not p.hidden:
        return model
    k, v = model.prefix()
    cfg = model.cfg.replace(prefix=PrefixConfig(kind="prefix", num_tokens=p.num_tokens, hidden=0))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: type(model)(cfg, rngs=nnx.Rngs(0))))
    values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    values["prefix"] = {"k": k, "v": v}
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def init_prompt(model: nnx.Module, how: str, token_ids: list[int], key: jax.Array) -> None:
    """Initialises prompt tuning's virtual tokens (in place): `random` keeps the random start scaled like
    the vocabulary's embeddings, `vocab` copies the embeddings of tokens drawn from the vocabulary, `text`
    those of `token_ids` (the tokenized init text, repeated to fill the N tokens)."""
    virtual = model.prefix.embeddings
    n = virtual.shape[0]
    table = model.embed.table[...].astype(jnp.float32)
    if how == "random":
        virtual.set_value(virtual[...] / model.cfg.init_std * jnp.std(table))
        return
    if how == "vocab":
        ids = jax.random.randint(key, (n,), 0, table.shape[0])
    elif how == "text":
        if not token_ids:
            raise ValueError("peft.prompt_init=text needs a non-empty peft.prompt_init_text")
        ids = jnp.asarray([token_ids[i % len(token_ids)] for i in range(n)], jnp.int32)
    else:
        raise ValueError(f"peft.prompt_init={how!r}: choose random, vocab or text")
    virtual.set_value(table[ids])
