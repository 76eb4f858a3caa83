"""Rotary position embeddings, with the linear, llama3 and YaRN context-extension scalings.

Frequencies are computed once in numpy float32 exactly as Hugging Face does, so a checkpoint keeps
its meaning across the two implementations; the rotation itself runs in float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim/2] float32, attention factor applied to cos and sin)."""
    dim = cfg.dim_head
    base = np.float32(cfg.rope_theta)
    inv_freq = (1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    s = cfg.rope_scaling
    if s is None or s.type == "default":
        return inv_freq, 1.0
    if s.type == "linear":
        return (inv_freq / np.float32(s.factor)).astype(np.float32), 1.0
    original = s.original_max_position_embeddings or cfg.max_seq_len
    if s.type == "llama3":
        return _llama3(inv_freq, s.factor, s.low_freq_factor, s.high_freq_factor, original), 1.0
    if s.type == "yarn":
        return _yarn(cfg, original)
    raise ValueError(f"unsupported RoPE scaling type {s.type!r}")


def _llama3(inv_freq: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    low_freq_wavelen = original / low
    high_freq_wavelen = original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(cfg: ModelConfig, original: int) -> tuple[np.ndarray, float]:
    s = cfg.rope_scaling
    dim, base = cfg.dim_head, cfg.rope_theta
    factor = s.factor if s.factor is not None else cfg.max_seq_len / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim))
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    keep = 1 - ramp  # 1: keep the original frequency (extrapolate), 0: interpolate
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq.astype(np.float32), float(attention_factor)


def rotary_tables(positions_BT: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, head_dim] in float32 for integer positions within ±max_seq_len (prompt and
    prefix slots sit at negative positions).

    Both are looked up in a table of the distances 0 .. max_seq_len - 1 (cos is even, sin odd).
    Computed from the positions directly, XLA's CPU backend fuses cos and sin into each layer's rotation
    and recomputes them for every head: rotating one layer's queries took 2.9 ms instead of 0.2.
    """
    inv_freq, attention_factor = inv_frequencies(cfg)
    freqs_PF = jnp.arange(cfg.max_seq_len, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)
    emb_PD = jnp.concatenate([freqs_PF, freqs_PF], axis=-1)
    positions_BT = positions_BT.astype(jnp.int32)
    distance_BT = jnp.abs(positions_BT)
    sign_BT1 = jnp.where(positions_BT < 0, -1.0, 1.0)[..., None]
    return ((jnp.cos(emb_PD) * attention_factor)[distance_BT],
            sign_BT1 * (jnp.sin(emb_PD) * attention_factor)[distance_BT])


def apply_rotary(x_BTHD: jax.Array, cos_BTD: jax.Array, sin_BTD: jax.Array) -> jax.Array:
    """Rotates halves of the head dimension (the GPT-NeoX / Llama layout)."""
    x = x_BTHD.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BTD[:, :, None, :] + rotated * sin_BTD[:, :, None, :]
    return out.astype(x_BTHD.dtype)
