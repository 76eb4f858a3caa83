"""The sampler: exactness against the full forward, sampling statistics, stopping, sharding, the text
wrapper and `kiln sample`."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from data.tokenizer import ByteTokenizer
from launch import sample as sample_cli
from model import hf, presets, sampling
from model.config import LoraConfig, PrefixConfig
from model.sharding import make_mesh, shard_module
from model.transformer import Transformer
from train import checkpoint
from train.generate import Sampler, load_sampler

# The byte tokenizer's 264 ids fit; a wider init than the default makes next-token distributions
# peaked enough that greedy continuations are far from ties.
CFG = presets.get("tiny", vocab_size=264, init_std=0.1)
MODEL = Transformer(CFG, rngs=nnx.Rngs(0))
BYTE = ByteTokenizer()
# Ragged prompts: one fills the 64-slot bucket exactly, the others are left-padded by 59 and 41.
PROMPTS = [list(np.random.RandomState(i).randint(8, 264, n)) for i, n in enumerate((5, 23, 64))]
N = 12
WIDTH = 80  # the longest prompt and its continuation
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9, num_samples=2)  # one compiled program for most tests


@jax.jit
def _forward(state, tokens_BT):
    return nnx.merge(*state)(tokens_BT)


def forward_logits(model, rows):
    """Float32 logits of the training forward for each row, right-padded to one width (one compiled
    program; the forward is causal, so the padding is unseen)."""
    tokens = np.zeros((len(rows), WIDTH), np.int32)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = ids
    return np.asarray(_forward(nnx.split(model), tokens))


def greedy_reference(model, prompts, steps):
    """Greedy continuations by recomputing the full forward after every token."""
    rows = [list(p) for p in prompts]
    for _ in range(steps):
        logits = forward_logits(model, rows)
        for r, ids in enumerate(rows):
            ids.append(int(np.argmax(logits[r, len(ids) - 1])))
    return np.asarray([ids[len(p):] for ids, p in zip(rows, prompts)])


def generate(**kw):
    kw = dict(dict(max_new_tokens=N, temperature=0.0), **kw)
    return sampling.generate(kw.pop("model", MODEL), kw.pop("prompts", PROMPTS), **kw)


@pytest.fixture(scope="module")
def greedy():
    return generate()


def test_greedy_equals_argmax_of_full_forward_recomputed_every_step(greedy):
    np.testing.assert_array_equal(greedy.tokens, greedy_reference(MODEL, PROMPTS, N))
    assert greedy.lengths.tolist() == [N] * 3 and greedy.finish_reasons == ["length"] * 3
    assert len(set(map(tuple, greedy.tokens.tolist()))) == 3  # the rows really differ


def test_logprobs_equal_the_training_forward_untempered_and_rows_are_prompt_major():
    """Sampled with temperature, top-k and top-p; the log-probs are still the model's own."""
    out = generate(seed=3, **SAMPLED)
    assert out.tokens.shape == (6, N) and out.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    prompts = [PROMPTS[i] for i in out.prompt_index]
    logits = forward_logits(MODEL, [p + t.tolist() for p, t in zip(prompts, out.tokens)])
    logp = jax.nn.log_softmax(logits, axis=-1)
    want = np.stack([logp[r, len(p) - 1 + np.arange(N), out.tokens[r]] for r, p in enumerate(prompts)])
    err = np.abs(want - out.logprobs).max()
    print(f"sampler vs training forward log-probs: max abs err {err:.2e}")
    # Measured 9.5e-7 (float32: the cached and the full attention sum in other orders). A position off
    # by one, a cache slot overwritten or a tempered distribution moves them by > 1e-2.
    assert err <= 1e-4
    assert all((out.tokens[r] != out.tokens[r + 1]).any() for r in (0, 2, 4))  # each sample draws its own


def test_decode_phases_split_the_steps_in_whole_multiples():
    assert sampling.decode_phases(128) == [33, 65, 97, 128]  # 4 phases of 32 steps (steps 1..127)
    assert sampling.decode_phases(256) == [65, 129, 193, 256]
    assert sampling.decode_phases(33) == [33] and sampling.decode_phases(1) == [1]


def test_phased_decoding_with_a_growing_cache_is_exact(greedy, monkeypatch):
    """Phases of 4 steps: the cache grows twice within N = 12 steps; greedy tokens and log-probs stay
    those of the full forward, and rows stopped in the first phase stay stopped."""
    monkeypatch.setattr(sampling, "PHASE_STEPS", 4)
    assert sampling.decode_phases(N) == [5, 9, 12]
    phased = generate()
    np.testing.assert_array_equal(phased.tokens, greedy.tokens)
    np.testing.assert_allclose(phased.logprobs, greedy.logprobs, atol=1e-5)  # measured 0 (same reductions)
    stop = int(greedy.tokens[0, 2])  # row 0 stops in the first phase (step 3 or before)
    out = generate(stop_ids=[stop])
    want = [list(row).index(stop) + 1 if stop in row else N for row in greedy.tokens.tolist()]
    assert out.lengths.tolist() == want and want[0] <= 3
    for r, n in enumerate(want):
        assert out.tokens[r, :n].tolist() == greedy.tokens[r, :n].tolist() and (out.tokens[r, n:] == 0).all()


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, c = (generate(seed=s, **SAMPLED).tokens for s in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    key = generate(seed=jax.random.key(7), **SAMPLED).tokens  # an explicit key is the same as its seed
    np.testing.assert_array_equal(a, key)


def test_row_r_draws_step_s_with_fold_in_of_fold_in_of_the_seed():
    """The documented stream: row r's draw at step s uses fold_in(fold_in(key(seed), r), s), so a row's samples
    depend on the seed and its place only. The first two tokens of every row, redrawn from the training
    forward's logits with those keys, are the sampler's."""
    out = generate(seed=7, **SAMPLED)
    rows = [p for p in PROMPTS for _ in range(2)]
    for step in range(2):
        logits = forward_logits(MODEL, [p + out.tokens[r, :step].tolist() for r, p in enumerate(rows)])
        last = np.stack([logits[r, len(p) + step - 1] for r, p in enumerate(rows)])
        keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(jax.random.key(7), r), step) for r in range(6)])
        tok, _ = SAMPLE(jnp.asarray(last), keys, SAMPLED["temperature"], SAMPLED["top_p"], top_k=SAMPLED["top_k"],
                        use_top_p=True)
        np.testing.assert_array_equal(out.tokens[:, step], np.asarray(tok), err_msg=f"step {step}")


def test_top_k_one_and_tiny_top_p_are_greedy(greedy):
    np.testing.assert_array_equal(generate(temperature=1.5, top_k=1, seed=1).tokens, greedy.tokens)
    np.testing.assert_array_equal(generate(temperature=1.5, top_p=1e-6, seed=1).tokens, greedy.tokens)


def test_top_k_none_is_off_as_zero(greedy):
    """None switches top-k off, as 0 does (transformers' convention): it runs the very program of top_k=0."""
    before = sampling._sample._cache_size()
    np.testing.assert_array_equal(generate(top_k=None).tokens, greedy.tokens)
    assert sampling._sample._cache_size() == before


# -- sampling statistics on crafted logits ---------------------------------------------------------
PROBS = np.asarray([0.45, 0.25, 0.15, 0.1, 0.05])
SAMPLE = jax.jit(sampling.sample_logits, static_argnames=("greedy", "top_k", "use_top_p"))


def draw(probs, temperature, top_k, top_p, seed=0, n=20000):
    """(token ids [n], log-probs [n]) drawn by `sample_logits` from n rows of logits log(probs), the token
    ids shuffled so that sorting is really exercised, with each row's count of every entry of probs."""
    order = np.asarray([3, 0, 4, 1, 2])
    logits = np.zeros((n, 5), np.float32)
    logits[:, order] = np.log(probs)
    keys = jax.random.split(jax.random.key(seed), n)
    tok, logp = SAMPLE(jnp.asarray(logits), keys, temperature, top_p, top_k=top_k, use_top_p=top_p < 1)
    tok = np.asarray(tok)
    return tok, np.asarray(logp), np.bincount(tok, minlength=5)[order]


def assert_frequencies(counts, expect):
    """Each count is binomial(n, p): within 4.5 standard deviations (a false alarm once in ~10^5 runs)."""
    n = counts.sum()
    tolerance = 4.5 * np.sqrt(n * expect * (1 - expect)) + 0.5
    assert np.all(np.abs(counts - n * expect) <= tolerance), (counts, n * expect)


@pytest.mark.parametrize("temperature,top_k,top_p,expect", [
    (1.0, 0, 1.0, PROBS),
    (0.5, 0, 1.0, PROBS ** 2 / np.sum(PROBS ** 2)),  # p^(1/T), renormalised
    (1.0, 3, 1.0, np.r_[PROBS[:3], 0, 0] / PROBS[:3].sum()),
    # The nucleus of 0.6: 0.45 (mass before it 0) and 0.25 (before it 0.45 < 0.6); 0.15 has 0.7 before it.
    (1.0, 0, 0.6, np.r_[PROBS[:2], 0, 0, 0] / PROBS[:2].sum()),
    # Top-p acts on the top-k tokens renormalised: 0.45, 0.25 of 0.85 leave 0.82 before 0.15 (the whole
    # distribution would leave 0.70 < 0.8 and keep it).
    (1.0, 3, 0.8, np.r_[PROBS[:2], 0, 0, 0] / PROBS[:2].sum()),
    # ... and on the tempered distribution: at T = 0.5 the first token alone holds 0.675 >= 0.6 (untempered,
    # 0.45 < 0.6 would keep a second).
    (0.5, 0, 0.6, np.r_[1.0, 0, 0, 0, 0]),
])
def test_sampling_frequencies_match_the_filtered_softmax(temperature, top_k, top_p, expect):
    tok, logp, counts = draw(PROBS, temperature, top_k, top_p)
    assert_frequencies(counts, expect)
    np.testing.assert_allclose(logp, np.log(PROBS[np.argsort([3, 0, 4, 1, 2])])[tok], atol=1e-6)


@pytest.mark.parametrize("probs,temperature,top_k,top_p", [
    ([0.4, 0.3, 0.1, 0.1, 0.1], 1.0, 3, 1.0),  # the k-th value ties with two more: all five are kept
    # Top-p on what top-k kept, ties included: 0.5 leaves 0.5 < 0.6 before 0.2, so 0.2 is in the nucleus (the
    # three top values alone, renormalised to 0.625 and 0.25, would stop at 0.5).
    ([0.5, 0.2, 0.1, 0.1, 0.1], 1.0, 3, 0.6),
    ([0.5, 0.2, 0.1, 0.1, 0.1], 2.0, 3, 0.4),  # the same at T = 2: 0.336 < 0.4 before the second token
])
def test_ties_at_the_kth_value_sample_as_hugging_faces_warpers(probs, temperature, top_k, top_p):
    """Transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper in the order `generate` applies
    them give the distribution to draw from. Top-k keeps every token tied with the k-th value, and top-p's
    nucleus is of that whole set renormalised (no tie here at the nucleus's own boundary, where transformers
    keeps whichever tied token its sort puts first)."""
    scores = TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(temperature)(None, torch.log(torch.tensor([probs]))))
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expect = torch.softmax(scores, dim=-1)[0].double().numpy()
    assert_frequencies(draw(np.asarray(probs), temperature, top_k, top_p)[2], expect)


def test_top_p_boundary_a_nucleus_that_reaches_top_p_exactly_is_complete():
    """Probabilities 1/2, 1/4, 1/8, 1/16, 1/16 are exact in float32: the mass before the third token is exactly
    0.75, so top_p=0.75 keeps two tokens (they reach it) and never draws a third; a hair above keeps three.
    At 0.9 the nucleus ends at the first 1/16 (0.875 before it), and the other, tied with it, is kept too:
    which of two equal tokens to drop would depend on their ids (transformers keeps the one its sort puts first)."""
    probs = np.asarray([0.5, 0.25, 0.125, 0.0625, 0.0625])
    for top_p, kept in ((0.75, 2), (0.7501, 3), (0.9, 5)):
        counts = draw(probs, 1.0, 0, top_p, seed=1)[2]
        assert np.all(counts[:kept] > 0) and np.all(counts[kept:] == 0), (top_p, counts)


def test_every_row_and_every_step_draws_its_own_randomness():
    """A model with all-zero weights has exactly uniform logits: each draw is then uniform over the 264 ids, and
    only fresh randomness per row and per step keeps the tokens from repeating (one key reused across the steps
    of a row repeats one token; across rows, repeats one row)."""
    graphdef, state = nnx.split(MODEL)
    zero = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, state))
    out = generate(model=zero, seed=5, **SAMPLED)  # the settings of the tests above: their compiled program
    np.testing.assert_allclose(out.logprobs, np.full((6, N), -np.log(264)), rtol=1e-5)  # uniform, untempered
    assert all(len(set(row)) > N // 2 for row in out.tokens.tolist())  # ~11.8 distinct of 12 expected
    assert len(set(out.tokens.ravel().tolist())) > 40  # 72 uniform draws of 264: ~61 distinct expected
    assert len(set(map(tuple, out.tokens.tolist()))) == 6


# -- stopping ----------------------------------------------------------------------------------------
def test_stop_id_ends_the_row_and_pads_after_it(greedy):
    stop = int(greedy.tokens[0, 4])
    first = [int(np.argmax(row == stop)) if stop in row else None for row in greedy.tokens]
    out = generate(stop_ids=[stop], pad_id=-1)
    for r, at in enumerate(first):
        if at is None:
            assert out.finish_reasons[r] == "length" and out.lengths[r] == N
            continue
        assert out.finish_reasons[r] == "stop" and out.lengths[r] == at + 1
        np.testing.assert_array_equal(out.tokens[r, :at + 1], greedy.tokens[r, :at + 1])  # the stop id is kept
        assert np.all(out.tokens[r, at + 1:] == -1) and np.all(out.logprobs[r, at + 1:] == 0)
    assert out.row(0)[0] == greedy.tokens[0, :first[0] + 1].tolist()


def test_stop_sequence_ends_the_row_after_it(greedy):
    seq = greedy.tokens[1, 6:9].tolist()
    out = generate(stop_sequences=[seq, [1, 2, 3, 4, 5]])
    text = greedy.tokens[1].tolist()
    end = next(i + 3 for i in range(N - 2) if text[i:i + 3] == seq)
    assert out.finish_reasons[1] == "stop" and out.lengths[1] == end
    np.testing.assert_array_equal(out.tokens[1, :end], greedy.tokens[1, :end])
    # A sequence that ends with a prompt token must not match across the prompt boundary.
    pair = [PROMPTS[0][-1], int(greedy.tokens[0, 0])]
    assert all(greedy.tokens[0, i:i + 2].tolist() != pair for i in range(N - 1))
    assert generate(stop_sequences=[pair]).finish_reasons[0] == "length"


def test_all_rows_stopped_ends_early_and_one_program_serves_a_bucket(greedy):
    before = sampling._sample._cache_size()
    out = generate(stop_ids=greedy.tokens[:, 0].tolist())
    assert out.lengths.tolist() == [1, 1, 1] and out.finish_reasons == ["stop"] * 3
    # Other lengths in the same 64-token bucket and another stop-id set reuse the compiled program.
    generate(prompts=[p[:-2] for p in PROMPTS], stop_ids=[5, 6])
    assert sampling._sample._cache_size() == before
    # Steps the loop never ran still hold the pad id (here one that is no token, so 0 would show).
    padded = generate(stop_ids=greedy.tokens[:, 0].tolist(), pad_id=-1)
    assert (padded.tokens[:, 1:] == -1).all() and (padded.logprobs[:, 1:] == 0).all()


def test_without_a_pad_id_rows_pad_with_the_models_pad_token(greedy):
    """pad_id defaults to the model's pad_token_id (0 only for a model without one)."""
    model = Transformer(CFG.replace(pad_token_id=7), rngs=nnx.Rngs(0))  # MODEL's weights: the same seed
    out = generate(model=model, stop_ids=greedy.tokens[:, 0].tolist())
    assert out.lengths.tolist() == [1, 1, 1] and (out.tokens[:, 1:] == 7).all()


def test_bad_arguments_are_clear_errors():
    for kw, msg in [(dict(prompts=[[]]), "prompt 0 is empty"), (dict(prompts=[[300]]), "outside the vocabulary"),
                    (dict(max_new_tokens=250), "max_seq_len=256"), (dict(top_p=0.0), "top_p"),
                    (dict(temperature=-1.0), "temperature"), (dict(num_samples=0), "num_samples"),
                    (dict(top_k=265), r"top_k must be in \[0, 264\]"), (dict(top_k=-1), "top_k"),
                    (dict(max_new_tokens=0), "max_new_tokens must be at least 1")]:
        with pytest.raises(ValueError, match=msg):
            generate(**kw)
    # The longest prompt (64) plus max_new_tokens may fill max_seq_len (256) exactly, not one more.
    sampling._check(CFG, PROMPTS, 192, 1.0, 264, 1.0, 1)
    with pytest.raises(ValueError, match="max_new_tokens=193 exceeds"):
        sampling._check(CFG, PROMPTS, 193, 1.0, 0, 1.0, 1)


# -- adapters, sharding ------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ["lora", "prompt", "prefix"])
def test_adapters_inside_the_model_are_sampled_with(adapter):
    extra = dict(lora=LoraConfig(rank=4, targets=("q", "v", "down"))) if adapter == "lora" else \
        dict(prefix=PrefixConfig(kind=adapter, num_tokens=3))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(CFG.replace(**extra), rngs=nnx.Rngs(1))))
    rng = np.random.RandomState(2)

    def value(path, x):  # random weights from numpy: no compiled initialiser per shape; norms at 1
        norm = "scale" in jax.tree_util.keystr(path)
        return jnp.asarray(np.ones(x.shape) if norm else 0.1 * rng.standard_normal(x.shape), x.dtype)

    # Every adapter weight is non-zero (LoRA's B starts at zero), so that dropping them changes the output.
    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(value, abstract))
    out = generate(model=model)
    np.testing.assert_array_equal(out.tokens, greedy_reference(model, PROMPTS, N))


@pytest.mark.parametrize("axes", [dict(fsdp=2), dict(tensor=2)])
def test_sharded_run_equals_one_device(axes, monkeypatch):
    monkeypatch.setattr(sampling, "PHASE_STEPS", 4)  # three phases: the cache grows twice on the mesh
    mesh = make_mesh(**dict(dict(data=1, fsdp=1, tensor=1), **axes), devices=jax.devices()[:2])
    graphdef, state = nnx.split(MODEL)
    with jax.set_mesh(mesh):
        model = shard_module(nnx.merge(graphdef, jax.tree.map(jnp.copy, state)), mesh)
    one = generate(seed=4, **SAMPLED)
    programs = sampling._sample._cache_size()
    two = generate(model=model, mesh=mesh, seed=4, **SAMPLED)
    assert sampling._sample._cache_size() == programs + 1  # a program of its own, partitioned for the mesh
    np.testing.assert_array_equal(one.tokens, two.tokens)
    np.testing.assert_allclose(one.logprobs, two.logprobs, atol=1e-5)
    assert len(one.lengths) == 6  # the 6 rows were padded to a multiple of the 2 batch shards and back


@pytest.mark.parametrize("tensor", [0, 2, 4])
def test_greedy_pick_equals_argmax_and_log_softmax_on_one_device_and_over_vocabulary_shards(tensor):
    """Ties go to the lowest id, also across shards; with shards, one all-gather of per-shard statistics."""
    rng = np.random.RandomState(0)
    logits = rng.standard_normal((6, 32)).astype(np.float32) * 3
    logits[0, 3] = logits[0, 3 + 8] = logits[0, 30] = 20.0  # a three-way tie: shard 0 of 4 (and of 2) wins
    logits[1, 17] = logits[1, 29] = 20.0  # a tie inside the last shard(s): the lower id wins
    logits[2, 31] = 20.0  # the very last id
    logits[3, 9] = 20.0  # inside the second shard of 4
    logits[4, 0] = 20.0
    if tensor:
        mesh = make_mesh(data=1, fsdp=1, tensor=tensor, devices=jax.devices()[:tensor])
        with jax.set_mesh(mesh):
            logits_BV = jax.device_put(logits, jax.NamedSharding(mesh, jax.P(None, "tensor")))
            tok, logp = jax.jit(sampling.greedy_pick)(logits_BV)
    else:
        tok, logp = SAMPLE(jnp.asarray(logits), jnp.zeros((6,), jnp.uint32), greedy=True)
    np.testing.assert_array_equal(np.asarray(tok), [3, 17, 31, 9, 0, np.argmax(logits[5])])
    rows = logits.astype(np.float64)
    exact = -np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1))  # the log-prob of the max
    np.testing.assert_allclose(np.asarray(logp), exact, rtol=1e-6, atol=1e-6)
    assert abs(exact[0] - np.log(1 / 3)) < 1e-5  # three tied logits far above the rest share the mass


def test_greedy_on_a_tensor_mesh_equals_one_device(greedy):
    mesh = make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    graphdef, state = nnx.split(MODEL)
    with jax.set_mesh(mesh):
        model = shard_module(nnx.merge(graphdef, jax.tree.map(jnp.copy, state)), mesh)
    two = generate(model=model, mesh=mesh)
    np.testing.assert_array_equal(two.tokens, greedy.tokens)
    np.testing.assert_allclose(two.logprobs, greedy.logprobs, atol=1e-5)


# -- the text wrapper ----------------------------------------------------------------------------
def test_complete_cuts_text_at_stop_strings():
    sampler = Sampler(MODEL, BYTE)
    prompts = ["Hello", "Once upon", "a time"]  # three, as PROMPTS: the greedy tests' programs serve these
    free = sampler.complete(prompts, max_new_tokens=N, temperature=0.0)
    ids = free[0]["token_ids"]
    # The random model's bytes are mostly not text; take two printable ASCII ones in a row as the stop.
    i = next(i for i in range(1, N - 1) if all(40 <= t - BYTE.offset < 127 for t in ids[i:i + 2]))
    stop = BYTE.decode(ids[i:i + 2])
    cut = sampler.complete(prompts, stop=[stop, "never appears", ""], max_new_tokens=N, temperature=0.0)  # "": none
    text = free[0]["text"]
    assert cut[0]["text"] == text[:text.index(stop)] and cut[0]["finish_reason"] == "stop"
    # The tokens run to the end of the stop string, where the decode loop stopped too.
    assert cut[0]["token_ids"] == ids[:i + 2]
    assert cut[0]["logprobs"] == pytest.approx(free[0]["logprobs"][:i + 2], abs=1e-6)
    assert stop not in free[1]["text"] and cut[1] == free[1]
    assert [c["prompt_index"] for c in cut] == [0, 1, 2]


def test_text_is_cut_at_the_earliest_stop_string_and_tokens_at_its_end():
    """Stop strings as listed need not occur in that order: the text ends before the earliest, the tokens
    with the shortest prefix that holds one (a stop string may end inside a token the others span)."""
    sampler = Sampler(MODEL, BYTE)
    ids = BYTE.encode_text("hello world\n\nmore")
    assert sampler._cut(ids, ["\n\n", "o w", "more"]) == ("hell", 7)  # "hello w": 7 byte tokens
    assert sampler._cut(ids, ["d\n", "world"]) == ("hello ", 11)  # "hello world" holds "world" first
    assert sampler._cut(ids, ["xyz"]) == ("hello world\n\nmore", None)


def test_complete_reports_a_stop_whenever_it_cuts_the_text():
    """The decode loop can run to its length past a stop string spelled by other tokens than its encoding;
    the text is still cut there, the tokens and log-probs with it, and the reply counts as stopped. Rows are
    prompt-major: sample s of prompt p is row p * num_samples + s."""
    sampler = Sampler(MODEL, BYTE)
    ids = BYTE.encode_text("ab\n\ncd")

    def scripted(prompt_ids, *, num_samples, **_):  # every row writes "ab\n\ncd" and runs to its length
        n = len(prompt_ids) * num_samples
        return sampling.SampleBatch(tokens=np.asarray([ids] * n, np.int32),
                                    logprobs=np.tile(-np.arange(1.0, 7.0, dtype=np.float32), (n, 1)),
                                    lengths=np.full((n,), 6, np.int32), finish_reasons=["length"] * n,
                                    prompt_index=np.repeat(np.arange(len(prompt_ids), dtype=np.int32), num_samples))

    sampler.generate = scripted
    out = sampler.complete(["x", "y"], stop=["\n\n"], num_samples=2, max_new_tokens=6)
    assert [(o["prompt_index"], o["sample_index"]) for o in out] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for o in out:
        assert (o["text"], o["token_ids"], o["logprobs"], o["finish_reason"]) == ("ab", ids[:4], [-1, -2, -3, -4], "stop")
    free = sampler.complete(["x"], stop=["zz"], max_new_tokens=6)[0]  # no stop string in the text: the loop's reason
    assert (free["text"], free["token_ids"], free["finish_reason"]) == ("ab\n\ncd", ids, "length")


def test_complete_refuses_one_string_for_a_list_of_prompts():
    """A string is a sequence too: taken as the list of prompts, "hi" would sample from "h" and from "i"."""
    with pytest.raises(ValueError, match="a list of prompts, not one string"):
        Sampler(MODEL, BYTE).complete("hi", max_new_tokens=N, temperature=0.0)


def test_chat_prompts_end_in_the_assistant_header_and_stop_at_end_of_turn():
    sampler = Sampler(MODEL, BYTE, chat_template="kiln")
    ids = sampler.encode("hi")
    assert ids[-1] == BYTE.token_id("<|assistant|>") and ids[:2] == [BYTE.bos_id, BYTE.token_id("<|user|>")]
    assert sampler.encode([{"role": "user", "content": "hi"}]) == ids
    assert sampler.encode("hi", chat=False) == BYTE.encode("hi", add_bos=True)
    assert sampler.stop_ids() == sorted({BYTE.eos_id, BYTE.token_id("<|end|>")})
    # The model's own end-of-sequence ids (one, or several as Llama 3's) stop too.
    for eos, want in ((9, [9]), ((9, 10), [9, 10])):
        abstract = nnx.eval_shape(lambda: Transformer(CFG.replace(eos_token_id=eos), rngs=nnx.Rngs(0)))
        assert Sampler(abstract, BYTE).stop_ids() == sorted({BYTE.eos_id, *want})
        assert Sampler(abstract, BYTE, chat_template="kiln").stop_ids() == sorted({BYTE.eos_id, BYTE.token_id("<|end|>"),
                                                                                 *want})
    with pytest.raises(ValueError, match="need a chat template"):
        Sampler(MODEL, BYTE).encode([{"role": "user", "content": "hi"}])


# -- kiln sample ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A Kiln run directory: checkpoints plus the config.json of an sft run (byte tokenizer, kiln template)."""
    path = tmp_path_factory.mktemp("run")
    checkpoint.save_params(str(path / "checkpoints"), 5, MODEL, CFG)
    (path / "config.json").write_text(json.dumps({"stage": "sft", "data": {"tokenizer": "byte",
                                                                           "chat_template": "kiln"}}))
    return path


def run_cli(args, capsys):
    assert sample_cli.main(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_cli_samples_a_kiln_run_with_its_chat_template(run_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    # top_k=1 samples greedily (temperature 0 refuses several samples: they would all be one)
    rows = run_cli([f"--checkpoint={run_dir}", f"--prompts={prompts}", "--temperature=1", "--top_k=1",
                    "--max_new_tokens=8", "--num_samples=2"], capsys)
    assert [(r.get("prompt"), r["sample"]) for r in rows] == [("hi", 0), ("hi", 1), (None, 0), (None, 1)]
    assert rows[2]["messages"] == [{"role": "user", "content": "hi"}]
    assert set(rows[0]) == {"prompt", "sample", "text", "token_ids", "logprobs", "finish_reason"}
    # Chat by default for an sft run: "hi" is one user turn of the kiln template.
    chat_ids = Sampler(MODEL, BYTE, chat_template="kiln").encode("hi")
    want = greedy_reference(MODEL, [chat_ids], 8)[0].tolist()
    for row in rows:
        assert row["token_ids"] == want[:len(row["token_ids"])] and row["text"] == BYTE.decode(row["token_ids"])
    out = tmp_path / "out.jsonl"
    assert sample_cli.main([f"--checkpoint={run_dir}/checkpoints/5", "--prompt=hi", "--no-chat",
                            "--temperature=0", "--max_new_tokens=8", f"--output={out}"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    want = greedy_reference(MODEL, [BYTE.encode("hi", add_bos=True)], 8)[0].tolist()
    assert written[0]["token_ids"] == want[:len(written[0]["token_ids"])]
    assert not list(tmp_path.glob("out.jsonl.tmp*"))


def test_load_sampler_chats_for_conversation_stages_with_the_tokenizers_template(run_dir, tmp_path):
    """Text prompts are chat turns for runs of the stages that train on conversations, not for pre-training;
    without a template in the run's config, the one whose control tokens the tokenizer has (the byte
    tokenizer's: kiln)."""
    for stage, chat in (("dpo", True), ("grpo", True), ("pretrain", False)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "checkpoints").symlink_to(run_dir / "checkpoints")
        (tmp_path / stage / "config.json").write_text(json.dumps({"stage": stage, "data": {"tokenizer": "byte"}}))
        sampler, chats = load_sampler(str(tmp_path / stage))
        assert (chats, sampler.chat_template) == (chat, "kiln"), stage
    assert load_sampler(str(run_dir), chat=False)[1] is False  # an explicit choice wins
    # A template the run recorded wins over the one the tokenizer's control tokens suggest (kiln here).
    (tmp_path / "recorded").mkdir()
    (tmp_path / "recorded" / "checkpoints").symlink_to(run_dir / "checkpoints")
    (tmp_path / "recorded" / "config.json").write_text(
        json.dumps({"stage": "pretrain", "data": {"tokenizer": "byte", "chat_template": "chatml"}}))
    assert load_sampler(str(tmp_path / "recorded"))[0].chat_template == "chatml"
    with pytest.raises(ValueError, match=r"'chatml' \(the data.chat_template of .*recorded\) needs the token"):
        load_sampler(str(tmp_path / "recorded"), chat=True)


def test_load_sampler_refuses_a_reward_model_and_another_tokenizer(run_dir, tmp_path):
    """`kiln sample` of a reward-model run sampled from the language-model head reward training leaves behind;
    a --tokenizer other than the run's (the right size or not) fed the model ids it was not trained on."""
    from tests.test_tokenizer import hf_dir

    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "checkpoints").symlink_to(run_dir / "checkpoints")
    (tmp_path / "rm" / "config.json").write_text(json.dumps({"stage": "reward", "data": {"tokenizer": "byte"}}))
    with pytest.raises(ValueError, match=r"rm is a reward model \(stage reward\): it scores replies"):
        load_sampler(str(tmp_path / "rm"))
    (tmp_path / "bpe").mkdir()
    bpe = hf_dir(tmp_path / "bpe", ["<|endoftext|>"], {"eos_token": "<|endoftext|>"})  # 400 tokens > 264
    with pytest.raises(ValueError, match=r"tokenizer '.*bpe' \(400 tokens\) is not the one the model in .* was "
                                         r"trained with \(byte, 264 tokens\); drop --tokenizer"):
        load_sampler(str(run_dir), tokenizer=bpe)
    assert load_sampler(str(run_dir), tokenizer="byte")[0].tokenizer.name == "byte"  # the same one: fine
    small = Transformer(presets.get("tiny", vocab_size=128), rngs=nnx.Rngs(0))  # no tokenizer recorded with it
    hf.save(small, small.cfg, str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"tokenizer byte has 264 tokens, more than the 128 of the model in"):
        load_sampler(str(tmp_path / "hf"), tokenizer="byte")


def test_cli_samples_a_hugging_face_directory(tmp_path, capsys):
    hf.save(MODEL, CFG, str(tmp_path / "hf"))
    rows = run_cli([f"--checkpoint={tmp_path / 'hf'}", "--tokenizer=byte", "--prompt=hi", "--prompt=yo",
                    "--temperature=0", "--max_new_tokens=8"], capsys)
    want = greedy_reference(MODEL, [BYTE.encode(p, add_bos=True) for p in ("hi", "yo")], 8)
    assert [r["token_ids"] for r in rows] == [w[:len(r["token_ids"])].tolist() for r, w in zip(rows, want)]
    assert all(r["finish_reason"] == "length" or r["token_ids"][-1] in (BYTE.eos_id, 7) for r in rows)


@pytest.mark.parametrize("content,msg", [
    ('{"prompt": "a"}\n{"prompt": \n', "p.jsonl line 2: not valid JSON"),
    ('{"text": "a"}\n', 'p.jsonl line 1: expected an object with a string "prompt"'),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', "p.jsonl line 1: message 0 has role 'bot'"),
    ("\n", "no prompts"),
])
def test_cli_bad_prompts_file_is_one_clear_error(run_dir, tmp_path, content, msg):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(content)
    with pytest.raises(ValueError, match=msg) as e:
        sample_cli.main([f"--checkpoint={run_dir}", f"--prompts={prompts}"])
    assert "\n" not in str(e.value)


def test_cli_without_a_tokenizer_or_prompts_says_what_to_pass(tmp_path):
    checkpoint.save_params(str(tmp_path / "bare"), 0, MODEL, CFG)
    with pytest.raises(ValueError, match=r"no config.json naming its tokenizer; pass a tokenizer \(--tokenizer; data.tokenizer for kiln generate\)"):
        sample_cli.main([f"--checkpoint={tmp_path / 'bare'}", "--prompt=hi"])
    with pytest.raises(ValueError, match="--prompt=TEXT"):
        sample_cli.main([f"--checkpoint={tmp_path / 'bare'}"])
    assert os.path.isdir(tmp_path / "bare")
