"""Grouped-query attention with RoPE, packed-sequence masks, sliding windows, soft-capping and a KV cache.

One mask rule serves training and decoding: a query attends to a key when both belong to the same
segment (or the key is a prompt/prefix-tuning slot, segment -1, which every segment shares), the
key's position is not after the query's, and (for windowed layers) the distance is below the window.
Packed documents therefore never see each other, and empty cache slots (segment 0, position
"infinity") are never attended.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model import attention_kernels as kernels, lora
from model.config import ModelConfig
from model.layers import dense, normal, param, zeros
from model.rope import apply_rotary
from model.sharding import constrain

NEG_INF = -2.3819763e38  # large finite negative: a fully masked row gives a uniform mix, never NaN
# The `blocked` kernel: at most this many query blocks of at least MIN_BLOCK rows (shorter rows: one block).
CAUSAL_BLOCKS, MIN_BLOCK = 4, 64


def attention_mask(q_pos_BT: jax.Array, q_seg_BT: jax.Array, k_pos_BS: jax.Array, k_seg_BS: jax.Array,
                   window: jax.Array | int) -> jax.Array:
    """Boolean [B, T, S]: may query t attend to key s. `window` 0 means unlimited."""
    q_pos, k_pos, k_seg = q_pos_BT[:, :, None], k_pos_BS[:, None, :], k_seg_BS[:, None, :]
    allowed = ((q_seg_BT[:, :, None] == k_seg) | (k_seg < 0)) & (k_pos <= q_pos)
    return allowed & ((window <= 0) | (q_pos - k_pos < window))


class Attention(nnx.Module):
    """Multi-head attention with n_kv_heads shared key/value heads (GQA; MHA when equal)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        E, H, K, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dim_head
        init = normal(cfg.init_std)
        self.dtype = jnp.dtype(cfg.dtype)
        self.n_kv_heads, self.group = K, H // K
        self.scale = (cfg.query_pre_attn_scalar or D) ** -0.5
        self.softcap = cfg.attn_softcap
        self.kernel = kernels.resolve(cfg.attention, self.dtype, cfg.attn_softcap)
        self.window = cfg.sliding_window or 0
        self.q = param(rngs, init, (E, H, D), ("embed", "q_heads", "head_dim"), cfg, stack)
        self.k = param(rngs, init, (E, K, D), ("embed", "kv_heads", "head_dim"), cfg, stack)
        self.v = param(rngs, init, (E, K, D), ("embed", "kv_heads", "head_dim"), cfg, stack)
        self.o = param(rngs, init, (H, D, E), ("q_heads", "head_dim", "embed"), cfg, stack)
        self.qkv_bias, self.o_bias_on = cfg.qkv_bias, cfg.o_bias
        if cfg.qkv_bias:
            self.q_bias = param(rngs, zeros, (H, D), ("q_heads", "head_dim"), cfg, stack)
            self.k_bias = param(rngs, zeros, (K, D), ("kv_heads", "head_dim"), cfg, stack)
            self.v_bias = param(rngs, zeros, (K, D), ("kv_heads", "head_dim"), cfg, stack)
        if cfg.o_bias:
            self.o_bias = param(rngs, zeros, (E,), ("embed",), cfg, stack)

    def project_qkv(self, x_BTE: jax.Array, cos: jax.Array, sin: jax.Array, key: jax.Array | None = None):
        """Queries [B,T,H,D] and rotated keys / values [B,T,K,D]. `key`: LoRA dropout (training)."""
        dt = self.dtype
        q = lora.apply(self, "q", x_BTE, dense(x_BTE, self.q[...].astype(dt)), key)
        k = lora.apply(self, "k", x_BTE, dense(x_BTE, self.k[...].astype(dt)), key)
        v = lora.apply(self, "v", x_BTE, dense(x_BTE, self.v[...].astype(dt)), key)
        if self.qkv_bias:
            q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                       v + self.v_bias[...].astype(dt))
        q = checkpoint_name(constrain(apply_rotary(q, cos, sin), ("batch", "act_seq", "act_heads", None)), "query_proj")
        k = checkpoint_name(constrain(apply_rotary(k, cos, sin), ("batch", "act_seq", "act_kv_heads", None)), "key_proj")
        v = checkpoint_name(constrain(v, ("batch", "act_seq", "act_kv_heads", None)), "value_proj")
        return q, k, v

    def attend(self, q_BTHD: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array, mask_BTS: jax.Array,
               key: jax.Array | None = None) -> jax.Array:
        """Softmax attention of queries over keys; returns the output projection [B,T,E]."""
        return self.project_out(self.softmax_attention(q_BTHD, k_BKSD, v_BKSD, mask_BTS), key)

    def softmax_attention(self, q_BTHD: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array,
                          mask_BTS: jax.Array) -> jax.Array:
        """The heads' outputs [B,T,H,D], before the output projection.

        Keys and values come heads-first, the KV cache's layout: each (row, kv-head) pair is then one
        contiguous matrix, so decoding multiplies the cache in place instead of transposing it every step.
        """
        B, T, H, D = q_BTHD.shape
        K, G, S = self.n_kv_heads, self.group, k_BKSD.shape[2]
        # Queries heads-first too, the G queries of each kv head stacked as rows (M = G*T), so both products
        # are plain batched matmuls over (b, k) that XLA runs without transposing an operand; the mask is
        # added as a bias, whose gradient is the identity (a `where` adds a select to the backward pass).
        # Together: attention's forward + backward 21% faster on CPU (docs/performance.md).
        q_BKMD = q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D)
        scores = jnp.einsum("bkmd,bksd->bkms", q_BKMD, k_BKSD, preferred_element_type=jnp.float32)
        scores = scores * self.scale
        if self.softcap is not None:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        bias_B11TS = jnp.where(mask_BTS, 0.0, NEG_INF)[:, None, None]
        scores = (scores.reshape(B, K, G, T, S) + bias_B11TS).reshape(B, K, G * T, S)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out_BKMD = jnp.einsum("bkms,bksd->bkmd", probs, v_BKSD)
        return out_BKMD.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)

    def causal_blocks(self, q_BTHD: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array,
                      mask_BTS: jax.Array) -> jax.Array:
        """`softmax_attention` of the sequence over its own keys, a block of queries at a time, each over
        the keys up to its block's end. Positions count up along each segment (as in every batch Kiln
        builds), so a key in a later slot than its query is always masked: a later position of the same
        segment, or another segment. The blocks above the diagonal are therefore skipped instead of computed
        and masked: at 4 blocks, 6 of the 16 query-key blocks (CPU: docs/performance.md)."""
        T = q_BTHD.shape[1]
        n = min(CAUSAL_BLOCKS, T // MIN_BLOCK)
        if n <= 1:
            return self.softmax_attention(q_BTHD, k_BKSD, v_BKSD, mask_BTS)
        bounds = [T * i // n for i in range(n + 1)]
        return jnp.concatenate([
            self.softmax_attention(q_BTHD[:, start:end], k_BKSD[:, :, :end], v_BKSD[:, :, :end],
                                   mask_BTS[:, start:end, :end])
            for start, end in zip(bounds, bounds[1:])], axis=1)

    def project_out(self, out_BTHD: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The heads' outputs [B,T,H,D] through the output projection: [B,T,E]."""
        B, T, H, D = out_BTHD.shape
        out_BTHD = constrain(out_BTHD, ("batch", "act_seq", "act_heads", None))
        # One contraction over h*d: contracting h and d separately makes XLA transpose the weight.
        out = dense(out_BTHD.reshape(B, T, H * D), self.o[...].astype(self.dtype).reshape(H * D, -1))
        out = lora.apply(self, "o", out_BTHD, out, key)
        if self.o_bias_on:
            out = out + self.o_bias[...].astype(self.dtype)
        return checkpoint_name(out, "out_proj")

    def __call__(self, x_BTE: jax.Array, cos: jax.Array, sin: jax.Array, mask_BTS: jax.Array,
                 key: jax.Array | None = None, prefix: tuple[jax.Array, jax.Array] | None = None,
                 segments_BT: jax.Array | None = None, windowed: jax.Array | bool = False) -> jax.Array:
        """`mask_BTS`: from `attention_mask`, over the prefix slots (first) and the sequence's keys.
        `prefix`: this layer's prompt/prefix keys and values [N, K, D] (rotated already), seen by every segment.
        `segments_BT` and `windowed` (whether this layer uses the sliding window): for the kernels."""
        q, k, v = self.project_qkv(x_BTE, cos, sin, key)
        if prefix is None and self.kernel not in ("einsum", "blocked") and segments_BT is not None:
            def run(window: int) -> jax.Array:
                return kernels.attend(self.kernel, q, k, v, mask_BTS, segments_BT, window, self.scale, self.softcap)

            if not self.window or isinstance(windowed, bool):
                out = run(self.window if windowed else 0)
            else:  # layers differ (Gemma 2): both kernels compiled, this layer's chosen
                out = jax.lax.cond(windowed, lambda: run(self.window), lambda: run(0))
            return self.project_out(out.astype(self.dtype), key)
        if prefix is not None:
            B = x_BTE.shape[0]
            k, v = (jnp.concatenate([jnp.broadcast_to(p.astype(k.dtype), (B, *p.shape)), x], axis=1)
                    for p, x in zip(prefix, (k, v)))
        # Prefix slots come before the sequence's keys, outside the blocks' rule: those rows take one block.
        core = self.causal_blocks if prefix is None and self.kernel == "blocked" else self.softmax_attention
        return self.project_out(core(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask_BTS), key)

    def decode(self, x_BTE: jax.Array, cos: jax.Array, sin: jax.Array, positions_BT: jax.Array,
               segments_BT: jax.Array, window: jax.Array | int, cache_k_BKSD: jax.Array, cache_v_BKSD: jax.Array,
               cache_pos: jax.Array, cache_seg: jax.Array, index: jax.Array):
        """Writes this step's keys/values into the cache at slot `index`, then attends over the whole cache.

        `cache_pos` / `cache_seg` [B, S] must already hold this step's positions and segments.
        Returns (output [B,T,E], new cache_k, new cache_v).
        """
        q, k, v = self.project_qkv(x_BTE, cos, sin)
        cache_k_BKSD, cache_v_BKSD = (
            jax.lax.dynamic_update_slice_in_dim(cache, new.transpose(0, 2, 1, 3).astype(cache.dtype), index, axis=2)
            for cache, new in ((cache_k_BKSD, k), (cache_v_BKSD, v)))
        mask = attention_mask(positions_BT, segments_BT, cache_pos, cache_seg, window)
        out = self.attend(q, cache_k_BKSD.astype(self.dtype), cache_v_BKSD.astype(self.dtype), mask)
        return out, cache_k_BKSD, cache_v_BKSD
