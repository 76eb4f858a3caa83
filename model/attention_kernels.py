"""Training attention through maintained kernels, chosen by `ModelConfig.attention`.

- `einsum`: Kiln's own softmax attention (`Attention.softmax_attention`): the reference every other
  path is tested against, and the only one decoding uses.
- `blocked`: the same attention a block of queries at a time, each over the keys up to its block's
  end (`Attention.causal_blocks`), skipping the blocks above the causal diagonal: the fastest on CPU.
- `xla`: `jax.nn.dot_product_attention(implementation="xla")`, JAX's portable formulation.
- `cudnn`: the same call with cuDNN's fused flash attention (GPU; bf16 / fp16). The packed-segment
  mask goes in as the kernel's mask, causality and the sliding window as its own switches.
- `splash`: the Pallas splash-attention kernel (TPU), with segment ids, causal or local masks and
  logit soft-capping inside the kernel. Elsewhere it runs in Pallas' interpret mode: slow, for the
  parity tests on CPU.
- `auto`: cudnn on GPU (when the dtype and switches allow), splash on TPU, blocked on CPU, einsum
  elsewhere.

The kernels see the sequence's own keys only: prompt/prefix slots and KV caches use `einsum`. All
paths share one convention: a query attends to keys of its own segment at positions not after it
(and within the window). Kernels compare indices rather than positions, which agrees for rows whose
segments are contiguous with positions counting up from each segment's start, as packing makes them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def resolve(name: str, dtype: jnp.dtype, softcap: float | None, platform: str | None = None) -> str:
    """The implementation `name` (one of `model.config.ATTENTION_KERNELS`, checked there) stands for on
    `platform` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    if name == "auto":
        if platform == "gpu" and softcap is None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
            return "cudnn"
        return {"tpu": "splash", "cpu": "blocked"}.get(platform, "einsum")
    if softcap is not None and name in ("xla", "cudnn"):
        raise ValueError(f"attention {name!r} has no logit soft-capping (attn_softcap); use einsum or splash")
    return name


def attend(name: str, q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_BTS: jax.Array,
           segments_BT: jax.Array, window: int, scale: float, softcap: float | None) -> jax.Array:
    """Attention output [B, T, H, D] by kernel `name` (not einsum or blocked, which `Attention` runs). `mask_BTS` is the full mask
    (`attention_mask`); `segments_BT` and the static `window` (0: none) are what the kernels take instead."""
    if name == "xla":
        return jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask=mask_BTS[:, None], scale=scale,
                                            implementation="xla")
    if name == "cudnn":
        same_segment = segments_BT[:, :, None] == segments_BT[:, None, :]
        return jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask=same_segment[:, None], scale=scale,
                                            is_causal=True, local_window_size=(window - 1, 0) if window else None,
                                            implementation="cudnn")
    if name == "splash":
        return _splash(q_BTHD * jnp.asarray(scale, q_BTHD.dtype), k_BSKD, v_BSKD, segments_BT, window, softcap,
                       interpret=jax.default_backend() != "tpu")
    raise ValueError(f"no attention kernel {name!r}")


def _splash(q_BTHD, k_BSKD, v_BSKD, segments_BT, window, softcap, interpret):
    """Splash attention per row and per kv-head: each kv-head's query group is one multi-query call."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, H, D = q_BTHD.shape
    K = k_BSKD.shape[2]
    shape = (T, T)
    one = sm.LocalMask(shape, (window - 1, 0), offset=0) if window else sm.CausalMask(shape)
    block = min(512, T)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mqa(sm.MultiHeadMask([one] * (H // K)), block_sizes=sizes,
                                attn_logits_soft_cap=softcap, head_shards=1, q_seq_shards=1, interpret=interpret)

    def row(q_TKGD, k_SKD, v_SKD, seg_T):
        ids = sk.SegmentIds(q=seg_T, kv=seg_T)
        out_KGTD = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(
            q_TKGD.transpose(1, 2, 0, 3), k_SKD.transpose(1, 0, 2), v_SKD.transpose(1, 0, 2))
        return out_KGTD.transpose(2, 0, 1, 3)

    out = jax.vmap(row)(q_BTHD.reshape(B, T, K, H // K, D), k_BSKD, v_BSKD, segments_BT)
    return out.reshape(B, T, H, D)
