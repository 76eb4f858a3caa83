"""Prompt tuning and prefix tuning: a learned prompt equals prepending it, per packed document, in
training and in cached decoding; MLP-reparameterised prefixes fold into plain ones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import hf, hf_peft, prefix
from model import presets
from model.config import PrefixConfig
from model.transformer import KVCache, Transformer, trainable
from train import build

CFG = presets.get("tiny", sliding_window=9, window_layers=(1,))  # one windowed layer: the prefix can fall out of it
TEXT = [11, 22, 33, 44, 55]
N = len(TEXT)
X = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 12)))


@pytest.fixture(scope="module")
def base():
    return Transformer(CFG, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, tokens_BT, segment_ids_BT=None):
    """The model's logits in one compiled program (op by op, a forward costs seconds of small compiles)."""
    return model(tokens_BT, segment_ids_BT=segment_ids_BT)


@nnx.jit
def decode(model, tokens_BT, cache):
    return model.decode(tokens_BT, cache)


def prepended(base, tokens):
    """The base model's logits for `tokens` when TEXT really precedes them."""
    full = jnp.concatenate([jnp.broadcast_to(jnp.asarray(TEXT), (tokens.shape[0], N)), tokens], axis=1)
    return forward(base, full)[:, N:]


def tuned(base, kind, hidden=0, scan=True):
    """`base` with a prompt (the embeddings of TEXT) or prefix (TEXT's keys and values) that stands for TEXT."""
    cfg = base.cfg.replace(prefix=PrefixConfig(kind=kind, num_tokens=N, hidden=hidden), scan_layers=scan)
    model = build.with_config(base, cfg, 0)
    if kind == "prompt":
        prefix.init_prompt(model, "text", TEXT, jax.random.key(0))
    elif not hidden:
        cache = KVCache.init(base.cfg, 1, N)
        _, cache = base.decode(jnp.asarray([TEXT]), cache, positions_BT=prefix.positions(N)[None])
        model.prefix.k.set_value(jnp.stack([k[0].transpose(1, 0, 2) for k in cache.k]))  # [L, N, K, D]
        model.prefix.v.set_value(jnp.stack([v[0].transpose(1, 0, 2) for v in cache.v]))
    return model


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
@pytest.mark.parametrize("scan", [True, False])
def test_a_learned_prompt_equals_prepending_it(base, kind, scan):
    model = tuned(base, kind, scan=scan)
    ref = prepended(base, X)
    err = float(jnp.abs(forward(model, X) - ref).max())
    assert err < 1e-6, err  # measured 1.2e-7 (float32); RoPE sees the same distances at shifted positions
    assert float(jnp.abs(forward(base, X) - ref).max()) > 1e-2  # the prompt matters


def test_prefix_is_per_kv_head(base):
    model = Transformer(base.cfg.replace(prefix=PrefixConfig(kind="prefix", num_tokens=7)), rngs=nnx.Rngs(0))
    k, v = model.prefix_kv()
    c = base.cfg
    assert k.shape == v.shape == (c.n_layers, 7, c.n_kv_heads, c.dim_head) and c.n_kv_heads < c.n_heads
    assert model.prefix.k.get_metadata()["axes"] == ("layers", "prefix", "kv_heads", "head_dim")
    # Drawn at the scale of real keys and values, x @ W with unit-scale x: init_std * sqrt(d_model) (= 0.16 here;
    # 448 draws each, so the sample std is within 4.5 sigma = 15% of it).
    want = c.init_std * c.d_model ** 0.5
    for x in (k, v):
        assert abs(float(jnp.std(x)) / want - 1) < 0.15 and abs(float(jnp.mean(x))) < 0.03
    assert not np.array_equal(k, v)


def test_every_packed_document_sees_the_prompt_and_no_other_document(base):
    """Two documents packed in one row, padding in the other: each document's logits equal its own row's."""
    model = tuned(base, "prompt")
    a, b = X[0, :5], X[1, :7]
    packed = jnp.stack([jnp.concatenate([a, b]), jnp.concatenate([b, jnp.zeros(5, jnp.int32)])])
    segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 7 + [0] * 5])
    out = forward(model, packed, segments)
    err = max(float(jnp.abs(out[0, :5] - forward(model, a[None])[0]).max()),
              float(jnp.abs(out[0, 5:] - forward(model, b[None])[0]).max()),
              float(jnp.abs(out[1, :7] - forward(model, b[None])[0]).max()))
    assert err < 1e-6, err  # measured 0 (the same sums); a document seeing its neighbour moves logits by ~1e-2


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_cached_decoding_sees_the_prompt(base, kind):
    model = tuned(base, kind)
    full = forward(model, X)
    cache = model.init_cache(2, 12)
    assert int(cache.index) == N
    first, cache = decode(model, X[:, :7], cache)
    rest = []
    for t in range(7, 12):  # one token at a time, as the sampler does
        logits, cache = decode(model, X[:, t:t + 1], cache)
        rest.append(logits)
    err = float(jnp.abs(jnp.concatenate([first, *rest], axis=1) - full).max())
    assert err < 1e-6, err  # measured 1.0e-7


def test_cache_holds_the_prefix_in_its_first_slots_seen_by_every_segment(base):
    """init_cache puts the prefix at positions -N..-1 with segment -1, the same in every row; a document of
    another segment id than 1 decodes against it exactly as segment 1 does."""
    model = tuned(base, "prefix")
    cache = model.init_cache(2, 4)
    assert int(cache.index) == N and cache.pos.shape == (2, N + 4)
    np.testing.assert_array_equal(cache.pos[:, :N], np.broadcast_to(np.arange(-N, 0), (2, N)))
    np.testing.assert_array_equal(cache.seg[:, :N], np.full((2, N), prefix.PREFIX_SEGMENT))
    assert prefix.PREFIX_SEGMENT < 0 and not np.any(np.asarray(cache.seg[:, N:]))
    k, v = model.prefix_kv()
    for layer in range(CFG.n_layers):
        for buffer, kv in ((cache.k[layer], k[layer]), (cache.v[layer], v[layer])):
            np.testing.assert_array_equal(buffer[:, :, :N], np.broadcast_to(np.asarray(kv).transpose(1, 0, 2)[None],
                                                                            (2, CFG.n_kv_heads, N, CFG.dim_head)))
    # One document in both rows, as segment 1 and as segment 2.
    out, _ = model.decode(jnp.stack([X[0, :4]] * 2), cache, segment_ids_BT=jnp.asarray([[1] * 4, [2] * 4]))
    np.testing.assert_array_equal(out[1], out[0])


def test_mlp_reparameterised_prefix_folds_into_plain_prefixes(base):
    model = tuned(base, "prefix", hidden=32)
    folded = prefix.fold(model)
    assert folded.cfg.prefix.hidden == 0 and not hasattr(folded.prefix, "w_in")
    np.testing.assert_array_equal(folded(X), model(X))
    assert {p.shape for p in jax.tree.leaves(nnx.state(model, prefix.PrefixParam))} == {
        (N, 64), (64, 32), (32,), (32, 2 * 2 * 2 * 16), (2 * 2 * 2 * 16,)}


def test_mlp_prefix_is_tanh_between_two_affine_maps_of_every_parameter(base):
    """Each of the reparameterisation's five parameters moves the prefix; saturated (w_in = 0, b_in = 50:
    tanh = 1 exactly) every token's keys and values are the column sums of w_out plus b_out, in some layout."""
    p = tuned(base, "prefix", hidden=32).prefix
    k0, v0 = (np.asarray(x) for x in p())
    for name in ("embed", "w_in", "b_in", "w_out", "b_out"):
        param = getattr(p, name)
        before = param[...]
        param.set_value(before + 0.1)
        k, v = p()
        assert not np.allclose(k, k0) and not np.allclose(v, v0), name
        param.set_value(before)
    p.w_in.set_value(jnp.zeros_like(p.w_in[...]))
    p.b_in.set_value(jnp.full_like(p.b_in[...], 50.0))
    p.b_out.set_value(jnp.asarray(np.random.RandomState(1).randn(*p.b_out.shape), jnp.float32))
    k, v = p()
    want = np.tile(np.asarray(p.w_out[...], np.float64).sum(axis=0) + np.asarray(p.b_out[...]), N)  # every token
    np.testing.assert_allclose(np.sort(np.concatenate([np.ravel(k), np.ravel(v)])), np.sort(want), rtol=1e-5, atol=1e-5)


def test_mlp_prefix_starts_like_linear_layers_scaled_to_real_keys(base):
    """The reparameterisation's embedding and first layer are drawn N(0, init_std), its biases 0, and its
    output layer N(0, init_std * sqrt(d_model / hidden)): a unit-scale tanh layer of `hidden` units then gives
    keys and values at the scale of real ones, init_std * sqrt(d_model)."""
    p = tuned(base, "prefix", hidden=256).prefix
    c = base.cfg
    for name, want in (("embed", c.init_std), ("w_in", c.init_std), ("w_out", c.init_std * (c.d_model / 256) ** 0.5)):
        w = np.asarray(getattr(p, name)[...])
        # >= 320 draws each (embed: 5 x 64): the sample std is within 4.5 sigma = 18% of the true one.
        assert abs(w.std() / want - 1) < 0.18 and abs(w.mean()) < 0.25 * want, (name, w.std(), want)
    assert not np.any(np.asarray(p.b_in[...])) and not np.any(np.asarray(p.b_out[...]))


def test_only_the_prompt_trains(base):
    model = tuned(base, "prompt")
    _, params, frozen = nnx.split(model, trainable(model.cfg), ...)
    assert [x.shape for x in jax.tree.leaves(params)] == [(N, 64)]
    assert sum(x.size for x in jax.tree.leaves(frozen)) == sum(
        x.size for x in jax.tree.leaves(nnx.state(base, nnx.Param)))


def test_prompt_initialisations(base):
    model = tuned(base, "prompt")
    table = np.asarray(base.embed.table[...])
    np.testing.assert_array_equal(model.prefix.embeddings[...], table[TEXT])
    prefix.init_prompt(model, "text", [7, 8], jax.random.key(1))  # shorter than N: repeated to fill it
    np.testing.assert_array_equal(model.prefix.embeddings[...], table[[7, 8, 7, 8, 7]])
    prefix.init_prompt(model, "vocab", [], jax.random.key(1))
    rows = np.asarray(model.prefix.embeddings[...])
    assert all(np.any(np.all(table == r, axis=1)) for r in rows)  # each is some token's embedding
    prefix.init_prompt(model, "random", [], jax.random.key(1))
    assert abs(float(jnp.std(model.prefix.embeddings[...])) - table.std()) < 0.5 * table.std()
    with pytest.raises(ValueError, match="prompt_init_text"):
        prefix.init_prompt(model, "text", [], jax.random.key(1))


def test_hugging_face_export_refuses_a_prefix(base, tmp_path):
    model = tuned(base, "prefix")
    with pytest.raises(hf.HFFormatError, match="prompt- or prefix-tuned"):
        hf.save(model, model.cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_the_sampler_decodes_with_the_prompt(base, kind):
    """Greedy samples of the tuned model equal the base model's with TEXT really in front of the prompts."""
    from model.sampling import generate

    model = tuned(base, kind)
    prompts = [[3, 17, 29], [8, 9, 10, 11, 12, 13, 14]]
    ours = generate(model, prompts, max_new_tokens=6, temperature=0.0)
    theirs = generate(base, [TEXT + p for p in prompts], max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(ours.tokens, theirs.tokens)
    np.testing.assert_allclose(ours.logprobs, theirs.logprobs, atol=5e-6)  # measured 4.8e-7
    assert not np.array_equal(ours.tokens, generate(base, prompts, max_new_tokens=6, temperature=0.0).tokens)


@pytest.mark.parametrize("kind, hidden", [("prompt", 0), ("prefix", 0), ("prefix", 8)])
def test_peft_loads_our_prompt_and_prefix_onto_the_transformers_base(tmp_path, kind, hidden):
    """kiln convert --adapter-only of a prompt- or prefix-tuned model: PEFT's PROMPT_TUNING / PREFIX_TUNING
    directory, which peft.PeftModel puts on the transformers base with the same logits as Kiln's."""
    import peft
    import torch
    import transformers

    import hf_models

    hf_models.build("llama_gqa4_yarn_headdim").save_pretrained(str(tmp_path / "base"))  # GQA, YaRN's attention factor
    _, hf_base = hf.load(str(tmp_path / "base"))
    cfg = hf_base.cfg.replace(prefix=PrefixConfig(kind=kind, num_tokens=N, hidden=hidden))
    model = build.with_config(hf_base, cfg, 0)  # random prompt / prefix (an MLP's, folded on export)
    tokens = np.asarray(X) % hf_base.cfg.vocab_size
    ours = np.asarray(forward(model, jnp.asarray(tokens)))
    hf_peft.save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=str(tmp_path / "base"))
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), attn_implementation="eager")
    with torch.no_grad():
        plain = torch_base(torch.tensor(tokens)).logits.numpy()
        tuned_model = peft.PeftModel.from_pretrained(torch_base, str(tmp_path / "adapter")).eval()
        theirs = tuned_model(input_ids=torch.tensor(tokens), attention_mask=torch.ones(tokens.shape, dtype=torch.long))
    theirs = theirs.logits.numpy()[:, -tokens.shape[1]:]  # prompt tuning's logits include the virtual tokens
    scale = np.abs(theirs).max()
    assert np.abs(theirs - plain).max() / scale > 1e-2  # PEFT really used the prompt
    # Measured relative to the largest logit: 8.3e-7 (prompt, prefix), 1.4e-6 (folded MLP prefix). Keys
    # exported unrotated (PEFT's real tokens sit N positions later) give 8.9e-2 and 1.2e-4; a wrong
    # key/value or head order is O(1).
    assert np.abs(ours - theirs).max() / scale < 5e-6
