"""Random tiny Hugging Face models for parity tests (CPU torch, fp32)."""
from __future__ import annotations

import torch
import transformers

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-5)

# name -> (model_type, config overrides). Each case exercises features the others do not.
CASES = {
    "llama_mha_bias_untied": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                            tie_word_embeddings=False)),
    "llama_gqa2_tied_llama3": ("llama", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_gqa4_yarn_headdim": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=24,
                                              rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                                original_max_position_embeddings=24))),
    "llama_yarn_mscale_notrunc": ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=6.0, beta_fast=16,
                                                                  beta_slow=2, mscale=0.8, mscale_all_dim=0.5,
                                                                  truncate=False,
                                                                  original_max_position_embeddings=20))),
    "llama_linear_gelu": ("llama", dict(hidden_act="gelu", rope_scaling=dict(rope_type="linear", factor=2.0))),
    "mistral_window_relu": ("mistral", dict(hidden_act="relu", sliding_window=11, head_dim=16)),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2_window_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=9, max_window_layers=1,
                                          tie_word_embeddings=False)),
    "gemma2": ("gemma2", dict(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24, sliding_window=13,
                              attn_logit_softcapping=5.0, final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh")),
    "gemma2_mha_bias": ("gemma2", dict(num_key_value_heads=4, attention_bias=True, sliding_window=7,
                                       attn_logit_softcapping=None, final_logit_softcapping=None)),
}


def build(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A random model for CASES[name] with norms and biases moved away from their init values."""
    model_type, overrides = CASES[name]
    cfg = transformers.AutoConfig.for_model(model_type, **dict(BASE, **overrides))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model
