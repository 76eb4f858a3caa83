"""The shared train step: mesh equivalence, gradient accumulation, token weighting, non-finite skipping."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import presets
from model.sharding import make_mesh, shard_module
from model.transformer import Transformer
from train import losses, optim
from train.step import init_state, make_train_step

OPTIM = ml_collections.ConfigDict(dict(lr=3e-3, schedule="cosine", warmup_steps=3, min_lr_ratio=0.1,
                                       decay_fraction=0.2, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                                       clip_norm=1.0))
CFG = presets.get("tiny", n_kv_heads=2, qkv_bias=True)


def batch(step, rows=8, T=32):
    rng = np.random.RandomState(step)
    tokens = (rng.randint(0, 256, (rows, 1)) + 7 * np.arange(T + 1)) % 256  # learnable: a fixed stride
    mask = (rng.rand(rows, T) > 0.3).astype(np.float32)  # ragged: rows carry different token counts
    seg = np.ones((rows, T), np.int32)
    seg[:, T // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)])[None].repeat(rows, 0)
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask, segment_ids=seg, positions=pos)


def run(mesh_shape=(1, 1, 1), accum=1, steps=20, devices=None):
    mesh = make_mesh(*mesh_shape, devices=devices or jax.devices()[:int(np.prod(mesh_shape))])
    with jax.set_mesh(mesh):
        model = shard_module(Transformer(CFG, rngs=nnx.Rngs(0)), mesh)
        graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
        tx, lr = optim.optimizer(OPTIM, steps, params)
        state = init_state(params, tx, 0)
        step_fn = jax.jit(make_train_step(graphdef, losses.get("next_token", {"z_loss": 1e-4}), tx, lr, accum),
                          donate_argnums=(0,))
        out = []
        for i in range(steps):
            b = batch(i)
            data = {k: jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")))) for k, v in b.items()}
            state, metrics = step_fn(state, frozen, data)
            out.append(jax.device_get(metrics))
    return out, state


@pytest.fixture(scope="module")
def reference():
    return run()


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1)])
def test_mesh_equivalence(reference, mesh_shape):
    ref, _ = reference
    got, _ = run(mesh_shape)
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in ref], rtol=1e-5)
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.5  # it learns


def test_grad_accumulation_equals_big_batch(reference):
    ref, ref_state = reference
    got, state = run(accum=4, mesh_shape=(1, 2, 1))
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in ref], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_loss_is_token_weighted():
    """The step's loss is the mean over loss tokens of the whole batch, not a mean of row means."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    b = {k: jnp.asarray(v) for k, v in batch(0).items()}
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx, lr = optim.optimizer(OPTIM, 10, params)
    _, metrics = jax.jit(make_train_step(graphdef, losses.get("next_token", {}), tx, lr, 2))(
        init_state(params, tx, 0), frozen, b)
    logits = model(b["tokens"], b["positions"], b["segment_ids"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)[..., 0]
    expected = float(jnp.sum(nll * b["loss_mask"]) / jnp.sum(b["loss_mask"]))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert float(metrics["weight"]) == float(b["loss_mask"].sum())


def test_nonfinite_step_is_skipped():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx, lr = optim.optimizer(OPTIM, 10, params)
    step_fn = jax.jit(make_train_step(graphdef, losses.get("next_token", {}), tx, lr))
    state = init_state(params, tx, 0)
    b = {k: jnp.asarray(v) for k, v in batch(0).items()}
    bad = dict(b, loss_mask=b["loss_mask"] * jnp.nan)
    before = jax.tree.map(np.asarray, state.params)
    state, m = step_fn(state, frozen, bad)
    assert bool(m["skipped"]) and int(state.nonfinite_streak) == 1 and int(state.step) == 1
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(x, y)
    state, m = step_fn(state, frozen, dict(b, loss_mask=jnp.zeros_like(b["loss_mask"])))
    assert bool(m["skipped"]) and int(state.nonfinite_streak) == 2  # an all-masked batch never updates
    state, m = step_fn(state, frozen, b)
    assert not bool(m["skipped"]) and int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 2
