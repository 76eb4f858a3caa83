"""The decoder's own promises: packing, causality, KV-cache decoding, scan/remat, sharding, presets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import presets, sharding
from model.transformer import KVCache, Transformer, param_count

GEMMA = presets.get("tiny", family="gemma2", act="gelu_tanh", norm_plus_one=True, sandwich_norm=True,
                    embed_scale=True, tie_embeddings=True, attn_softcap=5.0, final_softcap=3.0, sliding_window=5,
                    window_layers=(0,), head_dim=24, query_pre_attn_scalar=20)
CONFIGS = {"llama": presets.get("tiny"), "gemma2": GEMMA,
           "qwen2": presets.get("tiny", family="qwen2", qkv_bias=True, n_kv_heads=1, sliding_window=6)}


def make(cfg, seed=0):
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    # Move norms and biases off their init so that no term can hide.
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "bias" in path[-1] or any(str(p).endswith("norm") for p in path):
            var.set_value(var.get_value() + 0.3 * jax.random.normal(jax.random.key(len(path)), var.get_value().shape))
    return model


def tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, 256)


@pytest.mark.parametrize("name", CONFIGS)
def test_packed_documents_equal_separate_runs(name):
    model = make(CONFIGS[name])
    a, b = tokens((1, 13), 1), tokens((1, 19), 2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.asarray([[1] * 13 + [2] * 19])
    out = model(packed, segment_ids_BT=segments)
    np.testing.assert_allclose(out[:, :13], model(a), atol=1e-5)
    np.testing.assert_allclose(out[:, 13:], model(b), atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_causality(name):
    model = make(CONFIGS[name])
    t = tokens((2, 24))
    changed = t.at[:, 15].set((t[:, 15] + 1) % 256)
    before, after = model(t), model(changed)
    np.testing.assert_array_equal(before[:, :15], after[:, :15])
    assert np.abs(before[:, 15:] - after[:, 15:]).max() > 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_decoding_matches_full_forward(name):
    model = make(CONFIGS[name])
    t = tokens((2, 20))
    full = model(t)
    step = nnx.jit(lambda m, tok, c: m.decode(tok, c))
    logits, cache = step(model, t[:, :7], KVCache.init(model.cfg, 2, 24))
    outs = [logits]
    for i in range(7, 20):
        logits, cache = step(model, t[:, i:i + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)
    assert int(cache.index) == 20


def test_kv_cache_left_padding():
    model = make(GEMMA)
    t = tokens((1, 12))
    pad = 4
    padded = jnp.concatenate([jnp.zeros((1, pad), t.dtype), t], axis=1)
    seg = jnp.asarray([[0] * pad + [1] * 12])
    pos = jnp.asarray([[0] * pad + list(range(12))])
    logits, cache = model.decode(padded[:, :pad + 8], KVCache.init(GEMMA, 1, 20), pos[:, :pad + 8], seg[:, :pad + 8])
    outs = [logits[:, pad:]]
    for i in range(8, 12):
        logits, cache = model.decode(t[:, i:i + 1], cache, jnp.asarray([[i]]), jnp.asarray([[1]]))
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), model(t), atol=2e-5)


def _loss(m, t):
    return jnp.mean(jax.nn.log_softmax(m(t))[..., 0])


@pytest.fixture(scope="module")
def gemma_reference():
    t = tokens((2, 16))
    return t, nnx.value_and_grad(_loss)(make(CONFIGS["gemma2"]), t)


VARIANTS = [(r, s) for r in ("none", "full", "minimal", "save_qkv_proj", "save_out_proj", "save_dots")
            for s in (True, False) if (r, s) != ("none", True)]  # (none, scanned) is the reference


@pytest.mark.parametrize("remat,scan", VARIANTS)
def test_scan_unroll_and_remat_agree(remat, scan, gemma_reference):
    t, (ref_loss, ref_grads) = gemma_reference
    value, grads = nnx.value_and_grad(_loss)(make(CONFIGS["gemma2"].replace(remat=remat, scan_layers=scan)), t)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-6)


def test_sharded_forward_equals_one_device():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    cfg = presets.get("tiny", n_kv_heads=2, qkv_bias=True)
    model = make(cfg)
    t = tokens((8, 32))
    ref = np.asarray(model(t))
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    sharding.shard_module(model, mesh)
    q = model.layers.attn.q[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m, x: m(x))(model, t)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_mixed_precision_forward():
    cfg = presets.get("tiny", dtype="bfloat16", param_dtype="float32")
    model = make(cfg)
    ref = make(presets.get("tiny"))
    t = tokens((2, 16))
    out = model(t)
    assert model.embed.table[...].dtype == jnp.float32 and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref(t), atol=0.05 * float(jnp.abs(ref(t)).max()))


# Published parameter counts of the real shapes.
KNOWN_COUNTS = {"llama3_8b": 8_030_261_248, "llama3.2_1b": 1_235_814_400, "mistral_7b": 7_241_732_096,
                "qwen2_0.5b": 494_032_768, "qwen2_7b": 7_615_616_512, "gemma2_2b": 2_614_341_888,
                "gemma2_9b": 9_241_705_984}


@pytest.mark.parametrize("name", sorted(KNOWN_COUNTS))
def test_real_presets_initialise_abstractly(name):
    assert param_count(presets.get(name)) == KNOWN_COUNTS[name]


def test_small_preset_is_about_30m():
    assert 25e6 < param_count(presets.get("small")) < 35e6


def test_gemma2_preset_alternates_windows():
    windows = presets.get("gemma2_2b").layer_windows()
    assert windows[:4] == (4096, 0, 4096, 0) and len(windows) == 26


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of n_kv_heads=4"):
        presets.get("tiny", n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="unknown model preset 'llama9'"):
        presets.get("llama9")
