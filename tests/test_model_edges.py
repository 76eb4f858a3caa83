"""Corners of the decoder the family tests do not reach: a fresh model's initial values, bfloat16 Gemma
embeddings, library kernels beside a prompt/prefix or beside a window that no layer uses, the KV cache in
another dtype, what a tuned reward model trains, and configs through JSON.

Every model is tiny; each test compiles one or two small programs.
"""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from model import hf, presets
from model.config import LoraConfig, ModelConfig, PrefixConfig, RopeScaling
from model.layers import RMSNorm
from model.transformer import Transformer, trainable
from test_model import forward, make, rel_err, tokens

BF16 = ml_dtypes.bfloat16


def test_fresh_model_starts_from_unit_norms_zero_biases_and_init_std_weights():
    """Llama's RMSNorm multiplies by w, so w starts at 1; Gemma's by (1 + w), so w starts at 0. Biases start
    at 0; every matrix (embedding, projections, lm_head, reward head) is N(0, init_std)."""
    for plus_one in (False, True):
        norm = RMSNorm(presets.get("tiny", norm_plus_one=plus_one), nnx.Rngs(0))
        np.testing.assert_array_equal(norm.scale[...], np.full(64, 0.0 if plus_one else 1.0))
    cfg = presets.get("tiny", d_model=128, d_ff=256, qkv_bias=True, o_bias=True, mlp_bias=True, reward_head=True,
                      init_std=0.05)
    init = jax.jit(lambda: nnx.to_flat_state(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    flat = {"/".join(map(str, path)): np.asarray(var.get_value()) for path, var in init()}
    norms = [name for name in flat if name.endswith("norm/scale")]
    biases = [name for name in flat if "bias" in name]
    assert len(norms) == 3 and len(biases) == 7
    for name in norms:
        np.testing.assert_array_equal(flat[name], 1.0, err_msg=name)
    for name in biases:
        np.testing.assert_array_equal(flat[name], 0.0, err_msg=name)
    for name, w in flat.items():
        if name in norms or name in biases:
            continue
        # The smallest matrix (score, 128 draws): sample std within 4.5 sigma = 28% of 0.05, mean within 0.02.
        assert abs(w.std() / 0.05 - 1) < 0.28 and abs(w.mean()) < 0.02, (name, w.std(), w.mean())


def test_bf16_gemma_embeddings_are_scaled_by_sqrt_d_model_rounded_to_bf16():
    """Gemma multiplies the embeddings by sqrt(d_model) as a number of the activation dtype, as transformers'
    Gemma2 does (`torch.tensor(hidden_size ** 0.5, dtype=hidden_states.dtype)`): for d_model 72 the factor
    8.485 is 8.5 in bfloat16, and the product is rounded to bfloat16 once. The activations stay bfloat16."""
    cfg = presets.get("tiny", family="gemma2", d_model=72, n_heads=4, head_dim=18, norm_plus_one=True,
                      embed_scale=True, tie_embeddings=True, dtype="bfloat16")
    model = make(cfg)
    t = tokens((2, 8))
    x, *_ = model._inputs(jnp.asarray(t), None, None)
    assert x.dtype == jnp.bfloat16
    factor = np.float32(np.sqrt(72.0).astype(BF16))
    assert factor == 8.5
    table = np.asarray(model.embed.table[...], np.float32).astype(BF16).astype(np.float32)
    want = (table[t] * factor).astype(BF16)  # a product of two bf16 numbers is exact in float32
    np.testing.assert_array_equal(np.asarray(x), want)
    assert model.hidden(jnp.asarray(t)).dtype == jnp.bfloat16


PREFIXED = presets.get("tiny", prefix=PrefixConfig(kind="prefix", num_tokens=5))


def test_a_prefix_with_a_library_kernel_is_attended():
    """The kernels see the sequence's own keys only, so a model with prompt/prefix slots attends through
    einsum whatever `attention` says: attention="xla" gives einsum's logits, which the prefix moves."""
    t = tokens((2, 12))
    ref = np.asarray(forward(make(PREFIXED.replace(attention="einsum")), t, None, None))
    plain = make(PREFIXED.replace(prefix=None))  # the same base weights: the prefix is drawn last
    assert rel_err(forward(plain, t, None, None), ref) > 1e-2  # the prefix matters
    got = np.asarray(forward(make(PREFIXED.replace(attention="xla")), t, None, None))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)  # the same path: measured 0


def test_a_kernel_ignores_a_window_that_no_layer_uses(monkeypatch):
    """Qwen2 with use_sliding_window and max_window_layers = num_hidden_layers reads as sliding_window set
    and window_layers empty: every layer global. cuDNN's call (run here by XLA's implementation of the same
    function, as in test_attention_kernels) then gets no local window, and the logits are those of a config
    without any window."""
    original, windows = jax.nn.dot_product_attention, []

    def as_xla(*args, implementation=None, local_window_size=None, **kw):
        windows.append(local_window_size)
        return original(*args, implementation="xla", local_window_size=local_window_size, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
    cfg = presets.get("tiny", sliding_window=3, window_layers=())
    seg = np.asarray([[1] * 10 + [2] * 6, [1] * 16], np.int32)
    t = tokens((2, 16))
    want = np.asarray(forward(make(cfg.replace(sliding_window=None, window_layers=None)), t, None, seg))
    got = np.asarray(forward(make(cfg.replace(attention="cudnn")), t, None, seg))
    assert windows == [None]  # traced once: the layers are scanned
    assert rel_err(got, want) < 1e-6  # measured 1.4e-7
    windows.clear()
    windowed = np.asarray(forward(make(cfg.replace(window_layers=None, attention="cudnn")), t, None, seg))
    assert windows == [(2, 0)] and rel_err(windowed, want) > 1e-2  # a window of 3 would show


def test_a_bf16_cache_for_a_float32_model_holds_bf16_and_decodes_close():
    """`init_cache(dtype=...)` stores keys and values in that dtype (half the memory for bfloat16) and
    decoding over it matches the full forward to bfloat16's precision."""
    model = make(presets.get("tiny"))
    t = tokens((2, 10))
    cache = model.init_cache(2, 10, jnp.bfloat16)
    assert {x.dtype for x in cache.k + cache.v} == {jnp.dtype(jnp.bfloat16)}
    logits, cache = nnx.jit(lambda m, t, c: m.decode(t, c))(model, jnp.asarray(t), cache)
    assert {x.dtype for x in cache.k + cache.v} == {jnp.dtype(jnp.bfloat16)}
    err = rel_err(logits, forward(model, t, None, None))
    assert 0 < err < 3e-2, err  # measured 4.6e-3: keys and values rounded to 8 mantissa bits


def test_a_tuned_reward_model_trains_its_adapters_or_prompt_and_its_new_head():
    """A reward or value model tuned with LoRA or a prompt trains those and its scalar head (PEFT's
    modules_to_save), the base frozen; without a head, only the adapters or the prompt train."""
    for peft, tuned in ((dict(lora=LoraConfig(rank=2, targets=("q",))), {"layers/attn/q_lora/a", "layers/attn/q_lora/b"}),
                        (dict(prefix=PrefixConfig(kind="prompt", num_tokens=3)), {"prefix/embeddings"})):
        for head in (True, False):
            cfg = presets.get("tiny", reward_head=head, **peft)
            model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
            paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, trainable(cfg)))}
            assert paths == tuned | ({"score"} if head else set()), (peft, head, paths)


ROPE_EVERY_FIELD = [
    RopeScaling(type="linear", factor=2.5),
    RopeScaling(type="llama3", factor=8.0, low_freq_factor=2.0, high_freq_factor=6.0, original_max_position_embeddings=64),
    RopeScaling(type="yarn", factor=3.0, original_max_position_embeddings=48, beta_fast=16.0, beta_slow=2.0, mscale=0.8,
                mscale_all_dim=0.5, attention_factor=1.25, truncate=False),
]


def test_configs_survive_a_json_round_trip_with_every_rope_field():
    """A Kiln checkpoint stores ModelConfig.to_dict() as JSON: every RoPE scaling field of each type, LoRA,
    prompt/prefix and window settings come back equal (a field left out would silently revert to its default,
    and the restored model would compute something else)."""
    base = presets.get("tiny", sliding_window=8, window_layers=(1,), eos_token_id=(1, 2))
    for extra in [dict(rope_scaling=r) for r in ROPE_EVERY_FIELD] + [
            dict(lora=LoraConfig(rank=3, alpha=5.0, dropout=0.1, targets=("v", "down"), rslora=True, init="gaussian")),
            dict(prefix=PrefixConfig(kind="prefix", num_tokens=4, hidden=16))]:
        cfg = base.replace(**extra)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, extra
    for rope in ROPE_EVERY_FIELD:  # and through a Hugging Face config.json
        assert hf.config_from_hf(json.loads(json.dumps(hf.config_to_hf(presets.get("tiny", rope_scaling=rope))))
                                 ).rope_scaling == rope


def test_saving_over_an_export_replaces_it_whole_and_a_failed_save_leaves_it(tmp_path):
    """`hf.save` onto an existing export swaps the new directory in (no file of the old one survives, no
    temporary directory is left beside it); a save that fails part-way leaves the previous export as it was."""
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=32)
    first, second = make(cfg, seed=0), make(cfg, seed=1)
    out = tmp_path / "out"
    hf.save(first, cfg, str(out), files={"extra.txt": __file__})
    hf.save(second, cfg, str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    np.testing.assert_array_equal(hf.load(str(out))[1].embed.table[...], second.embed.table[...])
    with pytest.raises(FileNotFoundError):
        hf.save(first, cfg, str(out), files={"tokenizer.model": str(tmp_path / "missing")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    np.testing.assert_array_equal(hf.load(str(out))[1].embed.table[...], second.embed.table[...])
