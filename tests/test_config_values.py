"""The stage configs, recipes and sweeps set what their docstrings say: the hyperparameters a reader
takes from the documentation (DPO's beta, GRPO's group size, the anneal and context-extension
schedules, LoRA's alpha = 2 x rank, ...), and the recipes hand each stage the previous one's model."""
import os

import pytest

from configs.recipes import lifecycle, llama31_posttrain
from launch import sweep
from test_config_overrides import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sft_trains_the_replies_only():
    for spec in ("sft.py", "sft.py:smoke", "sft.py:gsm8k"):
        c = load(spec)
        assert (c.stage, c.loss.type, c.data.packing) == ("sft", "sft", True)
    assert load("sft.py").data.seq_len == 512 and load("sft.py:gsm8k").data.seq_len == 1024


def test_preference_stages():
    dpo = load("dpo.py")
    assert (dpo.stage, dpo.loss.type, dpo.loss.preference_type, dpo.loss.beta) == ("dpo", "dpo", "sigmoid", 0.1)
    assert (dpo.loss.label_smoothing, dpo.loss.nll_coef, dpo.loss.reference, dpo.model.init_from) == (
        0.0, 0.0, "model", "runs/sft")
    assert (dpo.data.sources.train.end, dpo.data.eval_sources.heldout.start) == (0.95, 0.95)
    hh = load("dpo.py:hh")
    assert (hh.data.sources.train.format, hh.data.sources.train.end, hh.data.eval_sources.heldout.start) == (
        "hh_rlhf", 0.9, 0.9)
    reward = load("reward.py")
    assert (reward.stage, reward.loss.type, reward.model.init_from) == ("reward", "reward", "runs/sft")


def test_rl_stages():
    grpo = load("grpo.py")
    assert (grpo.stage, grpo.loss.type, grpo.rollout.num_samples, grpo.rollout.batch_prompts) == ("grpo", "grpo", 8, 8)
    assert (grpo.loss.beta, grpo.loss.kl_estimator, grpo.loss.aggregation, grpo.rollout.advantage) == (
        0.04, "k3", "grpo", "grpo")
    assert (grpo.optim.lr, grpo.optim.schedule, grpo.data.batch_size, grpo.rollout.max_new_tokens) == (
        1e-5, "constant", 16, 128)
    rloo, dr = load("grpo.py:rloo"), load("grpo.py:dr_grpo")
    assert (rloo.rollout.advantage, rloo.loss.beta) == ("rloo", 0.0)
    assert (dr.rollout.advantage, dr.loss.aggregation) == ("dr_grpo", "dr_grpo")
    ppo = load("ppo.py")
    assert (ppo.loss.beta, ppo.loss.kl_estimator, ppo.loss.value_coef, ppo.loss.value_clip) == (0.05, "k1", 0.1, 0.2)
    assert (ppo.rollout.batch_prompts, ppo.rollout.num_samples, ppo.rollout.epochs) == (8, 4, 2)
    assert (ppo.rollout.gamma, ppo.rollout.lam, ppo.rollout.value_from) == (1.0, 0.95, "")
    rs = load("rejection_sampling.py")
    assert (rs.rollout.num_prompts, rs.rollout.num_samples, rs.rollout.temperature, rs.rollout.min_reward,
            rs.rollout.reward) == (256, 8, 1.0, 1.0, "verifier")


def test_anneal_context_extension_and_continued_training():
    anneal = load("anneal.py")
    assert (anneal.optim.schedule, anneal.optim.min_lr_ratio, anneal.optim.warmup_steps) == ("linear", 0.0, 0)
    assert (anneal.data.sources.train.weight, anneal.data.sources.quality.weight) == (0.3, 0.7)
    assert (anneal.data.sources.quality.max_digits, anneal.data.sources.quality.max_ops) == (3, 3)
    ext = load("context_extension.py")
    scaling = ext.model.rope_scaling
    assert (scaling.type, scaling.factor, scaling.original_max_position_embeddings) == ("yarn", 4.0, 256)
    assert ext.data.seq_len == ext.model.max_seq_len == 4 * 256
    llama3 = load("context_extension.py:llama3").model.rope_scaling
    assert (llama3.type, llama3.factor, llama3.low_freq_factor, llama3.high_freq_factor) == ("llama3", 4.0, 1.0, 4.0)
    cont = load("continue.py")
    assert (cont.data.sources.train.weight, cont.data.sources.replay.weight) == (0.8, 0.2)
    assert (cont.optim.warmup_steps, load("continue.py:no_replay").data.sources.replay.weight) == (30, 0.0)


def test_lifecycle_stages_each_start_from_the_one_before():
    stages = lifecycle.stages(lifecycle.get_config())
    assert [s["name"] for s in stages] == ["tokenizer", "pretrain", "context_extension", "anneal", "sft", "reward",
                                           "rs_generate", "rejection_sampling", "dpo", "grpo"]
    by = {s["name"]: {o.split("=", 1)[0]: o.split("=", 1)[1] for o in s["overrides"]} for s in stages}
    starts = {name: o.get("model.init_from") for name, o in by.items()}
    assert starts == {"tokenizer": None, "pretrain": "", "context_extension": "@pretrain",
                      "anneal": "@context_extension", "sft": "@anneal", "reward": "@sft", "rs_generate": "@sft",
                      "rejection_sampling": "@sft", "dpo": "@rejection_sampling", "grpo": "@dpo"}
    assert by["pretrain"]["data.tokenizer"] == "@tokenizer/tokenizer.model"
    assert by["rejection_sampling"]["data.sources.train.path"] == "@rs_generate/sft.jsonl"
    assert by["dpo"]["data.sources.train.path"] == "@rs_generate/pairs.jsonl"
    assert by["rs_generate"]["rollout.reward"] == "verifier"
    ext = by["context_extension"]  # 256 -> 512 tokens: YaRN factor 2 from the pre-training length
    assert (ext["model.rope_scaling.factor"], ext["model.rope_scaling.original_max_position_embeddings"],
            ext["data.seq_len"]) == ("2.0", "256", "512")
    assert by["grpo"]["rollout.temperature"] == "0.7" and by["anneal"]["data.sources.quality.weight"] == "0"
    smoke = {s["name"]: s for s in lifecycle.stages(lifecycle.get_config("smoke"))}
    assert "rollout.reward=@reward" in smoke["rs_generate"]["overrides"]
    assert all(s["config"].endswith(".py:smoke") for s in smoke.values())


def test_llama31_rounds_start_from_the_previous_rounds_model():
    stages = llama31_posttrain.stages(llama31_posttrain.get_config())
    by = {s["name"]: s for s in stages}
    assert [s["name"] for s in stages] == ["sft", "eval_sft", *(f"{k}_{r}" for r in (1, 2) for k in (
        "rejection_sampling", "sft", "dpo", "eval"))]
    assert "model.init_from=runs/pretrain" in by["sft"]["overrides"] and by["eval_sft"]["checkpoint"] == "@sft"
    for r, policy in ((1, "@sft"), (2, "@dpo_1")):
        rs = by[f"rejection_sampling_{r}"]["overrides"]
        assert f"model.init_from={policy}" in rs and f"seed={r}" in rs and "rollout.reward=verifier" in rs
        assert f"model.init_from={policy}" in by[f"sft_{r}"]["overrides"]
        assert f"model.init_from=@sft_{r}" in by[f"dpo_{r}"]["overrides"]
        assert by[f"eval_{r}"]["checkpoint"] == f"@dpo_{r}"
    smoke = [s["name"] for s in llama31_posttrain.stages(llama31_posttrain.get_config("smoke"))]
    assert smoke[:4] == ["pretrain", "sft", "eval_sft", "reward_1"]


def test_sweeps_set_their_documented_points(monkeypatch):
    monkeypatch.chdir(ROOT)
    lora = sweep.load_sweep("configs/sweeps/lora_rank.py", [])
    assert [(n, p.get("peft.lora_rank"), p.get("peft.lora_alpha"), p["optim.lr"]) for n, p in sweep.points(lora)] == [
        ("full", None, None, 3e-4), ("lora_r2", 2, 4.0, 2e-3), ("lora_r8", 8, 16.0, 2e-3), ("lora_r32", 32, 64.0, 2e-3)]
    dpo = sweep.load_sweep("configs/sweeps/dpo_beta.py", [])
    found = [(p["loss.preference_type"], p["loss.beta"], p.get("loss.label_smoothing")) for _, p in sweep.points(dpo)]
    assert found == [(t, b, 0.1 if t == "robust" else None) for t in ("sigmoid", "ipo", "robust")
                     for b in (0.05, 0.1, 0.5)]
    replay = sweep.load_sweep("configs/sweeps/replay.py", [])
    assert [(n, p["data.sources.train.weight"]) for n, p in sweep.points(replay)] == [
        ("replay_0.0", 1.0), ("replay_0.1", 0.9), ("replay_0.2", 0.8), ("replay_0.5", 0.5)]
    assert tuple(lora.seeds) == tuple(dpo.seeds) == tuple(replay.seeds) == (0, 1)


@pytest.mark.parametrize("spec, message", [("sft.py:smok", "unknown config variant 'smok'; this file has: gsm8k, smoke"),
                                           ("grpo.py:ppo", "unknown config variant 'ppo'")])
def test_unknown_variants_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        load(spec)
