"""Next-token cross-entropy and z-loss against hand computation on crafted logits.

The loss contract (train/losses/__init__.py): `loss_fn(model, batch, rngs) -> (loss_sum, metrics)` where
loss_sum is a SUM over loss tokens and metrics["weight"] counts them; the step divides by the weight.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from train import losses
from train.losses.next_token import token_nll

L = math.log
# Crafted logits [B=2, T=3, V=4] with closed-form log-softmax:
#   log([1, 2, 3, 4]): Z = 10;  [5, 5, 5, 5]: Z = 4 e^5;  [0, 0, ln 2, 0]: Z = 5.
LOGITS = np.array([
    [[L(1), L(2), L(3), L(4)], [5, 5, 5, 5], [0, 100, 0, 0]],
    [[L(1), L(2), L(3), L(4)], [0, 0, 0, 0], [0, 0, L(2), 0]],
], np.float32)
TARGETS = np.array([[3, 0, 0], [0, 2, 2]], np.int32)
MASK = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
# Per-token NLL = log Z - logit[target]:
#   (0,0): ln 10 - ln 4 = ln 2.5   (0,1): ln 4   (0,2): masked (would be ~100)
#   (1,0): ln 10 - ln 1 = ln 10    (1,1): masked (ln 4)   (1,2): ln 5 - ln 2 = ln 2.5
NLL = np.array([[L(2.5), L(4), 100.0], [L(10), L(4), L(2.5)]])
LOG_Z = np.array([[L(10), 5 + L(4), 100.0], [L(10), L(4), L(5)]])  # 100 + ln(1 + 3e-100) = 100
CE_SUM = L(2.5) + L(4) + L(10) + L(2.5)  # = ln 250 = 5.521461; a mean would be 1.380365
Z_SUM = L(10) ** 2 + (5 + L(4)) ** 2 + L(10) ** 2 + L(5) ** 2  # = 52.98787


class FixedLogits:
    """A stand-in model: returns the given logits, and checks it is called with the batch's positions and segments."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, tokens, positions, segment_ids, dropout_key=None):
        assert positions is BATCH["positions"] and segment_ids is BATCH["segment_ids"]
        assert tokens.shape == self.logits.shape[:2]
        return self.logits


BATCH = dict(tokens=jnp.zeros((2, 3), jnp.int32), targets=jnp.asarray(TARGETS), loss_mask=jnp.asarray(MASK),
             positions=jnp.asarray(np.tile(np.arange(3), (2, 1))), segment_ids=jnp.ones((2, 3), jnp.int32))


class DropoutKeys(FixedLogits):
    """FixedLogits that records the dropout key of every call."""

    def __init__(self, logits):
        super().__init__(logits)
        self.keys = []

    def __call__(self, tokens, positions, segment_ids, dropout_key=None):
        self.keys.append(dropout_key)
        return super().__call__(tokens, positions, segment_ids)


@pytest.mark.parametrize("name", ["next_token", "sft"])
def test_training_passes_a_dropout_key_and_evaluation_none(name):
    """The step's rngs reach the model as a dropout key (residual and adapter dropout draw from it);
    evaluation calls the loss with rngs None and the model runs without dropout."""
    model = DropoutKeys(jnp.asarray(LOGITS))
    loss_fn = losses.get(name, ml_collections.ConfigDict({}))
    loss_fn(model, BATCH, nnx.Rngs(0))
    loss_fn(model, BATCH, None)
    assert model.keys[0] is not None and model.keys[1] is None


def test_token_nll_by_hand():
    nll, log_z = token_nll(jnp.asarray(LOGITS), jnp.asarray(TARGETS))
    assert nll.dtype == jnp.float32 and log_z.dtype == jnp.float32
    # float32 logsumexp of values up to ~100: measured error < 1e-5 absolute.
    np.testing.assert_allclose(nll, NLL, atol=2e-5)
    np.testing.assert_allclose(log_z, LOG_Z, atol=2e-5)


def test_token_nll_computes_in_float32():
    """bfloat16 logits of 256 are exact, but bf16 has a spacing of 2 there: the normaliser 256 + ln 4 needs fp32."""
    logits = jnp.full((1, 1, 4), 256.0, jnp.bfloat16)
    nll, log_z = token_nll(logits, jnp.zeros((1, 1), jnp.int32))
    np.testing.assert_allclose(float(nll[0, 0]), L(4), rtol=1e-5)
    np.testing.assert_allclose(float(log_z[0, 0]), 256 + L(4), rtol=1e-6)


def test_next_token_loss_is_a_sum_with_token_weight():
    loss_fn = losses.get("next_token", {})
    loss_sum, metrics = loss_fn(FixedLogits(jnp.asarray(LOGITS)), BATCH, None)
    # A sum over the 4 loss tokens (ln 250 = 5.52), not their mean (1.38); masked tokens (~100) excluded.
    np.testing.assert_allclose(float(loss_sum), CE_SUM, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ce"]), CE_SUM, rtol=1e-6)
    assert float(metrics["weight"]) == 4.0
    assert "z_loss" not in metrics  # no z-loss configured: nothing added, nothing reported


def test_z_loss_by_hand():
    coef = 1e-2
    loss_fn = losses.get("next_token", ml_collections.ConfigDict({"z_loss": coef}))
    loss_sum, metrics = loss_fn(FixedLogits(jnp.asarray(LOGITS)), BATCH, None)
    # z-loss = coef * sum(log_z^2 * mask) = 0.01 * 52.98787; the loss is ce + z-loss, both sums.
    np.testing.assert_allclose(float(metrics["z_loss"]), coef * Z_SUM, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["ce"]), CE_SUM, rtol=1e-6)
    np.testing.assert_allclose(float(loss_sum), CE_SUM + coef * Z_SUM, rtol=1e-6)
    assert float(metrics["weight"]) == 4.0


def test_gradient_by_hand():
    """d loss_sum / d logits = mask * (softmax - onehot(target) + coef * 2 log_z * softmax): zero where masked."""
    coef = 1e-2
    loss_fn = losses.get("next_token", {"z_loss": coef})
    grad = jax.grad(lambda x: loss_fn(FixedLogits(x), BATCH, None)[0])(jnp.asarray(LOGITS))
    logits = LOGITS.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(4)[TARGETS]
    expected = MASK[..., None] * (p - onehot + coef * 2 * LOG_Z[..., None] * p)
    np.testing.assert_allclose(grad, expected, atol=1e-6)  # float32 softmax: measured error < 2e-7
    assert not np.any(grad[0, 2]) and not np.any(grad[1, 1])  # masked positions get no gradient at all


def test_next_token_trains_on_pretrain_and_sft_batches():
    """The data kinds the trainer builds pipelines for when loss.type is next_token."""
    assert losses.batch_kinds("next_token") == ("pretrain", "sft")


def test_unknown_loss_is_an_error():
    with pytest.raises(ValueError, match="loss.type"):
        losses.get("no_such_loss", {})


def test_sft_loss_is_the_same_packed_or_one_example_per_row():
    """SFT's loss weighs every assistant token the same across the whole step, so the same examples
    packed several to a row, or one per row, give the same loss and gradient. A mean of row means
    would not: packed rows hold several examples, and examples differ in their trained tokens."""
    import optax
    from flax import nnx

    from configs import sft
    from data import pipeline, tokenizer
    from model import presets
    from model.transformer import Transformer
    from train.step import init_state, make_train_step

    def one_batch(packing):
        c = sft.get_config("smoke")
        c.data.seq_len, c.data.batch_size, c.data.packing, c.data.synthetic.num_examples = 512, 12, packing, 240
        batches = list(pipeline.eval_iterator(c.data, "sft", tokenizer.load("byte"), "heldout"))
        assert len(batches) == 1  # all 12 held-out examples in one step either way
        return {k: jnp.asarray(v) for k, v in batches[0].items() if k != "target_bytes"}, c

    packed, c = one_batch(True)
    rows, _ = one_batch(False)
    assert (packed["segment_ids"].max(axis=1) > 1).any() and int(rows["segment_ids"].max()) == 1
    assert float(packed["loss_mask"].sum()) == float(rows["loss_mask"].sum()) > 0
    # Trained tokens are the answers only: prompts and padding carry no loss.
    assert float(rows["loss_mask"].sum()) < 0.5 * float((rows["segment_ids"] > 0).sum())

    model = Transformer(presets.get("tiny", vocab_size=384, max_seq_len=512), rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)  # the step logs the LR it applied
    step = jax.jit(make_train_step(graphdef, losses.get("sft", c.loss), tx))
    (_, m_packed), (_, m_rows) = (step(init_state(params, tx, 0), frozen, b) for b in (packed, rows))
    # Measured |difference| 4.8e-7 in a loss of 5.947 (float32 sums in another order); grad norms equal.
    assert abs(float(m_packed["loss"]) - float(m_rows["loss"])) < 2e-6
    assert abs(float(m_packed["grad_norm"]) - float(m_rows["grad_norm"])) < 1e-6 * float(m_rows["grad_norm"]) + 1e-7

    def mean_of_row_means(b):
        nll, _, mask = losses.next_token.forward_nll(model, b)
        per_row = (nll * mask).sum(1) / jnp.maximum(mask.sum(1), 1)
        return float(per_row[mask.sum(1) > 0].mean())

    assert abs(mean_of_row_means(packed) - mean_of_row_means(rows)) > 1e-4  # the test can tell them apart


def test_sft_loss_trains_on_sft_batches_only():
    assert losses.batch_kinds("sft") == ("sft",)


def test_sft_loss_is_next_token_with_its_z_loss():
    """The sft loss is next_token on the assistant tokens, z-loss included when configured."""
    coef = 1e-2
    loss_sum, metrics = losses.get("sft", ml_collections.ConfigDict({"z_loss": coef}))(FixedLogits(jnp.asarray(LOGITS)),
                                                                                      BATCH, None)
    np.testing.assert_allclose(float(loss_sum), CE_SUM + coef * Z_SUM, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["z_loss"]), coef * Z_SUM, rtol=1e-6)
    assert float(metrics["weight"]) == 4.0
