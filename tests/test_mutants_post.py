"""Post-training losses, RL and optimisation: the behaviours the other tests left open, each pinned by a
number worked out by hand from the formula (or an exact equality where the code promises one)."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from train import losses, rollout
from train.losses import rl
from train.losses.dpo import preference_loss
from train.losses.reward import bradley_terry_loss
from test_preference_losses import Scores, dpo, pair_batch, softplus


def test_reward_stage_subtracts_the_constant_margin_of_its_config():
    """`loss.margin` (no per-pair margins in the data) is subtracted from every pair's difference:
    −log σ(r_c − r_r − m). Pairs (2, 1) and (0, 0) with m = 0.5: softplus(−0.5) + softplus(0.5)."""
    model = Scores([2.0, 0.0, 9.0, 1.0, 0.0, -9.0])  # the third slot is padding
    loss_sum, m = losses.get("reward", ConfigDict(dict(margin=0.5, center_coef=0.0)))(
        model, pair_batch(([4, 3, 0], [5, 2, 0])), None)
    assert float(m["weight"]) == 2
    assert float(loss_sum) == pytest.approx(softplus(-0.5) + softplus(0.5), rel=1e-6)


def test_pure_pairwise_losses_compute_in_float32_from_low_precision_inputs():
    """Rewards and log-probs may come in bfloat16 (a bf16 model's head); the losses are computed in float32
    on the values given. bf16 keeps 3 significant digits, so a loss computed in it is ~1e-3 off."""
    chosen, rejected = jnp.array([258.0, 3.0], jnp.bfloat16), jnp.array([256.0, 4.0], jnp.bfloat16)  # exact in bf16
    out = bradley_terry_loss(chosen, rejected, center_coef=1e-3)
    want = (softplus(-2.0) + 1e-3 * 514.0 ** 2 + softplus(1.0) + 1e-3 * 7.0 ** 2) / 2
    assert out.dtype == jnp.float32 and float(out) == pytest.approx(want, rel=1e-6)
    # DPO: Δ = (−300 + 302) − (−310 + 308) = 4 (even numbers: exact in bf16), β = 0.1: −log σ(0.4).
    pc, pr, rc, rr = (jnp.array([x], jnp.bfloat16) for x in (-300.0, -310.0, -302.0, -308.0))
    out = preference_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")
    assert out.dtype == jnp.float32 and float(out[0]) == pytest.approx(softplus(-0.4), rel=1e-6)


def test_simpo_stage_reads_its_gamma_from_the_config():
    """SimPO's target margin γ is `loss.simpo_gamma`: equal per-token log-probs (UniformLM) give −log σ(−γ)
    per pair, 2 · softplus(1.5) at γ = 1.5 (the default 0.5 would give 2 · softplus(0.5))."""
    batch = pair_batch(([4, 3], [2, 5]))
    total, _ = dpo(batch, preference_type="simpo", beta=2.0, simpo_gamma=1.5)
    assert float(total) == pytest.approx(2 * softplus(1.5), rel=1e-6)


def test_rollout_rows_count_positions_from_zero_in_one_segment():
    """Prompt + reply rows are one document each: positions 0, 1, ... and segment 1 over its inputs, 0 (padding)
    after; the sampler read the prompt from position 0, so the scored log-probs must too."""
    replies = [{"token_ids": [7, 8, 2], "finish_reason": "stop"}, {"token_ids": [9], "finish_reason": "stop"}]
    out = rollout.token_rows([[1, 5, 6], [4]], replies, 1, 7, 0, mask_truncated=False)
    assert out["positions"].tolist() == [[0, 1, 2, 3, 4, 0, 0], [0, 0, 0, 0, 0, 0, 0]]
    assert out["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0]]


def stub_source(seed, monkeypatch, keys):
    """A RolloutSource of 4 prompts, 2 per rollout, whose sampler records the key of every rollout."""
    def sample(sampler, chats, ro, key):
        keys.append(np.asarray(jax.random.key_data(key)).tolist())
        replies = [{"text": "1", "token_ids": [7], "finish_reason": "stop"} for _ in chats for _ in range(ro.num_samples)]
        return [[1, 2] for _ in chats], replies

    monkeypatch.setattr(rollout, "sample", sample)
    monkeypatch.setattr(rollout.generate, "Sampler", lambda *a, **k: None)
    src = rollout.RolloutSource.__new__(rollout.RolloutSource)
    src.config = ConfigDict(dict(seed=seed, stage="grpo", mesh=dict(rules=()), data=dict(
        seq_len=4, batch_size=4, chat_template="chatml"), rollout=dict(
        batch_prompts=2, num_samples=2, format_penalty=0.0, mask_truncated=False, epochs=1, max_new_tokens=1)))
    graphdef, params, frozen = nnx.split(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), nnx.Param, ...)
    src.run = SimpleNamespace(graphdef=graphdef, state=SimpleNamespace(params=params), frozen=frozen, mesh=None,
                              tokenizer=SimpleNamespace(pad_id=0))
    src.records = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(4)]
    src.score = lambda chats, replies, answers: np.zeros(len(replies), np.float32)
    src.state, src.metrics, src.queue = {"rollouts": 0, "kl_coef": 0.0}, {}, []
    src._score_rollout = lambda rows, scores: rows
    return src


def test_each_rollout_samples_from_its_own_key_of_the_seed_and_resumes_on_it(monkeypatch):
    """Rollout k samples with a key of (seed, k): a new one every rollout (the same key each time would
    correlate the samples of successive rollouts), another for another seed, and the same after a resume."""
    keys = []
    src = stub_source(0, monkeypatch, keys)
    src._rollout(), src._rollout()
    assert keys[0] != keys[1]
    resumed = stub_source(0, monkeypatch, keys)
    resumed.set_state({"rollouts": 1, "kl_coef": 0.0})
    resumed._rollout()
    assert keys[2] == keys[1]
    stub_source(1, monkeypatch, keys)._rollout()
    assert keys[3] != keys[0]


def test_each_rollout_reply_is_scored_beside_its_own_prompt(monkeypatch):
    """Replies are prompt-major (reply i answers prompt i // G): the scorer gets each beside its own prompt and
    answer, which a reward model or a reward function reads together."""
    src, seen = stub_source(0, monkeypatch, []), []
    src.score = lambda chats, replies, answers: seen.append((chats, answers)) or np.zeros(len(replies), np.float32)
    src._rollout()
    chosen = src._prompts(0)
    assert chosen[0] != chosen[1]
    assert seen == [([p["prompt"] for p in chosen for _ in range(2)], [p["answer"] for p in chosen for _ in range(2)])]


def test_group_advantages_refuse_groups_of_one():
    """A group of one sample has no baseline (its unbiased std is NaN): refused, not NaN advantages."""
    with pytest.raises(ValueError, match="group_size=1"):
        rl.group_advantages(jnp.array([1.0, 0.0]), 1)


class RecordingSampler:
    """Stands in for the sampler: records how it is called, replies "ok" to everything."""

    def __init__(self):
        self.encoded, self.completed = [], []

    def encode(self, messages, **kwargs):
        self.encoded.append(kwargs)
        return [1, 2]

    def complete(self, chats, **kwargs):
        self.completed.append(kwargs)
        return [{"text": "ok", "token_ids": [3], "finish_reason": "stop"} for _ in chats for _ in range(2)]


def test_rollout_samples_with_the_rollout_settings():
    """`rollout.temperature / top_k / top_p / max_new_tokens / num_samples` and the rollout's key reach the
    sampler, through the chat template (prompts and replies as a chat, as the loss's rows are built)."""
    sampler, key = RecordingSampler(), jax.random.key(3)
    ro = SimpleNamespace(max_new_tokens=5, temperature=0.7, top_k=3, top_p=0.9, num_samples=2)
    ids, replies = rollout.sample(sampler, [[{"role": "user", "content": "q"}]], ro, key)
    assert ids == [[1, 2]] and len(replies) == 2 and sampler.encoded == [{"chat": True}]
    (kwargs,) = sampler.completed
    assert kwargs.pop("seed") is key
    assert kwargs == dict(max_new_tokens=5, temperature=0.7, top_k=3, top_p=0.9, num_samples=2, chat=True)


def test_rejection_sampling_draws_each_chunk_from_its_own_key_and_scores_each_reply_with_its_prompt(
        tmp_path, monkeypatch):
    """Each chunk of data.batch_size prompts samples from a key of (seed, chunk) with the rollout's sampling
    settings: chunks differ, a re-run with the same seed repeats them, another seed draws others. Every reply
    is scored beside its own prompt and reference answer. (The policy here echoes the prompt; nothing is
    loaded.)"""
    from train import rejection, rewards
    from test_config_overrides import load
    from test_misuse_post import saved_run

    calls, scored = [], []

    def complete(prompts, *, num_samples, **sampling):
        calls.append(dict(sampling, seed=np.asarray(jax.random.key_data(sampling["seed"])).tolist()))
        return [{"text": p[-1]["content"], "prompt_index": i} for i, p in enumerate(prompts) for _ in range(num_samples)]

    def load_sampler(path, tokenizer, chat):
        assert chat and tokenizer is None  # chats through the chat template; data.tokenizer=auto: the policy's own
        return SimpleNamespace(complete=complete), chat

    def score(chats, replies, answers):
        scored.extend(zip((c[-1]["content"] for c in chats), replies, answers))
        return np.zeros(len(replies), np.float32)

    monkeypatch.setattr(rejection.generate, "load_sampler", load_sampler)
    monkeypatch.setattr(rejection.rewards, "scorer", lambda reward: score)
    policy = saved_run(tmp_path / "policy", 2)

    def seeds(seed, run_dir):
        del calls[:], scored[:]
        config = load("rejection_sampling.py:smoke", f"--config.run_dir={tmp_path / run_dir}",
                      f"--config.model.init_from={policy}", "--config.rollout.num_prompts=4",
                      "--config.data.batch_size=2", "--config.data.synthetic.num_examples=40", f"--config.seed={seed}",
                      "--config.rollout.temperature=0.7", "--config.rollout.top_k=5", "--config.rollout.top_p=0.9")
        rejection.run(config)
        assert all((c["temperature"], c["top_k"], c["top_p"], c["max_new_tokens"]) == (0.7, 5, 0.9, 24) for c in calls)
        asked = [(r["prompt"][-1]["content"], r["answer"]) for r in rewards.prompts(config, 4)]
        assert len(set(asked)) == 4 and scored == [(q, q, a) for q, a in asked for _ in range(4)]
        return [c["seed"] for c in calls]

    first = seeds(0, "a")
    assert len(first) == 2 and first[0] != first[1]
    assert seeds(0, "b") == first
    other = seeds(1, "c")
    assert other[0] != first[0] and other[1] != first[1]


class ChunkedLogits:
    """Stands in for a model whose logits are made in chunks (`cfg.logits_chunk`): the losses reach it through
    `logit_stats`, which records the dropout key of every call."""

    cfg = SimpleNamespace(logits_chunk=2)

    def __init__(self, logits):
        self.logits, self.keys = logits, []

    def logit_stats(self, fn, tokens, positions, segment_ids, *per_position, dropout_key=None):
        self.keys.append(dropout_key)
        return fn(self.logits, *per_position)


def test_chunked_logits_get_the_dropout_key_in_training_and_none_in_evaluation():
    """With `model.logits_chunk` the loss goes through `Transformer.logit_stats`: training's dropout key must
    reach it as it reaches a whole-logits model (dropout silently off in chunked runs otherwise), and the loss
    is the same sum (ln 250 over the 4 loss tokens of test_losses's crafted logits)."""
    from test_losses import BATCH, CE_SUM, LOGITS

    model = ChunkedLogits(jnp.asarray(LOGITS))
    loss_fn = losses.get("next_token", ConfigDict({}))
    trained, _ = loss_fn(model, BATCH, nnx.Rngs(0))
    evaluated, _ = loss_fn(model, BATCH, None)
    assert model.keys[0] is not None and model.keys[1] is None
    assert float(trained) == float(evaluated) == pytest.approx(CE_SUM, rel=1e-6)


def test_logged_grad_norm_is_the_norm_of_the_token_mean_gradient():
    """`grad_norm` (what a researcher watches for spikes and sets clip_norm by) is the norm of the gradient the
    update applies, the token-weighted mean's, not of the summed gradient before the step divides it."""
    import optax

    from test_step import NEXT_TOKEN, Bigram, bigram_data, make_step, token_mean
    from train.step import init_state

    table, batch = bigram_data()
    graphdef, params, frozen = nnx.split(Bigram(table), nnx.Param, ...)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)
    _, m = make_step(graphdef, NEXT_TOKEN, tx)(init_state(params, tx, 0), frozen, batch)
    want = float(np.linalg.norm(np.asarray(jax.grad(token_mean)(jnp.asarray(table), batch))))
    assert float(m["weight"]) == 117.0 and float(m["grad_norm"]) == pytest.approx(want, rel=1e-5)


def test_a_whitespace_best_reply_is_no_sft_example_but_still_a_pair():
    """A best reply of only whitespace trains the end-of-turn token alone (the data layer refuses it in an SFT
    file, as it refuses an empty one): rejection sampling keeps it out of sft.jsonl, and pairs it against the
    worst reply all the same."""
    from train import rejection

    prompt = [{"role": "user", "content": "2+2?"}]
    sft, pairs = rejection._select([{"prompt": prompt}], [[" \n", "5"]], np.array([[1.0, 0.0]]), None, "policy")
    assert sft == [] and [(p["chosen"], p["rejected"]) for p in pairs] == [(" \n", "5")]


def test_pass_at_k_counts_a_prompt_with_a_single_right_sample():
    """pass@K is the fraction of prompts with at least one right sample of K (Chen et al., 2021): one right
    of 4 counts as fully as 4 of 4, and pass@1 is the chance one sample is right (1 of 8 here)."""
    from train import rejection

    m = rejection._metrics(np.array([[0, 0, 0, 1], [0, 0, 0, 0]], np.float32), kept=1, verifier=True)
    assert m == {"reward_mean": 0.125, "best_of_k": 0.5, "kept_fraction": 0.5, "pass@1": 0.125, "pass@4": 0.5}


@pytest.mark.parametrize("override", ["rollout.top_p=0.9", "rollout.top_k=5", "rollout.temperature=0.5",
                                      "rollout.max_new_tokens=7", "rollout.num_samples=2", "seed=3"])
def test_rejection_settings_record_every_sampling_setting(override):
    """A finished rejection-sampling run is reused only under the same settings: each sampling setting changed
    alone shows in them as itself (a missing one reuses replies sampled otherwise)."""
    from train import rejection
    from test_config_overrides import load

    args = ("rejection_sampling.py:smoke", "--config.model.init_from=/nonexistent/policy")
    then, now = rejection.settings(load(*args)), rejection.settings(load(*args, f"--config.{override}"))
    assert [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)] == [override.split("=")[0]]


class PositionsRM:
    """Stands in for a reward model: its score is the position it reads at the last real token."""

    cfg = SimpleNamespace(max_seq_len=256)

    def rewards(self, tokens, positions, segments):
        return jnp.max(jnp.where(segments > 0, positions, -1), axis=1).astype(jnp.float32)


def test_a_reward_model_scores_replies_at_positions_from_zero(monkeypatch, tmp_path):
    """The RL / rejection scorer renders prompt and reply (n tokens) and reads the reward model at positions
    0 … n − 1, as Bradley–Terry trained it (a padded row of another width must not shift them)."""
    from data import tokenizer
    from data.chat import render
    from train import rewards

    monkeypatch.setattr(rewards, "_reward_run", lambda reward: (reward, {"data": {"chat_template": "kiln"}}))
    monkeypatch.setattr(rewards.checkpoint, "load_model", lambda path: (None, PositionsRM()))
    monkeypatch.setattr(rewards.modeldir, "tokenizer_of", lambda path: "byte")
    chats, replies = [[{"role": "user", "content": "2+2?"}]] * 2, ["4", "It is four."]
    lengths = [len(render(c + [{"role": "assistant", "content": r}], tokenizer.load("byte"), "kiln")[0])
               for c, r in zip(chats, replies)]
    assert lengths[1] - lengths[0] == 10
    scores = rewards.scorer(str(tmp_path))(chats, replies, ["", ""])
    np.testing.assert_array_equal(scores, np.array(lengths, np.float32) - 1)


def test_reward_pairs_score_the_chosen_then_the_rejected_whole_sequences():
    """One pass over 2B rows: the first B the chosen sequences, the last B the rejected ones, each whole (its
    last target appended) with its own positions and segments; the scores split back in that order."""
    from train.losses.reward import pair_rewards, whole_sequences

    batch = pair_batch(([4, 3], [2, 5]))
    model = Scores([1.0, 2.0, 3.0, 4.0])
    chosen, rejected = pair_rewards(model, batch)
    assert chosen.tolist() == [1.0, 2.0] and rejected.tolist() == [3.0, 4.0]
    for rows, side in ((slice(0, 2), "chosen"), (slice(2, 4), "rejected")):
        for got, want in zip(model.seen, whole_sequences(batch, side)):
            np.testing.assert_array_equal(got[rows], want)


def test_rl_log_probs_and_values_read_each_rows_positions_and_segments(monkeypatch):
    """The policy's log-probs (loss and rollout alike) and the value model's estimates (PPO's loss and its
    rollout) are the models' on the rows' own positions and segments: two packed documents in a row must not
    attend to each other, and positions restart with each."""
    from model import presets
    from model.actor_critic import ActorCritic
    from model.transformer import Transformer

    policy = Transformer(presets.get("tiny", vocab_size=64), rngs=nnx.Rngs(0))
    value = Transformer(presets.get("tiny", vocab_size=64, reward_head=True), rngs=nnx.Rngs(1))
    model = ActorCritic(policy, value)
    tokens = np.random.default_rng(0).integers(3, 64, (2, 9))
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in dict(
        tokens=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=[[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]],
        positions=[[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0]], loss_mask=[[0, 1, 1, 1, 0, 1, 1, 1]] * 2).items()}
    z = np.asarray(policy(batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64) / 0.7
    log_z = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    want = np.take_along_axis(z, tokens[:, 1:, None], -1)[..., 0] - log_z
    np.testing.assert_allclose(rl.token_logps(model, batch, 0.7)[0], want, rtol=1e-5, atol=1e-5)
    # PPO's value loss with returns 0 and no clipping is ½ Σ V² over the masked tokens (dapo: a plain sum).
    values = np.asarray(value.values(batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64)
    mask = np.asarray(batch["loss_mask"], np.float64)
    cfg = ConfigDict(dict(beta=0.0, kl_estimator="k3", clip_eps_low=0.2, clip_eps_high=0.2, aggregation="dapo",
                          value_coef=1.0, value_clip=0.0, temperature=0.7, max_len=8))
    zeros = jnp.zeros((2, 8), jnp.float32)
    _, m = rl.make_ppo(cfg)(model, dict(batch, advantages=zeros, old_values=zeros, returns=zeros), None)
    assert float(m["value_loss"]) == pytest.approx(0.5 * (values ** 2 * mask).sum(), rel=1e-5)
    # The rollout's old values come from the same pass.
    config = ConfigDict(dict(stage="ppo", loss=dict(beta=0.0), data=dict(batch_size=2), rollout=dict(
        temperature=0.7, batch_prompts=1, num_samples=2, epochs=1, reward="verifier")))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    monkeypatch.setattr(rollout.rewards, "prompts", lambda config: [])
    monkeypatch.setattr(rollout.rewards, "scorer", lambda reward: None)
    src = rollout.RolloutSource(SimpleNamespace(config=config, graphdef=graphdef))
    np.testing.assert_allclose(src._stats(params, frozen, batch)["old_values"], values, rtol=1e-5, atol=1e-6)


def test_ppo_starts_with_the_kl_coefficient_of_loss_beta(monkeypatch):
    """PPO's KL-in-the-reward coefficient starts at `loss.beta` (then adapts with rollout.kl_target > 0)."""
    monkeypatch.setattr(rollout.rewards, "prompts", lambda config: [])
    monkeypatch.setattr(rollout.rewards, "scorer", lambda reward: None)
    config = ConfigDict(dict(stage="ppo", loss=dict(beta=0.3), data=dict(batch_size=2), rollout=dict(
        temperature=1.0, batch_prompts=1, num_samples=2, epochs=1, reward="verifier")))
    assert rollout.RolloutSource(SimpleNamespace(config=config, graphdef=None)).get_state() == {
        "rollouts": 0, "kl_coef": 0.3}
