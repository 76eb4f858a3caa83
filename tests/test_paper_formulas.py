"""What the papers' formulas are taken over, end to end from the data layer: DPO's sequence log-prob is
the sum over the reply's tokens (its end-of-turn included, the prompt excluded), bits per byte divide by
every UTF-8 byte of the evaluated text exactly once, and a reward model is read in RL after the same
tokens it was trained to score. The formulas themselves are pinned number by number in
test_preference_losses.py, test_rl.py, test_rl_by_hand.py, test_evaluate.py and test_harness.py."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from data import pipeline, tokenizer
from data.chat import render
from train import evaluate as ev
from train.losses.dpo import sequence_logps
from train.losses.reward import whole_sequences

BYTE = tokenizer.load("byte")


class Uniform(nnx.Module):
    """Uniform logits over V tokens: every target costs ln V nats."""

    V = 384

    def __call__(self, tokens, positions, segment_ids, dropout_key=None):
        return jnp.zeros((*tokens.shape, self.V), jnp.float32)


ROW = {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five."}


def one_pair(tmp_path):
    """The preference batch of ROW alone, as the data layer makes it (byte tokenizer, kiln template)."""
    (tmp_path / "p.jsonl").write_text(json.dumps(ROW) + "\n")
    data = base.get_config().data
    data.seq_len, data.batch_size = 64, 1
    data.eval_sources.pairs = base.source(str(tmp_path / "p.jsonl"), "jsonl")
    return next(iter(pipeline.eval_iterator(data, "preference", BYTE, "pairs"))), data.chat_template


def test_dpo_log_probs_sum_the_replys_tokens_and_its_end_of_turn_not_the_prompt(tmp_path):
    """Rafailov et al.'s log π(y|x) is a sum over y's tokens. Under a uniform model every token is −ln V,
    so the sums count the trained tokens: the reply's 8 (chosen) and 5 (rejected) bytes plus the end-of-turn
    token, none of the prompt's or the template's."""
    batch, _ = one_pair(tmp_path)
    for side in ("chosen", "rejected"):
        trained = batch[f"{side}_targets"][0][batch[f"{side}_loss_mask"][0] > 0].tolist()
        assert BYTE.decode(trained[:-1]) == ROW[side] and trained[-1] == BYTE.special_id("<|end|>")
    pc, pr, nc, nr = sequence_logps(Uniform(), {k: jnp.asarray(v) for k, v in batch.items()})
    assert (float(nc[0]), float(nr[0])) == (9.0, 6.0)
    np.testing.assert_allclose([pc[0], pr[0]], [-9 * math.log(Uniform.V), -6 * math.log(Uniform.V)], rtol=1e-6)


def test_bits_per_byte_count_every_utf8_byte_of_a_long_document_once(tmp_path):
    """A 59-byte document (multi-byte characters) evaluated in rows of 16: every byte is a trained target in
    exactly one window (none dropped or counted twice at a window edge), and the closing EOS is one more
    token of NLL but no byte. A uniform model's bits per byte is then 60 ln V / (59 ln 2)."""
    text = "héllo wörld 😀, naïve café — thirty-one more bytes."
    assert len(text.encode("utf-8")) == 59
    (tmp_path / "t.txt").write_text(text)
    data = base.get_config().data
    data.seq_len, data.batch_size = 16, 2
    data.eval_sources.t = base.source(str(tmp_path / "t.txt"), "text")
    graphdef, params, frozen = nnx.split(Uniform(), nnx.Param, ...)
    step = jax.jit(ev.make_eval_step(graphdef))
    rows = ev.evaluate_sources(data_config(data), "pretrain", BYTE, lambda b: step(params, frozen, b))
    assert rows["eval/tokens"] == 60
    assert rows["eval/bits_per_byte"] == pytest.approx(60 * math.log2(Uniform.V) / 59, rel=1e-6)
    assert rows["eval/perplexity"] == pytest.approx(Uniform.V, rel=1e-5)


def data_config(data):
    """A run config holding `data`, evaluating every batch."""
    config = base.get_config()
    config.data, config.train.eval_steps = data, 0
    return config


def test_a_reward_model_scores_in_rl_the_sequence_it_was_trained_on(tmp_path):
    """Bradley–Terry trains the score read after a pair's whole sequence (prompt, reply, end-of-turn); the
    RL / rejection scorer (train/rewards.py) renders prompt and reply itself. Both must be the same tokens,
    or the reward model is read at a token it never learnt to score."""
    batch, template = one_pair(tmp_path)
    tokens, _, segments = whole_sequences({k: jnp.asarray(v) for k, v in batch.items()}, "chosen")
    trained = np.asarray(tokens[0])[np.asarray(segments[0]) > 0].tolist()
    scored = render([{"role": "user", "content": ROW["prompt"]}, {"role": "assistant", "content": ROW["chosen"]}],
                    BYTE, template)[0]
    assert trained == scored and scored[-1] == BYTE.special_id("<|end|>")
