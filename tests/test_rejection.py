"""Rejection sampling: selection and metrics by hand, and a run end to end with a reward model."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from data import sources, tokenizer
from data.chat import render
from launch.config import load_config
from train import checkpoint, modeldir, rejection, rewards, trainer
from test_train import config as stage_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answer": str(i)} for i in range(3)]
SCORES = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
REPLIES = [[f"r{i}{j}" for j in range(4)] for i in range(3)]


def test_best_kept_above_threshold_and_best_against_worst_pairs():
    sft, pairs = rejection._select(PROMPTS, REPLIES, SCORES, 1.0, "pol")
    assert [r["messages"][-1]["content"] for r in sft] == ["r01", "r20"]  # ties: the earlier sample
    assert sft[0]["messages"][:-1] == PROMPTS[0]["prompt"] and sft[0]["provenance"] == {
        "policy": "pol", "prompt_index": 0, "sample_index": 1}
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("r01", "r00")]  # equal scores make no pair
    assert len(rejection._select(PROMPTS, REPLIES, SCORES, None, "pol")[0]) == 3  # no threshold: every prompt
    m = rejection._metrics(SCORES, kept=2, verifier=True)
    assert m == {"reward_mean": 0.5, "best_of_k": pytest.approx(2 / 3), "kept_fraction": pytest.approx(2 / 3),
                 "pass@1": 0.5, "pass@4": pytest.approx(2 / 3)}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny policy to sample from (what it says does not matter here: the reward model scores it)."""
    run_dir = str(tmp_path_factory.mktemp("policy"))
    trainer.train(stage_config("pretrain", run_dir, "--config.train.steps=2", "--config.train.eval_every=0"))
    return run_dir


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("reward"))
    trainer.train(stage_config("reward", run_dir, "--config.train.steps=2", "--config.train.eval_every=0"))
    return run_dir


def test_verifier_scores_the_final_answer_against_the_reference():
    score = rewards.scorer("verifier")
    replies = ["3 + 4 = 7\n#### 7", "#### 8", "the answer is 7", "#### 1,234.", "#### 7.0", "#### 2\n#### 7"]
    got = score([[]] * 6, replies, ["7", "7", "7", "1234", "7", "7"])
    assert got.dtype == np.float32 and got.tolist() == [1, 0, 0, 1, 1, 1]  # the last `####` counts


def test_a_policy_run_is_no_reward_model(policy):
    """rollout.reward names a run directory: only a reward-model run (stage reward) scores replies."""
    with pytest.raises(ValueError, match="is neither 'verifier', a Kiln reward-model run nor MODULE:FUNCTION"):
        rewards.scorer(policy)


def test_rejection_sampling_with_a_reward_model(policy, reward_run, tmp_path):
    run_dir = str(tmp_path / "rs")
    cfg = load_config(os.path.join(ROOT, "configs/rejection_sampling.py:smoke"),
                      [f"--config.run_dir={run_dir}", f"--config.model.init_from={policy}",
                       f"--config.rollout.reward={reward_run}", "--config.rollout.min_reward=-1e9"])
    results = rejection.run(cfg)
    assert results["prompts"] == 6 and results["sft_examples"] == 6 and "pass@4" not in results
    sft = [json.loads(line) for line in open(os.path.join(run_dir, "sft.jsonl"))]
    pairs = [json.loads(line) for line in open(os.path.join(run_dir, "pairs.jsonl"))]
    assert len(pairs) == results["pairs"] > 0 and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert np.mean([r["score"] for r in sft]) == pytest.approx(results["best_of_k"], rel=1e-5)
    assert results["best_of_k"] > results["reward_mean"]
    # The scores are the reward model's: recompute one kept reply's score on its own.
    model = checkpoint.load_model(reward_run)[1]
    scorer = rewards.scorer(reward_run)
    again = scorer([sft[0]["messages"][:-1]], [sft[0]["messages"][-1]["content"]], [""])
    assert float(again[0]) == pytest.approx(sft[0]["score"], abs=1e-4)
    # The scorer renders prompt and reply with the reward model's template and pads them to a width of
    # 64, which must change neither the positions (from 0) nor what the head reads: a short sequence
    # (where a position shift shows most) scores as the model scores it alone.
    tok = tokenizer.load(sources.expand_path(modeldir.tokenizer_of(reward_run), "tokenizer"))
    chat, reply = PROMPTS[0]["prompt"], "#### 12"
    seq = render(chat + [{"role": "assistant", "content": reply}], tok,
                 modeldir.run_config(reward_run)["data"]["chat_template"])[0]
    assert len(seq) < 32
    alone = float(model.rewards(jnp.asarray([seq], jnp.int32))[0])
    assert float(scorer([chat], [reply], [""])[0]) == pytest.approx(alone, abs=1e-5)
    assert model.cfg.reward_head
    # A prompt and reply of exactly max_seq_len tokens fit the reward model; one token more is refused.
    longest = "7" * (model.cfg.max_seq_len - len(seq) + len(reply))
    assert np.isfinite(scorer([chat], [longest], [""])).all()
    with pytest.raises(ValueError, match=f"{model.cfg.max_seq_len + 1} tokens exceed the reward model's max_seq_len"):
        scorer([chat], [longest + "7"], [""])
    # configs/sft.py reads the file as it is, and the pairs as preference records.
    data = stage_config("sft", str(tmp_path / "x")).data
    src = sources.load("rs", sources_entry(run_dir, "sft.jsonl"), data, "sft")
    assert len(src.records) == 6 and src.records[0]["messages"][-1]["role"] == "assistant"
    assert len(sources.load("rs", sources_entry(run_dir, "pairs.jsonl"), data, "preference").records) == len(pairs)
    # Finished: a rerun neither samples nor rewrites.
    stamp = os.stat(os.path.join(run_dir, "sft.jsonl")).st_mtime_ns
    assert rejection.run(cfg) == json.load(open(os.path.join(run_dir, "results.json")))
    assert os.stat(os.path.join(run_dir, "sft.jsonl")).st_mtime_ns == stamp


def sources_entry(run_dir, name):
    from configs import base
    return base.source(os.path.join(run_dir, name), "jsonl")


def test_kiln_generate_refuses_other_stages_and_kiln_train_points_to_it(tmp_path, capsys):
    from launch import main
    assert main.main(["generate", "--config=configs/sft.py:smoke", f"--config.run_dir={tmp_path}"]) == 1
    assert "kiln generate runs stage rejection_sampling, not 'sft'" in capsys.readouterr().err
    assert main.main(["train", "--config=configs/rejection_sampling.py:smoke", f"--config.run_dir={tmp_path}"]) == 1
    assert "use `kiln generate --config=configs/rejection_sampling.py`" in capsys.readouterr().err


def test_a_bare_checkpoint_policy_takes_data_tokenizer_and_an_empty_one_is_named(policy, tmp_path):
    """A policy saved without its run (a copied step directory) records no tokenizer: kiln generate's own
    data.tokenizer supplies it (it was ignored, and the error said to pass --tokenizer, which kiln generate has
    no flag for); a directory holding no model at all is named as such, not as lacking a tokenizer."""
    bare = str(tmp_path / "bare")
    cfg, model = checkpoint.load_model(policy)
    checkpoint.save_params(bare, 0, model, cfg)
    args = [f"--config.model.init_from={bare}", "--config.rollout.num_prompts=2", "--config.rollout.num_samples=2",
            "--config.rollout.max_new_tokens=4"]
    with pytest.raises(ValueError, match=r"no config.json naming its tokenizer; pass a tokenizer .*data.tokenizer"):
        rejection.run(load_config(os.path.join(ROOT, "configs/rejection_sampling.py:smoke"),
                                  [f"--config.run_dir={tmp_path / 'auto'}", *args]))
    results = rejection.run(load_config(os.path.join(ROOT, "configs/rejection_sampling.py:smoke"),
                                        [f"--config.run_dir={tmp_path / 'byte'}", "--config.data.tokenizer=byte", *args]))
    assert results["prompts"] == 2
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"empty: no finished checkpoint step"):
        rejection.run(load_config(os.path.join(ROOT, "configs/rejection_sampling.py:smoke"),
                                  [f"--config.run_dir={tmp_path / 'e'}", f"--config.model.init_from={tmp_path / 'empty'}"]))
