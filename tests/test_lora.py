"""LoRA: adapters that start as the identity, equal their merged weights, train alone, and round-trip
through Hugging Face PEFT's adapter format onto the transformers base model."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import hf_models
from model import hf, hf_peft, lora, presets
from model.config import LORA_TARGETS, LoraConfig
from model.transformer import Transformer, trainable
from train import build, optim

ALL = LoraConfig(rank=4, alpha=8.0, targets=LORA_TARGETS)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 200, (2, 24)))


def with_adapters(base: Transformer, lora_cfg: LoraConfig, seed: int = 0, b_scale: float = 0.0) -> Transformer:
    """`base` with fresh adapters; b_scale > 0 moves B away from zero so the adapters change the outputs."""
    model = build.with_config(base, base.cfg.replace(lora=lora_cfg), seed)
    if b_scale:
        keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
        for adapter in lora.adapters(model).values():
            adapter.b.set_value(jax.random.normal(next(keys), adapter.b.shape) * b_scale)
    return model


@pytest.fixture(scope="module")
def base():
    return Transformer(presets.get("tiny"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan", [True, False])
def test_fresh_adapters_reproduce_the_base_exactly(base, scan):
    plain = build.with_config(base, base.cfg.replace(scan_layers=scan), 0)
    model = with_adapters(plain, ALL)
    assert set(lora.adapters(model)) == set(LORA_TARGETS)
    np.testing.assert_array_equal(model(TOKENS), plain(TOKENS))  # B = 0: exactly the base, not merely close
    np.testing.assert_array_equal(model(TOKENS, dropout_key=jax.random.key(3)), plain(TOKENS))


def test_adapter_shapes_follow_the_weights_they_adapt(base):
    model = with_adapters(base, ALL)
    L, E, F, H, K, D = 2, 64, 128, 4, 2, 16
    shapes = {t: (a.a.shape, a.b.shape) for t, a in lora.adapters(model).items()}
    assert shapes == {"q": ((L, E, 4), (L, 4, H, D)), "k": ((L, E, 4), (L, 4, K, D)), "v": ((L, E, 4), (L, 4, K, D)),
                      "o": ((L, H, D, 4), (L, 4, E)), "gate": ((L, E, 4), (L, 4, F)), "up": ((L, E, 4), (L, 4, F)),
                      "down": ((L, F, 4), (L, 4, E))}
    q = lora.adapters(model)["q"]
    assert q.a.get_metadata()["axes"] == ("layers", "embed", "lora_rank")
    assert q.b.get_metadata()["axes"] == ("layers", "lora_rank", "q_heads", "head_dim")


def test_initialisers_match_peft(base):
    """A: PEFT's kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); gaussian: N(0, 1/r); B: zero."""
    big = Transformer(presets.get("tiny", d_model=256, d_ff=512), rngs=nnx.Rngs(0))
    kaiming = lora.adapters(with_adapters(big, LoraConfig(rank=16, targets=("q", "o", "down"))))
    # o's input is every head's output: H * D = 4 * 64 features, flattened as PEFT's o_proj sees them.
    for target, fan_in in (("q", 256), ("o", 4 * 64), ("down", 512)):
        a = np.asarray(kaiming[target].a[...])
        bound = fan_in ** -0.5
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.98 * bound
        assert abs(a.std() - bound / np.sqrt(3)) < 0.02 * bound  # uniform std = bound / sqrt(3)
        assert not np.any(np.asarray(kaiming[target].b[...]))
    gauss = np.asarray(lora.adapters(with_adapters(big, LoraConfig(rank=16, init="gaussian", targets=("q",))))["q"].a[...])
    assert abs(gauss.std() - 1 / 16) < 0.003 and np.abs(gauss).max() > 3 / 16  # normal, not uniform


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_weights_equal_the_adapted_model(base, rslora):
    cfg = LoraConfig(rank=4, alpha=8.0, targets=LORA_TARGETS, rslora=rslora)
    model = with_adapters(base, cfg, b_scale=0.1)
    adapted = model(TOKENS)
    assert float(jnp.abs(adapted - base(TOKENS)).max()) > 0.3  # the adapters move logits as much as the base's own
    merged = lora.merge(model)
    assert not lora.adapters(merged) and merged.cfg.lora is None
    err = float(jnp.abs(merged(TOKENS) - adapted).max())
    assert err < 1e-5, err  # the bound; measured 3.1e-7 (alpha/r) and 1.3e-6 (rsLoRA), float32
    # By hand for one weight: W + (alpha/r or alpha/sqrt(r)) * A @ B.
    q = lora.adapters(model)["q"]
    scale = 8.0 / (2.0 if rslora else 4.0)
    expected = base.layers.attn.q[...] + scale * jnp.einsum("ler,lrhd->lehd", q.a[...], q.b[...])
    np.testing.assert_allclose(merged.layers.attn.q[...], expected, atol=1e-6)


def test_merge_into_a_wider_dtype_keeps_the_update_over_a_bfloat16_base(base):
    """merge(model, dtype) stores W + s·AB in `dtype`: float32 over a bfloat16 base keeps the update unrounded
    (hf.save merges this way when it writes float32 files); by default the merge keeps the base's dtype."""
    bf16 = build.with_config(base, base.cfg.replace(param_dtype="bfloat16"), 0)
    model = with_adapters(bf16, LoraConfig(rank=4, alpha=8.0, targets=("q",)), b_scale=0.1)
    q = lora.adapters(model)["q"]
    a, b = (np.asarray(p[...], np.float64) for p in (q.a, q.b))
    want = np.asarray(bf16.layers.attn.q[...], np.float64) + 2.0 * np.einsum("ler,lrhd->lehd", a, b)
    merged = lora.merge(model, "float32")
    assert merged.cfg.param_dtype == "float32" and merged.layers.attn.q[...].dtype == jnp.float32
    # Measured 3.7e-9 (float32 sums); a bfloat16 result would be off by up to half a bf16 step of W (~1e-3).
    np.testing.assert_allclose(np.asarray(merged.layers.attn.q[...]), want, rtol=0, atol=1e-7)
    assert lora.merge(model).layers.attn.q[...].dtype == jnp.bfloat16


def test_scanned_and_unrolled_adapters_agree(base):
    model = with_adapters(base, ALL, b_scale=0.3)
    unrolled = build.with_config(model, model.cfg.replace(scan_layers=False), 0)
    np.testing.assert_array_equal(unrolled(TOKENS), model(TOKENS))  # measured: identical


def test_dropout_acts_on_the_adapter_input_only(base):
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"), dropout=0.5)
    model = with_adapters(base, cfg, b_scale=0.3)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    out = [model(TOKENS, dropout_key=k) for k in (k1, k1, k2, None, None)]
    np.testing.assert_array_equal(out[0], out[1])  # a key fixes the mask
    assert float(jnp.abs(out[0] - out[2]).max()) > 1e-3  # another key, another mask
    np.testing.assert_array_equal(out[3], out[4])  # no key: deterministic
    assert float(jnp.abs(out[0] - out[3]).max()) > 1e-3


def identity_adapter(dropout: float) -> lora.LoRA:
    """An adapter of 4 features with A = I, B = all ones and scale 1: each output is the sum of its (dropped
    out) inputs."""
    adapter = lora.LoRA(LoraConfig(rank=4, alpha=4.0, targets=("q",), dropout=dropout), (4,), (4,), ("embed",),
                        ("embed",), nnx.Rngs(0))
    adapter.a.set_value(jnp.eye(4))
    adapter.b.set_value(jnp.ones((4, 4)))
    return adapter


def test_dropout_keeps_or_zeroes_each_input_and_scales_the_kept_by_one_over_keep():
    """Inputs 1, 2, 4, 8 in 512 rows, dropout 0.5: every output is 2x the sum of a subset of the inputs (kept
    inputs scaled by 1 / (1 - 0.5), before A: all four outputs of a row equal), about half of each kept."""
    x = jnp.broadcast_to(jnp.asarray([1.0, 2.0, 4.0, 8.0]), (512, 4))
    out = np.asarray(identity_adapter(0.5)(x, jax.random.key(0)))
    assert np.all(out == out[:, :1])  # one mask on the input, not one per output
    kept = out[:, 0] / 2
    assert np.all(kept == np.round(kept)) and kept.min() >= 0 and kept.max() <= 15
    bits = (kept.astype(int)[:, None] >> np.arange(4)) & 1  # which of 1, 2, 4, 8 were kept
    assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 0.1), bits.mean(axis=0)  # 4.5 sigma for 512 rows
    assert abs(out[:, 0].mean() - 15.0) < 2.0  # the mean is the undropped output's (std of the mean 0.41)
    np.testing.assert_array_equal(identity_adapter(0.5)(x), jnp.full((512, 4), 15.0))  # no key: no dropout


def test_each_target_draws_its_own_dropout_mask():
    class Block(nnx.Module):
        def __init__(self):
            self.q_lora, self.v_lora = identity_adapter(0.5), identity_adapter(0.5)

    x = jnp.broadcast_to(jnp.asarray([1.0, 2.0, 4.0, 8.0]), (64, 4))
    block, key = Block(), jax.random.key(7)
    q, v = (np.asarray(lora.apply(block, name, x, jnp.zeros((64, 4)), key)) for name in ("q", "v"))
    np.testing.assert_array_equal(q, np.asarray(lora.apply(block, "q", x, jnp.zeros((64, 4)), key)))
    assert (q != v).any()  # the same input and key, another target: another mask
    np.testing.assert_array_equal(lora.apply(block, "k", x, jnp.ones((64, 4)), key), jnp.ones((64, 4)))  # no adapter


def test_peft_adapter_files_hold_every_setting_and_mismatched_settings_are_refused(base, tmp_path):
    """The adapter_config.json fields PEFT reads, lora_A [r, in] / lora_B [out, r] per layer, the settings read
    back exactly, and a load refused when rank, alpha, rsLoRA or targets differ from the model's."""
    import dataclasses
    from safetensors.numpy import load_file

    cfg = LoraConfig(rank=4, alpha=16.0, targets=("k", "up"), rslora=True, dropout=0.1)
    source = with_adapters(base, cfg, b_scale=0.2)
    path = str(tmp_path / "adapter")
    hf_peft.save_adapter(source, path)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: written[k] for k in ("peft_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "target_modules")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 16.0, "use_rslora": True, "lora_dropout": 0.1,
        "target_modules": ["k_proj", "up_proj"]}
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * 2  # 2 targets x 2 layers x (A, B)
    for target, adapter in lora.adapters(source).items():
        a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
        for i in range(2):
            name = f"base_model.model.model.layers.{i}.{hf_peft.MODULES[target]}.lora_"
            np.testing.assert_array_equal(tensors[name + "A.weight"], a[i].reshape(-1, 4).T)
            np.testing.assert_array_equal(tensors[name + "B.weight"], b[i].reshape(4, -1).T)
    assert hf_peft.read_config(path) == cfg
    saved = {t: (np.asarray(a.a[...]), np.asarray(a.b[...])) for t, a in lora.adapters(source).items()}
    for adapter in lora.adapters(source).values():
        adapter.a.set_value(jnp.zeros(adapter.a.shape))
        adapter.b.set_value(jnp.zeros(adapter.b.shape))
    hf_peft.load_adapter(source, path)
    for t, adapter in lora.adapters(source).items():
        np.testing.assert_array_equal(adapter.a[...], saved[t][0])
        np.testing.assert_array_equal(adapter.b[...], saved[t][1])
    for key, other in (("lora_alpha", dict(alpha=8.0)), ("lora_rslora", dict(rslora=False))):
        with pytest.raises(hf_peft.AdapterError, match=f"the adapter has {key}="):
            hf_peft.load_adapter(with_adapters(base, dataclasses.replace(cfg, **other)), path)


def test_only_adapters_are_trainable_and_optimizer_state_shrinks():
    """Optimizer-state bytes with and without LoRA, from abstract shapes (nothing allocated)."""
    report = {}
    for preset in ("small", "llama3_8b"):
        full_cfg = presets.get(preset)
        lora_cfg = full_cfg.replace(lora=LoraConfig(rank=8, targets=("q", "k", "v", "o")))
        sizes = {}
        for name, cfg in (("full", full_cfg), ("lora", lora_cfg)):
            model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
            _, params, frozen = nnx.split(model, trainable(cfg), ...)
            tx = optim.optimizer(OPTIM, 100, params)
            opt_state = jax.eval_shape(tx.init, params)
            sizes[name] = (lora.count(params), sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)))
            if name == "lora":
                assert all(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
                assert lora.count(frozen) == sizes["full"][0]  # the whole base is frozen
        report[preset] = sizes
        print(f"{preset}: trainable {sizes['full'][0]:,} -> {sizes['lora'][0]:,} parameters; "
              f"AdamW state {sizes['full'][1] / 2**20:,.1f} MiB -> {sizes['lora'][1] / 2**20:,.2f} MiB")
    # llama3_8b, r=8 on q,k,v,o: per layer A 4096*8*4 + B 8*(4096+1024+1024+4096) = 212,992; x 32 layers.
    assert report["llama3_8b"]["lora"][0] == 32 * (4 * 4096 * 8 + 8 * (4096 + 1024 + 1024 + 4096)) == 6_815_744
    # Two float32 moments per trainable parameter (plus scalars: counts and the injected LR).
    assert abs(report["llama3_8b"]["lora"][1] - 8 * 6_815_744) < 64
    assert report["llama3_8b"]["full"][1] > 8 * 8.0e9


class OPTIM:
    lr, schedule, warmup_steps, min_lr_ratio, decay_fraction = 1e-3, "cosine", 10, 0.1, 0.2
    weight_decay, b1, b2, eps, clip_norm = 0.1, 0.9, 0.95, 1e-8, 1.0


# -- Hugging Face PEFT ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf_base"))
    hf_models.build("llama_gqa4_yarn_headdim").save_pretrained(path)  # GQA: k/v adapters are narrower than q's
    return path


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_onto_the_transformers_base(hf_base, tmp_path, rslora):
    import peft

    _, base_model = hf.load(hf_base)
    model = with_adapters(base_model, LoraConfig(rank=4, alpha=8.0, targets=LORA_TARGETS, rslora=rslora), b_scale=0.2)
    tokens = TOKENS % 211
    ours = np.asarray(model(tokens))
    hf_peft.save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=hf_base)
    hf.save(model, model.cfg, str(tmp_path / "merged"))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["use_rslora"] == rslora and set(written["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    torch_base = transformers.AutoModelForCausalLM.from_pretrained(hf_base, attn_implementation="eager").eval()
    plain = torch_logits(torch_base, tokens)
    with_peft = torch_logits(peft.PeftModel.from_pretrained(torch_base, str(tmp_path / "adapter")).eval(), tokens)
    merged = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "merged"), attn_implementation="eager").eval(), tokens)
    assert np.abs(with_peft - plain).max() > 0.1  # PEFT really applied the adapters
    scale = np.abs(merged).max()
    # Measured, relative to the largest logit (float32): PEFT vs the merged export 1.2e-6 (alpha/r) and
    # 3.0e-6 (rsLoRA); Kiln vs PEFT 1.1e-6 and 2.2e-6. A wrong scale, transpose or head order is O(1).
    assert np.abs(with_peft - merged).max() / scale < 8e-6
    assert np.abs(ours - with_peft).max() / scale < 8e-6


def test_peft_adapter_imports_into_kiln(hf_base, tmp_path):
    _, base_model = hf.load(hf_base)
    cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "down"))
    source = with_adapters(base_model, cfg, b_scale=0.2)
    hf_peft.save_adapter(source, str(tmp_path / "adapter"))
    assert hf_peft.read_config(str(tmp_path / "adapter")) == cfg
    target = with_adapters(base_model, cfg, seed=5)  # other A, zero B
    hf_peft.load_adapter(target, str(tmp_path / "adapter"))
    for name, adapter in lora.adapters(source).items():
        np.testing.assert_array_equal(lora.adapters(target)[name].a[...], adapter.a[...])
        np.testing.assert_array_equal(lora.adapters(target)[name].b[...], adapter.b[...])
    np.testing.assert_array_equal(target(TOKENS % 211), source(TOKENS % 211))

    wrong_rank = with_adapters(base_model, LoraConfig(rank=8, alpha=8.0, targets=("q", "v", "down")))
    with pytest.raises(hf_peft.AdapterError, match="the adapter has lora_rank=4 but peft.lora_rank=8"):
        hf_peft.load_adapter(wrong_rank, str(tmp_path / "adapter"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(hf_peft.AdapterError, match="does not support use_dora"):
        hf_peft.read_config(str(tmp_path / "adapter"))
    with pytest.raises(hf_peft.AdapterError, match="no adapter_config.json"):
        hf_peft.read_config(str(tmp_path))
    assert not os.path.exists(str(tmp_path / "adapter.old-kiln"))
