"""Model FLOPs per token and the device's peak, for MFU.

FLOPs per trained token = 6 * N + 6 * L * H * D * T, where
- N counts the parameters used in matrix multiplies: every weight except the embedding lookup
  (the LM head is counted, also when it shares the embedding table; a reward model has none, its
  scalar head is counted), so 2N multiply-adds forward and 4N backward;
- the attention term is the QK^T and AV products: 2 * 2 * T * H * D per token per layer forward,
  times 3 for forward + backward, halved because causal masking skips the upper triangle
  (counted once, as in the PaLM appendix B convention with causality applied).
Parameter-efficient runs differentiate only their adapters, so the frozen weights cost 4N (forward,
and the backward pass to the activations, which every adapter below them needs) instead of 6N;
LoRA's own matmuls count 6 per parameter, and prompt / prefix tuning's N_p slots add keys that
every query sees: 12 * L * H * D * N_p. A frozen reference model (DPO) adds its forward pass,
2N + 2 * L * H * D * T per token.
MFU = tokens/s * FLOPs per token / (peak FLOP/s per device * devices).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from model.config import DType, ModelConfig, dtype_name
from model.transformer import param_count

# Dense peak FLOP/s per chip by (device kind substring, compute dtype); first match wins.
PEAK_FLOPS = (
    ("H200", "bfloat16", 989e12), ("H100", "bfloat16", 989e12), ("A100", "bfloat16", 312e12),
    ("H200", "float32", 494e12), ("H100", "float32", 494e12), ("A100", "float32", 156e12),  # TF32
    ("L4", "bfloat16", 121e12), ("TPU v6", "bfloat16", 918e12), ("TPU v5p", "bfloat16", 459e12),
    ("TPU v5 lite", "bfloat16", 197e12), ("TPU v5e", "bfloat16", 197e12), ("TPU v4", "bfloat16", 275e12),
)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) by the formulas in the module docstring."""
    n, attention = _matmul_params(cfg), 6 * cfg.n_layers * cfg.n_heads * cfg.dim_head * seq_len
    if cfg.lora is None and cfg.prefix is None:
        return 6.0 * n + attention
    adapters = param_count(cfg) - param_count(cfg.replace(lora=None, prefix=None)) if cfg.lora is not None else 0
    prefix = 12 * cfg.n_layers * cfg.n_heads * cfg.dim_head * cfg.prefix.num_tokens if cfg.prefix is not None else 0
    return 4.0 * n + 6.0 * adapters + attention + prefix


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs per token of a forward pass alone (a frozen reference model's): 2N + 2·L·H·D·T, plus
    LoRA's adapters (2 per parameter) and prompt / prefix slots (4·L·H·D·N_p)."""
    adapters = param_count(cfg) - param_count(cfg.replace(lora=None, prefix=None)) if cfg.lora is not None else 0
    prefix = 4 * cfg.n_layers * cfg.n_heads * cfg.dim_head * cfg.prefix.num_tokens if cfg.prefix is not None else 0
    return 2.0 * (_matmul_params(cfg) + adapters) + 2 * cfg.n_layers * cfg.n_heads * cfg.dim_head * seq_len + prefix


def _matmul_params(cfg: ModelConfig) -> int:
    """N: the base model's parameters that take part in matrix multiplies."""
    n = param_count(cfg.replace(lora=None, prefix=None)) - cfg.vocab_size * cfg.d_model  # drop the lookup table ...
    if cfg.reward_head and not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.d_model  # ... and an LM head that a reward model never runs
    elif cfg.tie_embeddings and not cfg.reward_head:
        n += cfg.vocab_size * cfg.d_model  # ... but a tied table is also the LM head matmul
    return n


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a jitted n^3 matmul on the default device: the CPU 'peak'."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_flops(dtype: DType, device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device for matmuls in `dtype` (table for GPU/TPU, measured on CPU)."""
    dtype = dtype_name(dtype)
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_peak("float32" if dtype == "float32" else "bfloat16")
    for kind, table_dtype, peak in PEAK_FLOPS:
        if kind.lower() in device.device_kind.lower() and table_dtype == ("float32" if dtype == "float32" else "bfloat16"):
            return peak
    return float(np.nan)  # unknown chip: MFU is reported as NaN rather than guessed


def total_peak_flops(dtype: DType, devices: list[jax.Device]) -> float:
    """Peak FLOP/s of `devices` together. On CPU the measured peak already uses every core, and
    fake CPU devices (tests) share those cores, so it is not multiplied."""
    if devices[0].platform == "cpu":
        return peak_flops(dtype, devices[0])
    return peak_flops(dtype, devices[0]) * len(devices)
