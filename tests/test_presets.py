"""The real presets' fields beyond their shapes (tests/test_model.py checks the parameter counts), as
the models' published configs (config.json on the Hugging Face Hub) give them: RoPE base and scaling,
context length, norm epsilon, soft-capping, sliding windows and special tokens."""
import pytest

from model import presets
from model.config import RopeScaling

LLAMA31_ROPE = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)
GEMMA2 = dict(family="gemma2", act="gelu_tanh", norm_eps=1e-6, tie_embeddings=True, norm_plus_one=True,
              sandwich_norm=True, embed_scale=True, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
              head_dim=256, query_pre_attn_scalar=256, max_seq_len=8192, bos_token_id=2, eos_token_id=1,
              pad_token_id=0, qkv_bias=False, rope_theta=10000.0)

PUBLISHED = {
    "llama3_8b": dict(family="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      d_ff=14336, max_seq_len=131072, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, norm_eps=1e-5,
                      act="silu", tie_embeddings=False, qkv_bias=False, sliding_window=None, attn_softcap=None,
                      bos_token_id=128000, eos_token_id=128001),
    "llama3.2_1b": dict(family="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        head_dim=64, d_ff=8192, max_seq_len=131072, rope_theta=500000.0, tie_embeddings=True,
                        rope_scaling=RopeScaling(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=8192),
                        norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    "mistral_7b": dict(family="mistral", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       d_ff=14336, max_seq_len=32768, rope_theta=10000.0, sliding_window=4096, window_layers=None,
                       norm_eps=1e-5, rope_scaling=None, bos_token_id=1, eos_token_id=2),
    "qwen2_0.5b": dict(family="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
                       d_ff=4864, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, o_bias=False,
                       tie_embeddings=True, sliding_window=None, eos_token_id=151643),
    "qwen2_7b": dict(family="qwen2", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                     d_ff=18944, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, o_bias=False,
                     tie_embeddings=False, eos_token_id=151643),
    # Gemma 2: local (4096-token) attention on the even layers, global on the odd ones.
    "gemma2_2b": dict(GEMMA2, vocab_size=256000, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, d_ff=9216,
                      window_layers=tuple(range(0, 26, 2))),
    "gemma2_9b": dict(GEMMA2, vocab_size=256000, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8, d_ff=14336,
                      window_layers=tuple(range(0, 42, 2))),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_presets_match_their_published_configs(name):
    cfg = presets.get(name)
    assert {k: getattr(cfg, k) for k in PUBLISHED[name]} == PUBLISHED[name]


def test_presets_take_overrides_and_refuse_unknown_names():
    cfg = presets.get("llama3_8b", n_layers=2, rope_scaling=dict(type="linear", factor=2.0))
    assert (cfg.n_layers, cfg.d_model, cfg.rope_scaling.type, cfg.rope_scaling.factor) == (2, 4096, "linear", 2.0)
    assert presets.get("llama3_8b").n_layers == 32  # the preset itself is unchanged
    with pytest.raises(ValueError, match="unknown model preset 'llama4'; known: gemma2_2b, gemma2_9b, llama3.2_1b"):
        presets.get("llama4")
