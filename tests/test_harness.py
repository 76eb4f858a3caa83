"""Kiln models in lm-evaluation-harness: log-likelihoods equal the model's own, generation goes through
the sampler, and the harness runs a task defined from local files."""
import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

from data import tokenizer as tokenizers  # noqa: E402
from model import presets  # noqa: E402
from model.sampling import SampleBatch  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from train.generate import Sampler  # noqa: E402
from train.harness import KilnLM  # noqa: E402

BYTE = tokenizers.load("byte")


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def lm():
    model = Transformer(presets.get("tiny", vocab_size=384), rngs=nnx.Rngs(0))
    return KilnLM(sampler=Sampler(model, BYTE), batch_size=3, max_length=32)


_FORWARDS = {}


def log_softmax(model, ids):
    """[len(ids) - 1, V] next-token log-probs after each of ids[:-1], from one plain forward of them
    right-padded to 64 tokens, which a causal model never reads (one compiled program for every length)."""
    if id(model) not in _FORWARDS:
        graphdef, state = nnx.split(model)
        _FORWARDS[id(model)] = (model, state, jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)))
    _, state, forward = _FORWARDS[id(model)]
    inputs = np.zeros((1, 64), np.int32)
    inputs[0, :len(ids) - 1] = ids[:-1]
    return np.asarray(jax.nn.log_softmax(forward(state, jnp.asarray(inputs)), axis=-1)[0, :len(ids) - 1])


def reference(model, ids):
    """log P(ids[t] | ids[:t]) for t >= 1."""
    return log_softmax(model, ids)[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def test_loglikelihood_equals_the_models_own(lm):
    pairs = [("The sum is", " 42"), ("Ava has 3 apples.", " She eats one."), ("x", "yz")]
    got = lm.loglikelihood([Request(c, k) for c, k in pairs] * 2)  # 6 requests: batches of 3 and 3
    for (context, continuation), (score, greedy) in zip(pairs * 2, got):
        ctx, cont = BYTE.encode(context, add_bos=True), BYTE.encode_text(continuation)
        want = reference(lm.sampler.model, ctx + cont)[-len(cont):]
        assert abs(score - float(want.sum())) < 1e-5  # measured 0: the padded batch computes the same sums
        logp = log_softmax(lm.sampler.model, ctx + cont)[-len(cont):]
        assert greedy == bool(np.all(np.argmax(logp, -1) == np.asarray(cont)))


def test_loglikelihood_of_a_long_context_keeps_its_last_max_length_inputs(lm):
    """Context and continuation longer than max_length + 1 tokens lose the context's start: the row scored
    is their last 33 ids (32 inputs predicting 32 targets), the continuation at its end."""
    context, continuation = "Ben finds 12 more marbles and gives 5 to Chloe. How many", " are left?"
    ctx, cont = BYTE.encode(context, add_bos=True), BYTE.encode_text(continuation)
    assert len(ctx + cont) == 67
    (score, _), _, _ = lm.loglikelihood([Request(context, continuation), Request("x", "yz"), Request("x", "y")])
    want = reference(lm.sampler.model, (ctx + cont)[-33:])[-len(cont):]
    assert abs(score - float(want.sum())) < 1e-5  # batched with short rows, like the other tests (one program)


def test_the_models_own_greedy_continuation_is_greedy(lm):
    """Scored on token ids: a random model's greedy bytes need not be text."""
    context = BYTE.encode("Ava has", add_bos=True)
    ids = lm.sampler.generate([context], max_new_tokens=6, temperature=0.0, stop_ids=()).row(0)[0]
    (_, greedy), (_, other) = lm._score([(context, ids), (context, ids[:-1] + [(ids[-1] + 1) % 264])])
    assert greedy and not other


def harness_windows(ids, prefix, max_length):
    """lm-eval's own rolling windows of `ids` (context_len 1, made disjoint), as its models score a text."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    return [make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix, max_length, 1)]


def test_loglikelihood_rolling_sums_every_token(lm):
    short = "Ava has 3 apples."
    ids = BYTE.encode(short, add_bos=True)
    assert abs(lm.loglikelihood_rolling([Request(short)])[0] - float(reference(lm.sampler.model, ids).sum())) < 1e-4
    long = "Ben finds 12 more marbles and gives 5 to Chloe. " * 2 + "Done."  # 101 bytes: four windows
    windows = harness_windows(BYTE.encode_text(long), BYTE.bos_id, 32)
    # Three full windows conditioned on one token each; the last five bytes on the 28 before them (a 33-id row).
    assert [(len(c), len(p)) for c, p in windows] == [(1, 32), (1, 32), (1, 32), (28, 5)]
    want = sum(float(reference(lm.sampler.model, c + p)[-len(p):].sum()) for c, p in windows)
    assert abs(lm.loglikelihood_rolling([Request(long)])[0] - want) < 1e-3  # measured 1.2e-5 (of -540)


def harness_split(tok, context, continuation):
    """lm-eval's own split of a request (TemplateLM._encode_pair, a causal model whose encoding adds BOS)."""
    from lm_eval.api.model import TemplateLM

    model = types.SimpleNamespace(backend="causal", tok_encode=lambda text: tok.encode(text, add_bos=True))
    return TemplateLM._encode_pair(model, context, continuation)


def test_loglikelihood_splits_context_and_continuation_as_the_harness_does(lm):
    """A context's trailing space belongs to the continuation (" 7" is scored, not "7" after a lone space),
    its leading space stays; the byte tokenizer splits nowhere else, so both sides are checked against lm-eval's
    split and the model. An empty context is BOS alone, before the continuation's own tokens (lm-eval's
    prefix token); a continuation of no tokens is refused (it scored 0, and greedy)."""
    pairs = [("Answer: ", "7"), ("The sum is  \n", "42."), ("  Q:  ", "7")]
    got = lm.loglikelihood([Request(c, k) for c, k in pairs])
    for (context, continuation), (score, _) in zip(pairs, got):
        ctx, cont = harness_split(BYTE, context, continuation)
        assert abs(score - float(reference(lm.sampler.model, ctx + cont)[-len(cont):].sum())) < 1e-5
        assert lm.encode_pair(context, continuation) == (ctx, cont)
    assert harness_split(BYTE, *pairs[0])[1] == BYTE.encode_text(" 7")
    assert lm.encode_pair("", "Ava") == ([BYTE.bos_id], BYTE.encode_text("Ava"))
    with pytest.raises(ValueError, match="empty continuation '' for context 'x'"):
        lm.loglikelihood([Request("x", "")])


@pytest.fixture(scope="module")
def bpe_lm(tmp_path_factory):
    """A byte-level BPE tokenizer without BOS (as Qwen2's: EOS is the prefix token) and a model for it."""
    from test_tokenizer import hf_dir

    tok = tokenizers.load(hf_dir(tmp_path_factory.mktemp("bpe"), ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                 {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    model = Transformer(presets.get("tiny", vocab_size=400), rngs=nnx.Rngs(1))
    return KilnLM(sampler=Sampler(model, tok), batch_size=4, max_length=16)


def test_loglikelihood_with_merging_tokens_and_no_bos(bpe_lm):
    """BPE merges across the boundary ("is " + "42" is not "is" + " 42" token by token): the continuation is
    the tokens of the whole after the context's, as lm-eval takes them. Without BOS an empty context is EOS,
    and a rolling text starts from EOS too, so its first token is scored."""
    tok, model = bpe_lm.tok, bpe_lm.sampler.model
    context, continuation = "The answer is ", "42 apples"
    assert tok.encode_text(context) + tok.encode_text(continuation) != tok.encode_text(context + continuation)
    ctx, cont = harness_split(tok, context, continuation)
    short = "Ben has 12 more marbles."
    (score, _), (empty, _) = bpe_lm.loglikelihood([Request(context, continuation), Request("", short)])
    assert abs(score - float(reference(model, ctx + cont)[-len(cont):].sum())) < 1e-5
    assert tok.bos_id is None
    assert abs(empty - float(reference(model, [tok.eos_id] + tok.encode_text(short)).sum())) < 1e-5
    assert bpe_lm.encode_pair(context, continuation) == (ctx, cont) and bpe_lm.prefix_id == tok.eos_id
    text = "Ben has 12 more marbles than Ava, who has 5. How many does Ben have?"
    ids = tok.encode_text(text)
    windows = harness_windows(ids, tok.eos_id, 16)
    assert [(len(c), len(p)) for c, p in windows] == [(1, 16), (3, 14)]  # the second window reads 2 more tokens
    want = sum(float(reference(model, c + p)[-len(p):].sum()) for c, p in windows)
    assert abs(bpe_lm.loglikelihood_rolling([Request(text)])[0] - want) < 1e-4
    with pytest.raises(ValueError, match=r"continuation of \d+ tokens does not fit max_length=16"):
        bpe_lm.loglikelihood([Request("Q:", " " + text)])  # scored 0 (an empty slice) before


def test_generate_until_is_the_samplers_greedy_text(lm):
    """Requests are batched by their settings and answered in request order, each as if alone."""
    asks = [("Ava has", ["\n"], 12), ("Ben buys 3", ["e"], 12), ("Cleo", ["\n"], 12), ("Dan", ["\n"], 7)] * 3
    out = lm.generate_until([Request(text, {"until": until, "max_gen_toks": n}) for text, until, n in asks])
    for (text, until, n), got in zip(asks, out):
        want = lm.sampler.complete([text], stop=until, max_new_tokens=n, temperature=0.0, chat=False)[0]["text"]
        assert got == want and until[0] not in got
    assert len(set(out[:4])) > 1  # the prompts differ, and so do their continuations


class ScriptedSampler:
    """Stands in for the Sampler: every row continues with `text`; records what generate_until asked for."""

    def __init__(self, model, text):
        self.model, self.tokenizer, self.ids, self.calls = model, BYTE, BYTE.encode_text(text), []

    def generate(self, prompt_ids, **kw):
        self.calls.append((prompt_ids, kw))
        n, width = len(prompt_ids), len(self.ids)
        return SampleBatch(tokens=np.asarray([self.ids] * n, np.int32), logprobs=np.zeros((n, width), np.float32),
                           lengths=np.full((n,), width, np.int32), finish_reasons=["length"] * n,
                           prompt_index=np.arange(n, dtype=np.int32))


def test_generate_until_cuts_at_the_earliest_stop_and_keeps_the_end_of_a_long_context(lm):
    """The text ends before whichever `until` string comes first; a context too long for the model and the
    generation loses its start; greedy unless the request samples, with its temperature and top_p."""
    sampler = ScriptedSampler(lm.sampler.model, " 42\n\nQuestion: next")
    harness = KilnLM(sampler=sampler, batch_size=2)
    long = "".join(chr(97 + i % 26) for i in range(300))  # 301 ids with BOS; the model holds 256
    out = harness.generate_until([
        Request("Q: a", {"until": ["Question:", "\n\n"], "max_gen_toks": 8}),
        Request(long, {"until": ["Question:", "2\n"], "max_gen_toks": 16, "do_sample": True, "temperature": 0.7,
                       "top_p": 0.9}),
        Request("Q: b", {"until": ["Question:"], "max_gen_toks": 8, "do_sample": False, "temperature": 0.9})])
    assert out == [" 42", " 4", " 42\n\n"]
    (ids1, kw1), (ids2, kw2), (ids3, kw3) = sampler.calls
    assert ids3 == [BYTE.encode("Q: b", add_bos=True)] and kw3["temperature"] == 0.0  # do_sample off: greedy
    assert ids1 == [BYTE.encode("Q: a", add_bos=True)]
    assert (kw1["temperature"], kw1["top_p"], kw1["max_new_tokens"]) == (0.0, 1.0, 8)
    assert kw1["stop_sequences"] == [BYTE.encode_text("Question:"), BYTE.encode_text("\n\n")]
    assert ids2 == [BYTE.encode(long, add_bos=True)[-(256 - 16):]] and lm.sampler.model.cfg.max_seq_len == 256
    assert (kw2["temperature"], kw2["top_p"], kw2["max_new_tokens"]) == (0.7, 0.9, 16)


def test_max_length_defaults_to_the_models_context_and_batch_size_auto_to_16(lm):
    harness = KilnLM(sampler=lm.sampler, batch_size="auto")
    assert (harness.max_length, harness.batch_size) == (lm.sampler.model.cfg.max_seq_len, 16) == (256, 16)


def test_generate_until_defaults_to_256_new_tokens_and_takes_one_stop_string(lm):
    """A request without max_gen_toks generates up to 256 tokens (the harness's default), and `until` may be
    one string rather than a list of them."""
    roomy = types.SimpleNamespace(cfg=dataclasses.replace(lm.sampler.model.cfg, max_seq_len=512))  # room for 256
    sampler = ScriptedSampler(roomy, " 42\n\nQuestion: next")
    assert KilnLM(sampler=sampler).generate_until([Request("Q: c", {"until": "Question:"})]) == [" 42\n\n"]
    (_, kw), = sampler.calls
    assert kw["max_new_tokens"] == 256 and kw["stop_sequences"] == [BYTE.encode_text("Question:")]


@pytest.mark.parametrize("max_gen_toks", [0, 256, 300])
def test_generate_until_refuses_a_generation_that_leaves_no_room_for_the_context(lm, max_gen_toks):
    """max_gen_toks >= max_seq_len (256) left the whole context in place (ids[-0:]) or cut it from a
    positive index; zero generates nothing. Each is refused up front, naming the request."""
    sampler = ScriptedSampler(lm.sampler.model, " 42")
    with pytest.raises(ValueError, match=f"request 1: max_gen_toks={max_gen_toks} .*max_seq_len=256"):
        KilnLM(sampler=sampler).generate_until([Request("Q: a", {"max_gen_toks": 8}),
                                                Request("Q: b", {"max_gen_toks": max_gen_toks})])
    assert sampler.calls == []


@pytest.mark.slow  # the default run stays under 15 minutes; .ci/run runs it with the slow tests
def test_harness_runs_a_local_gsm8k_task(lm, tmp_path, data_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    gsm8k = os.path.join(data_dir, "gsm8k")
    (tmp_path / "kiln_gsm8k.yaml").write_text(json.dumps({
        "task": "kiln_gsm8k_local", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": os.path.join(gsm8k, "test.jsonl"),
                                          "train": os.path.join(gsm8k, "train.jsonl")}},
        "test_split": "test", "fewshot_split": "train", "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer.split('####')[-1].strip()}}",
        "generation_kwargs": {"until": ["\n\n", "Question:"], "do_sample": False, "max_gen_toks": 8},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    results = lm_eval.simple_evaluate(model=lm, tasks=["kiln_gsm8k_local"], num_fewshot=1, limit=3,
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    row = results["results"]["kiln_gsm8k_local"]
    assert row["exact_match,none"] == 0.0  # a random model; the point is that the harness ran it through Kiln
    assert len(results["samples"]["kiln_gsm8k_local"]) == 3
