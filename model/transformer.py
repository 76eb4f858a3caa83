"""The decoder-only language model: embed, a stack of pre-norm blocks run with `lax.scan`, norm, logits.

All layers' parameters live in one `Block` with a leading `layers` axis. The forward pass splits
that block into its graph and state and scans over the state, so the scanned and the unrolled
(`scan_layers=False`) passes share one parameter layout and one checkpoint format. Per-layer
differences (Gemma2's alternating sliding windows) travel through the scan as data. Cached decoding
runs the layers unrolled, over per-layer views of the same weights, each with its own cache buffer.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import lora, prefix as prefixes
from model.attention import Attention, attention_mask
from model.config import DType, ModelConfig
from model.layers import MLP, Embed, RMSNorm, dense, dropout, normal, param
from model.rope import rotary_tables
from model.sharding import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("out_proj", "mlp_hidden"),
}
EMPTY_POSITION = np.iinfo(np.int32).max  # cache slots not yet written: after every query


class KVCache(NamedTuple):
    """Keys and values of every layer for decoding. Slot s of row b holds a token at `pos[b, s]`.

    One buffer per layer, heads before slots: a decode step updates each in place and multiplies it
    as it lies (a stacked [L, ...] buffer would be sliced, i.e. copied, every layer of every step).
    """

    k: tuple[jax.Array, ...]  # per layer [B, K, S, D]
    v: tuple[jax.Array, ...]  # per layer [B, K, S, D]
    pos: jax.Array  # [B, S] int32, EMPTY_POSITION where unwritten
    seg: jax.Array  # [B, S] int32, 0 where unwritten or padding
    index: jax.Array  # [] int32, the next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: DType | None = None) -> "KVCache":
        shape, dt = (batch, cfg.n_kv_heads, max_len, cfg.dim_head), jnp.dtype(dtype or cfg.dtype)
        return cls(k=tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)),
                   v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)),
                   pos=jnp.full((batch, max_len), EMPTY_POSITION, jnp.int32),
                   seg=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))

    def grow(self, slots: int) -> "KVCache":
        """The same cache with `slots` empty slots appended to every row. A decode loop can start on a
        short cache and grow it in phases, so early steps attend over fewer empty slots."""
        def pad(x: jax.Array, value) -> jax.Array:
            widths = [(0, 0)] * x.ndim
            widths[2 if x.ndim == 4 else 1] = (0, slots)
            return jnp.pad(x, widths, constant_values=value)

        return self._replace(k=tuple(pad(k, 0) for k in self.k), v=tuple(pad(v, 0) for v in self.v),
                             pos=pad(self.pos, EMPTY_POSITION), seg=pad(self.seg, 0))


class Block(nnx.Module):
    """One pre-norm decoder layer (optionally with Gemma2's extra post-norms)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        self.sandwich = cfg.sandwich_norm
        self.dropout = cfg.dropout
        self.attn_norm = RMSNorm(cfg, rngs, stack)
        self.attn = Attention(cfg, rngs, stack)
        self.mlp_norm = RMSNorm(cfg, rngs, stack)
        self.mlp = MLP(cfg, rngs, stack)
        if cfg.sandwich_norm:
            self.attn_post_norm = RMSNorm(cfg, rngs, stack)
            self.mlp_post_norm = RMSNorm(cfg, rngs, stack)

    def _mlp_residual(self, x: jax.Array, h: jax.Array, key: jax.Array | None = None) -> jax.Array:
        # Adapter dropout inside the MLP and residual dropout on both branches draw from separate keys.
        mlp_key, attn_drop_key, mlp_drop_key = (None,) * 3 if key is None else jax.random.split(key, 3)
        if self.sandwich:
            h = self.attn_post_norm(h)
        x = x + dropout(h, self.dropout, attn_drop_key)
        h = self.mlp(self.mlp_norm(x), mlp_key)
        if self.sandwich:
            h = self.mlp_post_norm(h)
        return constrain(x + dropout(h, self.dropout, mlp_drop_key), ("batch", "act_seq", "act_embed"))

    def __call__(self, x, cos, sin, mask, key=None, prefix=None, segments=None, windowed=False):
        attn_key, rest_key = (None, None) if key is None else jax.random.split(key)
        h = self.attn(self.attn_norm(x), cos, sin, mask, attn_key, prefix, segments, windowed)
        return self._mlp_residual(x, h, rest_key)

    def decode(self, x, cos, sin, positions, segments, window, cache_k, cache_v, cache_pos, cache_seg, index):
        h, cache_k, cache_v = self.attn.decode(self.attn_norm(x), cos, sin, positions, segments, window,
                                               cache_k, cache_v, cache_pos, cache_seg, index)
        return self._mlp_residual(x, h), cache_k, cache_v


def segment_positions(segments_BT: jax.Array) -> jax.Array:
    """Positions that restart at 0 at every segment boundary of a packed row."""
    T = segments_BT.shape[1]
    idx = jnp.arange(T, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segments_BT[:, :1], bool),
                              segments_BT[:, 1:] != segments_BT[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens)` returns float32 logits [batch, seq, vocab]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        self.layers = Block(cfg, rngs, stack=(cfg.n_layers,))
        self.final_norm = RMSNorm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)
        if cfg.reward_head:
            self.score = param(rngs, normal(cfg.init_std), (cfg.d_model,), ("embed",), cfg)
        # Parameter-efficient parts come last, so that adding them leaves the base's initialisation alone.
        if cfg.lora is not None:
            lora.attach(self, rngs)
        if cfg.prefix is not None:
            self.prefix = prefixes.make(cfg, rngs)

    # -- inputs ---------------------------------------------------------------------------------
    def _inputs(self, tokens_BT, positions_BT, segments_BT, x=None):
        """Embedded inputs (or the given embeddings `x`), rotary tables, positions and segments."""
        if segments_BT is None:
            segments_BT = jnp.ones(tokens_BT.shape, jnp.int32)
        if positions_BT is None:
            positions_BT = segment_positions(segments_BT)
        x = self.embed(tokens_BT) if x is None else x
        if self.cfg.embed_scale:
            x = x * jnp.asarray(self.cfg.d_model ** 0.5, x.dtype)
        x = constrain(x, ("batch", "act_seq", "act_embed"))
        cos, sin = rotary_tables(positions_BT, self.cfg)
        return x, cos, sin, positions_BT.astype(jnp.int32), segments_BT.astype(jnp.int32)

    def _scan(self, body, carry, xs):
        cfg = self.cfg
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        return jax.lax.scan(body, carry, xs, unroll=1 if cfg.scan_layers else cfg.n_layers)

    def logits(self, h_BTE: jax.Array) -> jax.Array:
        """Float32 logits from final hidden states (after the final norm)."""
        if self.cfg.tie_embeddings:
            logits = self.embed.attend(h_BTE)
        else:
            logits = dense(h_BTE, self.lm_head[...].astype(h_BTE.dtype), out_dtype=jnp.float32)
        if self.cfg.final_softcap is not None:
            logits = jnp.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return constrain(logits, ("batch", "act_seq", "act_vocab"))

    # -- full-sequence forward ------------------------------------------------------------------
    def hidden(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final-normed hidden states [B, T, d_model] (for heads other than the LM head)."""
        x, cos, sin, pos, seg = self._inputs(tokens_BT, positions_BT, segment_ids_BT)
        graphdef, state = nnx.split(self.layers)
        prefix_kv = self.prefix_kv()
        k_pos, k_seg = pos, seg
        if prefix_kv is not None:  # the prompt/prefix slots come first: positions -N..-1, seen by every segment
            B, N = tokens_BT.shape[0], self.num_prefix()
            k_pos = jnp.concatenate([jnp.broadcast_to(prefixes.positions(N), (B, N)), k_pos], axis=1)
            k_seg = jnp.concatenate([jnp.full((B, N), prefixes.PREFIX_SEGMENT, jnp.int32), k_seg], axis=1)
        # The masks are built once, outside the layer loop: built inside, every layer would store its own
        # copy for the backward pass. Layers differ only in being windowed or not.
        windows = self.cfg.layer_windows()
        masks = {w: attention_mask(pos, seg, k_pos, k_seg, w) for w in set(windows)}
        uniform = len(masks) == 1  # then each layer's window is known when tracing
        windowed = jnp.asarray([w > 0 for w in windows])
        # One dropout key per layer, scanned over like the weights (adapter dropout; None: no dropout).
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.cfg.n_layers)

        def body(x, layer):
            layer_state, is_windowed, key, prefix_kv = layer
            if uniform:
                mask, is_windowed = masks[windows[0]], windows[0] > 0
            else:
                mask = jnp.where(is_windowed, masks[max(windows)], masks[0])
            return nnx.merge(graphdef, layer_state)(x, cos, sin, mask, key, prefix_kv, seg, is_windowed), None

        x, _ = self._scan(body, x, (state, windowed, keys, prefix_kv))
        return self.final_norm(x)

    def logit_stats(self, fn: Callable[..., Any], tokens_BT: jax.Array, positions_BT: jax.Array | None,
                    segment_ids_BT: jax.Array | None, *per_position_BT: jax.Array,
                    dropout_key: jax.Array | None = None) -> Any:
        """`fn(logits [B,C,V], *per_position chunks [B,C])`, a pytree of [B,C] arrays, over the whole
        sequence: [B,T] each. With `cfg.logits_chunk` = C > 0 the logits are made C positions at a time
        and recomputed in the backward pass, so the float32 [B,T,V] logits never exist at once (what
        dominates memory at a 128k-256k vocabulary); 0 makes them whole."""
        h_BTE = self.hidden(tokens_BT, positions_BT, segment_ids_BT, dropout_key=dropout_key)
        B, T, _ = h_BTE.shape
        C = self.cfg.logits_chunk
        if not C or C >= T:
            return fn(self.logits(h_BTE), *per_position_BT)
        n = -(-T // C)

        def chunks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [n, B, C, ...], zero-padded
            x = jnp.pad(x, [(0, 0), (0, n * C - T)] + [(0, 0)] * (x.ndim - 2))
            return x.reshape(B, n, C, *x.shape[2:]).swapaxes(0, 1)

        @jax.checkpoint
        def one(args):
            h, extra = args
            return fn(self.logits(h), *extra)

        out = jax.lax.map(one, (chunks(h_BTE), tuple(chunks(x) for x in per_position_BT)))
        return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(B, n * C)[:, :T], out)

    def prefix_kv(self) -> tuple[jax.Array, jax.Array] | None:
        """Prompt/prefix tuning's keys and values of every layer [L, N, K, D] at positions -N..-1 (None
        without). Prompt tuning's are the virtual tokens' own, from a causal pass of the layers over them."""
        p = self.cfg.prefix
        if p is None:
            return None
        if p.kind == "prefix":
            return self.prefix()
        N = p.num_tokens
        pos, seg = prefixes.positions(N)[None], jnp.ones((1, N), jnp.int32)
        virtual = self.prefix.embeddings[...].astype(self.cfg.dtype)[None]
        x, cos, sin, pos, seg = self._inputs(None, pos, seg, x=virtual)
        cache = KVCache.init(self.cfg, 1, N)._replace(pos=pos, seg=seg)
        _, cache = self._decode_layers(x, cos, sin, pos, seg, cache, self.decode_layers())
        return tuple(jnp.stack([kv[0].transpose(1, 0, 2) for kv in kvs]) for kvs in (cache.k, cache.v))

    def num_prefix(self) -> int:
        """Key/value slots before every sequence (prompt or prefix tuning's N; 0 without)."""
        return self.cfg.prefix.num_tokens if self.cfg.prefix is not None else 0

    def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> KVCache:
        """An empty cache for `max_len` tokens per row, after the prompt/prefix slots if the model has them."""
        n = self.num_prefix()
        cache = KVCache.init(self.cfg, batch, max_len + n, dtype)
        if not n:
            return cache
        k, v = self.prefix_kv()

        def put(slots: tuple[jax.Array, ...], kv_LNKD: jax.Array) -> tuple[jax.Array, ...]:
            """Each layer's prefix [N, K, D] into slots [:n] of its [B, K, S, D] buffer, the same in every row."""
            out = []
            for buffer_BKSD, kv_NKD in zip(slots, kv_LNKD):
                kv_KND = kv_NKD.transpose(1, 0, 2)
                rows_BKND = jnp.broadcast_to(kv_KND[None], (batch, *kv_KND.shape))
                out.append(buffer_BKSD.at[:, :, :n].set(rows_BKND.astype(buffer_BKSD.dtype)))
            return tuple(out)

        return KVCache(k=put(cache.k, k), v=put(cache.v, v),
                       pos=cache.pos.at[:, :n].set(prefixes.positions(n)),
                       seg=cache.seg.at[:, :n].set(prefixes.PREFIX_SEGMENT), index=jnp.asarray(n, jnp.int32))

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, vocab]. Segment id 0 marks padding; packed documents get distinct ids.
        `dropout_key` switches on the dropout of LoRA adapters (training); without it the pass is deterministic."""
        return self.logits(self.hidden(tokens_BT, positions_BT, segment_ids_BT, dropout_key=dropout_key))

    def values(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """The scalar head at every position [B, T] (float32): a value model's estimate after each token."""
        if not self.cfg.reward_head:
            raise ValueError("this model has no reward head (ModelConfig.reward_head), the scalar head of reward "
                             "and value models")
        h_BTE = self.hidden(tokens_BT, positions_BT, segment_ids_BT)
        return jnp.einsum("bte,e->bt", h_BTE.astype(jnp.float32), self.score[...].astype(jnp.float32))

    def rewards(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                segment_ids_BT: jax.Array | None = None) -> jax.Array:
        """Scalar scores [B] (float32) of a reward model: the head at each row's last non-padding token
        (segment > 0), which has read the whole sequence."""
        values_BT = self.values(tokens_BT, positions_BT, segment_ids_BT)
        T = tokens_BT.shape[1]
        real_BT = jnp.ones(tokens_BT.shape, bool) if segment_ids_BT is None else segment_ids_BT > 0
        last_B = T - 1 - jnp.argmax(jnp.flip(real_BT, axis=1), axis=1)
        return jnp.take_along_axis(values_BT, last_B[:, None], axis=1)[:, 0]

    # -- cached decoding ------------------------------------------------------------------------
    def decode_layers(self) -> list[Block]:
        """The layers one by one, views of the stacked weights. A decode loop makes them once, outside
        the loop, and passes them to every `decode` call, so no step slices the stack again."""
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda w: w[i], state)) for i in range(self.cfg.n_layers)]

    def decode(self, tokens_BT: jax.Array, cache: KVCache, positions_BT: jax.Array | None = None,
               segment_ids_BT: jax.Array | None = None, *, layers: list[Block] | None = None,
               last_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Runs T new tokens against the cache (prefill: T = prompt length; sampling: T = 1).

        Positions default to continuing from `cache.index`. `layers`: `decode_layers()`, made once per
        decode loop (default: made now). Returns (logits [B,T,V], updated cache); with `last_only`, the
        logits of the last position only, [B,1,V] (a prefill needs no others).
        """
        B, T = tokens_BT.shape
        if positions_BT is None:  # real tokens start at 0 after the prompt/prefix slots
            start = cache.index - self.num_prefix()
            positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        x, cos, sin, pos, seg = self._inputs(tokens_BT, positions_BT, segment_ids_BT)
        # Padding tokens are written as never-visible slots.
        slot_pos = jnp.where(seg > 0, pos, EMPTY_POSITION)
        cache = cache._replace(pos=jax.lax.dynamic_update_slice_in_dim(cache.pos, slot_pos, cache.index, axis=1),
                               seg=jax.lax.dynamic_update_slice_in_dim(cache.seg, seg, cache.index, axis=1))
        x, cache = self._decode_layers(x, cos, sin, pos, seg, cache, layers or self.decode_layers())
        if last_only:
            x = x[:, -1:]
        return self.logits(self.final_norm(x)), cache._replace(index=cache.index + T)

    def _decode_layers(self, x, cos, sin, pos, seg, cache: KVCache, layers: list[Block]) -> tuple[jax.Array, KVCache]:
        """The layers over x, unrolled (each reads and writes its own cache buffer); the index stays."""
        ks, vs = [], []
        for layer, window, k, v in zip(layers, self.cfg.layer_windows(), cache.k, cache.v, strict=True):
            x, k, v = layer.decode(x, cos, sin, pos, seg, window, k, v, cache.pos, cache.seg, cache.index)
            ks.append(k)
            vs.append(v)
        return x, cache._replace(k=tuple(ks), v=tuple(vs))


def trainable(cfg: ModelConfig) -> nnx.filterlib.Filter:
    """The variables a stage trains for this model (an nnx filter): its LoRA adapters or its
    prompt/prefix if it has them (the base stays frozen; a reward model's new head trains too, as
    PEFT's modules_to_save), else every parameter."""
    if cfg.lora is None and cfg.prefix is None:
        return nnx.Param
    tuned = nnx.LoRAParam if cfg.lora is not None else prefixes.PrefixParam
    return nnx.Any(tuned, nnx.PathContains("score")) if cfg.reward_head else tuned


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters, from abstract shapes only (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
