"""Named model shapes: `tiny` for tests, `small` for CPU demos, and the real published shapes."""
from __future__ import annotations

from typing import Any

from model.config import ModelConfig, RopeScaling

_LLAMA31_ROPE = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
_GEMMA2 = dict(family="gemma2", act="gelu_tanh", norm_eps=1e-6, tie_embeddings=True, norm_plus_one=True,
               sandwich_norm=True, embed_scale=True, attn_softcap=50.0, final_softcap=30.0,
               sliding_window=4096, head_dim=256, query_pre_attn_scalar=256, max_seq_len=8192)

PRESETS: dict[str, dict[str, Any]] = {
    # Tests: every code path at toy size.
    "tiny": dict(family="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                 max_seq_len=256),
    # CPU demos: ~30M parameters (d_model 512, 8 layers, SwiGLU 1408, vocab 8192).
    "small": dict(family="llama", vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1408,
                  max_seq_len=1024, tie_embeddings=True),
    "llama3_8b": dict(family="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      d_ff=14336, max_seq_len=131072, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE,
                      bos_token_id=128000, eos_token_id=128001),
    "llama3.2_1b": dict(family="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        head_dim=64, d_ff=8192, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                        rope_scaling=dict(_LLAMA31_ROPE, factor=32.0), bos_token_id=128000, eos_token_id=128001),
    "mistral_7b": dict(family="mistral", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       d_ff=14336, max_seq_len=32768, sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "qwen2_0.5b": dict(family="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                       d_ff=4864, max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                       tie_embeddings=True, eos_token_id=151643),
    "qwen2_7b": dict(family="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                     d_ff=18944, max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                     eos_token_id=151643),
    "gemma2_2b": dict(_GEMMA2, vocab_size=256000, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, d_ff=9216,
                      window_layers=tuple(range(0, 26, 2)), bos_token_id=2, eos_token_id=1, pad_token_id=0),
    "gemma2_9b": dict(_GEMMA2, vocab_size=256000, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8, d_ff=14336,
                      window_layers=tuple(range(0, 42, 2)), bos_token_id=2, eos_token_id=1, pad_token_id=0),
}


def get(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` with `overrides` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    fields = dict(PRESETS[name], **overrides)
    if isinstance(fields.get("rope_scaling"), dict):
        fields["rope_scaling"] = RopeScaling.from_dict(fields["rope_scaling"])
    return ModelConfig(**fields)
