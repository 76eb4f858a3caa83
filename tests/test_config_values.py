"""The stage configs, recipes and sweeps set what their docstrings say: the hyperparameters a reader
takes from the documentation (DPO's beta, GRPO's group size, the anneal and context-extension
schedules, LoRA's alpha = 2 x rank, ...), and the recipes hand each stage the previous one's model."""
import os

import pytest

from configs import base
from configs.recipes import lifecycle, llama31_posttrain
from launch import sweep
from launch.config import load_config
from test_config_overrides import load
from test_configs import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pretraining_as_documented():
    """configs/pretrain.py: the small preset on a 768-piece BPE of the task, worksheets of 6 problems,
    300 steps of 4 x 512 tokens; Tiny Shakespeare: 4096 pieces across line breaks, a 6 x 384 model with
    SwiGLU 1024, 780 steps of 8 x 256 at lr 2e-3, weight decay 0.6, 90% / 10%; smoke: tiny and bytes."""
    c = load("pretrain.py")
    assert (c.model.preset, c.data.tokenizer, c.data.tokenizer_vocab_size, c.data.synthetic.problems_per_document) == (
        "small", "train", 768, 6)
    assert (c.data.seq_len, c.data.batch_size, c.train.steps, c.optim.lr) == (512, 4, 300, 2e-3)
    s = load("pretrain.py:shakespeare")
    assert (s.data.tokenizer, s.data.tokenizer_vocab_size, s.data.tokenizer_newlines) == ("train", 4096, True)
    assert (s.model.d_model, s.model.n_layers, s.model.n_heads, s.model.n_kv_heads, s.model.d_ff) == (384, 6, 6, 6, 1024)
    assert (s.data.seq_len, s.data.batch_size, s.train.steps, s.optim.lr, s.optim.weight_decay) == (256, 8, 780, 2e-3, 0.6)
    assert (s.data.sources.train.format, span(s.data.sources.train), span(s.data.eval_sources.eval)) == (
        "text", (0.0, 0.9), (0.9, 1.0))
    smoke = load("pretrain.py:smoke")
    assert (smoke.model.preset, smoke.data.tokenizer, smoke.data.synthetic.problems_per_document) == ("tiny", "byte", 1)
    # After pre-training: each stage evaluates before its first step and at its end.
    anneal, ext = load("anneal.py:shakespeare"), load("context_extension.py:shakespeare")
    assert (anneal.model.init_from, ext.model.init_from) == ("runs/pretrain_shakespeare",) * 2
    assert (anneal.data.sources.train.weight, anneal.data.sources.quality.weight, anneal.optim.lr) == (0.5, 0.5, 2e-4)
    assert (ext.data.seq_len, ext.data.sources.train.format) == (1024, "text")
    for c in (load("anneal.py"), anneal, ext, load("context_extension.py"), load("continue.py")):
        assert c.train.eval_every == c.train.steps


def test_sft_trains_the_replies_only():
    for spec in ("sft.py", "sft.py:smoke", "sft.py:gsm8k"):
        c = load(spec)
        assert (c.stage, c.loss.type, c.data.packing) == ("sft", "sft", True)
    sft = load("sft.py")  # 40 steps of 8 x 512 tokens
    assert (sft.data.seq_len, sft.data.batch_size, sft.train.steps, sft.optim.lr, sft.optim.warmup_steps) == (
        512, 8, 40, 3e-4, 4)
    assert load("sft.py:gsm8k").data.seq_len == 1024


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
    hh = load("reward.py:hh")  # a 4-layer, d_model 256 byte-level model from scratch, 1024-byte rows
    assert (hh.model.init_from, hh.model.n_layers, hh.model.d_model, hh.data.seq_len) == ("", 4, 256, 1024)


def test_rl_stages():
    grpo = load("grpo.py")
    assert (grpo.stage, grpo.loss.type, grpo.rollout.num_samples, grpo.rollout.batch_prompts) == ("grpo", "grpo", 8, 8)
    assert (grpo.loss.beta, grpo.loss.kl_estimator, grpo.loss.aggregation, grpo.rollout.advantage) == (
        0.04, "k3", "grpo", "grpo")
    assert (grpo.optim.lr, grpo.optim.schedule, grpo.data.batch_size, grpo.rollout.max_new_tokens) == (
        1e-5, "constant", 16, 128)
    assert (grpo.data.seq_len, grpo.data.sources.train.format, grpo.data.sources.train.end) == (256, "synthetic", 0.95)
    for gsm8k in (load("grpo.py:gsm8k"), load("ppo.py:gsm8k")):  # GSM8K's training questions, longer replies
        assert (gsm8k.data.sources.train.format, gsm8k.data.sources.train.path) == ("gsm8k", "$KILN_DATA_DIR/gsm8k/train.jsonl")
        assert (gsm8k.rollout.max_new_tokens, gsm8k.data.seq_len, gsm8k.run_dir) == (320, 512, f"runs/{gsm8k.stage}_gsm8k")
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
    # Rejection sampling's files, as JSON lines (a path under format=synthetic would train on the built-in task).
    assert by["rejection_sampling"]["data.sources.train.format"] == by["dpo"]["data.sources.train.format"] == "jsonl"
    assert by["rs_generate"]["rollout.reward"] == "verifier"
    ext = by["context_extension"]  # 256 -> 512 tokens: YaRN factor 2 from the pre-training length
    assert (ext["model.rope_scaling.factor"], ext["model.rope_scaling.original_max_position_embeddings"],
            ext["data.seq_len"]) == ("2.0", "256", "512")
    assert by["grpo"]["rollout.temperature"] == "0.7" and by["anneal"]["data.sources.quality.weight"] == "0"
    # One-step problems up to the annealing, the two-step task from SFT on; one-digit numbers throughout.
    for name, ops in by.items():
        early = name in ("tokenizer", "pretrain", "context_extension", "anneal")
        assert (ops["data.synthetic.min_ops"], ops["data.synthetic.max_ops"]) == (("1", "1") if early else ("2", "2"))
        assert ops["data.synthetic.max_digits"] == "1"
    assert by["pretrain"]["model.n_heads"] == by["pretrain"]["model.n_kv_heads"] == "4"
    assert [(by[n]["train.steps"], by[n]["checkpoint.every"]) for n in ("pretrain", "sft", "dpo")] == [
        ("400", "200"), ("240", "120"), ("20", "10")]  # a checkpoint halfway: an interrupted stage resumes
    names = ("pretrain", "context_extension", "anneal", "sft", "reward", "rejection_sampling", "dpo", "grpo")
    assert [(by[n]["data.seq_len"], by[n]["data.batch_size"]) for n in names] == [
        ("256", "4"), ("512", "4"), ("256", "4"), ("256", "8"), ("128", "8"), ("256", "8"), ("128", "8"), ("256", "16")]
    assert [by[n].get("data.synthetic.problems_per_document") for n in ("tokenizer", "pretrain", "anneal", "sft")] == [
        "4", "4", "4", None]  # pre-training's worksheets, and the tokenizer fitted to them
    assert (by["tokenizer"]["data.tokenizer_vocab_size"], by["tokenizer"]["data.tokenizer_split_digits"]) == ("512", "False")
    evaluate = dict(o.split("=", 1) for o in stages[1]["evaluate"]["overrides"])  # on long prompts, 0- and 1-shot
    assert (evaluate["data.seq_len"], evaluate["eval.shots"], evaluate["eval.num_problems"]) == ("512", "(0, 1)", "500")
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
    # Extra overrides (every stage's, then its kind's) come first: a round's own settings win over them.
    c = llama31_posttrain.get_config()
    c.overrides, c.sft_overrides = ("model.init_from=x", "train.steps=7"), ("optim.lr=0.5",)
    sft = llama31_posttrain.stages(c)[3]
    assert sft["name"] == "sft_1" and sft["overrides"][:3] == ["model.init_from=x", "train.steps=7", "optim.lr=0.5"]
    assert sft["overrides"][3] == "model.init_from=@sft"


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
    # The small variants: full SFT at the main job's lr 1e-3 on 8 x 256 tokens; DPO on 128-token pair rows.
    small = sweep.load_sweep("configs/sweeps/lora_rank.py:small", [])
    assert [(n, p["optim.lr"]) for n, p in sweep.points(small)] == [
        ("full", 1e-3), ("lora_r2", 2e-3), ("lora_r8", 2e-3), ("lora_r32", 2e-3)]
    assert {"data.seq_len=256", "data.batch_size=8", "train.steps=60"} <= set(small.overrides)
    small = sweep.load_sweep("configs/sweeps/dpo_beta.py:small", [])
    assert {"data.seq_len=128", "train.steps=30", "train.eval_steps=16", "optim.lr=3e-5"} <= set(small.overrides)


@pytest.mark.parametrize("spec, message", [("sft.py:smok", "unknown config variant 'smok'; this file has: gsm8k, smoke"),
                                           ("grpo.py:ppo", "unknown config variant 'ppo'")])
def test_unknown_variants_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        load(spec)


def test_base_defaults():
    """Every default of configs/base.py that a stage file does not override: a changed default silently
    changes every run (and a resumed run's data stream), so each is pinned here."""
    c = base.get_config()
    assert (c.stage, c.run_dir, c.seed) == ("pretrain", "runs/default", 0)
    data = {k: v for k, v in c.data.to_dict().items() if k not in ("sources", "eval_sources", "synthetic")}
    assert data == dict(tokenizer="auto", tokenizer_vocab_size=2048, tokenizer_model_type="bpe",
                        tokenizer_split_digits=True, tokenizer_newlines=False, seq_len=128, batch_size=8, packing=True,
                        pack_method="first_fit", packing_bins=4, shuffle_seed=0, text_separator="", shift_windows=True,
                        truncate=True, chat_template="kiln", mask_special_tokens=False, skip_bad_records=False,
                        num_workers=0)
    assert c.data.synthetic.to_dict() == dict(num_examples=20000, max_digits=2, min_ops=1, max_ops=2, seed=0,
                                              problems_per_document=1)
    assert c.data.sources.to_dict() == {"train": {"path": "", "format": "synthetic", "weight": 1.0}}
    assert not c.data.eval_sources and not c.eval.tasks
    assert c.optim.to_dict() == dict(lr=3e-4, schedule="cosine", warmup_steps=100, min_lr_ratio=0.1, decay_fraction=0.2,
                                     weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0, grad_accum=1)
    assert c.train.to_dict() == dict(steps=1000, log_every=10, eval_every=200, eval_steps=10, max_nonfinite_steps=10,
                                     progress=True)
    assert c.checkpoint.to_dict() == {"every": 500, "keep": 3, "keep_every": 0, "async": True, "resume": "auto",
                                      "allow_changes": False}
    assert {k: v for k, v in c.mesh.to_dict().items() if k != "rules"} == dict(data=1, fsdp=-1, tensor=1, dcn_data=1,
                                                                                dcn_fsdp=1)
    assert {k: v for k, v in c.eval.to_dict().items() if k != "tasks"} == dict(
        shots=(0, 4), chain_of_thought=(True, False), num_problems=100, max_new_tokens=256, batch_size=32, shot_seed=0)
    assert c.loss.to_dict() == dict(type="next_token", z_loss=0.0, beta=0.1, label_smoothing=0.0, margin=0.0,
                                    center_coef=0.0, preference_type="sigmoid", nll_coef=0.0, simpo_gamma=0.5,
                                    reference="model", kl_estimator="k3", clip_eps_low=0.2, clip_eps_high=0.2,
                                    aggregation="grpo", value_coef=0.1, value_clip=0.2)
    assert c.rollout.to_dict() == dict(num_samples=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=128,
                                       reward="verifier", num_prompts=0, min_reward=None, batch_prompts=8, epochs=1,
                                       format_penalty=0.0, mask_truncated=False, advantage="grpo", gamma=1.0, lam=0.95,
                                       kl_target=0.0, kl_horizon=10000, value_from="")
    assert c.peft.to_dict() == dict(method="none", lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                                    lora_targets=("q", "k", "v", "o"), lora_rslora=False, lora_init="kaiming",
                                    adapter_from="", num_virtual_tokens=20, prompt_init="random", prompt_init_text="",
                                    prefix_hidden=0)
    model = {k: v for k, v in c.model.to_dict().items() if v is not None and k != "rope_scaling"}
    assert model == dict(preset="tiny", dtype="float32", param_dtype="float32", remat="none", scan_layers=True,
                         attention="auto", logits_chunk=0, dropout=0.0, init_from="")
    assert {k: v for k, v in c.model.rope_scaling.to_dict().items() if v is not None} == dict(
        type="none", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0)  # Llama 3.1's frequency factors


def span(src):
    return src.get("start", 0.0), src.get("end", 1.0)


@pytest.mark.parametrize("path,variant", CASES, ids=[f"{p}:{v}" for p, v in CASES])
def test_held_out_sources_never_overlap_the_training_ones(path, variant):
    """Every evaluated source (data.eval_sources, a task's problems) and every source a model learns from
    (data.sources of a trained stage, a task's few-shot examples) of the same data are disjoint slices."""
    c = load_config(os.path.join(ROOT, path) + (f":{variant}" if variant else ""))
    seen = {} if c.stage == "eval" else {f"data.sources.{n}": s for n, s in c.data.sources.items()}
    held = {f"data.eval_sources.{n}": s for n, s in c.data.eval_sources.items()}
    for name, t in c.eval.tasks.items():
        seen[f"eval.tasks.{name}.shots"], held[f"eval.tasks.{name}.eval"] = t.shots, t.eval
    for h_name, h in held.items():
        for s_name, s in seen.items():
            if (h.format, h.path) == (s.format, s.path):
                (h0, h1), (s0, s1) = span(h), span(s)
                assert h1 <= s0 or s1 <= h0, f"{h_name} {span(h)} overlaps {s_name} {span(s)}"


def test_set_path_creates_nothing():
    """A variant's misspelt key is an error, not a new key (configs are not locked yet when variants apply)."""
    c = base.get_config()
    base.set_path(c, "data.synthetic.max_ops", 3)
    assert c.data.synthetic.max_ops == 3
    for key in ("data.seq_lenn", "dat.seq_len", "data.synthetic.max_op"):
        with pytest.raises(KeyError, match=key):
            base.set_path(c, key, 1)
    assert "seq_lenn" not in c.data and "max_op" not in c.data.synthetic


def test_eval_tasks_score_the_held_out_split_with_shots_from_the_training_one():
    gsm8k, arithmetic = load("eval.py:gsm8k"), load("eval.py")
    test, train = "$KILN_DATA_DIR/gsm8k/test.jsonl", "$KILN_DATA_DIR/gsm8k/train.jsonl"
    task = gsm8k.eval.tasks.gsm8k
    assert (task.eval.path, task.shots.path, gsm8k.data.eval_sources.gsm8k.path) == (test, train, test)
    assert (tuple(gsm8k.eval.shots), gsm8k.eval.max_new_tokens) == ((0, 8), 320)  # 8-shot, as the chain-of-thought paper
    task = arithmetic.eval.tasks.arithmetic
    assert (span(task.eval), span(task.shots), span(arithmetic.data.eval_sources.arithmetic)) == (
        (0.95, 1.0), (0.0, 0.95), (0.95, 1.0))
