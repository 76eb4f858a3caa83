"""The trainer layer's behaviours the other tests left open, each pinned by a number worked out by hand or an
exact equality where the code promises one: the sharding rule table, the step a run builds from its config,
the model settings `peft.*` and `model.param_dtype` give, the reference policy's own weights, damaged
checkpoints set aside, atomic writes of run files."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from launch.config import load_config
from model import presets
from model.config import LoraConfig, PrefixConfig
from model.sharding import logical_to_spec, make_mesh, state_shardings
from model.transformer import Transformer
from train import build, checkpoint, losses, records, trainer
from train.reference import Reference
from test_checkpoint import DATA, damage, run, save_steps  # noqa: F401 (run: a fixture)
from test_train import config


@pytest.fixture(scope="module")
def rules():
    """The rule table a run uses: the config's `mesh.rules` (the defaults of model/sharding.py)."""
    return load_config("configs/pretrain.py:smoke", []).mesh.rules


# Each logical name alone on a dimension of 8 that every mesh axis (2 each) divides: the mesh axes it maps to.
# FSDP shards the batch and the weights' embedding dimension; tensor parallelism shards heads, the MLP hidden
# dimension and the vocabulary (weights and activations alike); everything else is replicated.
LOGICAL_TO_MESH = {
    "batch": ("data", "fsdp"), "embed": "fsdp",
    "vocab": "tensor", "mlp": "tensor", "q_heads": "tensor", "kv_heads": "tensor", "act_mlp": "tensor",
    "act_heads": "tensor", "act_kv_heads": "tensor", "act_vocab": "tensor",
    "layers": None, "head_dim": None, "norm": None, "act_seq": None, "act_embed": None, "cache_seq": None,
    "lora_rank": None, "prefix": None,
}


def test_every_logical_axis_maps_to_its_mesh_axes(rules):
    """A rule sending a logical axis to the wrong mesh axis (or to none) changes no number on one device or
    another mesh, only what each device holds and which collectives run: only the specs show it."""
    assert sorted(name for name, _ in rules) == sorted(LOGICAL_TO_MESH)
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    for name, target in LOGICAL_TO_MESH.items():
        assert logical_to_spec((name,), (8,), mesh, rules) == P(target), name


def test_tiny_models_parameters_are_sharded_fsdp_by_tensor(rules):
    """Every parameter of a 4-layer tiny model (biases on) on a data 1 x fsdp 4 x tensor 2 mesh: the stacked
    layers axis is never sharded (4 layers would divide fsdp 4), norms are replicated, kv heads (2) split over
    tensor (2) like the query heads (4)."""
    cfg = presets.get("tiny", n_layers=4, n_kv_heads=2, qkv_bias=True, o_bias=True, mlp_bias=True)
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = state_shardings(params, make_mesh(1, 4, 2, devices=jax.devices()[:8]), rules)
    specs = {jax.tree_util.keystr(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(shardings)}
    heads, heads_bias = P(None, "fsdp", "tensor", None), P(None, "tensor", None)
    embed_last = P(None, "tensor", None, "fsdp")
    assert specs == {
        "['embed']['table']": P("tensor", "fsdp"), "['lm_head']": P("fsdp", "tensor"),
        "['final_norm']['scale']": P(None), "['layers']['attn_norm']['scale']": P(None, None),
        "['layers']['mlp_norm']['scale']": P(None, None),
        "['layers']['attn']['q']": heads, "['layers']['attn']['k']": heads, "['layers']['attn']['v']": heads,
        "['layers']['attn']['o']": embed_last,
        "['layers']['attn']['q_bias']": heads_bias, "['layers']['attn']['k_bias']": heads_bias,
        "['layers']['attn']['v_bias']": heads_bias, "['layers']['attn']['o_bias']": P(None, "fsdp"),
        "['layers']['mlp']['gate']": P(None, "fsdp", "tensor"), "['layers']['mlp']['up']": P(None, "fsdp", "tensor"),
        "['layers']['mlp']['down']": P(None, "tensor", "fsdp"), "['layers']['mlp']['gate_bias']": P(None, "tensor"),
        "['layers']['mlp']['up_bias']": P(None, "tensor"), "['layers']['mlp']['down_bias']": P(None, "fsdp"),
    }


def recording_shapes(loss_fn, shapes):
    """`loss_fn`, noting the token shape of every batch it is traced with (micro-batches under accumulation)."""
    def wrapped(model, batch, rngs):
        shapes.append(tuple(batch["tokens"].shape))
        return loss_fn(model, batch, rngs)
    return wrapped


def test_a_runs_step_follows_its_configs_schedule_seed_and_accumulation(monkeypatch):
    """`trainer.setup` wires the config into the run: the LR schedule spans `train.steps` updates (linear from
    lr to 0 over 4 steps: lr x 1, 3/4, 1/2, 1/4; a schedule over 5 steps would log 4/5, 3/5, 2/5), the fresh
    model's weights and the step's key are those of `seed`, and `optim.grad_accum` = 2 splits the batch of 8
    rows into micro-batches of 4. A one-layer model on one device: compiling the step is the test's cost."""
    shapes = []
    real_get = losses.get
    monkeypatch.setattr(losses, "get", lambda name, cfg: recording_shapes(real_get(name, cfg), shapes))
    cfg = config("pretrain", "/nonexistent", "--config.seed=3", "--config.train.steps=4", "--config.data.seq_len=16",
                 "--config.model.n_layers=1", "--config.model.d_model=32", "--config.model.d_ff=64",
                 "--config.optim.lr=0.01", "--config.optim.schedule=linear", "--config.optim.warmup_steps=0",
                 "--config.optim.min_lr_ratio=0.0", "--config.optim.grad_accum=2")
    job = trainer.setup(cfg, jax.devices()[:1])
    np.testing.assert_array_equal(np.asarray(job.state.rng), np.asarray(jax.random.key_data(jax.random.key(3))))
    with jax.set_mesh(job.mesh):  # as setup builds it (so the model's eager ops are compiled once)
        fresh = nnx.state(Transformer(job.model_cfg, rngs=nnx.Rngs(3)), nnx.Param)
    for got, want in zip(jax.tree.leaves(job.state.params), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    B, T = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, 200, (B, T + 1)).astype(np.int32)
    batch = job.global_batch(dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((B, T), np.float32),
                                  positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
                                  segment_ids=np.ones((B, T), np.int32)))
    lrs = []
    for _ in range(4):
        job.state, metrics = job.step_fn(job.state, job.frozen, batch)
        lrs.append(float(metrics["lr"]))
    np.testing.assert_allclose(lrs, [0.01, 0.0075, 0.005, 0.0025], rtol=1e-6)
    assert set(shapes) == {(B // 2, T)}


class Scale(nnx.Module):
    """A one-weight model: what the reference computes is w * x per row."""

    def __init__(self):
        self.w = nnx.Param(jnp.asarray(2.0))


def test_a_reference_keeps_its_own_copy_of_the_starting_weights():
    """Every train step donates (deletes) the policy's trainable arrays: the reference holds a copy, so it still
    computes with the starting weights afterwards (sharing the arrays crashed the first DPO step after it)."""
    graphdef, params, frozen = nnx.split(Scale(), nnx.Param, ...)
    ref = Reference(graphdef, params, frozen, chunks=2, fields=lambda model, b: {"ref": model.w[...] * b["x"]})
    jax.tree.map(lambda a: a.delete(), params)
    np.testing.assert_array_equal(np.asarray(ref({"x": jnp.arange(4.0)})["ref"]), [0.0, 2.0, 4.0, 6.0])


def test_a_failed_atomic_write_leaves_the_old_file_whole_and_no_temporary_one(tmp_path):
    """config.json and the like are written through a temporary file and a rename: a write that fails half-way
    (here text UTF-8 cannot encode, a lone surrogate) leaves the earlier file as it was, not truncated."""
    path = tmp_path / "config.json"
    path.write_text("old\n")
    with pytest.raises(UnicodeEncodeError):
        records.write_text_atomic(str(path), "new \ud800\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["config.json"]
    records.write_json_atomic(str(path), {"b": 1, "a": [2]})
    assert path.read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n' and os.listdir(tmp_path) == ["config.json"]


def test_every_damaged_later_step_is_set_aside_not_only_the_latest(run, tmp_path):
    """Steps 2 and 3 both damaged: the restore falls back to step 1 and moves both to checkpoints.corrupt with a
    warning each. A step left behind in checkpoints/ would stay the latest one, tried (and failing) again on
    every later resume, and retention would count it among the steps it keeps."""
    run_dir = str(tmp_path)
    states = save_steps(run_dir, run, [1, 2, 3])
    damage(run_dir, 3, "random bytes")
    damage(run_dir, 2, "truncated")
    warnings = []
    ckpt = checkpoint.Checkpointer(run_dir)
    step, state, data = ckpt.restore_latest(run.state, warn=warnings.append)
    assert step == 1 and data == DATA
    np.testing.assert_array_equal(np.asarray(state.params["embed"]["table"][...]),
                                  np.asarray(states[1].params["embed"]["table"][...]))
    assert [w.split("checkpoint step ")[1][0] for w in warnings] == ["3", "2"]
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["1"] and ckpt.latest_step() == 1
    assert sorted(m.split("-")[0] for m in os.listdir(os.path.join(run_dir, "checkpoints.corrupt"))) == ["2", "3"]


def test_peft_settings_reach_the_models_config():
    """Every `peft.*` value a user sets is the one the adapters get: a LoRA alpha or rsLoRA flag left at its
    default trains with another scale (alpha / rank = 1 here instead of 24 / sqrt(4) = 12) without a word."""
    cfg = config("sft", "/nonexistent", "--config.peft.method=lora", "--config.peft.lora_rank=4",
                 "--config.peft.lora_alpha=24", "--config.peft.lora_dropout=0.25", "--config.peft.lora_rslora=true",
                 "--config.peft.lora_targets=('v','down')", "--config.peft.lora_init=gaussian")
    assert build.peft_configs(cfg) == {"lora": LoraConfig(rank=4, alpha=24.0, dropout=0.25, targets=("v", "down"),
                                                          rslora=True, init="gaussian"), "prefix": None}
    for method, hidden, prefix in (("prompt_tuning", [], PrefixConfig(kind="prompt", num_tokens=7)),
                                   ("prefix_tuning", ["--config.peft.prefix_hidden=12"],
                                    PrefixConfig(kind="prefix", num_tokens=7, hidden=12))):
        cfg = config("sft", "/nonexistent", f"--config.peft.method={method}", "--config.peft.num_virtual_tokens=7",
                     *hidden)
        assert build.peft_configs(cfg) == {"lora": None, "prefix": prefix}


def test_a_loaded_model_takes_the_runs_parameter_dtype():
    """`model.param_dtype=bfloat16` on a float32 checkpoint: every loaded weight is stored as bfloat16 (its float32
    value rounded), not kept in float32 under a config that says bfloat16."""
    model = Transformer(presets.get("tiny", n_layers=1), rngs=nnx.Rngs(0))
    cast = build.with_config(model, model.cfg.replace(param_dtype="bfloat16"), seed=0)
    before, after = nnx.state(model, nnx.Param), nnx.state(cast, nnx.Param)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x.astype(jnp.bfloat16)))
