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

import hf_models
from launch import main as cli
from model import hf

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
    assert err <= 1e-4


def test_round_trip_through_transformers(case, tmp_path):
    name, _, path, ref = case
    cfg, model = hf.load(path)
    hf.save(model, cfg, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert type(reloaded).__name__ == hf.ARCHITECTURES[cfg.family]
    assert rel_err(torch_logits(reloaded.float().eval()), ref) <= 1e-5
    cfg2, _ = hf.load(str(tmp_path / "out"))
    assert cfg2 == cfg


def test_bf16_load_close_to_fp32(case):
    name, _, path, ref = case
    cfg, model = hf.load(path, dtype="bfloat16")
    logits = model(jnp.asarray(TOKENS))
    assert model.layers.attn.q[...].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    assert rel_err(logits, ref) < 0.05


def test_sharded_checkpoint_with_index(tmp_path):
    model = hf_models.build("llama_mha_bias_untied")
    model.save_pretrained(tmp_path / "src")
    cfg, kiln_model = hf.load(str(tmp_path / "src"))
    hf.save(kiln_model, cfg, str(tmp_path / "sharded"), max_shard_bytes=200_000)
    files = sorted(os.listdir(tmp_path / "sharded"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    _, again = hf.load(str(tmp_path / "sharded"))
    np.testing.assert_array_equal(np.asarray(again(jnp.asarray(TOKENS))), np.asarray(kiln_model(jnp.asarray(TOKENS))))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded")).float().eval()
    assert rel_err(torch_logits(reloaded), torch_logits(model)) <= 1e-5


@pytest.fixture
def llama_dir(tmp_path):
    hf_models.build("llama_gqa2_tied_llama3").save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


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
    assert rel_err(torch_logits(back.float().eval()), torch_logits(model)) <= 1e-5


def test_cli_bad_input_is_one_line(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    p = subprocess.run([sys.executable, "-m", "launch.main", "convert", "--from-hf", str(tmp_path / "bad"),
                        "--to", str(tmp_path / "ck")], capture_output=True, text=True)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr and "unsupported model_type 'bert'" in p.stderr
    assert not (tmp_path / "ck").exists()
