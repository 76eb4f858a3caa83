"""Held-out evaluation: loss, perplexity and bits per byte against hand computation (train/evaluate.py)."""
import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from train import evaluate as ev

L = math.log


def test_eval_metrics_by_hand():
    # 3 tokens, 6 ln 2 nats in all, decoding to 4 bytes: 2 ln 2 nats per token, perplexity e^(2 ln 2) = 4,
    # 6 bits over 4 bytes = 1.5 bits per byte.
    m = ev.eval_metrics(6 * L(2), 3.0, 4.0)
    assert m["tokens"] == 3.0
    np.testing.assert_allclose([m["loss"], m["perplexity"], m["bits_per_byte"]], [2 * L(2), 4.0, 1.5], rtol=1e-12)


def test_eval_metrics_edge_cases():
    assert ev.eval_metrics(1000.0, 1.0, 10.0)["perplexity"] == math.inf  # e^1000 is past float range
    assert math.isnan(ev.eval_metrics(3.0, 2.0, 0.0)["bits_per_byte"])  # no bytes (only special tokens)
    assert ev.eval_metrics(L(2), 1.0, 1.0)["bits_per_byte"] == pytest.approx(1.0)  # one byte, one bit


class FixedLogits(nnx.Module):
    """A model whose logits are its one parameter, whatever the tokens."""

    def __init__(self, logits):
        self.logits = nnx.Param(jnp.asarray(logits, jnp.float32))

    def __call__(self, tokens, positions, segment_ids, dropout_key=None):
        return self.logits[...]


# Logits [1, 3, V=2]: positions 0 and 1 are uniform (NLL ln 2 for either target); position 2 is [0, ln 3],
# so Z = 4 and the NLL of target 1 is ln 4 - ln 3 = ln(4/3).
LOGITS = [[[0.0, 0.0], [0.0, 0.0], [0.0, L(3)]]]


def batch(mask, target_bytes, targets=(0, 1, 1)):
    return dict(tokens=jnp.zeros((1, 3), jnp.int32), targets=jnp.asarray([targets], jnp.int32),
                loss_mask=jnp.asarray([mask], jnp.float32), target_bytes=jnp.asarray([target_bytes], jnp.int32),
                positions=jnp.arange(3)[None], segment_ids=jnp.ones((1, 3), jnp.int32))


# Position 1 is masked out: its 5 bytes and its ln 2 must not count. NLL = ln 2 + ln(4/3) = ln(8/3) nats over
# 2 tokens and 3 + 1 = 4 bytes: log2(8/3) / 4 = (3 - log2 3) / 4 = 0.35375937 bits per byte.
MASKED = batch([1, 0, 1], [3, 5, 1])
# Every position, 100 bytes each: it would pull bits per byte to ~0 if it were evaluated.
EXTRA = batch([1, 1, 1], [100, 100, 100])


def split():
    graphdef, params, frozen = nnx.split(FixedLogits(LOGITS), nnx.Param, ...)
    return graphdef, params, frozen


def test_eval_step_sums_only_masked_in_positions():
    graphdef, params, frozen = split()
    nll, tokens, nbytes = np.asarray(jax.jit(ev.make_eval_step(graphdef))(params, frozen, MASKED))
    np.testing.assert_allclose(nll, L(8 / 3), rtol=1e-6)
    assert (tokens, nbytes) == (2.0, 4.0)
    m = ev.eval_metrics(float(nll), float(tokens), float(nbytes))
    np.testing.assert_allclose(m["bits_per_byte"], (3 - math.log2(3)) / 4, rtol=1e-6)
    np.testing.assert_allclose(m["loss"], L(8 / 3) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["perplexity"], math.sqrt(8 / 3), rtol=1e-6)


def fake_run(monkeypatch, sources, eval_steps):
    """A stand-in for trainer.Run and the eval data: `shakespeare` yields [EXTRA, EXTRA, MASKED], any other
    source [MASKED, MASKED, EXTRA]."""
    seen = []

    def eval_iterator(data_cfg, kind, tokenizer, name, process_index, process_count):
        assert data_cfg is config.data and kind in ev.EVAL_KINDS and tokenizer == "the tokenizer"
        assert (process_index, process_count) == (0, 1)
        seen.append(name)
        return iter([EXTRA, EXTRA, MASKED] if name == "shakespeare" else [MASKED, MASKED, EXTRA])

    monkeypatch.setattr(ev.pipeline, "eval_iterator", eval_iterator)
    graphdef, params, frozen = split()
    config = ml_collections.ConfigDict(dict(
        data=dict(eval_sources={name: dict(path=f"{name}.txt", format="txt", weight=1.0) for name in sources}),
        train=dict(eval_steps=eval_steps)))
    run = types.SimpleNamespace(config=config, graphdef=graphdef, state=types.SimpleNamespace(params=params),
                                frozen=frozen, tokenizer="the tokenizer", global_batch=lambda b: b, _eval_step=None)
    return run, seen


def test_evaluate_sums_batches_up_to_eval_steps(monkeypatch):
    run, seen = fake_run(monkeypatch, ["shakespeare", "gsm8k"], eval_steps=2)
    rows = ev.evaluate(run, "pretrain")
    assert seen == ["gsm8k", "shakespeare"]  # ConfigDict lists keys sorted: gsm8k is the first source
    # gsm8k, two MASKED batches (EXTRA is past eval_steps): twice the NLL, tokens and bytes, the same ratios.
    # The first source is also reported under the plain keys.
    for prefix in ("eval/gsm8k/", "eval/"):
        np.testing.assert_allclose(rows[prefix + "bits_per_byte"], (3 - math.log2(3)) / 4, rtol=1e-6)
        np.testing.assert_allclose(rows[prefix + "loss"], L(8 / 3) / 2, rtol=1e-6)
        assert rows[prefix + "tokens"] == 4.0
    # shakespeare, two EXTRA batches: NLL 2 (2 ln 2 + ln(4/3)) = 2 ln(16/3) over 6 tokens and 600 bytes.
    np.testing.assert_allclose(rows["eval/shakespeare/bits_per_byte"], (4 - math.log2(3)) / 300, rtol=1e-6)
    np.testing.assert_allclose(rows["eval/shakespeare/loss"], L(16 / 3) / 3, rtol=1e-6)
    assert rows["eval/shakespeare/tokens"] == 6.0
    assert set(rows) == {p + k for p in ("eval/shakespeare/", "eval/gsm8k/", "eval/")
                         for k in ("loss", "perplexity", "bits_per_byte", "tokens")}


def test_evaluate_one_batch(monkeypatch):
    run, _ = fake_run(monkeypatch, ["gsm8k"], eval_steps=1)
    rows = ev.evaluate(run, "sft")
    assert rows["eval/gsm8k/tokens"] == 2.0  # the first MASKED batch only
    np.testing.assert_allclose(rows["eval/bits_per_byte"], (3 - math.log2(3)) / 4, rtol=1e-6)


def test_evaluate_every_batch_when_eval_steps_is_zero(monkeypatch):
    run, _ = fake_run(monkeypatch, ["eval"], eval_steps=0)
    rows = ev.evaluate(run, "pretrain")
    # A source named `eval` is reported only under the plain keys. With EXTRA:
    # NLL 2 ln(8/3) + 2 ln 2 + ln(4/3) = ln(1024/27) nats, 4 + 3 = 7 tokens, 8 + 300 = 308 bytes.
    assert set(rows) == {"eval/loss", "eval/perplexity", "eval/bits_per_byte", "eval/tokens"}
    assert rows["eval/tokens"] == 7.0
    np.testing.assert_allclose(rows["eval/bits_per_byte"], math.log2(1024 / 27) / 308, rtol=1e-6)


def test_evaluate_refuses_unknown_kinds_and_empty_sources(monkeypatch):
    run, _ = fake_run(monkeypatch, ["eval"], eval_steps=0)
    with pytest.raises(ValueError, match="not supported"):  # bits per byte of preference pairs
        ev.evaluate_sources(run.config, "preference", run.tokenizer, lambda batch: None)
    run.config.data.eval_sources = {}
    assert ev.evaluate(run, "preference") == {}  # nothing to evaluate: no rows, no error
    run, _ = fake_run(monkeypatch, ["eval"], eval_steps=0)
    monkeypatch.setattr(ev.pipeline, "eval_iterator", lambda *a, **k: iter([batch([0, 0, 0], [1, 1, 1])]))
    with pytest.raises(ValueError, match="no loss tokens"):
        ev.evaluate(run, "pretrain")


def test_stage_loss_metrics_are_summed_over_the_source_and_divided_by_its_weight(monkeypatch):
    """Kinds without a language-modelling loss (preference pairs) report the stage loss's own sums, over at
    most eval_steps batches, each divided by the source's summed weight (not a count of batches or examples)."""
    batches = [dict(l=[1.0, 2.0], w=[0.25, 0.25], a=[0.25, 0.0]), dict(l=[3.0, 0.0], w=[0.125, 0.0], a=[0.125, 0.0]),
               dict(l=[100.0, 0.0], w=[1.0, 0.0], a=[0.0, 0.0])]  # the third is past eval_steps

    def loss_fn(model, batch, key):
        assert key is None  # evaluation draws no dropout
        return jnp.sum(batch["l"]), {"weight": jnp.sum(batch["w"]), "accuracy": jnp.sum(batch["a"])}

    monkeypatch.setattr(ev.losses, "get", lambda name, cfg: loss_fn)
    monkeypatch.setattr(ev.pipeline, "eval_iterator", lambda *a, **k: iter(
        [{key: jnp.asarray(v, jnp.float32) for key, v in b.items()} for b in batches]))
    graphdef, params, frozen = split()
    config = ml_collections.ConfigDict(dict(data=dict(eval_sources={"pairs": dict(path="p.jsonl", format="jsonl")}),
                                            train=dict(eval_steps=2), loss=dict(type="dpo")))
    run = types.SimpleNamespace(config=config, graphdef=graphdef, state=types.SimpleNamespace(params=params),
                                frozen=frozen, tokenizer="the tokenizer", global_batch=lambda b: b, _eval_step=None)
    rows = ev.evaluate(run, "preference")
    # Loss 1 + 2 + 3 = 6 and accuracy 0.375 over weight 0.625.
    assert set(rows) == {"eval/pairs/loss", "eval/pairs/accuracy", "eval/loss", "eval/accuracy"}
    for prefix in ("eval/pairs/", "eval/"):
        np.testing.assert_allclose([rows[prefix + "loss"], rows[prefix + "accuracy"]], [9.6, 0.6], rtol=1e-6)
    batches[:2] = [dict(l=[1.0, 0.0], w=[0.0, 0.0], a=[0.0, 0.0])] * 2
    run._eval_step = None
    with pytest.raises(ValueError, match="data.eval_sources.pairs: nothing to evaluate"):
        ev.evaluate(run, "preference")
