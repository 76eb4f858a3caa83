"""Kiln's decoder against Hugging Face transformers: logits, round trips, sharded files, bad input."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import hf_models
from launch import main as cli
from model import hf, presets
from model.config import RopeScaling
from model.rope import inv_frequencies

TOKENS = np.random.RandomState(0).randint(0, hf_models.BASE["vocab_size"], (2, 70))  # longer than every window


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=sorted(hf_models.CASES))
def case(request, tmp_path_factory):
    """(name, HF model, its directory, reference logits)."""
    model = hf_models.build(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return request.param, model, path, torch_logits(model)


def test_logits_match_transformers(case):
    name, _, path, ref = case
    cfg, model = hf.load(path)
    assert cfg.family == hf_models.CASES[name][0]
    err = rel_err(model(jnp.asarray(TOKENS)), ref)
    print(f"parity {name}: max|diff|/max|logit| = {err:.2e}")
    # Measured 6.3e-7 (qwen2_bias_tied) .. 1.29e-6 (gemma2): float32 sums in another order. 4e-6 is
    # about 3x the worst; a bug that moves Gemma2's logits (max |logit| 2.65) by 5e-5 is 1.9e-5 here.
    assert err <= 4e-6


def test_round_trip_through_transformers(case, tmp_path):
    name, _, path, ref = case
    cfg, model = hf.load(path)
    hf.save(model, cfg, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert type(reloaded).__name__ == hf.ARCHITECTURES[cfg.family]
    # The weights go through unchanged in float32, so transformers computes the very same logits
    # (measured 0 for every case).
    np.testing.assert_array_equal(torch_logits(reloaded.float().eval()), ref)
    cfg2, _ = hf.load(str(tmp_path / "out"))
    assert cfg2 == cfg


def test_bf16_load_close_to_fp32(case):
    name, _, path, ref = case
    cfg, model = hf.load(path, dtype="bfloat16")
    logits = model(jnp.asarray(TOKENS))
    assert model.layers.attn.q[...].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    err = rel_err(logits, ref)
    print(f"bf16 {name}: max|diff|/max|logit| = {err:.2e}")
    # Measured 1.0e-2 (qwen2_bias_tied) .. 2.4e-2 (llama_linear_gelu): bfloat16 weights and activations
    # keep 8 mantissa bits, so this cannot be tight; float32 parity above holds the line at 4e-6. A
    # wrong RoPE, norm or softcap in the bf16 path moves logits by far more than 4e-2.
    assert err <= 4e-2


# RoPE scalings checked against transformers' own frequency functions, over the corners the model
# cases above do not reach: (head_dim, rope_theta, max_position_embeddings, rope_parameters).
ROPE_CASES = {
    "linear": (16, 10000.0, 128, dict(rope_type="linear", factor=2.0)),
    "llama3_8b": (128, 500000.0, 131072, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=8192)),  # all three bands
    "llama3_bands": (64, 10000.0, 128, dict(rope_type="llama3", factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                            original_max_position_embeddings=16)),
    "yarn": (24, 10000.0, 96, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=24)),
    "yarn_mscale_notrunc": (16, 10000.0, 120, dict(rope_type="yarn", factor=6.0, beta_fast=16, beta_slow=2, mscale=0.8,
                                                   mscale_all_dim=0.5, truncate=False,
                                                   original_max_position_embeddings=20)),
    "yarn_attention_factor": (64, 1e6, 4096, dict(rope_type="yarn", factor=2.0, attention_factor=1.3,
                                                  original_max_position_embeddings=2048)),
    "yarn_zero_width_ramp": (16, 10000.0, 128, dict(rope_type="yarn", factor=4.0, beta_fast=4, beta_slow=4,
                                                    truncate=False, original_max_position_embeddings=32)),
    "yarn_ramp_clamped": (16, 10000.0, 4 * 10**9, dict(rope_type="yarn", factor=4.0,
                                                       original_max_position_embeddings=10**9)),
    "yarn_factor_from_lengths": (16, 10000.0, 96, dict(rope_type="yarn", original_max_position_embeddings=32)),
}


@pytest.mark.parametrize("name", ROPE_CASES)
def test_rope_frequencies_match_transformers(name):
    head_dim, theta, max_len, rope = ROPE_CASES[name]
    # transformers insists on a factor when validating; its frequency function then derives a missing
    # one from the lengths, as Kiln does, so the factor is removed after validation.
    params = dict(rope, rope_theta=theta, factor=rope.get("factor", 1.0))
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=64 // head_dim or 1, head_dim=head_dim,
                                      max_position_embeddings=max_len, rope_parameters=params)
    if "factor" not in rope:
        hf_cfg.rope_parameters["factor"] = None
    want, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    cfg = presets.get("tiny", head_dim=head_dim, rope_theta=theta, max_seq_len=max_len,
                      rope_scaling=RopeScaling.from_dict(rope))
    got, got_factor = inv_frequencies(cfg)
    # Both compute in float32 with the same formulas: bit-identical up to torch 2.12, 1.4e-7 relative
    # (one float32 rounding of the power) with torch 2.13 / transformers 5.24. A wrong band, ramp or factor
    # moves frequencies by far more than 1e-6.
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
    assert got_factor == pytest.approx(want_factor, rel=1e-12)


MINIMAL = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)
# config.json files written before transformers 4.5x: no layer_types, tie_word_embeddings,
# query_pre_attn_scalar or head_dim; the family's defaults apply, as transformers' own config classes say.
OLD_CONFIGS = {
    "llama": dict(MINIMAL),
    "gemma2": dict(MINIMAL, sliding_window=13),
    "qwen2": dict(MINIMAL, use_sliding_window=True, sliding_window=9, max_window_layers=2),
    "mistral": dict(MINIMAL, sliding_window=7),
}


@pytest.mark.parametrize("family", OLD_CONFIGS)
def test_config_defaults_of_older_files_are_the_families(family):
    for fields in (OLD_CONFIGS[family], {k: v for k, v in OLD_CONFIGS[family].items() if k != "sliding_window"}):
        cfg = hf.config_from_hf(dict(fields, model_type=family))
        theirs = transformers.AutoConfig.for_model(family, **fields)
        assert cfg.tie_embeddings == theirs.tie_word_embeddings
        # Keys whose defaults differ by family (Gemma2: 8192, head_dim 256, GeLU-tanh, soft-caps 50 and 30).
        assert (cfg.max_seq_len, cfg.dim_head, cfg.norm_eps) == (
            theirs.max_position_embeddings, getattr(theirs, "head_dim", None) or 16, theirs.rms_norm_eps)
        assert cfg.act == hf._ACTS_IN[getattr(theirs, "hidden_activation", None) or theirs.hidden_act]
        assert (cfg.attn_softcap, cfg.final_softcap) == (getattr(theirs, "attn_logit_softcapping", None),
                                                         getattr(theirs, "final_logit_softcapping", None))
        if family != "llama":  # without a sliding_window key: transformers' 4096
            layer_types = getattr(theirs, "layer_types", None) or ["sliding_attention"] * 4  # Mistral: every layer
            assert cfg.layer_windows() == tuple(theirs.sliding_window if t == "sliding_attention" else 0
                                                for t in layer_types)
    cfg = hf.config_from_hf(dict(OLD_CONFIGS[family], model_type=family))
    if family == "gemma2":
        assert cfg.query_pre_attn_scalar == 256 and cfg.dim_head == 256
        assert (cfg.attn_softcap, cfg.final_softcap, cfg.act, cfg.max_seq_len) == (50.0, 30.0, "gelu_tanh", 8192)
        assert cfg.layer_windows() == (13, 0, 13, 0)  # layer 0 slides
    if family == "qwen2":
        assert cfg.layer_windows() == (0, 0, 9, 9)  # from max_window_layers on
    if family == "mistral":
        assert hf.config_from_hf(dict(MINIMAL, model_type=family)).layer_windows() == (4096,) * 4


def test_rope_theta_from_either_key_style():
    v4 = hf.config_from_hf(dict(MINIMAL, model_type="llama", rope_theta=5e5))
    v5 = hf.config_from_hf(dict(MINIMAL, model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert v4.rope_theta == v5.rope_theta == 5e5 and v5.rope_scaling is None
    assert hf.config_from_hf(dict(MINIMAL, model_type="llama")).rope_theta == 10000.0


def test_config_written_says_what_kiln_computes():
    """Fields Kiln leaves implicit are written explicitly: Gemma's query scale defaults to head_dim in
    Kiln (transformers would take 256), and Qwen2's first sliding layer is its max_window_layers."""
    gemma = presets.get("tiny", family="gemma2", head_dim=32, query_pre_attn_scalar=None, sliding_window=8,
                        window_layers=(0,), norm_plus_one=True, sandwich_norm=True, embed_scale=True,
                        tie_embeddings=True)
    written = hf.config_to_hf(gemma)
    assert written["query_pre_attn_scalar"] == 32
    assert written["layer_types"] == ["sliding_attention", "full_attention"]
    qwen = presets.get("tiny", family="qwen2", n_layers=4, qkv_bias=True, sliding_window=8, window_layers=(2, 3))
    written = hf.config_to_hf(qwen)
    assert (written["use_sliding_window"], written["max_window_layers"], written["sliding_window"]) == (True, 2, 8)
    assert hf.config_from_hf(dict(written, layer_types=None)).layer_windows() == (0, 0, 8, 8)


@pytest.mark.parametrize("changes, lost", [
    (dict(sliding_window=16), r"layer_windows=\(16, 16\) \(read back as \(0, 0\)\)"),
    (dict(qkv_bias=True), r"o_bias=False \(read back as True\)"),
    (dict(attn_softcap=30.0), r"attn_softcap=30\.0 \(read back as None\)"),
    (dict(family="mistral", qkv_bias=True, o_bias=True), "qkv_bias=True .*o_bias=True "),
    (dict(family="mistral", sliding_window=8, window_layers=(0,)), r"layer_windows=\(8, 0\)"),
    (dict(family="qwen2", qkv_bias=True, mlp_bias=True), "mlp_bias=True"),
    (dict(family="gemma2", norm_plus_one=True, sandwich_norm=True, embed_scale=False), "embed_scale=False"),
])
def test_config_a_family_cannot_express_is_refused(changes, lost):
    """Writing config.json must not drop a setting the family's file has no key for (a Llama window, a
    Mistral bias, a Gemma model without its embedding scale): transformers would build another model."""
    with pytest.raises(hf.HFFormatError, match=f"{changes.get('family', 'llama')} config cannot express .*{lost}"):
        hf.config_to_hf(presets.get("tiny", **changes))


def test_sharded_checkpoint_with_index(tmp_path):
    model = hf_models.build("llama_mha_bias_untied")
    model.save_pretrained(tmp_path / "src")
    cfg, kiln_model = hf.load(str(tmp_path / "src"))
    hf.save(kiln_model, cfg, str(tmp_path / "sharded"), max_shard_bytes=200_000)
    files = sorted(os.listdir(tmp_path / "sharded"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = {f: load_file(str(tmp_path / "sharded" / f)) for f in files if f.endswith(".safetensors")}
    assert sorted(index["weight_map"].items()) == sorted((n, f) for f, t in shards.items() for n in t)
    sizes = [sum(a.nbytes for a in t.values()) for t in shards.values()]
    assert index["metadata"]["total_size"] == sum(sizes)
    # Each shard stays within the limit (every tensor here is smaller than it), and is filled: the
    # tensor written after a shard's last one would not have fit.
    assert all(size <= 200_000 for size in sizes)
    order = [name for name, _ in hf.hf_tensors(kiln_model, cfg)]
    for k in range(1, len(shards)):
        done, this = (shards[f"model-{j:05d}-of-{len(shards):05d}.safetensors"] for j in (k, k + 1))
        first = min(this, key=order.index)
        assert sum(a.nbytes for a in done.values()) + this[first].nbytes > 200_000
    _, again = hf.load(str(tmp_path / "sharded"))
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(TOKENS))), np.asarray(kiln_model(jnp.asarray(TOKENS))))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"),
                                                                  attn_implementation="eager").float().eval()
    # Same weights and the same (eager) attention as the source model: measured 0.
    np.testing.assert_array_equal(torch_logits(reloaded), torch_logits(model))


@pytest.fixture
def llama_dir(tmp_path):
    hf_models.build("llama_gqa2_tied_llama3").save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_dtype_arguments_take_jax_and_numpy_dtypes(llama_dir, tmp_path):
    """`jnp.bfloat16`, `np.float32` and "bfloat16" mean the same thing to every public dtype argument."""
    by_name = hf.load(str(llama_dir), dtype="bfloat16", param_dtype="float32")
    by_dtype = hf.load(str(llama_dir), dtype=jnp.bfloat16, param_dtype=np.float32)
    assert by_dtype[0] == by_name[0] and by_dtype[0].dtype == "bfloat16" and by_dtype[0].param_dtype == "float32"
    np.testing.assert_array_equal(by_dtype[1](jnp.asarray(TOKENS)), by_name[1](jnp.asarray(TOKENS)))
    cfg, model = hf.load(str(llama_dir), dtype=np.dtype("float32"))
    assert model.layers.attn.q[...].dtype == jnp.float32
    hf.save(model, cfg, str(tmp_path / "half"), dtype=jnp.float16)
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == "float16"
    assert {a.dtype for a in load_file(str(tmp_path / "half" / "model.safetensors")).values()} == {np.dtype(np.float16)}
    assert presets.get("tiny", dtype=jnp.bfloat16).dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype 'int32' is not one of"):
        hf.load(str(llama_dir), dtype=jnp.int32)


def test_tied_checkpoint_that_also_stores_the_lm_head_loads(llama_dir):
    """Some tied checkpoints store lm_head.weight (a copy of the table) anyway: it is not an unmapped tensor."""
    _, before = hf.load(str(llama_dir))
    tensors = load_file(str(llama_dir / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(llama_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg, after = hf.load(str(llama_dir))
    assert cfg.tie_embeddings
    np.testing.assert_array_equal(np.asarray(after(jnp.asarray(TOKENS))), np.asarray(before(jnp.asarray(TOKENS))))
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(llama_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hf.HFFormatError, match="tensors Kiln does not map for model_type 'llama': model.extra.weight$"):
        hf.load(str(llama_dir))


def test_unsupported_model_type_is_named(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt_neox")))
    with pytest.raises(hf.HFFormatError, match="unsupported model_type 'gpt_neox'"):
        hf.load(str(llama_dir))


def test_wrong_shape_tensor_is_named(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=80)))
    with pytest.raises(hf.HFFormatError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\)"):
        hf.load(str(llama_dir))


def test_missing_shard_is_named(tmp_path):
    model = hf_models.build("qwen2_bias_tied")
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    shards = sorted(f for f in os.listdir(tmp_path / "m") if f.endswith(".safetensors"))
    os.remove(tmp_path / "m" / shards[-1])
    with pytest.raises(hf.HFFormatError, match=f"shard {shards[-1]} .* is missing"):
        hf.load(str(tmp_path / "m"))


def test_unsupported_rope_type_is_named(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.HFFormatError, match="unsupported RoPE scaling type 'longrope'"):
        hf.load(str(llama_dir))


def test_kiln_convert_round_trip(tmp_path):
    model = hf_models.build("gemma2")
    model.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "ckpt")]) == 0
    assert cli.main(["convert", "--from-kiln", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), attn_implementation="eager")
    np.testing.assert_array_equal(torch_logits(back.float().eval()), torch_logits(model))  # same weights: measured 0


@pytest.mark.parametrize("kind", ["train", "hf_dir", "byte"])
def test_kiln_convert_exports_the_runs_tokenizer(tmp_path, capsys, kind):
    """An export held the weights alone: `kiln sample --checkpoint=EXPORT` then failed for want of a
    tokenizer. The run's tokenizer goes into the export under the names Kiln's and transformers'
    loaders look for (a trained sentencepiece model as tokenizer.model; a tokenizer directory's files),
    and the export encodes as the run did; the byte tokenizer has no file, and the line says so."""
    from flax import nnx

    from data import spm, tokenizer
    from model.transformer import Transformer
    from test_tokenizer import CORPUS, hf_dir
    from train import checkpoint, modeldir

    run, cfg = tmp_path / "run", presets.get("tiny", vocab_size=400)
    checkpoint.save_params(str(run / "checkpoints"), 3, Transformer(cfg, rngs=nnx.Rngs(0)), cfg)
    names = {"train": str(run / "tokenizer.model"), "byte": "byte"}
    if kind == "train":
        spm.train(CORPUS, names["train"], vocab_size=400, model_type="bpe")
    elif kind == "hf_dir":
        (tmp_path / "tok").mkdir()
        names["hf_dir"] = hf_dir(tmp_path / "tok", ["<|endoftext|>"], {"eos_token": "<|endoftext|>"})
    (run / "config.json").write_text(json.dumps({"data": {"tokenizer": "train" if kind == "train" else names[kind]}}))
    assert cli.main(["convert", "--from-kiln", str(run), "--to-hf", str(tmp_path / "out")]) == 0
    written = sorted(os.listdir(tmp_path / "out"))
    line = capsys.readouterr().out
    if kind == "byte":
        assert written == ["config.json", "model.safetensors"] and "pass --tokenizer=byte" in line
        return
    want = {"train": ["tokenizer.model"], "hf_dir": ["tokenizer.json", "tokenizer_config.json"]}[kind]
    assert written == sorted(["config.json", "model.safetensors", *want]) and ", ".join(want) in line
    text = CORPUS[7]
    assert modeldir.tokenizer_of(str(tmp_path / "out")) == str(tmp_path / "out")
    assert tokenizer.load(str(tmp_path / "out")).encode(text) == tokenizer.load(names[kind]).encode(text)


def test_cli_bad_input_is_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    p = subprocess.run([sys.executable, "-m", "launch.main", "convert", "--from-hf", str(tmp_path / "bad"),
                        "--to", str(tmp_path / "ck")], capture_output=True, text=True)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and "unsupported model_type 'bert'" in p.stderr
    assert not (tmp_path / "ck").exists()
