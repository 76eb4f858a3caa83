"""RL losses by hand (GAE, group advantages, clipping, KL estimators, aggregation), GRPO's zero loss
with a non-zero gradient, and the grpo / ppo smoke runs: metrics logged, resume exact."""
import json
import os
import re
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from model import presets
from model.transformer import Transformer
from launch.config import ConfigError
from train import build, checkpoint, flops, preflight, rewards, rollout, trainer
from train.losses import rl
from train.rollout import token_rows
from test_train import config as stage_config, rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARD = f"--config.rollout.reward={os.path.join(ROOT, 'tests/rl_reward.py')}:digits"


def gae_by_loop(r, v, gamma, lam):
    """GAE of one episode, as written in the paper: a backward loop over A_t = δ_t + γλ A_{t+1}."""
    adv, last, T = np.zeros(len(r)), 0.0, len(r)
    for t in reversed(range(T)):
        next_v = v[t + 1] if t + 1 < T else 0.0
        last = r[t] + gamma * next_v - v[t] + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_torchtune_vector_and_the_paper_loop():
    adv, ret = rl.gae(jnp.array([0.0, 0, 0, 1]), jnp.array([0.0, 0, 0, 1]), jnp.ones(4), gamma=0.9, lam=0.95)
    np.testing.assert_allclose(adv, [0.6579, 0.7695, 0.9, 0.0], atol=1e-4)
    np.testing.assert_allclose(ret, np.asarray(adv) + [0, 0, 0, 1], atol=1e-6)
    # A batch whose rows end at different tokens: each row equals its episode alone, zeros after it.
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    lengths = [7, 4, 1]
    mask = (np.arange(7)[None] < np.array(lengths)[:, None]).astype(np.float32)
    adv, ret = rl.gae(r, v, mask, gamma=0.99, lam=0.9)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(adv[i, :n], gae_by_loop(r[i, :n], v[i, :n], 0.99, 0.9), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret[i, :n], gae_by_loop(r[i, :n], v[i, :n], 0.99, 0.9) + v[i, :n], rtol=1e-5,
                                   atol=1e-6)
        assert not np.any(adv[i, n:]) and not np.any(ret[i, n:])


def test_group_advantages_grpo_dr_grpo_and_rloo():
    np.testing.assert_allclose(rl.group_advantages(jnp.array([1.0, 0, 0, 1]), 4), [0.8659, -0.8659, -0.8659, 0.8659],
                               atol=1e-4)
    r = jnp.array([1.0, 2, 3, 5, 5, 5])  # two groups of 3; the second all equal: no signal
    np.testing.assert_allclose(rl.group_advantages(r, 3), [-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(rl.group_advantages(r, 3, method="dr_grpo"), [-1, 0, 1, 0, 0, 0])
    # RLOO: r_i minus the mean of the other two.
    np.testing.assert_allclose(rl.group_advantages(r, 3, method="rloo"), [1 - 2.5, 2 - 2, 3 - 1.5, 0, 0, 0])
    with pytest.raises(ValueError, match="group_size"):
        rl.group_advantages(r, 4)


def test_clipped_policy_loss_cases():
    logp = jnp.log(jnp.array([1.5, 0.5, 1.5, 0.5, 1.1]))  # ratios against old log-probs 0
    adv = jnp.array([1.0, 1.0, -1.0, -1.0, 2.0])
    loss, clipped = rl.clipped_policy_loss(logp, jnp.zeros(5), adv, clip_low=0.2, clip_high=0.2)
    # A > 0: the gain stops at 1 + ε; a ratio below 1 − ε keeps its (worse) unclipped value.
    # A < 0: the ratio above 1 + ε keeps its unclipped (worse) value; below 1 − ε it stops at 1 − ε.
    np.testing.assert_allclose(loss, [-1.2, -0.5, 1.5, 0.8, -2.2], rtol=1e-6)
    assert clipped.tolist() == [True, False, False, True, False]
    grads = jax.grad(lambda lp: rl.clipped_policy_loss(lp, jnp.zeros(5), adv, clip_low=0.2, clip_high=0.2)[0].sum())(logp)
    assert grads[0] == 0 and grads[3] == 0 and grads[1] != 0 and grads[2] != 0
    # Clip-higher (DAPO): ε_high = 0.28 lets a positive advantage grow further.
    loss, _ = rl.clipped_policy_loss(logp, jnp.zeros(5), adv, clip_low=0.2, clip_high=0.28)
    np.testing.assert_allclose(loss[0], -1.28, rtol=1e-6)


def test_value_loss_kl_estimators_and_aggregation():
    v, old, ret = jnp.array([1.0, 0.0]), jnp.array([0.5, 0.0]), jnp.array([0.0, 1.0])
    # Row 0: unclipped (1 - 0)^2 = 1, clipped (0.5 + 0.2)^2 = 0.49: max 1; row 1: both 1.
    np.testing.assert_allclose(rl.clipped_value_loss(v, old, ret, clip=0.2), [0.5, 0.5])
    # V hits the return but moved 0.5 from V_old: the clipped estimate (0.7) is further, and counts.
    np.testing.assert_allclose(rl.clipped_value_loss(jnp.array([1.0]), jnp.array([0.5]), jnp.array([1.0]), clip=0.2),
                               [0.5 * 0.3 ** 2], rtol=1e-5)
    np.testing.assert_allclose(rl.clipped_value_loss(jnp.array([1.0]), jnp.array([0.5]), jnp.array([1.0]), clip=0.0),
                               [0.0])
    logp, ref = jnp.log(jnp.array([0.5, 0.2])), jnp.log(jnp.array([0.25, 0.4]))
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k1"), [np.log(2), np.log(0.5)], rtol=1e-6)
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k3"), [0.5 - np.log(0.5) - 1, 2 - np.log(2) - 1], rtol=1e-6)
    per_token = jnp.array([[1.0, 2, 3, 9], [4, 0, 0, 9]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert [float(x) for x in rl.aggregate(per_token, mask, "grpo", 4)] == [2 + 4, 2]
    assert [float(x) for x in rl.aggregate(per_token, mask, "dapo", 4)] == [10, 4]
    assert [float(x) for x in rl.aggregate(per_token, mask, "dr_grpo", 4)] == [10, 8]


def test_adaptive_kl_coefficient():
    # KL 50% above target: the error clips at +20%, scaled by samples / horizon.
    assert rl.adaptive_kl_coef(0.1, 9.0, 6.0, 512, 10000) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    assert rl.adaptive_kl_coef(0.1, 5.4, 6.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert rl.adaptive_kl_coef(0.1, 0.0, 6.0, 1000, 1000) == pytest.approx(0.08)


def tiny_batch(advantages):
    cfg = presets.get("tiny").replace(vocab_size=64)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.array(np.random.default_rng(0).integers(3, 64, (4, 9)), jnp.int32)
    mask = jnp.ones((4, 8), jnp.int32).at[:, :3].set(0)  # three prompt targets, five reply targets
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": jnp.tile(jnp.arange(8), (4, 1)),
             "segment_ids": jnp.ones((4, 8), jnp.int32), "loss_mask": mask,
             "advantages": jnp.asarray(advantages, jnp.float32)[:, None] * mask}
    return model, batch


def loss_cfg(**kw):
    return ConfigDict(dict(dict(beta=0.0, kl_estimator="k3", clip_eps_low=0.2, clip_eps_high=0.2, aggregation="grpo",
                                value_coef=0.1, value_clip=0.2, temperature=1.0, max_len=8), **kw))


def test_grpo_with_beta_0_and_one_update_has_zero_loss_and_a_gradient():
    model, batch = tiny_batch(rl.group_advantages(jnp.array([1.0, 0, 0, 1]), 4))
    loss_fn = rl.make_grpo(loss_cfg())
    graphdef, params = nnx.split(model)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch, None),
                                                        has_aux=True))(params)
    assert float(loss) == 0.0 and float(metrics["ratio"]) == pytest.approx(4.0)  # ratio 1 x weight 4
    assert float(jax.tree.reduce(lambda a, g: a + jnp.sum(jnp.abs(g)), grads, 0.0)) > 1e-3
    # The gradient is that of -A * log-prob, per-reply mean over its tokens.
    logps = lambda p: rl.token_logps(nnx.merge(graphdef, p), batch, 1.0)[0]  # noqa: E731
    by_hand = jax.jit(jax.grad(lambda p: -jnp.sum(jnp.sum(batch["advantages"] * logps(p), axis=1) / 5)))(params)
    np.testing.assert_allclose(grads["embed"]["table"][...], by_hand["embed"]["table"][...], atol=1e-6)
    # Old log-probs from elsewhere (mu > 1): a changed policy has a ratio away from 1 and a loss.
    old = rl.token_logps(model, batch, 1.0)[0] + 0.1 * jnp.asarray(np.random.default_rng(1).normal(size=(4, 8)))
    loss, _ = loss_fn(model, dict(batch, old_logps=old), None)
    assert float(loss) != 0.0


def test_token_rows_mask_the_reply_and_truncated_replies():
    replies = [{"token_ids": [7, 8, 2], "finish_reason": "stop"}, {"token_ids": [9, 9, 9, 9], "finish_reason": "length"}]
    out = token_rows([[1, 5, 6]], replies, 2, 8, 0, mask_truncated=True)
    assert out["tokens"][0].tolist() == [1, 5, 6, 7, 8, 0, 0, 0] and out["targets"][0].tolist() == [5, 6, 7, 8, 2, 0, 0, 0]
    assert out["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0] and not out["loss_mask"][1].any()
    assert token_rows([[1, 5, 6]], replies, 2, 8, 0, False)["loss_mask"][1].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    # Prompt and longest reply take 7 tokens: 6 inputs fill a row of seq_len 6 exactly, 5 do not fit.
    assert token_rows([[1, 5, 6]], replies, 2, 6, 0, False)["targets"][1].tolist() == [5, 6, 9, 9, 9, 9]
    with pytest.raises(ValueError, match="data.seq_len=5"):
        token_rows([[1, 5, 6]], replies, 2, 5, 0, False)


def test_a_rollout_whose_replies_are_all_masked_as_truncated_is_named():
    """With rollout.mask_truncated, a rollout whose every reply ran to max_new_tokens gave the trainer a batch
    without loss tokens, reported as a data source's masks; one reply that ended is enough to go on."""
    ro = SimpleNamespace(mask_truncated=True, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"rollout 3: all 2 replies ran to rollout.max_new_tokens=4 and "
                                         r"rollout.mask_truncated=true drops them all"):
        rollout.check_truncation(np.array([True, True]), ro, 3)
    rollout.check_truncation(np.array([True, False]), ro, 3)
    rollout.check_truncation(np.array([True, True]), SimpleNamespace(mask_truncated=False, max_new_tokens=4), 3)


def test_python_reward_function_and_a_bad_one(tmp_path):
    score = rewards.scorer(f"{os.path.join(ROOT, 'tests/rl_reward.py')}:digits")
    np.testing.assert_allclose(score([[]] * 2, ["a1", "22"], ["", ""]), [0.5, 1.0])
    # MODULE:FUNCTION imports an installed module (the tests' directory is on the path under pytest).
    np.testing.assert_allclose(rewards.scorer("rl_reward:digits")([[]] * 2, ["a1", "22"], ["", ""]), [0.5, 1.0])
    with pytest.raises(ValueError, match="cannot load reward function 'digits' from 'no_such_module'"):
        rewards.scorer("no_such_module:digits")
    with pytest.raises(ValueError, match="cannot load reward function 'nope'"):
        rewards.scorer(f"{os.path.join(ROOT, 'tests/rl_reward.py')}:nope")
    # One score per reply, or a clear error (not a misaligned batch of advantages later).
    (tmp_path / "short.py").write_text("def first_only(prompts, replies, answers):\n    return [1.0]\n")
    with pytest.raises(ValueError, match=r"returned scores of shape \(1,\) for 2 replies"):
        rewards.scorer(f"{tmp_path / 'short.py'}:first_only")([[]] * 2, ["a", "b"], ["", ""])
    # A NaN score poisoned every advantage of its group (the first of them is named); words, or the function's
    # own error, named no key; a column of scores is not one number per reply.
    (tmp_path / "bad.py").write_text("def nan(p, r, a):\n    return [1.0, float('nan'), float('inf')]\n"
                                     "def words(p, r, a):\n    return ['good', 'bad']\n"
                                     "def lookup(p, r, a):\n    return [{}['x'] for _ in r]\n"
                                     "def column(p, r, a):\n    return [[1.0] for _ in r]\n")
    for name, message in [("nan", r"returned nan for reply 1 of 3; scores must be finite"),
                          ("words", r"returned scores that are not numbers \(could not convert"),
                          ("lookup", r"bad.py:lookup' failed on 3 replies \(KeyError: 'x'\); run with --debug"),
                          ("column", r"returned scores of shape \(3, 1\) for 3 replies")]:
        with pytest.raises(ValueError, match=message):
            rewards.scorer(f"{tmp_path / 'bad.py'}:{name}")([[]] * 3, ["a", "b", "c"], [""] * 3)
    # A directory that holds no reward-model run is named as such.
    with pytest.raises(ValueError, match="is neither 'verifier', a Kiln reward-model run nor MODULE:FUNCTION"):
        rewards.scorer(str(tmp_path))


def test_a_ppo_value_model_trained_with_another_tokenizer_is_refused(tmp_path):
    """The value model reads the policy's token ids: a rollout.value_from run trained with another tokenizer
    would read them as other text. Its config.json says so before any model is loaded."""
    (tmp_path / "rm" / "checkpoints").mkdir(parents=True)
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"stage": "reward",
                                                             "data": {"tokenizer": "/elsewhere/tokenizer.model"}}))
    config = stage_config("ppo", "/nonexistent", REWARD, f"--config.rollout.value_from={tmp_path / 'rm'}")
    config.data.tokenizer = "byte"
    with pytest.raises(ValueError, match=re.escape(f"rollout.value_from='{tmp_path / 'rm'}' was trained with tokenizer "
                                                   "'/elsewhere/tokenizer.model', the policy with 'byte'; the value")):
        build.build_value_model(config, None, None)


def test_rl_prompts_read_every_weighted_source_in_order():
    config = stage_config("grpo", "/nonexistent")
    records = rewards.prompts(config)
    assert len(records) > 3 and all(set(r) == {"prompt", "answer"} for r in records)
    assert rewards.prompts(config, 3) == records[:3]  # a limit takes the first prompts
    with config.unlocked():
        config.data.sources.off = ConfigDict(dict(config.data.sources.train.to_dict(), weight=0.0))
    assert rewards.prompts(config) == records  # a source of weight 0 is not read
    config.data.sources.off.weight = 1.0
    assert rewards.prompts(config) == records + records  # sources one after another


def run_stage(stage, run_dir, *overrides):
    return trainer.train(stage_config(stage, run_dir, REWARD, *overrides))


def test_grpo_smoke_logs_metrics_and_resumes_exactly(tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    run_stage("grpo", whole)
    logged = {r["step"]: r for r in rows(whole)}
    names = {"reward/mean", "reward/std", "kl", "entropy", "clip_frac", "completion_length", "rollout/tokens_per_s"}
    assert names <= set(logged[4]), names - set(logged[4])
    assert logged[4]["reward/std"] > 0 and logged[4]["kl"] > 0  # replies differ; the policy moved off the reference
    # Stopped after the first checkpoint and resumed: the same rollouts (sampling RNG included) and losses.
    run_stage("grpo", split, "--config.train.steps=2")
    run_stage("grpo", split)
    resumed = {r["step"]: r for r in rows(split)}
    for step in (3, 4):
        for key in ("loss", "reward/mean", "completion_length", "kl", "grad_norm"):
            assert resumed[step][key] == logged[step][key], (step, key)
    a, b = (checkpoint.load_model(d)[1] for d in (whole, split))
    np.testing.assert_array_equal(a.embed.table[...], b.embed.table[...])


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ppo"))
    run_stage("ppo", run_dir)
    return run_dir


def test_ppo_smoke_logs_metrics_and_saves_a_loadable_policy(ppo_run):
    logged = {r["step"]: r for r in rows(ppo_run)}
    names = {"reward/mean", "reward/std", "kl", "entropy", "clip_frac", "completion_length", "value_loss",
             "explained_variance", "kl_coef", "objective/kl"}
    assert names <= set(logged[4]), names - set(logged[4])
    assert logged[4]["value_loss"] > 0 and logged[4]["kl"] != 0 and logged[4]["kl_coef"] == 0.05
    # MFU counts the value model's forward and backward pass as well as the policy's: twice the FLOPs.
    config = stage_config("ppo", ppo_run, REWARD)
    per_token = 2 * flops.flops_per_token(checkpoint.read_model_config(ppo_run), config.data.seq_len)
    peak = flops.total_peak_flops("float32", jax.devices())
    assert logged[4]["mfu"] == pytest.approx(logged[4]["tokens_per_s"] * per_token / peak, rel=1e-9)
    # The checkpoint's `params` is the policy alone (what sampling, eval and init_from read); the value
    # model and the optimizer state restore with it.
    policy = checkpoint.load_model(ppo_run)[1]
    assert not policy.cfg.reward_head
    run = trainer.setup(config)
    ckpt = checkpoint.Checkpointer(ppo_run)
    step, state, data_state = ckpt.restore_latest(run.state, warn=print)
    ckpt.close()
    assert step == 4 and data_state["rollouts"] == 2  # 2 train steps per rollout: one mini-batch, 2 epochs
    np.testing.assert_array_equal(state.params["policy"]["embed"]["table"][...], policy.embed.table[...])
    assert not np.array_equal(state.params["value"]["score"][...], run.state.params["value"]["score"][...])




@pytest.mark.parametrize("overrides, msg", [
    (["--config.rollout.num_samples=3"], "does not split into mini-batches of data.batch_size=8"),
    (["--config.rollout.batch_prompts=4", "--config.train.steps=3"], "train.steps=3 is not a multiple of the 2 train"),
    (["--config.rollout.epochs=2", "--config.checkpoint.every=3"], "checkpoint.every=3 is not a multiple of the 2"),
    (["--config.rollout.num_samples=1", "--config.data.batch_size=2"], "must be >= 2"),
])
def test_rl_preflight_names_the_problem(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        preflight.stage_kind(stage_config("grpo", "/nonexistent", *overrides))
    config = stage_config("grpo", "/nonexistent")
    config.stage = "rloo"
    with pytest.raises(ValueError, match="use stage grpo with rollout.advantage=rloo"):
        preflight.stage_kind(config)


@pytest.mark.parametrize("stage, key, msg", [
    ("grpo", "--config.rollout.gamma=0.9", "'rollout.gamma' is set but stage is 'grpo'; it is read by stage=ppo"),
    ("ppo", "--config.rollout.advantage=rloo", "'rollout.advantage' is set but stage is 'ppo'"),
    ("grpo", "--config.loss.value_coef=1", "'loss.value_coef' is set but loss.type is 'grpo'"),
    ("sft", "--config.rollout.epochs=2", "'rollout.epochs' is set but stage is 'sft'"),
])
def test_rl_keys_are_read_only_where_they_apply(stage, key, msg):
    with pytest.raises(ConfigError, match=msg):
        stage_config(stage, "/nonexistent", key)


def test_ppo_value_model_starts_from_a_reward_model(tmp_path):
    reward_dir = str(tmp_path / "reward")
    trainer.train(stage_config("reward", reward_dir, "--config.train.steps=3", "--config.optim.warmup_steps=1",
                               "--config.train.eval_every=0"))
    reward_model = checkpoint.load_model(reward_dir)[1]
    run = trainer.setup(stage_config("ppo", str(tmp_path / "ppo"), REWARD, f"--config.rollout.value_from={reward_dir}"))
    value = run.state.params["value"]
    np.testing.assert_array_equal(value["score"][...], reward_model.score[...])  # the trained head, not a new one
    np.testing.assert_array_equal(value["embed"]["table"][...], reward_model.embed.table[...])
    assert not np.array_equal(run.state.params["policy"]["embed"]["table"][...], reward_model.embed.table[...])
    # A value model must read the policy's tokens.
    other = str(tmp_path / "other")
    shutil.copytree(reward_dir, other)
    with open(os.path.join(other, "config.json")) as f:
        config = json.load(f)
    config["data"]["tokenizer"] = "/elsewhere/tokenizer.model"
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="was trained with tokenizer '/elsewhere/tokenizer.model', the policy with"):
        trainer.setup(stage_config("ppo", str(tmp_path / "ppo2"), REWARD, f"--config.rollout.value_from={other}"))
