"""FLOPs per token (6N + 6·L·H·D·T, train/flops.py) against a hand count, and the peak FLOP/s lookup behind MFU."""
import types

import jax
import numpy as np
import pytest

from model.config import LoraConfig, ModelConfig, PrefixConfig
from model.transformer import param_count
from train import flops

# One concrete shape, GQA and a head_dim that is not d_model / n_heads (so H·D != d_model shows):
# vocab V=100, d_model E=32, L=3 layers, H=4 query heads, K=2 kv heads, head_dim D=12, d_ff F=80, seq T=64.
SHAPE = dict(family="llama", vocab_size=100, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=12,
             d_ff=80, max_seq_len=128)
# Parameters by hand:
#   per layer: q E·H·D = 1536, k E·K·D = 768, v 768, o H·D·E = 1536      -> attention 4608
#              gate, up E·F = 2560 each, down F·E = 2560                  -> MLP 7680
#              attn_norm, mlp_norm E = 32 each                            -> 64
#              layer total 12352, times 3 layers                          -> 37056
#   final norm 32; embedding table V·E = 3200; untied LM head E·V = 3200
UNTIED_PARAMS = 3200 + 37056 + 32 + 3200  # 43488
TIED_PARAMS = 3200 + 37056 + 32  # 40288
# N (the matmul parameters) drops the lookup table but keeps the LM head matmul, tied or not: 40288.
N = 37056 + 32 + 3200
ATTENTION = 6 * 3 * 4 * 12 * 64  # 6·L·H·D·T = 55296: QK^T and AV, causal (counted once), fwd + bwd
FLOPS_PER_TOKEN = 6 * N + ATTENTION  # 241728 + 55296 = 297024


def test_param_count_by_hand():
    assert param_count(ModelConfig(**SHAPE)) == UNTIED_PARAMS
    assert param_count(ModelConfig(**SHAPE, tie_embeddings=True)) == TIED_PARAMS


def test_flops_per_token_by_hand():
    assert flops.flops_per_token(ModelConfig(**SHAPE), 64) == FLOPS_PER_TOKEN == 297024
    # Tying the table saves parameters, not matmul work: the LM head still multiplies by it.
    assert flops.flops_per_token(ModelConfig(**SHAPE, tie_embeddings=True), 64) == 297024
    # A reward model runs no LM head (tied or not) but a scalar head of E = 32 weights:
    # 6 * (37056 + 32 + 32) + 55296 = 222720 + 55296.
    assert param_count(ModelConfig(**SHAPE, reward_head=True)) == UNTIED_PARAMS + 32
    for tied in (False, True):
        assert flops.flops_per_token(ModelConfig(**SHAPE, tie_embeddings=tied, reward_head=True), 64) == 278016


def test_reference_forward_by_hand():
    # A frozen reference's forward pass: 2N + 2·L·H·D·T = 80576 + 18432; a 20-slot prefix adds 4·L·H·D·20.
    assert flops.forward_flops_per_token(ModelConfig(**SHAPE), 64) == 99008
    prefix = ModelConfig(**SHAPE, prefix=PrefixConfig(kind="prefix", num_tokens=20))
    assert flops.forward_flops_per_token(prefix, 64) == 99008 + 11520
    # LoRA's adapters (816 parameters, see below) run in the forward pass too: 2 FLOPs each.
    lora = ModelConfig(**SHAPE, lora=LoraConfig(rank=2, alpha=4.0, targets=("q", "v")))
    assert flops.forward_flops_per_token(lora, 64) == 99008 + 2 * 816


def test_attention_term_grows_with_sequence_length():
    cfg = ModelConfig(**SHAPE)
    # Only 6·L·H·D·T depends on T: 64 more tokens of context add 6·3·4·12·64 = 55296 per token.
    assert flops.flops_per_token(cfg, 128) - flops.flops_per_token(cfg, 64) == 55296
    assert flops.flops_per_token(cfg, 0) == 6 * N


def test_biases_count_as_parameters():
    # q/k/v biases: (H + 2K)·D = 96 per layer, 288 in all: 6 · 288 = 1728 more FLOPs per token.
    cfg = ModelConfig(**SHAPE, qkv_bias=True)
    assert flops.flops_per_token(cfg, 64) == 297024 + 1728


def test_parameter_efficient_runs_by_hand():
    # LoRA rank 2 on q and v: A E·r = 64 each, B r·H·D = 96 (q) and r·K·D = 48 (v): 272 per layer, 816 in
    # all, 6 FLOPs each; the frozen N costs 4 per parameter (no weight gradients): 4N = 161152.
    lora = ModelConfig(**SHAPE, lora=LoraConfig(rank=2, alpha=4.0, targets=("q", "v")))
    assert param_count(lora) - UNTIED_PARAMS == 816
    assert flops.flops_per_token(lora, 64) == 4 * N + 6 * 816 + ATTENTION == 221344
    # Prompt tuning, 5 virtual tokens: every query also attends to 5 more keys, 12·L·H·D·5 = 8640.
    prompt = ModelConfig(**SHAPE, prefix=PrefixConfig(kind="prompt", num_tokens=5))
    assert flops.flops_per_token(prompt, 64) == 4 * N + ATTENTION + 8640 == 225088


def gpu(kind):
    return types.SimpleNamespace(platform="gpu", device_kind=kind)


@pytest.mark.parametrize("kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 80GB HBM3", "float16", 989e12),  # half precision runs at the bf16 rate
    ("NVIDIA H100 80GB HBM3", "float32", 494e12),  # TF32
    ("NVIDIA H200", "bfloat16", 989e12),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12),
    ("NVIDIA H200", "float32", 494e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("TPU v6 lite", "bfloat16", 918e12),  # Trillium (v6e)
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5e", "bfloat16", 197e12),
    ("TPU v4", "bfloat16", 275e12),
])
def test_peak_table(kind, dtype, peak):
    """Dense (not sparse) peaks from the vendors' data sheets, per chip."""
    assert flops.peak_flops(dtype, gpu(kind)) == peak


def test_unknown_chip_gives_nan_not_a_guess():
    assert np.isnan(flops.peak_flops("bfloat16", gpu("Tesla T4")))
    assert np.isnan(flops.peak_flops("float32", gpu("TPU v4")))  # no fp32 entry for it


def test_total_peak_multiplies_accelerators_but_not_fake_cpu_devices(monkeypatch):
    assert flops.total_peak_flops("bfloat16", [gpu("NVIDIA H100")] * 4) == 4 * 989e12
    assert flops.total_peak_flops("bfloat16", [gpu("NVIDIA H100")]) == 989e12
    asked = []
    monkeypatch.setattr(flops, "measured_matmul_peak", lambda dtype: asked.append(dtype) or 1e11)
    cpus = jax.devices("cpu")
    assert len(cpus) == 8  # conftest's fake devices share the same cores: the measured peak is all of them
    assert flops.total_peak_flops("float32", cpus) == 1e11
    assert flops.total_peak_flops("bfloat16", cpus) == 1e11
    assert asked == ["float32", "bfloat16"]


def test_measured_peak_is_matmul_flops_over_the_best_time(monkeypatch):
    # A fake clock: three timed repetitions of 2 s, 0.5 s and 1 s. The best (0.5 s) counts:
    # an n=8 matmul is 2·8^3 = 1024 FLOPs, so 2048 FLOP/s.
    ticks = iter([0.0, 2.0, 10.0, 10.5, 20.0, 21.0])
    monkeypatch.setattr(flops, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert flops.measured_matmul_peak.__wrapped__("float32", 8, 3) == 2048.0


def test_cpu_peak_is_measured():
    """On CPU the peak is a real measurement (a jitted 2048^3 matmul, about a second): positive and finite,
    and the default device is the first one."""
    peak = flops.peak_flops("float32")
    assert 1e9 < peak < 1e14 and peak == flops.peak_flops("float32", jax.devices()[0])
