"""Reward-model and preference losses against values computed by hand from the papers' formulas,
and the sequence log-probs they are fed, against a row-by-row forward pass."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from train.losses.dpo import orpo_loss, preference_loss, sequence_logps, simpo_loss
from train import losses
from train.losses.reward import bradley_terry_loss, whole_sequences


def softplus(x):  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# torchtune's published DPO vector (beta 0.1): deltas are 0, 10 and 20.
POLICY_C, POLICY_R = [-0.5, -10.0, -1.0], [-0.1, -30.0, -21.0]
REF_C, REF_R = [-0.5, -10.1, -0.1], [-0.1, -20.1, -0.1]


def loss(loss_type, beta=0.1, eps=0.0):
    return np.asarray(preference_loss(jnp.array(POLICY_C), jnp.array(POLICY_R), jnp.array(REF_C), jnp.array(REF_R),
                                      beta=beta, loss_type=loss_type, label_smoothing=eps))


def test_dpo_sigmoid_matches_torchtunes_vector():
    np.testing.assert_allclose(loss("sigmoid"), [0.6931, 0.3133, 0.1269], atol=5e-5)
    # Exactly: -log sigma(beta * delta) = softplus(-beta * delta) for beta * delta = 0, 1, 2.
    np.testing.assert_allclose(loss("sigmoid"), [math.log(2), softplus(-1), softplus(-2)], rtol=1e-6)


def test_conservative_and_robust_dpo_by_hand():
    z = np.array([0.0, 1.0, 2.0])  # beta * delta
    agree = np.array([-softplus(-x) for x in z])  # log sigma(z)
    disagree = np.array([-softplus(x) for x in z])  # log sigma(-z)
    np.testing.assert_allclose(loss("sigmoid", eps=0.1), -0.9 * agree - 0.1 * disagree, rtol=1e-6)
    np.testing.assert_allclose(loss("robust", eps=0.1), (-0.9 * agree + 0.1 * disagree) / 0.8, rtol=1e-6)
    assert loss("robust", eps=0.1)[0] == pytest.approx(math.log(2), rel=1e-6)  # unbiased: ln 2 at delta 0
    np.testing.assert_allclose(loss("robust"), loss("sigmoid"), rtol=1e-7)  # eps 0: plain DPO


def test_hinge_and_ipo_by_hand():
    np.testing.assert_allclose(loss("hinge", beta=0.05), [1.0, 0.5, 0.0], atol=1e-6)  # relu(1 - beta*delta)
    np.testing.assert_allclose(loss("ipo", beta=0.1), [25.0, 25.0, 225.0], rtol=1e-5)  # (delta - 5)^2
    np.testing.assert_allclose(loss("ipo", beta=0.5), [1.0, 81.0, 361.0], rtol=1e-5)  # (delta - 1)^2


def test_policy_equal_to_reference_gives_ln2():
    logps = jnp.array([-3.0, -40.0])
    for loss_type in ("sigmoid", "robust"):
        np.testing.assert_allclose(preference_loss(logps, logps - 1, logps, logps - 1, beta=0.3, loss_type=loss_type,
                                                   label_smoothing=0.2), [math.log(2)] * 2, rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="kto"), "unknown preference loss_type 'kto'"),
    (dict(beta=0.0), "beta must be positive"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(loss_type="ipo", label_smoothing=0.1), "not ipo"),
])
def test_bad_preference_settings_are_named(kwargs, message):
    args = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0) | kwargs
    with pytest.raises(ValueError, match=message):
        preference_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), **args)


def test_simpo_and_orpo_by_hand():
    # SimPO: beta (c - r) - gamma = 2 * 1.0 - 0.5 = 1.5; the second pair 2 * (-0.25) - 0.5 = -1.
    out = simpo_loss(jnp.array([-0.5, -1.0]), jnp.array([-1.5, -0.75]), beta=2.0, gamma=0.5)
    np.testing.assert_allclose(out, [softplus(-1.5), softplus(1.0)], rtol=1e-6)
    smoothed = simpo_loss(jnp.array([-0.5]), jnp.array([-1.5]), beta=2.0, gamma=0.5, label_smoothing=0.2)
    np.testing.assert_allclose(smoothed, [0.8 * softplus(-1.5) + 0.2 * softplus(1.5)], rtol=1e-6)
    # ORPO: P_c = 0.5 (odds 1), P_r = 0.2 (odds 1/4): log odds ratio ln 4, loss lam * log(1 + 1/4).
    out = orpo_loss(jnp.log(jnp.array([0.5, 0.2])), jnp.log(jnp.array([0.2, 0.5])), lam=0.1)
    np.testing.assert_allclose(out, [0.1 * math.log(1.25), 0.1 * math.log(5.0)], rtol=1e-5)


def test_bradley_terry_by_hand():
    chosen, rejected = jnp.array([2.0, 0.0, -1.0]), jnp.array([1.0, 0.0, 1.0])  # differences 1, 0, -2
    plain = (softplus(-1) + math.log(2) + softplus(2)) / 3
    assert float(bradley_terry_loss(chosen, rejected)) == pytest.approx(plain, rel=1e-6)
    # A per-pair margin is subtracted from the difference: 0.5, 0, -1.
    margin = (softplus(-0.5) + math.log(2) + softplus(1)) / 3
    assert float(bradley_terry_loss(chosen, rejected, margin=jnp.array([0.5, 0.0, -1.0]))) == pytest.approx(margin, rel=1e-6)
    assert float(bradley_terry_loss(chosen, rejected, margin=0.5)) == pytest.approx(
        (softplus(-0.5) + softplus(0.5) + softplus(2.5)) / 3, rel=1e-6)
    # Centring adds c * mean((r_c + r_r)^2) = 0.01 * (9 + 0 + 0) / 3.
    assert float(bradley_terry_loss(chosen, rejected, center_coef=0.01)) == pytest.approx(plain + 0.03, rel=1e-6)


class Scores:
    """Stands in for a reward model: fixed scores for the 2B rows (chosen first), and the sequences it got."""

    def __init__(self, scores):
        self.scores, self.seen = jnp.asarray(scores, jnp.float32), None

    def rewards(self, tokens, positions, segments):
        self.seen = (tokens, positions, segments)
        return self.scores


def pair_batch(lengths, T=6):
    """Right-padded chosen/rejected rows of the given token counts; tokens 10.., targets 20.."""
    batch = {}
    for side, ns in zip(("chosen", "rejected"), lengths):
        rows = {k: np.zeros((len(ns), T), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
        rows["loss_mask"] = np.zeros((len(ns), T), np.float32)
        for b, n in enumerate(ns):
            rows["tokens"][b, :n], rows["targets"][b, :n] = 10 + np.arange(n), 20 + np.arange(n)
            rows["segment_ids"][b, :n], rows["positions"][b, :n], rows["loss_mask"][b, 1:n] = 1, np.arange(n), 1
        batch.update({f"{side}_{k}": jnp.asarray(v) for k, v in rows.items()})
    return batch


def test_reward_loss_sums_over_real_pairs_with_trl_style_metrics():
    c = ConfigDict(dict(margin=0.0, center_coef=0.01))
    # Three slots: two pairs and an empty one (a padding slot of the last eval batch).
    model = Scores([2.0, 0.0, 9.0, 1.0, 0.0, -9.0])
    loss_sum, m = losses.get("reward", c)(model, pair_batch(([4, 3, 0], [5, 2, 0])), None)
    assert float(m["weight"]) == 2
    # Pairs (2, 1) and (0, 0): -log sigma(1) + ln 2, centring 0.01 * (9 + 0).
    assert float(loss_sum) == pytest.approx(softplus(-1) + math.log(2) + 0.09, rel=1e-6)
    assert float(m["accuracy"]) == 1 and float(m["margin"]) == pytest.approx(1.0)  # strict: the tie does not count
    assert float(m["rewards/chosen"]) == pytest.approx(2.0) and float(m["rewards/rejected"]) == pytest.approx(1.0)
    assert float(m["reward_std"]) / 2 == pytest.approx(np.std([2, 0, 1, 0]), rel=1e-6)  # real rows only


def test_reward_model_reads_the_whole_sequence():
    """Rows hold inputs (the sequence but its last token); the score must see that last token too."""
    tokens, positions, segments = whole_sequences(pair_batch(([4, 6], [1, 2])), "chosen")
    np.testing.assert_array_equal(tokens[0], [10, 11, 12, 13, 23, 0])  # target 3 appended at slot 4
    np.testing.assert_array_equal(segments[0], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(positions[0], [0, 1, 2, 3, 4, 0])
    np.testing.assert_array_equal(tokens[1], 10 + np.arange(6))  # a full row was cut: it keeps its inputs
    np.testing.assert_array_equal(segments[1], np.ones(6))


def test_sequence_logps_sum_each_replys_masked_targets():
    """Chosen and rejected run as one batch; each sum must be its own row's masked log-probs."""
    from configs import base
    from data import pipeline, tokenizer
    from model import presets
    from model.transformer import Transformer

    data = base.get_config().data  # pairs from the synthetic task: a worked solution against one with a slip
    data.seq_len, data.batch_size, data.synthetic.num_examples = 256, 3, 100
    batch = {k: jnp.asarray(v) for k, v in next(pipeline.train_iterator(data, "preference", tokenizer.load("byte"),
                                                                      seed=0)).items()}
    model = Transformer(presets.get("tiny", vocab_size=384), rngs=nnx.Rngs(0))
    chosen, rejected, n_chosen, n_rejected = sequence_logps(model, batch)
    for side, sums, counts in (("chosen", chosen, n_chosen), ("rejected", rejected, n_rejected)):
        for b in range(3):  # one row at a time, log-softmax by hand in float64
            logits = np.asarray(model(batch[f"{side}_tokens"][b:b + 1], batch[f"{side}_positions"][b:b + 1],
                                      batch[f"{side}_segment_ids"][b:b + 1])[0], np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
            mask = np.asarray(batch[f"{side}_loss_mask"][b])
            picked = logp[np.arange(len(mask)), np.asarray(batch[f"{side}_targets"][b])]
            assert 0 < mask.sum() < (np.asarray(batch[f"{side}_segment_ids"][b]) > 0).sum()  # the reply only
            assert float(counts[b]) == mask.sum()
            # Measured |error| up to 4.8e-5 on sums of -380..-640 (float32 accumulation).
            assert float(sums[b]) == pytest.approx(float((picked * mask).sum()), abs=2e-4)
    assert not np.allclose(chosen, rejected)  # the halves differ, so swapping them would fail


def test_rewards_read_each_rows_last_real_token():
    from model import presets
    from model.transformer import Transformer

    model = Transformer(presets.get("tiny", reward_head=True), rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    seq = rng.randint(0, 256, (7,)).astype(np.int32)
    alone = float(model.rewards(jnp.asarray(seq[None]))[0])
    # The same sequence right-padded with junk (segment 0), and one cut a token shorter.
    padded = np.concatenate([seq, rng.randint(0, 256, (5,))]).astype(np.int32)[None]
    segments = (np.arange(12) < 7).astype(np.int32)[None]
    shorter = (np.arange(12) < 6).astype(np.int32)[None]
    positions = np.minimum(np.arange(12), 6)[None].astype(np.int32)
    got = model.rewards(jnp.asarray(np.concatenate([padded, padded])), jnp.asarray(np.concatenate([positions] * 2)),
                        jnp.asarray(np.concatenate([segments, shorter])))
    assert float(got[0]) == pytest.approx(alone, abs=1e-6)  # measured 1.5e-8 (of 0.08): padding is never read
    assert abs(float(got[1]) - alone) > 1e-3  # a different last token: a different score
    # By hand: the head times the final hidden state at the last real position.
    h = model.hidden(jnp.asarray(seq[None]))[0, -1]
    assert alone == pytest.approx(float(jnp.dot(h, model.score[...])), rel=1e-5)
    with pytest.raises(ValueError, match="no reward head"):
        Transformer(presets.get("tiny"), rngs=nnx.Rngs(0)).rewards(jnp.asarray(seq[None]))


class UniformLM:
    """Stands in for a policy: uniform logits over V tokens, so every target has log-prob -ln V."""

    V = 32  # above every token id of pair_batch

    def __call__(self, tokens, positions, segments, dropout_key=None):
        return jnp.zeros((*tokens.shape, self.V), jnp.float32)


class DropoutKeysLM(UniformLM):
    """UniformLM that records the dropout key of every call."""

    def __init__(self):
        self.keys = []

    def __call__(self, tokens, positions, segments, dropout_key=None):
        self.keys.append(dropout_key)
        return super().__call__(tokens, positions, segments)


def test_dpo_training_passes_a_dropout_key_and_evaluation_none():
    """One policy pass of chosen and rejected together: with the step's rngs it draws dropout, in evaluation
    (rngs None) it does not."""
    batch = pair_batch(([4, 3], [2, 5]))
    batch.update(ref_chosen_logps=jnp.zeros(2), ref_rejected_logps=jnp.zeros(2))
    model, cfg = DropoutKeysLM(), ConfigDict(dict(preference_type="sigmoid", beta=0.1, label_smoothing=0.0,
                                                  nll_coef=0.0, simpo_gamma=0.5))
    losses.get("dpo", cfg)(model, batch, nnx.Rngs(0))
    losses.get("dpo", cfg)(model, batch, None)
    assert len(model.keys) == 2 and model.keys[0] is not None and model.keys[1] is None


def dpo(batch, model=None, **loss):
    c = ConfigDict(dict(preference_type="sigmoid", beta=0.1, label_smoothing=0.0, nll_coef=0.0, simpo_gamma=0.5))
    c.update(loss)
    return losses.get("dpo", c)(UniformLM() if model is None else model, batch, None)


def test_dpo_stage_loss_by_hand():
    # Pairs with 3 / 1 and 2 / 4 trained tokens (loss_mask is 1 on tokens 1..n-1), and a padding slot.
    batch = pair_batch(([4, 3, 0], [2, 5, 0]))
    lnV = math.log(UniformLM.V)
    pc, pr = np.array([-3, -2, 0]) * lnV, np.array([-1, -4, 0]) * lnV
    batch.update(ref_chosen_logps=jnp.array([-3.0, -5.0, 0.0]), ref_rejected_logps=jnp.array([-2.0, -3.0, 0.0]))
    delta = (pc - [-3, -5, 0]) - (pr - [-2, -3, 0])
    total, m = dpo(batch)
    assert float(m["weight"]) == 2
    assert float(total) == pytest.approx(sum(softplus(-0.1 * d) for d in delta[:2]), rel=1e-6)
    rc, rr = 0.1 * (pc - [-3, -5, 0]), 0.1 * (pr - [-2, -3, 0])
    assert float(m["rewards/chosen"]) == pytest.approx(rc[:2].sum(), rel=1e-6)
    assert float(m["rewards/margins"]) == pytest.approx((rc - rr)[:2].sum(), rel=1e-6)
    assert float(m["rewards/accuracies"]) == float(((rc > rr)[:2]).sum())
    assert float(m["logps/chosen"]) == pytest.approx(pc[:2].sum(), rel=1e-6)
    # IPO on per-token log-probs: policy -ln V per token; references divided by the token counts.
    total, _ = dpo(batch, preference_type="ipo", beta=0.5)
    ipo = [((-lnV + lnV) - (-3 / 3 - -2 / 1) - 1.0) ** 2, ((-lnV + lnV) - (-5 / 2 - -3 / 4) - 1.0) ** 2]
    assert float(total) == pytest.approx(sum(ipo), rel=1e-5)
    # The chosen NLL term, per token: ln V for both pairs, times 0.2.
    with_nll, m = dpo(batch, nll_coef=0.2)
    assert float(with_nll) - float(dpo(batch)[0]) == pytest.approx(2 * 0.2 * lnV, rel=1e-5)
    # Reference-free SimPO: equal per-token log-probs, so -log sigma(-gamma) for both pairs.
    total, _ = dpo({k: v for k, v in batch.items() if not k.startswith("ref_")}, preference_type="simpo", beta=2.0)
    assert float(total) == pytest.approx(2 * softplus(0.5), rel=1e-6)


def test_dpo_stage_metrics_smoothing_and_reference_free_losses_by_hand():
    # Pairs of 3 / 1 and 2 / 5 trained tokens; a slot whose rejected reply has none, and one whose chosen reply
    # has none: neither is a pair. The first pair's policy equals its reference: a tie, which is no accuracy.
    batch = pair_batch(([4, 3, 2, 0], [2, 6, 0, 3]))
    lnV = math.log(UniformLM.V)
    pc, pr = sequence_logps(UniformLM(), batch)[:2]
    batch.update(ref_chosen_logps=jnp.array([pc[0], -5.0, -1.0, 0.0]),
                 ref_rejected_logps=jnp.array([pr[0], -3.0, -2.0, 0.0]))
    delta = (-2 * lnV + 5) - (-5 * lnV + 3)  # the second pair's; the first's is 0
    total, m = dpo(batch, label_smoothing=0.1)  # conservative DPO: -(1-e) log s(b d) - e log s(-b d)
    assert float(m["weight"]) == 2
    assert float(total) == pytest.approx(math.log(2) + 0.9 * softplus(-0.1 * delta) + 0.1 * softplus(0.1 * delta),
                                         rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.1 * (-2 * lnV + 5), rel=1e-5)
    assert float(m["rewards/rejected"]) == pytest.approx(0.1 * (-5 * lnV + 3), rel=1e-5)
    assert float(m["rewards/accuracies"]) == 1.0  # strictly greater: the tie does not count
    assert float(m["logps/rejected"]) == pytest.approx(-6 * lnV, rel=1e-6)
    assert float(m["logps/chosen"]) == pytest.approx(-5 * lnV, rel=1e-6)
    free = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    # SimPO on per-token log-probs (-ln V on both sides): z = beta * 0 - gamma = -0.5, smoothed 0.2.
    total, m = dpo(free, preference_type="simpo", beta=2.0, label_smoothing=0.2)
    assert float(total) == pytest.approx(2 * (0.8 * softplus(0.5) + 0.2 * softplus(-0.5)), rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(2 * 2.0 * -lnV, rel=1e-6)  # beta x per-token log-prob
    assert float(m["rewards/rejected"]) == pytest.approx(2 * 2.0 * -lnV, rel=1e-6)
    assert float(m["rewards/margins"]) == pytest.approx(0.0, abs=1e-5)
    # ORPO: equal per-token log-probs have equal odds, lam * ln 2 a pair, plus the chosen NLL per token.
    total, m = dpo(free, preference_type="orpo", beta=0.1, nll_coef=1.0)
    assert float(total) == pytest.approx(2 * (0.1 * math.log(2) + lnV), rel=1e-6)
    assert float(m["nll_loss"]) == pytest.approx(2 * lnV, rel=1e-6)


class BigramLM(UniformLM):
    """Stands in for a policy whose logits are fixed random numbers per input token, so replies of different
    lengths have different per-token log-probs (under UniformLM they are all −ln V)."""

    TABLE = (2.0 * np.random.default_rng(0).normal(size=(UniformLM.V, UniformLM.V))).astype(np.float32)

    def __call__(self, tokens, positions, segments, dropout_key=None):
        return jnp.asarray(self.TABLE)[tokens]

    @classmethod
    def mean_logps(cls, batch, side):
        """Each row's log-prob per trained token, log-softmax by hand in float64."""
        z = cls.TABLE.astype(np.float64)[np.asarray(batch[f"{side}_tokens"])]
        targets = np.asarray(batch[f"{side}_targets"])[..., None]
        logp = np.take_along_axis(z, targets, -1)[..., 0] - np.log(np.exp(z).sum(-1))
        mask = np.asarray(batch[f"{side}_loss_mask"], np.float64)
        return (logp * mask).sum(1) / mask.sum(1)


def test_reference_free_losses_and_the_nll_term_read_each_replys_own_per_token_log_probs():
    """SimPO's −log σ(β(c − r) − γ), ORPO's −λ log σ(log odds c − log odds r) and Llama 3's NLL term (on the
    chosen reply only) take c and r per token, each over its own reply's trained tokens; robust DPO keeps its
    label smoothing in the stage, and the hinge takes summed log-probs. Equal per-token log-probs (UniformLM)
    hid chosen and rejected swapped or the NLL taken over the rejected reply; here the pairs' differ."""
    batch = pair_batch(([4, 3, 5], [2, 6, 3]))  # 3 / 1, 2 / 5 and 4 / 2 trained tokens
    c, r = BigramLM.mean_logps(batch, "chosen"), BigramLM.mean_logps(batch, "rejected")
    assert np.abs(c - r).min() > 0.3  # no pair ties, so a swap shows
    free = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    # SimPO (beta 2, gamma 0.5, smoothed 0.2) plus 0.2 x the chosen reply's per-token NLL, as CPO-SimPO.
    total, m = dpo(free, BigramLM(), preference_type="simpo", beta=2.0, label_smoothing=0.2, nll_coef=0.2)
    z = 2.0 * (c - r) - 0.5
    want = sum(0.8 * softplus(-x) + 0.2 * softplus(x) for x in z) + 0.2 * -c.sum()
    assert float(total) == pytest.approx(want, rel=1e-6)  # measured |rel. error| <= 3e-8 (float32)
    assert float(m["nll_loss"]) == pytest.approx(-c.sum(), rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(2.0 * c.sum(), rel=1e-6)
    assert float(m["rewards/rejected"]) == pytest.approx(2.0 * r.sum(), rel=1e-6)
    # ORPO: lambda 0.1 times the odds-ratio term plus the chosen NLL, log odds(P) = log P − log(1 − P).
    total, _ = dpo(free, BigramLM(), preference_type="orpo", beta=0.1, nll_coef=1.0)
    log_odds = c - np.log(-np.expm1(c)), r - np.log(-np.expm1(r))
    assert float(total) == pytest.approx(sum(0.1 * softplus(-x) for x in log_odds[0] - log_odds[1]) - c.sum(),
                                         rel=1e-6)
    # Robust DPO (eps 0.1) on summed log-probs against a reference, with the NLL term beside it.
    n_c, n_r = np.array([3.0, 2.0, 4.0]), np.array([1.0, 5.0, 2.0])
    ref_c, ref_r = np.array([-4.0, -1.0, -9.0]), np.array([-2.0, -6.0, -3.0])
    with_ref = dict(batch, ref_chosen_logps=jnp.asarray(ref_c), ref_rejected_logps=jnp.asarray(ref_r))
    total, _ = dpo(with_ref, BigramLM(), preference_type="robust", label_smoothing=0.1, nll_coef=0.2)
    bd = 0.1 * ((c * n_c - ref_c) - (r * n_r - ref_r))
    robust = sum((0.9 * softplus(-x) - 0.1 * softplus(x)) / 0.8 for x in bd)
    assert float(total) == pytest.approx(robust + 0.2 * -c.sum(), rel=1e-6)
    # The hinge relu(1 − βΔ) on the same summed log-probs (only IPO's are per token): one pair past the margin.
    total, _ = dpo(with_ref, BigramLM(), preference_type="hinge")
    assert float(total) == pytest.approx(sum(max(0.0, 1 - x) for x in bd), rel=1e-6) and min(1 - bd) < 0


def test_orpo_at_probability_one_stays_finite():
    """An average log-prob of 0 (P = 1) has infinite odds: ORPO clamps it just below 1."""
    chosen, rejected = jnp.array([0.0, 1e-3]), jnp.log(jnp.array([0.5, 0.5]))
    out = orpo_loss(chosen, rejected, lam=1.0)
    # log odds(1 - 1e-6) ~ ln 1e6 = 13.8: the loss is ~ e^-13.8 ~ 1e-6, not 0.
    assert np.all(np.isfinite(out)) and np.all(out > 2e-7) and np.all(out < 4e-6)
    grad = jax.grad(lambda c: orpo_loss(c, rejected, lam=1.0).sum())(chosen)
    assert np.all(np.isfinite(grad))


def test_orpo_log_odds_of_confident_replies_keep_their_digits():
    """log odds = log P − log(1 − P): with P = exp(−1e-4), 1 − P computed as 1 − exp(·) in float32 keeps
    about 3 digits (the loss was 2e-4 off, 1.4e-3 at −1e-5); log(−expm1(·)) keeps them all."""
    def log_odds(x):  # float64, exactly
        return x - math.log(-math.expm1(x))

    chosen, rejected = [-1e-4, -1e-5, -0.3, -2.0], [-2e-4, -1.0, -1.2, -5.0]
    want = [0.5 * softplus(-(log_odds(c) - log_odds(r))) for c, r in zip(chosen, rejected)]
    out = orpo_loss(jnp.array(chosen), jnp.array(rejected), lam=0.5)
    np.testing.assert_allclose(out, want, rtol=5e-6)  # measured 6e-7


def test_reward_loss_takes_each_pairs_margin_from_the_data():
    batch = dict(pair_batch(([4, 3, 0], [5, 2, 0])), margin=jnp.array([0.5, 2.0, 7.0]))
    loss_sum, _ = losses.get("reward", ConfigDict(dict(margin=0.0, center_coef=0.0)))(
        Scores([2.0, 0.0, 9.0, 1.0, 0.0, -9.0]), batch, None)
    assert float(loss_sum) == pytest.approx(softplus(-(1 - 0.5)) + softplus(2.0), rel=1e-6)  # r_c - r_r - m
    with pytest.raises(ValueError, match="leave loss.margin at 0"):
        losses.get("reward", ConfigDict(dict(margin=1.0, center_coef=0.0)))(Scores(np.zeros(6)), batch, None)


def test_pairs_carry_their_optional_numbers_through_the_pipeline(tmp_path):
    from configs import base
    from data import pipeline, sources, tokenizer

    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "margin": i / 2} for i in range(3)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = base.get_config().data
    data.seq_len, data.batch_size = 64, 4
    data.eval_sources.pairs = base.source(str(tmp_path / "p.jsonl"), "jsonl")
    batch = next(iter(pipeline.eval_iterator(data, "preference", tokenizer.load("byte"), "pairs")))
    np.testing.assert_array_equal(batch["margin"], [0.0, 0.5, 1.0, 0.0])  # the 4th slot is padding
    rows[1].pop("margin")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(sources.DataError, match="mixes pairs with 'margin' and pairs without"):
        next(iter(pipeline.eval_iterator(data, "preference", tokenizer.load("byte"), "pairs")))


def test_reference_in_pieces_equals_one_pass():
    """With gradient accumulation the reference runs the batch in pieces; the log-probs must not change."""
    from configs import base
    from data import pipeline, tokenizer
    from model import presets
    from model.transformer import Transformer
    from train.reference import Reference

    data = base.get_config().data
    data.seq_len, data.batch_size, data.synthetic.num_examples = 256, 4, 100
    batch = {k: jnp.asarray(v) for k, v in next(pipeline.train_iterator(data, "preference", tokenizer.load("byte"),
                                                                      seed=0)).items()}
    graphdef, params, frozen = nnx.split(Transformer(presets.get("tiny", vocab_size=384), rngs=nnx.Rngs(0)), nnx.Param, ...)
    whole, pieces = Reference(graphdef, params, frozen)(batch), Reference(graphdef, params, frozen, chunks=2)(batch)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        assert whole[key].shape == (4,)
        np.testing.assert_allclose(pieces[key], whole[key], rtol=1e-6)
        np.testing.assert_allclose(whole[key], sequence_logps(nnx.merge(graphdef, params, frozen), batch)[
            0 if "chosen" in key else 1], rtol=1e-6)
