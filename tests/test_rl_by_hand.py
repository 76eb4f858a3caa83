"""The GRPO and PPO stage losses and the rollout's scoring, against float64 computations written out
from the papers' formulas, on a stand-in model with fixed logits (no transformer, nothing to train)."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict

from train import rollout
from train.losses import rl
from test_rl import gae_by_loop

N, T, V = 3, 4, 5
RNG = np.random.default_rng(0)
LOGITS = (2.0 * RNG.normal(size=(N, T, V))).astype(np.float32)
TARGETS = np.array([[1, 4, 0, 2], [3, 3, 1, 0], [2, 0, 4, 1]], np.int32)
# Row 0 trains three reply tokens, row 1 one, row 2 none (a truncated reply dropped from the loss).
MASK = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 0]], np.float32)
# The ratios ρ = exp(logp − old) the old log-probs are set to give: both sides of both clip bounds.
RATIOS = np.array([[1.0, 1.5, 0.7, 1.1], [1.0, 1.0, 1.25, 1.0], [0.5, 2.0, 1.0, 1.0]])
ADV = np.array([1.0, -2.0, 0.7])[:, None] * MASK
REF = RNG.normal(size=(N, T)) - 1.5  # reference log-probs
VALUES = np.array([[0.3, 1.0, -0.4, 0.9], [0.0, 0.5, 2.0, 0.1], [1.0, 1.0, 1.0, 1.0]], np.float32)
OLD_VALUES = np.array([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
RETURNS = np.array([[0.0, 0.2, 0.1, 1.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)


def log_softmax_stats(temperature):
    """(log-prob of each target, entropy) at `temperature`, float64."""
    z = LOGITS.astype(np.float64) / temperature
    log_z = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    p = np.exp(z - log_z[..., None])
    logp = np.take_along_axis(z, TARGETS[..., None], -1)[..., 0] - log_z
    return logp, log_z - (p * z).sum(-1)


class FixedPolicy:
    """Stands in for the policy (fixed logits) and, for PPO, its value model (fixed values)."""

    def __init__(self):
        self.value = SimpleNamespace(values=lambda tokens, positions, segments: jnp.asarray(VALUES))

    def __call__(self, tokens, positions, segment_ids, dropout_key=None):
        assert tokens.shape == (N, T)
        return jnp.asarray(LOGITS)


def batch(temperature):
    logp, _ = log_softmax_stats(temperature)
    out = {"tokens": np.zeros((N, T), np.int32), "targets": TARGETS, "positions": np.tile(np.arange(T), (N, 1)),
           "segment_ids": np.ones((N, T), np.int32), "loss_mask": MASK.astype(np.int32),
           "old_logps": (logp - np.log(RATIOS)).astype(np.float32), "advantages": ADV.astype(np.float32),
           "ref_logps": REF.astype(np.float32), "old_values": OLD_VALUES, "returns": RETURNS}
    return {k: jnp.asarray(v) for k, v in out.items()}


def loss_cfg(**kw):
    return ConfigDict(dict(dict(beta=0.04, kl_estimator="k3", clip_eps_low=0.2, clip_eps_high=0.28, aggregation="grpo",
                                value_coef=0.3, value_clip=0.2, temperature=0.7, max_len=10), **kw))


def by_hand(cfg, ppo):
    """(loss sum, weight, per-token masked means of entropy / clip_frac / ratio / kl, value-loss sum)."""
    logp, entropy = log_softmax_stats(cfg.temperature)
    ratio = np.exp(logp - (logp - np.log(RATIOS)))
    surrogate = np.maximum(-ADV * ratio, -ADV * np.clip(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high))
    clipped = (-ADV * np.clip(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)) > -ADV * ratio
    log_r = REF - logp
    kl = np.exp(log_r) - log_r - 1 if cfg.kl_estimator == "k3" else -log_r
    policy = surrogate if ppo else surrogate + cfg.beta * kl
    v_clip = OLD_VALUES + np.clip(VALUES - OLD_VALUES, -cfg.value_clip, cfg.value_clip)
    value = 0.5 * np.maximum((VALUES - RETURNS) ** 2, (v_clip - RETURNS) ** 2)
    n_tok = MASK.sum(1)

    def agg(x):
        if cfg.aggregation == "grpo":  # each reply's token mean, summed over replies; weight: replies
            return sum((x[i] * MASK[i]).sum() / n_tok[i] for i in range(N) if n_tok[i]), float((n_tok > 0).sum())
        weight = MASK.sum() if cfg.aggregation == "dapo" else (n_tok > 0).sum() * cfg.max_len
        return (x * MASK).sum(), float(weight)

    pg, weight = agg(policy)
    means = {k: (x * MASK).sum() / MASK.sum() for k, x in
             (("entropy", entropy), ("clip_frac", clipped), ("ratio", ratio), ("kl", kl))}
    return pg, weight, means, agg(value)[0]


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_by_hand(aggregation):
    cfg = loss_cfg(aggregation=aggregation)
    pg, weight, means, _ = by_hand(cfg, ppo=False)
    assert 0 < means["clip_frac"] < 1  # both branches are taken
    loss, m = rl.make_grpo(cfg)(FixedPolicy(), batch(0.7), None)
    assert float(m["weight"]) == weight  # grpo: 2 replies; dapo: 4 tokens; dr_grpo: 2 x max_len 10 (not T = 4)
    assert float(loss) == pytest.approx(pg, rel=1e-5, abs=1e-6)
    assert float(m["pg_loss"]) == float(loss)
    for key, want in means.items():  # masked token means, times the weight (the step divides it out)
        assert float(m[key]) == pytest.approx(want * weight, rel=1e-5), key
    assert "value_loss" not in m


def test_grpo_loss_adds_beta_times_the_kl_estimate():
    """GRPO's loss adds β·KL per token (k3 = ref/π − log(ref/π) − 1, or k1 = log π/ref), averaged per reply."""
    logp = log_softmax_stats(0.7)[0]
    estimates = {"k3": np.exp(REF - logp) - (REF - logp) - 1, "k1": logp - REF}
    without, _ = rl.make_grpo(loss_cfg(beta=0.0))(FixedPolicy(), batch(0.7), None)
    for estimator, kl in estimates.items():
        per_reply = [(kl[i] * MASK[i]).sum() / MASK[i].sum() for i in range(2)]  # row 2 trains no token
        loss, m = rl.make_grpo(loss_cfg(beta=0.5, kl_estimator=estimator))(FixedPolicy(), batch(0.7), None)
        assert float(loss) - float(without) == pytest.approx(0.5 * sum(per_reply), rel=1e-4), estimator
        assert float(m["kl"]) == pytest.approx((kl * MASK).sum() / MASK.sum() * 2, rel=1e-5), estimator


class DropoutKeysPolicy(FixedPolicy):
    """FixedPolicy that records the dropout key of every policy call."""

    def __init__(self):
        super().__init__()
        self.keys = []

    def __call__(self, tokens, positions, segment_ids, dropout_key=None):
        self.keys.append(dropout_key)
        return super().__call__(tokens, positions, segment_ids)


@pytest.mark.parametrize("make", [rl.make_grpo, rl.make_ppo])
def test_rl_training_passes_a_dropout_key_and_evaluation_none(make):
    model, loss_fn = DropoutKeysPolicy(), make(loss_cfg())
    loss_fn(model, batch(0.7), nnx.Rngs(0))
    loss_fn(model, batch(0.7), None)
    assert len(model.keys) == 2 and model.keys[0] is not None and model.keys[1] is None


class TrainablePolicy(nnx.Module):
    """The fixed logits as the one parameter, so the loss's gradient has a closed form."""

    def __init__(self):
        self.logits = nnx.Param(jnp.asarray(LOGITS))

    def __call__(self, tokens, positions, segment_ids, dropout_key=None):
        return self.logits[...]


def test_one_update_per_rollout_is_the_policy_gradient():
    """Without old_logps (one update per rollout) the ratio is exp(logp − stop_gradient(logp)) = 1 and the
    gradient is (−A + β·(1 − ref/π))·∂logp/∂z, with ∂logp/∂z = (onehot(target) − softmax(z/τ)) / τ, each reply's
    tokens averaged (grpo aggregation): the surrogate's −A, and the k3 KL term's derivative 1 − exp(ref − logp),
    which pulls logp towards the reference. Without the stop-gradient the ratio would be a constant with no
    gradient; a KL estimate on stopped log-probs would give the same loss and no KL gradient."""
    cfg = loss_cfg(beta=0.5)
    b = {k: v for k, v in batch(cfg.temperature).items() if k != "old_logps"}
    loss_fn = rl.make_grpo(cfg)
    grads = nnx.jit(nnx.grad(lambda model: loss_fn(model, b, None)[0]))(TrainablePolicy())
    z = LOGITS.astype(np.float64) / cfg.temperature
    softmax = np.exp(z - z.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    kl_slope = 0.5 * (1 - np.exp(REF - log_softmax_stats(cfg.temperature)[0]))
    per_token = (-ADV + kl_slope) * MASK / np.maximum(MASK.sum(1), 1)[:, None]
    want = per_token[..., None] * (np.eye(V)[TARGETS] - softmax) / cfg.temperature
    assert np.abs(want).max() > 0.1
    # Measured: up to 3.1e-5 absolute on entries up to 37 (9.6e-7 relative), float32.
    np.testing.assert_allclose(np.asarray(grads.logits[...]), want, rtol=1e-5, atol=1e-6)


def test_ppo_loss_by_hand():
    """PPO: the clipped surrogate (its KL is in the reward, not the loss) plus value_coef times the
    clipped value loss, both aggregated the same way; the KL still reported."""
    for aggregation in ("grpo", "dapo"):
        cfg = loss_cfg(aggregation=aggregation)
        pg, weight, means, value = by_hand(cfg, ppo=True)
        loss, m = rl.make_ppo(cfg)(FixedPolicy(), batch(0.7), None)
        assert float(m["weight"]) == weight
        assert float(m["pg_loss"]) == pytest.approx(pg, rel=1e-5)
        assert float(m["value_loss"]) == pytest.approx(value, rel=1e-5)
        assert float(loss) == pytest.approx(pg + 0.3 * value, rel=1e-5)
        assert float(m["kl"]) == pytest.approx(means["kl"] * weight, rel=1e-5)
    # Both value branches count: row 0's last value moved 0.9 towards its return; clipped at 0.2 it is further.
    v_clip = OLD_VALUES + np.clip(VALUES - OLD_VALUES, -0.2, 0.2)
    far = (v_clip - RETURNS) ** 2 > (VALUES - RETURNS) ** 2
    assert far[MASK > 0].any() and (~far[MASK > 0]).any()


def test_token_logps_temperature_and_entropy():
    for temperature in (1.0, 0.7):
        want_logp, want_entropy = log_softmax_stats(temperature)
        logp, entropy = rl.token_logps(FixedPolicy(), batch(temperature), temperature)
        np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-6)
    assert not np.allclose(log_softmax_stats(1.0)[1], log_softmax_stats(0.7)[1], rtol=1e-2)


def test_whiten_uses_the_valid_tokens_only():
    x = np.array([[1.0, 2.0, 100.0], [4.0, -50.0, 7.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    valid = x[mask > 0].astype(np.float64)  # 1, 2, 4, 7: mean 3.5, population variance 5.25
    want = (x - valid.mean()) / np.sqrt(valid.var() + 1e-8) * mask
    np.testing.assert_allclose(rl.whiten(jnp.asarray(x), jnp.asarray(mask)), want, rtol=1e-5, atol=1e-6)
    out = np.asarray(rl.whiten(jnp.asarray(x), jnp.asarray(mask)))
    assert out[mask > 0].mean() == pytest.approx(0.0, abs=1e-6) and out[mask > 0].std() == pytest.approx(1.0, rel=1e-5)


def test_needs_old_logps_and_the_loss_config():
    """The rollout's log-probs are needed whenever a rollout feeds more than one train step: with 4 x 2 replies
    in mini-batches of 4, the second step's policy has moved and its ratio must be against the sampling one
    (GRPO's default 8 x 8 replies in batches of 16 is four steps of one epoch)."""
    def config(stage, epochs, beta, batch_size=8):
        return ConfigDict(dict(stage=stage, rollout=dict(epochs=epochs, temperature=0.6, max_new_tokens=12,
                                                         batch_prompts=4, num_samples=2),
                               loss=dict(beta=beta), data=dict(seq_len=64, batch_size=batch_size)))
    assert not rollout.needs_old_logps(config("grpo", 1, 0.04))  # one update: the loss's own pass
    assert rollout.needs_old_logps(config("grpo", 2, 0.0))
    assert rollout.needs_old_logps(config("grpo", 1, 0.0, batch_size=4))  # two mini-batches of one epoch
    assert rollout.needs_old_logps(config("ppo", 1, 0.05))  # PPO's KL reward reads them
    assert not rollout.needs_old_logps(config("ppo", 1, 0.0))
    assert rollout.needs_old_logps(config("ppo", 1, 0.0, batch_size=2))
    cfg = rollout.loss_config(config("grpo", 1, 0.04))
    assert cfg.temperature == 0.6 and cfg.max_len == 12 and cfg.beta == 0.04


# Rollout scoring: two prompts x two samples, rows of T = 6 with replies of 3, 2, 0 (dropped) and 4 targets.
ROLL_MASK = np.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]], np.float32)
ROLL = np.random.default_rng(1)
ROLL_OLD, ROLL_REF = ROLL.normal(size=(4, 6)) - 2.0, ROLL.normal(size=(4, 6)) - 2.5
ROLL_VALUES = ROLL.normal(size=(4, 6))
SCORES = np.array([1.0, 0.0, 0.5, 2.0], np.float32)


def score_rollout(stage, kl_target=0.0, advantage="grpo", kl_estimator="k1"):
    """`RolloutSource._score_rollout` with the reference and the rollout statistics stubbed by fixed arrays."""
    src = rollout.RolloutSource.__new__(rollout.RolloutSource)
    src.config = ConfigDict(dict(stage=stage, loss=dict(kl_estimator=kl_estimator), rollout=dict(
        num_samples=2, advantage=advantage, gamma=0.9, lam=0.8, kl_target=kl_target, kl_horizon=100)))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    src.run = SimpleNamespace(mesh=mesh, rollout_reference=lambda b: dict(b, ref_logps=jnp.asarray(ROLL_REF, jnp.float32)),
                              state=SimpleNamespace(params=None), frozen=None)
    src._stats = lambda params, frozen, b: {"old_logps": jnp.asarray(ROLL_OLD, jnp.float32),
                                             "old_values": jnp.asarray(ROLL_VALUES, jnp.float32)}
    src.state, src.metrics = {"rollouts": 0, "kl_coef": 0.1}, {}
    rows = {k: np.zeros((4, 6), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    rows["loss_mask"] = ROLL_MASK.astype(np.int32)
    return src, src._score_rollout(rows, SCORES)


def ppo_targets_by_hand(kl):
    """(whitened advantages, returns) [4, 6] of the rollout when its per-token KL estimate is `kl`."""
    adv, ret = np.zeros((4, 6)), np.zeros((4, 6))
    for i in range(4):
        idx = np.flatnonzero(ROLL_MASK[i])
        if not len(idx):
            continue
        r = -0.1 * kl[i, idx]
        r[-1] += SCORES[i]  # the score on the last reply token
        adv[i, idx] = gae_by_loop(r, ROLL_VALUES[i, idx], 0.9, 0.8)
        ret[i, idx] = adv[i, idx] + ROLL_VALUES[i, idx]
    valid = adv[ROLL_MASK > 0]
    return (adv - valid.mean()) / np.sqrt(valid.var() + 1e-8) * ROLL_MASK, ret


def test_ppo_rollout_scores_by_hand():
    """Per-token reward −kl_coef·k1(π_old, ref) (k3 with loss.kl_estimator=k3) with the score added on the
    reply's last token, GAE over the reply, returns = advantages + values before the advantages are whitened
    over all reply tokens."""
    src, out = score_rollout("ppo")
    kl = (ROLL_OLD - ROLL_REF) * ROLL_MASK  # k1 = log π_old / ref
    whitened, ret = ppo_targets_by_hand(kl)
    np.testing.assert_allclose(out["returns"], ret, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["advantages"], whitened, rtol=1e-5, atol=1e-5)
    kl_per_reply = np.mean([kl[i].sum() for i in (0, 1, 3)])  # summed over each reply's tokens
    assert src.metrics["objective/kl"] == pytest.approx(kl_per_reply, rel=1e-5)
    assert src.metrics["kl_coef"] == 0.1 and src.state["kl_coef"] == 0.1  # kl_target 0: fixed
    residual = (ret - ROLL_VALUES)[ROLL_MASK > 0]
    assert src.metrics["explained_variance"] == pytest.approx(1 - residual.var() / ret[ROLL_MASK > 0].var(), rel=1e-4)
    # Adaptive (Ziegler et al.): error clipped to ±20%, times the 4 replies over horizon 100.
    target = kl_per_reply / 1.1  # the KL 10% above target
    src, _ = score_rollout("ppo", kl_target=target)
    assert src.state["kl_coef"] == pytest.approx(0.1 * (1 + 0.1 * 4 / 100), rel=1e-4)
    assert src.metrics["kl_coef"] == 0.1  # the coefficient the rollout used
    # k3 = ref/π_old − log(ref/π_old) − 1 in the reward instead.
    src, out = score_rollout("ppo", kl_estimator="k3")
    k3 = (np.exp(ROLL_REF - ROLL_OLD) - (ROLL_REF - ROLL_OLD) - 1) * ROLL_MASK
    whitened, ret = ppo_targets_by_hand(k3)
    np.testing.assert_allclose(out["returns"], ret, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["advantages"], whitened, rtol=1e-5, atol=1e-5)
    assert src.metrics["objective/kl"] == pytest.approx(np.mean([k3[i].sum() for i in (0, 1, 3)]), rel=1e-5)


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_grpo_rollout_puts_each_replys_group_advantage_on_its_tokens(advantage):
    _, out = score_rollout("grpo", advantage=advantage)
    if advantage == "grpo":  # groups (1, 0) and (0.5, 2): unbiased std 0.7071 and 1.0607
        per_reply = [0.5 / (np.sqrt(0.5) + 1e-4), -0.5 / (np.sqrt(0.5) + 1e-4),
                     -0.75 / (np.sqrt(1.125) + 1e-4), 0.75 / (np.sqrt(1.125) + 1e-4)]
    else:  # the other sample's score as baseline
        per_reply = [1.0, -1.0, -1.5, 1.5]
    np.testing.assert_allclose(out["advantages"], np.array(per_reply)[:, None] * ROLL_MASK, rtol=1e-5)
    assert "returns" not in out


def test_rollout_scores_each_reply_against_its_prompts_answer_less_the_format_penalty(monkeypatch):
    """`_rollout` with the sampler stubbed: replies are prompt-major, so reply i answers prompt i // G;
    a reply cut at max_new_tokens loses rollout.format_penalty and, with mask_truncated, its loss."""
    records = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(3)]
    texts = {"0": ["0", "1"], "1": ["1", "x"], "2": ["2", "2"]}  # replies per prompt: right, wrong
    seen = {}

    def sample(sampler, chats, ro, key):
        seen["chats"] = chats
        answers = [next(r["answer"] for r in records if r["prompt"] == c) for c in chats]
        replies = [{"text": t, "token_ids": [7] * (j + 1), "finish_reason": "length" if j else "stop"}
                   for a in answers for j, t in enumerate(texts[a])]
        return [[1, 2 + i] for i in range(len(chats))], replies  # each prompt its own ids

    def score(chats, replies, answers):
        seen["answers"] = answers
        return np.array([float(r == a) for r, a in zip(replies, answers)], np.float32)

    def score_rollout(rows, scores):
        seen["rows"], seen["scores"] = rows, scores
        return rows

    monkeypatch.setattr(rollout, "sample", sample)
    monkeypatch.setattr(rollout.generate, "Sampler", lambda *a, **k: None)
    src = rollout.RolloutSource.__new__(rollout.RolloutSource)
    src.config = ConfigDict(dict(seed=0, stage="grpo", mesh=dict(rules=()), data=dict(seq_len=6, batch_size=4,
                                                                                    chat_template="chatml"),
                                 rollout=dict(batch_prompts=2, num_samples=2, format_penalty=0.25, mask_truncated=True,
                                              epochs=1, max_new_tokens=2)))
    graphdef, params, frozen = nnx.split(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), nnx.Param, ...)
    src.run = SimpleNamespace(graphdef=graphdef, state=SimpleNamespace(params=params), frozen=frozen, mesh=None,
                              tokenizer=SimpleNamespace(pad_id=0))
    src.records, src.score, src.state, src.metrics = records, score, {"rollouts": 0, "kl_coef": 0.0}, {}
    src._score_rollout = score_rollout
    minibatches = src._rollout()
    firsts = [c[0]["content"] for c in seen["chats"]]
    assert len(firsts) == 2 and len(set(firsts)) == 2
    want_answers = [a[1:] for a in firsts for _ in range(2)]
    assert seen["answers"] == want_answers  # each reply scored against its own prompt's answer
    # Every prompt's first reply is right and stops; its second is wrong except prompt 2's, and cut off.
    want = [1.0 if j == 0 or a == "2" else 0.0 for a in want_answers[::2] for j in range(2)]
    want = np.array(want) - 0.25 * np.array([0, 1, 0, 1])
    np.testing.assert_allclose(seen["scores"], want)
    assert seen["scores"].dtype == np.float32
    # Rows: their prompt's ids then the reply; the cut replies (1 and 3) carry no loss.
    np.testing.assert_array_equal(seen["rows"]["tokens"][:, :2], [[1, 2], [1, 2], [1, 3], [1, 3]])
    np.testing.assert_array_equal(seen["rows"]["loss_mask"].sum(axis=1), [1, 0, 1, 0])
    assert src.metrics["reward/mean"] == pytest.approx(want.mean())
    assert src.metrics["reward/std"] == pytest.approx(want.std())  # over the rollout's replies, population std
    assert src.metrics["rollout/truncated"] == 0.5 and src.metrics["completion_length"] == 1.5
    assert src.state["rollouts"] == 1 and len(minibatches) == 1

    # A rollout whose every reply was cut (and so masked) is named before it reaches the step as a bad batch.
    def all_cut(*args):
        ids, replies = sample(*args)
        return ids, [dict(r, finish_reason="length") for r in replies]

    monkeypatch.setattr(rollout, "sample", all_cut)
    with pytest.raises(ValueError, match=r"rollout 1: all 4 replies ran to rollout.max_new_tokens=2"):
        src._rollout()


def bare_source(**config):
    src = rollout.RolloutSource.__new__(rollout.RolloutSource)
    src.config = ConfigDict(config)
    return src


def test_rollouts_take_each_prompt_once_a_pass_in_a_new_order_each_pass():
    """Rollouts of 2 prompts walk through per-pass permutations of the 5 prompts: rollout 2 takes the last of
    pass 0 and the first of pass 1; no pass is in file order, the two passes' orders differ, and so do seeds'."""
    def order(seed):
        src = bare_source(seed=seed, rollout=dict(batch_prompts=2))
        src.records = [f"p{i}" for i in range(5)]
        return [p for k in range(5) for p in src._prompts(k)]

    walk = order(0)
    passes = walk[:5], walk[5:]
    assert all(sorted(p) == [f"p{i}" for i in range(5)] for p in passes)
    assert passes[0] != passes[1] and [f"p{i}" for i in range(5)] not in passes
    assert walk == order(0) and walk != order(1)


def test_minibatches_cover_the_rollout_once_per_epoch_reshuffled_each_epoch():
    """8 rows in mini-batches of 2, 3 epochs: each epoch's 4 mini-batches hold every row once, and every
    epoch (and rollout) draws its own order, so the epochs' mini-batches differ."""
    src = bare_source(seed=0, data=dict(batch_size=2), rollout=dict(epochs=3))
    rows = {"tokens": np.arange(8)[:, None] * np.ones((1, 3), np.int32), "loss_mask": np.arange(8)[:, None]}
    out = src._minibatches(rows, k=0)
    assert len(out) == 12 and all(b["tokens"].shape == (2, 3) for b in out)
    epochs = [np.concatenate([b["loss_mask"][:, 0] for b in out[4 * e:4 * e + 4]]).tolist() for e in range(3)]
    assert all(sorted(e) == list(range(8)) for e in epochs)
    assert all(b["tokens"][:, 0].tolist() == b["loss_mask"][:, 0].tolist() for b in out)  # rows stay whole
    assert len({tuple(e) for e in epochs}) == 3
    assert [b["loss_mask"].tolist() for b in src._minibatches(rows, k=1)] != [b["loss_mask"].tolist() for b in out]


def test_a_rollout_source_is_checkpointed_only_between_rollouts(monkeypatch):
    """Its state (rollouts done, PPO's KL coefficient) is saved only once a rollout's mini-batches are all
    used (they are not in the state); in between it says so, and a pre-emption notice waits for the boundary.
    Restoring drops anything queued, so the next batch starts rollout `rollouts`."""
    src = bare_source(seed=0)
    src.state, src.queue = {"rollouts": 3, "kl_coef": 0.05}, []
    served = iter([[{"tokens": np.zeros((2, 3))}, {"tokens": np.ones((2, 3))}], [{"tokens": np.full((2, 3), 2.0)}]])
    monkeypatch.setattr(src, "_rollout", lambda: next(served))
    assert src.at_boundary and src.get_state() == {"rollouts": 3, "kl_coef": 0.05}
    assert next(src)["tokens"][0, 0] == 0 and not src.at_boundary
    with pytest.raises(RuntimeError, match="must fall between rollouts"):
        src.get_state()
    assert next(src)["tokens"][0, 0] == 1 and src.at_boundary
    src.queue = [{"tokens": np.ones((2, 3))}]
    src.set_state({"rollouts": 4, "kl_coef": 0.1})
    assert src.at_boundary and src.state == {"rollouts": 4, "kl_coef": 0.1}
    assert next(src)["tokens"][0, 0] == 2  # a new rollout, not the dropped queue


class Bigram(nnx.Module):
    """A policy whose logits are a fixed row of LOGITS per input token."""

    def __init__(self):
        self.table = nnx.Param(jnp.asarray(LOGITS.reshape(-1, V)[:V]))

    def __call__(self, tokens, positions, segment_ids, dropout_key=None):
        return self.table[...][tokens]


BIGRAM_TOKENS = np.array([[0, 1, 2], [3, 4, 0], [2, 2, 1], [4, 3, 3]], np.int32)
BIGRAM_TARGETS = np.array([[1, 2, 3], [4, 0, 1], [2, 1, 0], [3, 3, 4]], np.int32)


def bigram_batch():
    return {k: jnp.asarray(v) for k, v in (("tokens", BIGRAM_TOKENS), ("targets", BIGRAM_TARGETS),
                                           ("positions", np.tile(np.arange(3), (4, 1))),
                                           ("segment_ids", np.ones((4, 3), np.int32)))}


def bigram_logps(temperature):
    """Bigram's log-prob of each target at `temperature`, float64."""
    z = LOGITS.reshape(-1, V)[:V].astype(np.float64)[BIGRAM_TOKENS] / temperature
    return np.take_along_axis(z, BIGRAM_TARGETS[..., None], -1)[..., 0] - np.log(np.exp(z).sum(-1))


def test_rl_reference_adds_per_token_log_probs_at_the_sampling_temperature():
    config = ConfigDict(dict(loss=dict(beta=0.1), rollout=dict(temperature=0.7, batch_prompts=2, num_samples=2),
                             data=dict(batch_size=2)))
    graphdef, params, frozen = nnx.split(Bigram(), nnx.Param, ...)
    out = rollout.reference(config, graphdef, params, frozen)(bigram_batch())
    want = bigram_logps(0.7)
    np.testing.assert_allclose(out["ref_logps"], want, rtol=1e-5, atol=1e-6)
    # The reference holds its own copy: the train step donates (deletes) the policy's arrays.
    reference = rollout.reference(config, graphdef, params, frozen)
    for leaf in jax.tree.leaves(params):
        leaf.delete()
    again = reference(bigram_batch())
    np.testing.assert_allclose(again["ref_logps"], want, rtol=1e-5, atol=1e-6)
    config.loss.beta = 0.0
    assert rollout.reference(config, graphdef, params, frozen) is None  # no KL term, no reference


def test_rollout_old_log_probs_are_the_sampling_distributions(monkeypatch):
    """The ratio exp(logp − old_logp) is against the distribution the replies were sampled from: the policy
    at rollout.temperature as it was at the rollout, computed in pieces of a mini-batch (here 2 of 2 rows)."""
    monkeypatch.setattr(rollout.rewards, "prompts", lambda config: [])
    monkeypatch.setattr(rollout.rewards, "scorer", lambda reward: None)
    config = ConfigDict(dict(stage="grpo", loss=dict(beta=0.0), data=dict(batch_size=2), rollout=dict(
        temperature=0.7, batch_prompts=2, num_samples=2, epochs=2, reward="verifier")))
    graphdef, params, frozen = nnx.split(Bigram(), nnx.Param, ...)
    src = rollout.RolloutSource(SimpleNamespace(config=config, graphdef=graphdef))
    out = src._stats(params, frozen, bigram_batch())
    assert set(out) == {"old_logps"}  # grpo: no values
    np.testing.assert_allclose(out["old_logps"], bigram_logps(0.7), rtol=1e-5, atol=1e-6)


def test_policy_of_an_actor_critic_is_its_policy():
    from model import presets
    from model.actor_critic import ActorCritic, policy_of
    from model.transformer import Transformer

    policy = Transformer(presets.get("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    value = Transformer(presets.get("tiny", vocab_size=64, reward_head=True), rngs=nnx.Rngs(1))
    both = ActorCritic(policy, value)
    assert policy_of(both) is policy and both.value is value and both.cfg is policy.cfg
    assert policy_of(policy) is policy
    with pytest.raises(ValueError, match="needs a scalar head"):
        ActorCritic(policy, policy)
