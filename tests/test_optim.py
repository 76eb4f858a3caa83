"""LR schedules, which parameters get weight decay, AdamW's arithmetic and global-norm clipping.

Expected values are worked out by hand in the comments (lr 0.4, warmup 4, 20 steps, min_lr_ratio 0.1
unless said otherwise), so a changed constant, a shifted phase or an off-by-one shows as a number.
The optimizer is driven only through `tx.init` / `tx.update` and its state is searched by name
('mu', 'nu', 'count'), so wrappers such as `optax.inject_hyperparams` may change its structure.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from model import presets
from model.transformer import Transformer
from train import optim


def cfg(**overrides):
    base = dict(lr=0.4, schedule="constant", warmup_steps=4, min_lr_ratio=0.1, decay_fraction=0.2,
                weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=0.0)
    return ml_collections.ConfigDict(dict(base, **overrides))


def values(schedule, steps):
    return [float(schedule(s)) for s in steps]


# float32 schedule arithmetic: errors measured below 3e-8 on these values.
TOL = dict(rtol=1e-6, atol=1e-7)

# Warmup is linear from 0: lr * step / warmup = 0.1 * step for lr 0.4, warmup 4.
WARMUP = {0: 0.0, 1: 0.1, 2: 0.2, 3: 0.3}


@pytest.mark.parametrize("name", ["constant", "cosine", "linear", "wsd"])
def test_every_schedule_warms_up_linearly_from_zero(name):
    lr = optim.schedule(cfg(schedule=name), 20)
    np.testing.assert_allclose(values(lr, WARMUP), list(WARMUP.values()), **TOL)
    np.testing.assert_allclose(float(lr(4)), 0.4, **TOL)  # the end of warmup is the peak for every schedule


def test_constant():
    lr = optim.schedule(cfg(schedule="constant"), 20)
    np.testing.assert_allclose(values(lr, [4, 10, 19, 20, 100]), [0.4] * 5, **TOL)


def test_cosine_decays_to_the_floor():
    # After warmup, t = step - 4 runs over rest = 16 steps:
    # lr(t) = 0.4 * (0.9 * (1 + cos(pi t / 16)) / 2 + 0.1), floor 0.4 * 0.1 = 0.04.
    lr = optim.schedule(cfg(schedule="cosine"), 20)
    expected = {
        4: 0.4,
        8: 0.4 * (0.45 * (1 + 0.7071067811865476) + 0.1),  # t=4: cos(pi/4) -> 0.3472792
        12: 0.4 * (0.45 + 0.1),  # t=8, halfway: cos(pi/2) = 0 -> 0.22
        16: 0.4 * (0.45 * (1 - 0.7071067811865476) + 0.1),  # t=12 -> 0.0927208
        20: 0.04,  # end of the run: the floor lr * min_lr_ratio
        35: 0.04,  # beyond the end: stays at the floor
    }
    np.testing.assert_allclose(values(lr, expected), list(expected.values()), **TOL)


def test_linear_decays_to_the_floor():
    # 0.4 -> 0.04 over the 16 steps after warmup: -0.0225 per step.
    lr = optim.schedule(cfg(schedule="linear"), 20)
    expected = {4: 0.4, 8: 0.31, 12: 0.22, 19: 0.0625, 20: 0.04, 35: 0.04}
    np.testing.assert_allclose(values(lr, expected), list(expected.values()), **TOL)
    # min_lr_ratio 0 (annealing) ends at exactly zero.
    lr0 = optim.schedule(cfg(schedule="linear", min_lr_ratio=0.0), 20)
    np.testing.assert_allclose(values(lr0, [12, 20, 30]), [0.2, 0.0, 0.0], **TOL)


def test_wsd_warmup_stable_decay():
    # decay_fraction 0.2 of 20 steps: the last 4 steps decay, 0.4 -> 0.04 by -0.09 per step;
    # stable from the end of warmup (4) to step 16.
    lr = optim.schedule(cfg(schedule="wsd"), 20)
    expected = {4: 0.4, 10: 0.4, 15: 0.4, 16: 0.4, 17: 0.31, 18: 0.22, 19: 0.13, 20: 0.04, 30: 0.04}
    np.testing.assert_allclose(values(lr, expected), list(expected.values()), **TOL)
    # decay_fraction 0.5 of 40 steps, warmup 4: stable 4..20, then 0.4 -> 0.04 over 20 steps (-0.018 per step).
    lr = optim.schedule(cfg(schedule="wsd", decay_fraction=0.5), 40)
    expected = {19: 0.4, 20: 0.4, 25: 0.31, 30: 0.22, 40: 0.04}
    np.testing.assert_allclose(values(lr, expected), list(expected.values()), **TOL)
    # A decay shorter than one step is rounded up to one step: 20 * 0.01 = 0.2 -> 1.
    lr = optim.schedule(cfg(schedule="wsd", decay_fraction=0.01), 20)
    np.testing.assert_allclose(values(lr, [18, 19, 20]), [0.4, 0.4, 0.04], **TOL)
    # A fractional decay length rounds to the nearest step: 20 * 0.23 = 4.6 -> 5 steps (-0.072 per step
    # from step 15), 20 * 0.21 = 4.2 -> 4 steps (from step 16, as above).
    lr = optim.schedule(cfg(schedule="wsd", decay_fraction=0.23), 20)
    np.testing.assert_allclose(values(lr, [15, 16, 20]), [0.4, 0.328, 0.04], **TOL)
    lr = optim.schedule(cfg(schedule="wsd", decay_fraction=0.21), 20)
    np.testing.assert_allclose(values(lr, [16, 17, 20]), [0.4, 0.31, 0.04], **TOL)
    # decay_fraction 1 without warmup: no stable phase, a linear decay from step 0 (-0.036 per step over 10).
    lr = optim.schedule(cfg(schedule="wsd", decay_fraction=1.0, warmup_steps=0), 10)
    np.testing.assert_allclose(values(lr, [0, 1, 5, 10]), [0.4, 0.364, 0.22, 0.04], **TOL)
    # A decay longer than what the warmup leaves (10 steps asked, 6 left after warmup 4) is cut to those 6
    # steps (-0.06 per step), so the run still ends at the floor rather than at 0.184.
    lr = optim.schedule(cfg(schedule="wsd", decay_fraction=1.0), 10)
    np.testing.assert_allclose(values(lr, [3, 4, 5, 7, 10]), [0.3, 0.4, 0.34, 0.22, 0.04], **TOL)


def test_warmup_edge_cases():
    # No warmup: the peak from step 0.
    lr = optim.schedule(cfg(schedule="cosine", warmup_steps=0), 20)
    np.testing.assert_allclose(values(lr, [0, 10, 20]), [0.4, 0.22, 0.04], **TOL)  # t/20 = 0, 1/2, 1
    # Warmup longer than the run is cut to the run: 0.4 * step / 10.
    lr = optim.schedule(cfg(schedule="constant", warmup_steps=50), 10)
    np.testing.assert_allclose(values(lr, [0, 5, 10, 20]), [0.0, 0.2, 0.4, 0.4], **TOL)
    # Warmup as long as the run: nothing is left to decay over, and nothing breaks.
    lr = optim.schedule(cfg(schedule="linear", warmup_steps=10), 10)
    np.testing.assert_allclose(values(lr, [5, 10, 11]), [0.2, 0.4, 0.04], **TOL)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="schedule"):
        optim.schedule(cfg(schedule="exponential"), 20)


# -- the optimizer ----------------------------------------------------------------------------

def adam_state(opt_state):
    """The Adam moments node (the one with `mu` and `nu`) wherever wrappers put it."""
    nodes = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu"))
             if hasattr(x, "mu") and hasattr(x, "nu")]
    assert len(nodes) == 1, nodes
    return nodes[0]


def counts(opt_state):
    """Every step counter in the optimizer state (Adam's, the schedule's, ...)."""
    return [int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
            if any(getattr(k, "name", None) == "count" for k in path)]


def vec(*xs, axes=("embed", "mlp")):
    """A [1, n] matrix parameter (weight decay applies), or an [n] vector one with axes ("norm",)."""
    x = jnp.asarray(xs, jnp.float32)
    return nnx.Param(x if len(axes) == 1 else x[None], axes=axes)


def apply(tx, params, grads_list):
    """Params and optimizer state after one `tx.update` per gradient tree (jitted: one compile, not one per op)."""
    @jax.jit
    def run(params, grads_list):
        state = tx.init(params)
        for grads in grads_list:
            updates, state = tx.update(grads, state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params, state
    return run(params, grads_list)


def as_dict(state):
    """{"['layers']['attn']['q']": array, ...} for an nnx.State of parameters."""
    return {jax.tree_util.keystr(path).removesuffix(".value"): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def grads_like(params, fill=0.0):
    return jax.tree.map(lambda p: jnp.full_like(p, fill), params)


DECAYED = ("['embed']['table']", "['lm_head']", "['layers']['attn']['q']", "['layers']['attn']['k']",
           "['layers']['attn']['v']", "['layers']['attn']['o']", "['layers']['mlp']['gate']",
           "['layers']['mlp']['up']", "['layers']['mlp']['down']")
NORMS = ("['final_norm']['scale']", "['layers']['attn_norm']['scale']", "['layers']['mlp_norm']['scale']")
BIASES = ("['layers']['attn']['q_bias']", "['layers']['attn']['k_bias']", "['layers']['attn']['v_bias']",
          "['layers']['attn']['o_bias']", "['layers']['mlp']['gate_bias']", "['layers']['mlp']['up_bias']",
          "['layers']['mlp']['down_bias']")


def one_decay_step(**model_overrides):
    """(params before, params after) one AdamW step with zero gradients: only weight decay moves anything.

    With g = 0 the moments stay 0 and AdamW's update is -lr * (0 / (0 + eps) + wd * p) = -lr * wd * p,
    here 0.1 * 0.5 = 0.05 of each decayed parameter; undecayed ones get exactly 0.
    """
    model_cfg = presets.get("tiny", qkv_bias=True, o_bias=True, mlp_bias=True, **model_overrides)
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    # Distinct non-zero values everywhere (biases and norm scales start at 0 / 1), so any decay shows.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), abstract)
    tx = optim.optimizer(cfg(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=1.0), 10, params)
    after, _ = apply(tx, params, [grads_like(params)])
    return as_dict(params), as_dict(after)


@pytest.fixture(scope="module")
def decay_step():
    return one_decay_step()


def test_weight_decay_shrinks_matrices_by_lr_times_wd(decay_step):
    before, after = decay_step
    for name in DECAYED:
        # p - 0.05 p in float32: one rounding, measured relative error < 1.2e-7.
        np.testing.assert_allclose(after[name], 0.95 * before[name], rtol=3e-7, err_msg=name)


def test_no_weight_decay_on_norm_scales(decay_step):
    before, after = decay_step
    for name in NORMS:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_no_weight_decay_on_biases(decay_step):
    """Biases are vectors per head, [H, D] for q/k/v: they must not be decayed either."""
    before, after = decay_step
    decayed = [name for name in BIASES if not np.array_equal(after[name], before[name])]
    assert not decayed, f"weight decay applied to biases: {decayed}"


def test_every_parameter_is_classified(decay_step):
    """The lists above cover the whole model, so a new parameter kind gets a decision here."""
    before, _ = decay_step
    assert set(before) == set(DECAYED + NORMS + BIASES)


def test_tied_embedding_table_is_decayed():
    before, after = one_decay_step(tie_embeddings=True)
    assert "['lm_head']" not in before
    np.testing.assert_allclose(after["['embed']['table']"], 0.95 * before["['embed']['table']"], rtol=3e-7)


def test_weight_decay_follows_the_schedule():
    """Zero gradients, wd 1: step k multiplies a matrix by (1 - lr_k) with lr_k = 0.1 k during warmup."""
    params = nnx.State({"w": vec(1.0, -2.0)})
    tx = optim.optimizer(cfg(weight_decay=1.0), 20, params)
    after, state = apply(tx, params, [grads_like(params)] * 4)
    # 1 * (1 - 0) * (1 - 0.1) * (1 - 0.2) * (1 - 0.3) = 0.504
    np.testing.assert_allclose(np.asarray(after["w"][...]), [[0.504, -1.008]], rtol=1e-6)
    assert set(counts(state)) == {4}


def test_adamw_two_steps_by_hand():
    """b1 = 0.9, b2 = 0.95, lr 0.1 constant, no decay; gradients 1 then 3 on one weight, -2 then -2 on another.

    step 1: mu = 0.1 g, nu = 0.05 g^2; bias-corrected mu / sqrt(nu) = g / |g|: the update is -0.1 * sign(g).
    step 2 (g1 = 1, g2 = 3): mu = 0.09 + 0.3 = 0.39, nu = 0.0475 + 0.45 = 0.4975;
      mu_hat = 0.39 / 0.19 = 2.0526316, nu_hat = 0.4975 / 0.0975 = 5.1025641, update = -0.1 * 0.9086921.
    step 2 (g = -2 twice): the ratio stays -1, update +0.1.
    """
    params = nnx.State({"w": vec(0.0, 0.0)})
    tx = optim.optimizer(cfg(lr=0.1, warmup_steps=0, weight_decay=0.3), 10, params)
    # weight decay 0.3 on w: step 1 decays 0 (p = 0); step 2 adds -0.1 * 0.3 * p1.
    g1 = nnx.State({"w": vec(1.0, -2.0)})
    g2 = nnx.State({"w": vec(3.0, -2.0)})
    after, state = apply(tx, params, [g1, g2])
    p1 = np.array([-0.1, 0.1])
    p2 = p1 + np.array([-0.1 * 0.9086921397, 0.1]) - 0.1 * 0.3 * p1
    np.testing.assert_allclose(np.asarray(after["w"][...])[0], p2, rtol=1e-6)
    adam = adam_state(state)
    np.testing.assert_allclose(np.asarray(adam.mu["w"][...])[0], [0.39, -0.2 * 0.9 - 0.2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adam.nu["w"][...])[0], [0.4975, 0.95 * 0.2 + 0.2], rtol=1e-6)
    assert set(counts(state)) == {2}


def test_adam_hyperparameters_come_from_the_config():
    """b1 = 0.5, b2 = 0.75, eps = 0.5 (all far from optax's defaults), lr 0.1, gradients 2 then 4.

    step 1: mu = 0.5 * 2 = 1, nu = 0.25 * 4 = 1; mu_hat = 1 / 0.5 = 2, nu_hat = 1 / 0.25 = 4;
      update = -0.1 * 2 / (sqrt(4) + 0.5) = -0.08.
    step 2: mu = 0.5 + 0.5 * 4 = 2.5, nu = 0.75 + 0.25 * 16 = 4.75; mu_hat = 2.5 / 0.75 = 3.3333333,
      nu_hat = 4.75 / 0.4375 = 10.857143; update = -0.1 * 3.3333333 / (3.2950179 + 0.5) = -0.0878345.
    """
    params = nnx.State({"w": vec(0.0)})
    tx = optim.optimizer(cfg(lr=0.1, warmup_steps=0, b1=0.5, b2=0.75, eps=0.5), 10, params)
    after, state = apply(tx, params, [nnx.State({"w": vec(2.0)}), nnx.State({"w": vec(4.0)})])
    np.testing.assert_allclose(float(after["w"][...][0, 0]), -0.08 - 0.0878344565, rtol=1e-6)
    np.testing.assert_allclose(float(adam_state(state).mu["w"][...][0, 0]), 2.5, rtol=1e-6)
    np.testing.assert_allclose(float(adam_state(state).nu["w"][...][0, 0]), 4.75, rtol=1e-6)


@pytest.mark.parametrize("clip_norm, grads, expected_g", [
    # global norm sqrt(3^2 + 4^2) = 5 over BOTH leaves, clipped to 1: every gradient times 1/5.
    (1.0, (3.0, 4.0), (0.6, 0.8)),
    # global norm 0.5 is under the threshold: unchanged.
    (1.0, (0.3, 0.4), (0.3, 0.4)),
    # clip_norm 0 (or negative, or None) turns clipping off.
    (0.0, (3.0, 4.0), (3.0, 4.0)),
    (-1.0, (3.0, 4.0), (3.0, 4.0)),
    (None, (3.0, 4.0), (3.0, 4.0)),
])
def test_global_norm_clipping(clip_norm, grads, expected_g):
    """Adam's update is scale-free, so clipping shows in its first moment: mu = (1 - b1) * clipped g."""
    params = nnx.State({"a": vec(0.0), "b": vec(0.0, axes=("norm",))})
    tx = optim.optimizer(cfg(clip_norm=clip_norm), 10, params)
    g = nnx.State({"a": vec(grads[0]), "b": vec(grads[1], axes=("norm",))})
    _, state = apply(tx, params, [g])
    mu = adam_state(state).mu
    np.testing.assert_allclose([float(mu["a"][...].ravel()[0]), float(mu["b"][...].ravel()[0])],
                               [0.1 * expected_g[0], 0.1 * expected_g[1]], rtol=1e-6)
