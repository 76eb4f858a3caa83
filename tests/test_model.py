"""The decoder's own promises: packing, KV-cache decoding, scan/remat, sharding, mixed precision, presets.

Every forward pass here is jitted and every model is drawn in numpy, so the file's time goes into a
few XLA compiles rather than thousands of eager per-op ones. Tolerances are set from the error
measured on this stack (jax 0.10.2, CPU); each says the figure it was set from.
"""
import contextlib
import io
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import presets, sharding
from model.attention import Attention
from model.config import RopeScaling
from model.layers import dropout
from model.rope import inv_frequencies, rotary_tables
from model.transformer import REMAT_POLICIES, KVCache, Transformer, param_count

GEMMA = presets.get("tiny", family="gemma2", act="gelu_tanh", norm_plus_one=True, sandwich_norm=True,
                    embed_scale=True, tie_embeddings=True, attn_softcap=5.0, final_softcap=3.0, sliding_window=5,
                    window_layers=(0,), head_dim=24, query_pre_attn_scalar=20)
CONFIGS = {
    "llama": presets.get("tiny"),  # GQA 4 query heads on 2 kv heads, global attention
    "gemma2": GEMMA,  # window 5 on layer 0 only, softcaps, sandwich norms
    "qwen2": presets.get("tiny", family="qwen2", qkv_bias=True, n_kv_heads=1, sliding_window=6),  # every layer windowed
}
WEIGHT_STD = 0.1  # large enough that attention is far from uniform, so a wrongly masked key shows


def make(cfg, seed=0):
    """A model of `cfg` with random weights drawn in numpy (no per-shape XLA compile).

    Norm scales and biases are moved off their init values so that no term can hide behind a 1 or a 0.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.RandomState(seed)
    flat = {}
    for path, var in nnx.to_flat_state(state):
        noise = rng.standard_normal(var.get_value().shape).astype(np.float32)
        if any(str(p).endswith("norm") for p in path):
            value = (0.0 if cfg.norm_plus_one else 1.0) + 0.3 * noise
        elif "bias" in str(path[-1]):
            value = 0.3 * noise
        else:
            value = WEIGHT_STD * noise
        flat[path] = var.replace(jnp.asarray(value, cfg.param_dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def tokens(shape, seed=1, vocab=256):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@nnx.jit
def forward(model, tokens_BT, positions_BT, segments_BT):
    return model(tokens_BT, positions_BT, segments_BT)


def rel_err(a, b):
    """max |a - b| / max |b|: the one error figure every tolerance in this file is stated in."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# -- packing -----------------------------------------------------------------------------------------
# Rows of 32 tokens as (segment id, length) runs; segment 0 is padding. The rows differ in how many
# documents they hold, where the boundaries fall, whether there is padding, which ids they use, and
# include a one-token document. Every window config below has documents longer than its window.
LAYOUTS = [
    [(1, 13), (2, 19)],
    [(1, 5), (2, 9), (3, 7), (4, 4), (0, 7)],
    [(7, 20), (0, 12)],
    [(3, 1), (4, 31)],
]
T_PACK = 32


def packed_batch(seed=3):
    """(tokens, segments, positions restarting per document with a per-document offset, documents).

    `documents` lists (row, start, length, offset) of every non-padding run.
    """
    rng = np.random.RandomState(seed)
    R = len(LAYOUTS)
    tok = rng.randint(0, 256, (R, T_PACK)).astype(np.int32)
    seg = np.zeros((R, T_PACK), np.int32)
    pos = np.zeros((R, T_PACK), np.int32)
    docs = []
    for r, runs in enumerate(LAYOUTS):
        start = 0
        for sid, length in runs:
            seg[r, start:start + length] = sid
            if sid:
                offset = 7 * len(docs)  # explicit positions need not start at 0
                pos[r, start:start + length] = offset + np.arange(length)
                docs.append((r, start, length, offset))
            start += length
        assert start == T_PACK
    return tok, seg, pos, docs


@pytest.mark.parametrize("explicit_positions", [False, True], ids=["derived_positions", "explicit_positions"])
@pytest.mark.parametrize("name", CONFIGS)
def test_packed_documents_equal_separate_runs(name, explicit_positions):
    """Each packed document's logits equal those of the document run alone in a row of its own."""
    model = make(CONFIGS[name])
    tok, seg, pos, docs = packed_batch()
    # The lone runs ride in the same batch (one compile), one document per row at the row's start with
    # filler after it that it cannot see (causality is tested in test_attention.py).
    alone_tok = tokens((len(docs), T_PACK), seed=4)
    alone_pos = np.zeros((len(docs), T_PACK), np.int32)
    for i, (r, start, length, offset) in enumerate(docs):
        alone_tok[i, :length] = tok[r, start:start + length]
        alone_pos[i] = offset + np.arange(T_PACK)
    all_tok = np.concatenate([tok, alone_tok])
    all_seg = np.concatenate([seg, np.ones_like(alone_tok)])
    # Derived: positions_BT=None, so the model derives restarting positions from the segments.
    all_pos = np.concatenate([pos, alone_pos]) if explicit_positions else None
    out = forward(model, all_tok, all_pos, all_seg)
    packed, alone = out[:len(tok)], out[len(tok):]
    errs = [rel_err(packed[r, start:start + length], alone[i, :length])
            for i, (r, start, length, _) in enumerate(docs)]
    print(f"packed vs alone {name}: max rel err {max(errs):.2e}")
    # Measured 0 (bit-identical): masked keys add exact zeros. The bound leaves a few float32 ulps for
    # another backend's reduction order; a key leaking across documents moves logits by >1e-2.
    assert max(errs) <= 1e-6


# -- KV cache ----------------------------------------------------------------------------------------
# Tokens decoded per step, per config. Every config's 20 tokens outrun its window, so decoding must
# drop old cache entries; llama and qwen2 decode several tokens a step, so the queries of one step
# must also mask each other causally; gemma2 decodes one token a step as the sampler does.
DECODE_CHUNK = {"llama": 4, "gemma2": 1, "qwen2": 5}


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_decoding_matches_full_forward(name):
    model = make(CONFIGS[name])
    t = tokens((2, 20))
    full = forward(model, t, None, None)
    step = nnx.jit(lambda m, tok, c: m.decode(tok, c))
    chunk = DECODE_CHUNK[name]
    cache = KVCache.init(model.cfg, 2, 24)  # 4 slots stay empty and must never be attended
    outs = []
    for i in range(0, 20, chunk):
        logits, cache = step(model, t[:, i:i + chunk], cache)
        outs.append(logits)
    err = rel_err(jnp.concatenate(outs, axis=1), full)
    print(f"kv cache {name}: rel err {err:.2e}")
    assert err <= 1e-6  # measured 0 (bit-identical)
    assert int(cache.index) == 20


def test_kv_cache_rows_with_different_left_padding():
    """Row 0 is left-padded by 4, row 1 not at all; each must decode as if it were alone."""
    model = make(GEMMA)
    a, b = tokens((1, 12), 5), tokens((1, 16), 6)
    tok = np.concatenate([np.concatenate([np.zeros((1, 4), np.int32), a], 1), b])
    seg = np.asarray([[0] * 4 + [1] * 12, [1] * 16], np.int32)
    pos = np.asarray([[0] * 4 + list(range(12)), list(range(16))], np.int32)
    step = nnx.jit(lambda m, tok, c, p, s: m.decode(tok, c, p, s))
    cache = KVCache.init(GEMMA, 2, 20)
    outs = []
    for i in range(0, 16, 4):  # 4 tokens a step; from the second step on the cache outruns the window (5)
        logits, cache = step(model, tok[:, i:i + 4], cache, pos[:, i:i + 4], seg[:, i:i + 4])
        outs.append(logits)
    out = jnp.concatenate(outs, axis=1)
    # Both references in one batch: row a right-filled with tokens it cannot see.
    ref = forward(model, np.concatenate([np.concatenate([a, tokens((1, 4), 7)], 1), b]), None, None)
    err = max(rel_err(out[0, 4:], ref[0, :12]), rel_err(out[1], ref[1]))
    print(f"left padding: rel err {err:.2e}")
    assert err <= 1e-6  # measured 0 (bit-identical)


def test_kv_cache_grow_appends_unwritten_slots_and_keeps_the_written_ones():
    """Grown slots are exactly those of a fresh cache (position EMPTY_POSITION, segment 0, zero keys and
    values), so neither their position nor their segment can make them visible; written slots stay put."""
    cfg = CONFIGS["llama"]
    rng = np.random.RandomState(0)
    shape = (2, cfg.n_kv_heads, 3, cfg.dim_head)
    cache = KVCache.init(cfg, 2, 3)._replace(
        k=tuple(jnp.asarray(rng.randn(*shape), jnp.float32) for _ in range(cfg.n_layers)),
        v=tuple(jnp.asarray(rng.randn(*shape), jnp.float32) for _ in range(cfg.n_layers)),
        pos=jnp.asarray([[0, 1, 2], [5, 6, 7]], jnp.int32), seg=jnp.asarray([[1, 1, 2], [-1, 1, 1]], jnp.int32),
        index=jnp.asarray(3, jnp.int32))
    grown = cache.grow(2)
    fresh = KVCache.init(cfg, 2, 2)
    assert int(grown.index) == 3
    np.testing.assert_array_equal(grown.pos, np.concatenate([cache.pos, fresh.pos], axis=1))
    np.testing.assert_array_equal(grown.seg, np.concatenate([cache.seg, fresh.seg], axis=1))
    assert np.all(np.asarray(fresh.pos) == np.iinfo(np.int32).max) and not np.any(np.asarray(fresh.seg))
    for new, old in zip(grown.k + grown.v, cache.k + cache.v):
        assert new.shape == (2, cfg.n_kv_heads, 5, cfg.dim_head)
        np.testing.assert_array_equal(new[:, :, :3], old)
        assert not np.any(np.asarray(new[:, :, 3:]))


# -- scan / unroll / remat -----------------------------------------------------------------------------
def _loss(m, t):
    return jnp.mean(jax.nn.log_softmax(m(t))[..., 0])


def _pure_loss(cfg, t):
    """(loss as a function of the parameter state, that state) for `cfg`."""
    graphdef, state = nnx.split(make(cfg))
    return (lambda s: _loss(nnx.merge(graphdef, s), t)), state


def _remat_eqns(jaxpr):
    """Every remat (jax.checkpoint) equation in `jaxpr`, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat2", "remat"):
            found.append(eqn)
        for sub in eqn.params.values():
            if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                found += _remat_eqns(sub.jaxpr if hasattr(sub, "jaxpr") else sub)
    return found


def test_scan_unroll_and_remat_take_different_paths():
    """The agreement test below is only worth something if each variant really is another program."""
    t = tokens((2, 16))
    residuals = {}
    for remat in ["none", *REMAT_POLICIES]:
        for scan in (True, False):
            fn, state = _pure_loss(GEMMA.replace(remat=remat, scan_layers=scan), t)
            eqns = jax.make_jaxpr(fn)(state).jaxpr.eqns
            (layer_scan,) = [e for e in eqns if e.primitive.name == "scan"]
            assert layer_scan.params["unroll"] == (1 if scan else GEMMA.n_layers), (remat, scan)
            remats = _remat_eqns(layer_scan.params["jaxpr"].jaxpr)
            if remat == "none":
                assert not remats
            else:
                (eqn,) = remats
                assert eqn.params["policy"] is REMAT_POLICIES[remat] and eqn.params["prevent_cse"] == (not scan)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(fn, state)
        residuals[remat] = out.getvalue()
    # Each policy saves a different set for the backward pass ...
    assert len(set(residuals.values())) == len(residuals)
    # ... and the name-based ones save exactly their named tensors, one per name, stacked over layers:
    # (q [L,B,T,H,D], k and v [L,B,T,K,D], mlp_hidden [L,B,T,F], [L,B,T,E]: each layer's input (the
    # scan carry, always saved) plus out_proj). A checkpoint_name lost from the model shows here.
    L, B, T, E, H, K, D, F = 2, 2, 16, GEMMA.d_model, GEMMA.n_heads, GEMMA.n_kv_heads, GEMMA.dim_head, GEMMA.d_ff
    shapes = [f"f32[{L},{B},{T},{H},{D}] output", f"f32[{L},{B},{T},{K},{D}] output", f"f32[{L},{B},{T},{F}] output",
              f"f32[{L},{B},{T},{E}] output"]
    saved = {"full": [0, 0, 0, 1], "save_qkv_proj": [1, 2, 0, 1], "save_out_proj": [0, 0, 1, 2]}
    for remat, counts in saved.items():
        assert [residuals[remat].count(shape) for shape in shapes] == counts, remat


# Every policy once, alternating scanned and unrolled layers; (none, scanned) is the reference.
VARIANTS = [("none", False), ("full", True), ("minimal", False), ("save_qkv_proj", True), ("save_out_proj", False),
            ("save_dots", True)]


@pytest.fixture(scope="module")
def gemma_reference():
    t = tokens((2, 16))
    fn, state = _pure_loss(GEMMA, t)
    return t, jax.jit(jax.value_and_grad(fn))(state)


@pytest.mark.parametrize("remat,scan", VARIANTS)
def test_scan_unroll_and_remat_agree(remat, scan, gemma_reference):
    t, (ref_loss, ref_grads) = gemma_reference
    fn, state = _pure_loss(GEMMA.replace(remat=remat, scan_layers=scan), t)
    lowered = jax.jit(jax.value_and_grad(fn)).lower(state)
    # A scanned stack lowers to while loops, an unrolled one to straight-line code.
    assert ("stablehlo.while" in lowered.as_text()) == scan
    value, grads = lowered.compile()(state)
    err = max(rel_err(g, r) for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    print(f"{remat} scan={scan}: loss diff {abs(float(value) - float(ref_loss)):.1e}, grad rel err {err:.1e}")
    assert abs(float(value) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))  # measured 0
    assert err <= 2e-6  # measured <= 7.2e-7 (XLA fuses the unrolled and rematerialised sums differently)


# -- sharding and precision ------------------------------------------------------------------------------
def test_sharded_forward_equals_one_device():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    cfg = presets.get("tiny", n_kv_heads=2, qkv_bias=True, o_bias=True)  # every attention parameter is sharded
    model = make(cfg)
    t = tokens((8, 32))
    ref = np.asarray(forward(model, t, None, None))
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    sharding.shard_module(model, mesh)
    q = model.layers.attn.q[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    with jax.set_mesh(mesh):
        fn = nnx.jit(lambda m, x: m(x))
        hlo = fn.lower(model, t).compile().as_text()
        out = fn(model, t)
    # The compiled program is partitioned: it gathers FSDP shards and reduces tensor-parallel partial sums.
    assert "all-gather" in hlo and ("all-reduce" in hlo or "reduce-scatter" in hlo)
    assert len(out.sharding.device_set) == 8 and not out.sharding.is_fully_replicated
    err = rel_err(out, ref)
    print(f"sharded vs one device: rel err {err:.2e}")
    assert err <= 2e-6  # measured 6.7e-7 (tensor-parallel partial sums added in another order)


def test_mixed_precision_forward():
    model = make(presets.get("tiny", dtype="bfloat16", param_dtype="float32"))
    ref = make(presets.get("tiny"))  # the same weights (same seed), computed in float32
    t = tokens((2, 16))
    out = forward(model, t, None, None)
    assert model.embed.table[...].dtype == jnp.float32 and out.dtype == jnp.float32
    err = rel_err(out, forward(ref, t, None, None))
    print(f"bf16 compute vs fp32: rel err {err:.2e}")
    # Measured 1.5e-2: bfloat16 keeps 8 mantissa bits (0.4% per rounding) through two layers, so this
    # bound cannot be tight; float32 parity is held to 1e-6 elsewhere. A bug in the bf16 path (a norm
    # or RoPE computed wrong) moves logits by tens of percent.
    assert err <= 3e-2


def test_bf16_attention_scores_are_float32():
    """In bfloat16 compute, query-key scores are accumulated and kept in float32 before the softmax.

    One query against two keys whose raw scores are 1024 and 1026 (bf16 inputs, exact products): bf16
    spacing at 1024 is 8, so scores rounded to bf16 would tie at 1024 and mix the values 50/50. In float32
    the scaled scores (D = 16, scale 1/4) are 256 and 256.5, so the weight on key 0 is sigmoid(-0.5) = 0.3775.
    """
    attn = Attention(presets.get("tiny", dtype="bfloat16"), rngs=nnx.Rngs(0))
    H, K, D, E = 4, 2, 16, 64
    attn.o[...] = jnp.full((H, D, E), 1.0 / (H * D))  # out[e] = mean over heads and head_dim of probs @ v
    q = jnp.zeros((1, 1, H, D), jnp.bfloat16).at[..., 0].set(32).at[..., 1].set(2)
    # Keys and values heads-first [B, K, S, D], as attend takes them.
    k = jnp.zeros((1, K, 2, D), jnp.bfloat16).at[..., 0].set(32).at[:, :, 1, 1].set(1)  # q.k = 1024, 1026
    v = jnp.zeros((1, K, 2, D), jnp.bfloat16).at[:, :, 0].set(1)  # key 0's value is 1, key 1's is 0
    out = attn.attend(q, k, v, jnp.ones((1, 1, 2), bool))
    # Measured 0.376953 (bf16 rounding of the probability 0.377541); bf16 scores would give 0.5.
    np.testing.assert_allclose(np.asarray(out, np.float32), 0.377541, atol=3e-3)


# -- presets ---------------------------------------------------------------------------------------------
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


def test_rotary_tables_equal_cos_and_sin_of_every_position_negative_ones_included():
    """The tables are looked up by distance (cos even, sin odd); a wrong sign, an off-by-one row or a
    missing attention factor shows at once."""
    cfg = presets.get("tiny", max_seq_len=300, rope_scaling=RopeScaling.from_dict(
        dict(rope_type="yarn", factor=4.0, attention_factor=1.3, original_max_position_embeddings=64)))
    positions = np.asarray([[-299, -7, -1, 0, 1, 2, 150, 299]], np.int32)
    cos, sin = jax.jit(rotary_tables, static_argnums=1)(jnp.asarray(positions), cfg)
    inv_freq, factor = inv_frequencies(cfg)
    angle = positions[..., None].astype(np.float32) * np.concatenate([inv_freq, inv_freq])
    # float32 angles up to 299 rad: XLA's and numpy's cos/sin differ by ~1 ulp of the argument's range.
    np.testing.assert_allclose(cos, np.cos(angle.astype(np.float64)) * factor, atol=2e-6)
    np.testing.assert_allclose(sin, np.sin(angle.astype(np.float64)) * factor, atol=2e-6)
    assert factor == 1.3


def test_dropout_zeroes_its_rate_and_scales_the_rest_to_keep_the_mean():
    x = jnp.full((200_000,), 2.0)
    out = np.asarray(dropout(x, 0.25, jax.random.key(0)))
    kept = out[out != 0]
    assert abs(1 - kept.size / x.size - 0.25) < 0.005  # binomial sd 0.001
    np.testing.assert_array_equal(kept, np.float32(2.0) / np.float32(0.75))
    np.testing.assert_array_equal(dropout(x, 0.25, None), x)  # no key (evaluation): untouched


def test_residual_dropout_acts_only_in_training_and_follows_its_key():
    """With a key, each block's two branches are dropped (deterministically per key); without one, the
    model is exactly the one without dropout (evaluation and sampling pass no key)."""
    cfg = CONFIGS["llama"]
    plain, dropped = make(cfg), make(cfg.replace(dropout=0.3))
    toks = tokens((2, 12))
    run = nnx.jit(lambda m, t, key: m(t, dropout_key=key))
    np.testing.assert_array_equal(forward(dropped, toks, None, None), forward(plain, toks, None, None))
    np.testing.assert_array_equal(run(plain, toks, jax.random.key(1)), forward(plain, toks, None, None))
    a, b, c = (np.asarray(run(dropped, toks, jax.random.key(k))) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert rel_err(a, np.asarray(forward(plain, toks, None, None))) > 0.05 and rel_err(a, c) > 0.05
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        cfg.replace(dropout=1.0)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of n_kv_heads=4"):
        presets.get("tiny", n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match="unknown model preset 'llama9'"):
        presets.get("llama9")


def test_hybrid_mesh_puts_granules_outermost_on_the_network_axes():
    devices = jax.devices()[:8]
    # Two slices of four (one process: devices split in order): the data axis crosses slices.
    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=2, devices=devices, dcn_data=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert set(ids[0].ravel()) == {d.id for d in devices[:4]} and set(ids[1].ravel()) == {d.id for d in devices[4:]}
    # FSDP across two slices, data parallel inside each: the fsdp axis is (slice, fsdp within it).
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=1, devices=devices, dcn_fsdp=2)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert set(ids[:, :2].ravel()) == {d.id for d in devices[:4]}  # the first slice: fsdp 0-1 of both data rows
    with pytest.raises(ValueError, match="do not split into dcn_data \\* dcn_fsdp = 3 groups"):
        sharding.make_mesh(devices=devices, dcn_data=3)
    with pytest.raises(ValueError, match="data\\*fsdp\\*tensor=8 does not match the 4 devices per granule"):
        sharding.make_mesh(data=8, fsdp=1, devices=devices, dcn_data=2)


def test_a_mesh_takes_one_free_axis_that_divides_the_devices():
    """-1 is the remaining devices: on one axis it is 8 / (the others), on two it is ambiguous, and where
    the others do not divide the devices it cannot be whole; devices split by process must match the granules."""
    devices = jax.devices()[:8]
    assert dict(sharding.make_mesh(data=2, fsdp=-1, tensor=2, devices=devices).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(data=-1, fsdp=1, tensor=4, devices=devices).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    with pytest.raises(ValueError, match=r"at most one of data/fsdp/tensor may be -1, got \[-1, -1, 2\]"):
        sharding.make_mesh(data=-1, fsdp=-1, tensor=2, devices=devices)
    with pytest.raises(ValueError, match="mesh: 8 devices are not divisible by data\\*fsdp\\*tensor=3"):
        sharding.make_mesh(data=3, fsdp=-1, tensor=1, devices=devices)
    with pytest.raises(ValueError, match="dcn_data \\* dcn_fsdp must be at least 1, got 0"):
        sharding.make_mesh(devices=devices, dcn_data=0)
    hosts = [SimpleNamespace(id=i, process_index=i // 2) for i in range(6)]  # 3 processes of 2 devices
    with pytest.raises(ValueError, match="the devices span 3 processes but mesh.dcn_data \\* mesh.dcn_fsdp = 2"):
        sharding.make_mesh(devices=hosts, dcn_data=2)
    uneven = [SimpleNamespace(id=i, process_index=int(i >= 4)) for i in range(6)]  # 4 + 2
    with pytest.raises(ValueError, match=r"the 2 granules hold different numbers of devices \(\[4, 2\]\)"):
        sharding.make_mesh(devices=uneven, dcn_data=2)
