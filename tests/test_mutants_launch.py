"""Holes a planted bug in the config layer slipped through: each range's exact bound, every documented
choice accepted, every key accepted by each setting that reads it (and refused by the others), and the
documented values of stage configs that no other test pinned."""
import argparse
import functools
import importlib
import os
import types

import jax
import pytest

from configs.recipes import lifecycle
from launch import eval as kiln_eval, launcher, local, sample, stage_results, sweep, tokenizer_cli
from launch.config import ConfigError, load_config
from model import presets
from model.transformer import param_count
from test_config_overrides import load
from test_launch_edges import Sampler


@pytest.mark.parametrize("override, rule, inside", [
    ("optim.b2=1.0", "in [0, 1)", "0.0"),  # b2 = 1: the second moment never forgets, Adam's step never shrinks
    ("model.rope_theta=0.0", "positive", "0.5"),  # base 0: every rotation angle is 0 ** (2i / d)
])
def test_a_strict_bound_is_refused_at_its_own_value(override, rule, inside):
    """The open end of a range, given exactly (tests/test_misuse_entry.py tries values beyond it)."""
    key, _, raw = override.partition("=")
    with pytest.raises(ConfigError) as e:
        load("pretrain.py:smoke", f"--config.{override}")
    assert str(e.value) == f"config key {key!r} must be {rule}, got {float(raw)}"
    load("pretrain.py:smoke", f"--config.{key}={inside}")


# Documented in configs/base.py: which loss.type reads which loss.* key, which stage which rollout.* key,
# which peft.method which peft.* key; each with a value other than its default.
LOSS_READERS = {
    # rejection sampling trains nothing: its loss.type stays the default, next_token
    "z_loss=1e-4": ("pretrain.py:smoke", "sft.py:smoke", "rejection_sampling.py:smoke"),
    "margin=0.5": ("reward.py:smoke",), "center_coef=0.01": ("reward.py:smoke",),
    "label_smoothing=0.1": ("dpo.py:smoke",), "nll_coef=0.2": ("dpo.py:smoke",),
    "reference=data": ("dpo.py:smoke",), "preference_type=hinge": ("dpo.py:smoke",),
    "beta=0.2": ("dpo.py:smoke", "grpo.py:smoke", "ppo.py:smoke"),
    "kl_estimator=k1": ("grpo.py:smoke", "ppo.py:smoke"), "clip_eps_low=0.1": ("grpo.py:smoke", "ppo.py:smoke"),
    "clip_eps_high=0.28": ("grpo.py:smoke", "ppo.py:smoke"), "aggregation=dr_grpo": ("grpo.py:smoke", "ppo.py:smoke"),
    "value_coef=0.5": ("ppo.py:smoke",), "value_clip=0.0": ("ppo.py:smoke",),
}
SAMPLING = ("num_samples=2", "temperature=0.7", "top_p=0.9", "top_k=5", "max_new_tokens=8", "reward=runs/rm")
ROLLOUT_READERS = {
    **{k: ("rejection_sampling.py:smoke", "grpo.py:smoke", "ppo.py:smoke") for k in SAMPLING},
    "num_prompts=3": ("rejection_sampling.py:smoke",), "min_reward=0.5": ("rejection_sampling.py:smoke",),
    **{k: ("grpo.py:smoke", "ppo.py:smoke") for k in ("batch_prompts=4", "epochs=2", "format_penalty=0.5",
                                                      "mask_truncated=true")},
    "advantage=rloo": ("grpo.py:smoke",),
    **{k: ("ppo.py:smoke",) for k in ("gamma=0.9", "lam=0.9", "kl_target=0.1", "kl_horizon=100",
                                      "value_from=runs/rm")},
}
PEFT_READERS = {
    **{k: ("lora",) for k in ("lora_rank=4", "lora_alpha=8.0", "lora_dropout=0.1", "lora_targets=('q','down')",
                              "lora_rslora=true", "lora_init=gaussian", "adapter_from=/adapters/a")},
    "num_virtual_tokens=8": ("prompt_tuning", "prefix_tuning"), "prompt_init=vocab": ("prompt_tuning",),
    "prefix_hidden=32": ("prefix_tuning",),
}
STAGES = ("pretrain.py:smoke", "sft.py:smoke", "reward.py:smoke", "dpo.py:smoke", "rejection_sampling.py:smoke",
          "grpo.py:smoke", "ppo.py:smoke")
CASES = [(f"{group}.{item}", spec, spec in readers) for group, table in (("loss", LOSS_READERS),
                                                                          ("rollout", ROLLOUT_READERS))
         for item, readers in table.items() for spec in STAGES]
CASES += [(f"peft.{item}", method, method in readers) for item, readers in PEFT_READERS.items()
          for method in ("none", "lora", "prompt_tuning", "prefix_tuning")]


@pytest.mark.parametrize("override, where, read", CASES, ids=[f"{o}@{w}" for o, w, _ in CASES])
def test_each_key_is_taken_where_it_is_read_and_refused_elsewhere(override, where, read):
    """A key dropped from (or added to) a setting's readers refused a documented setting, or let one that
    does nothing through in silence (ppo's rollout.kl_horizon, reward's loss.center_coef were refused)."""
    if override.startswith("peft."):
        spec, extra = "sft.py:smoke", [f"--config.peft.method={where}"]
    else:
        spec, extra = where, []
    key = override.split("=", 1)[0]
    if read:
        assert load(spec, *extra, f"--config.{override}").is_locked
    else:
        with pytest.raises(ConfigError, match=f"config key '{key}' is set but "):
            load(spec, *extra, f"--config.{override}")


@pytest.mark.parametrize("spec, override", [
    ("pretrain.py:smoke", "optim.schedule=wsd"), ("pretrain.py:smoke", "optim.schedule=constant"),
    ("pretrain.py:smoke", "optim.schedule=linear"), ("pretrain.py:smoke", "model.remat=save_qkv_proj"),
    ("pretrain.py:smoke", "model.dtype=bfloat16"), ("pretrain.py:smoke", "model.param_dtype=float16"),
    ("pretrain.py:smoke", "checkpoint.resume=none"), ("sft.py:smoke", "data.chat_template=chatml"),
    ("sft.py:smoke", "data.chat_template=llama3"), ("sft.py:smoke", "data.chat_template=gemma"),
    ("context_extension.py:smoke", "model.rope_scaling.type=linear"),
    ("context_extension.py:smoke", "model.rope_scaling.type=llama3"),
    ("dpo.py:smoke", "loss.preference_type=ipo"), ("dpo.py:smoke", "loss.preference_type=robust"),
    ("grpo.py:smoke", "loss.aggregation=dapo"), ("grpo.py:smoke", "rollout.advantage=dr_grpo"),
])
def test_every_documented_choice_loads(spec, override):
    """A choice dropped from launch/config.py's CHOICES refused a documented setting (optim.schedule=wsd)."""
    key, _, value = override.partition("=")
    assert str(functools.reduce(getattr, key.split("."), load(spec, f"--config.{override}"))) == value


def test_a_config_without_training_sources_says_so(tmp_path):
    """Not "weights sum to zero" (there are none to weigh): the file names no training source at all."""
    path = tmp_path / "nosources.py"
    path.write_text("from ml_collections import ConfigDict\nfrom configs import base\n\n"
                    "def get_config():\n    c = base.get_config()\n    c.data.sources = ConfigDict()\n    return c\n")
    with pytest.raises(ConfigError, match="^data.sources is empty; name at least one training source$"):
        load_config(str(path))


# What each stage config sets beyond tests/test_config_values.py's checks: its docstring's figures, the
# model it starts from, its optimizer and its step counts. A changed value changes every run of the stage.
STAGE_VALUES = {
    "pretrain.py": {"optim.warmup_steps": 20, "train.eval_steps": 10, "model.init_from": ""},
    "pretrain.py:smoke": {"optim.lr": 1e-3, "optim.warmup_steps": 5, "train.steps": 20, "data.seq_len": 64},
    "pretrain.py:shakespeare": {"optim.warmup_steps": 20, "optim.min_lr_ratio": 0.1, "model.scan_layers": False,
                                "train.eval_every": 100, "train.eval_steps": 0},
    "context_extension.py": {"model.init_from": "runs/pretrain", "optim.lr": 2e-4, "optim.warmup_steps": 10},
    "anneal.py": {"model.init_from": "runs/pretrain", "optim.lr": 3e-4},
    "continue.py": {"model.init_from": "runs/pretrain_shakespeare", "optim.lr": 5e-4},
    "continue.py:synthetic": {"model.init_from": "runs/lifecycle/anneal", "data.synthetic.problems_per_document": 4,
                              "data.sources.train.min_ops": 2, "data.sources.train.max_ops": 3,
                              "data.sources.replay.min_ops": 1, "data.sources.replay.max_digits": 1},
    "sft.py": {"train.eval_every": 40, "run_dir": "runs/sft"},
    "sft.py:smoke": {"optim.lr": 1e-3, "model.max_seq_len": 512},
    "sft.py:gsm8k": {"run_dir": "runs/sft_gsm8k", "data.sources.train.format": "gsm8k"},
    "reward.py": {"optim.lr": 1e-4, "optim.warmup_steps": 5, "train.steps": 100, "train.eval_every": 50},
    "reward.py:hh": {"run_dir": "runs/reward_hh", "data.sources.train.format": "hh_rlhf",
                     "data.eval_sources.heldout.format": "hh_rlhf", "model.n_heads": 4, "model.n_kv_heads": 4,
                     "model.d_ff": 704},
    "dpo.py": {"optim.lr": 1e-5, "optim.warmup_steps": 5, "optim.weight_decay": 0.0, "train.steps": 60,
               "train.eval_every": 30},
    "dpo.py:hh": {"run_dir": "runs/dpo_hh", "data.seq_len": 1024},
    "rejection_sampling.py": {"model.init_from": "runs/sft", "data.batch_size": 16},
    "rejection_sampling.py:gsm8k": {"rollout.num_prompts": 512, "rollout.max_new_tokens": 320},
    # GRPO: 8 prompts x 8 replies per rollout, 1 temperature, 4 mini-batches of 16, 30 rollouts; PPO: token-mean.
    "grpo.py": {"model.init_from": "runs/sft", "rollout.temperature": 1.0, "optim.warmup_steps": 4,
                "optim.weight_decay": 0.0, "train.log_every": 4, "train.eval_every": 0, "checkpoint.every": 40},
    "ppo.py": {"model.init_from": "runs/sft", "loss.aggregation": "dapo"},
    # Evaluation: 0- and 4-shot over the whole held-out text; smoke 0-shot only, on a handful of problems.
    "eval.py": {"eval.shots": (0, 4), "train.eval_steps": 0, "data.seq_len": 512},
    "eval.py:smoke": {"eval.shots": (0,), "eval.num_problems": 4, "eval.max_new_tokens": 48},
    "eval.py:gsm8k": {"data.seq_len": 2048, "run_dir": "runs/eval_gsm8k"},
    # The RL smoke variant: a tiny model from scratch, two prompts' rollouts of 16 tokens, 4 steps.
    "grpo.py:smoke": {"model.init_from": "", "model.preset": "tiny", "data.seq_len": 192, "rollout.batch_prompts": 2,
                      "rollout.max_new_tokens": 16, "train.steps": 4, "checkpoint.every": 2, "optim.warmup_steps": 1},
}


@pytest.mark.parametrize("spec", sorted(STAGE_VALUES))
def test_stage_configs_set_their_documented_values(spec):
    c = load(spec)
    assert {k: functools.reduce(getattr, k.split("."), c) for k in STAGE_VALUES[spec]} == STAGE_VALUES[spec]


@pytest.mark.parametrize("spec, rollouts", [("grpo.py", 30), ("ppo.py", 30)])
def test_rl_steps_are_the_documented_rollouts_of_mini_batches(spec, rollouts):
    """Each rollout of batch_prompts x num_samples replies is `epochs` passes of mini-batches of data.batch_size:
    GRPO's docstring says 8 x 8 replies in 4 mini-batches of 16, PPO's 8 x 4 in 2 epochs of 2, 30 rollouts each."""
    c = load(spec)
    per_rollout = c.rollout.batch_prompts * c.rollout.num_samples // c.data.batch_size * c.rollout.epochs
    assert (per_rollout, c.train.steps) == ({"grpo.py": 4, "ppo.py": 4}[spec], rollouts * per_rollout)


def test_context_extension_smoke_extends_fourfold():
    """As the full config (256 -> 1024): the smoke's 128-token rows are 4x its original_max_position_embeddings."""
    c = load("context_extension.py:smoke")
    assert (c.data.seq_len, c.model.rope_scaling.original_max_position_embeddings, c.model.rope_scaling.factor) == (
        128, 32, 4.0)


def test_small_and_tiny_presets_are_their_documented_shapes():
    """`small` (model/presets.py): ~30M parameters, d_model 512, 8 layers, SwiGLU 1408, vocab 8192, tied: the
    DESIGN's 34M benchmark model is it with --untied. Counted by hand: embeddings V*d, per layer 4*d*d attention
    (8 kv heads of 64) + 3*d*d_ff MLP + 2 norms of d, a final norm. `tiny`: GQA (2 kv heads of 4), untied."""
    small, tiny = presets.get("small"), presets.get("tiny")
    assert (small.vocab_size, small.d_model, small.n_layers, small.n_heads, small.n_kv_heads, small.d_ff,
            small.tie_embeddings, small.max_seq_len) == (8192, 512, 8, 8, 8, 1408, True, 1024)
    assert param_count(small) == 8192 * 512 + 8 * (4 * 512 * 512 + 3 * 512 * 1408 + 2 * 512) + 512 == 29_893_120
    assert (tiny.vocab_size, tiny.d_model, tiny.n_layers, tiny.n_heads, tiny.n_kv_heads, tiny.d_ff,
            tiny.tie_embeddings, tiny.max_seq_len) == (256, 64, 2, 4, 2, 128, False, 256)
    assert param_count(tiny) == 2 * 256 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64


def write_sweep(tmp_path, **fields) -> str:
    """A sweep file whose get_config returns `fields` over tests/test_sweep.py's defaults (None: left out)."""
    path = tmp_path / "sweep_file.py"
    settings = {**dict(run_dir=str(tmp_path / "out"), base="configs/sft.py:smoke", overrides=(), seeds=(0,),
                       metrics=("eval/loss",), points=({"optim.lr": 0.1},)), **fields}
    settings = {k: v for k, v in settings.items() if v is not None}
    path.write_text(f"from ml_collections import ConfigDict\ndef get_config(variant=''):\n"
                    f"    return ConfigDict({settings!r})\n")
    return str(path)


@pytest.mark.parametrize("base", [None, ""])
def test_a_sweep_without_a_base_config_is_refused(tmp_path, base):
    """Without `base` every run would load nothing: the check names the missing key before any run."""
    with pytest.raises(ConfigError, match="a sweep sets 'base'"):
        sweep.load_sweep(write_sweep(tmp_path, base=base), [])


def test_the_plot_draws_one_line_per_series_value(tmp_path, monkeypatch):
    """plot.series splits the points into labelled lines (dpo_beta.py: one line per loss type over beta)."""
    from matplotlib.figure import Figure
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: drawn.append(fig))
    monkeypatch.setattr(sweep.os, "replace", lambda *a: None)
    s = sweep.load_sweep(write_sweep(tmp_path, plot={"x": "loss.beta", "series": "loss.type", "y": ("m",)}), [])
    points = [{"point": f"{t}{b}", "overrides": {"loss.beta": b, "loss.type": t}, "mean": {"m": b * (t == "a")},
               "std": {"m": 0.0}} for t in ("a", "b") for b in (0.1, 0.5)]
    sweep.plot({"points": points}, s, str(tmp_path / "p.png"))
    [ax] = drawn[0].axes
    assert [bars.lines[0].get_xydata().tolist() for bars in ax.containers] == [  # errorbar: (data line, caps, bars)
        [[0.1, 0.1], [0.5, 0.5]], [[0.1, 0.0], [0.5, 0.0]]]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss.type=a", "loss.type=b"]


def test_a_stage_row_waits_for_no_helper_that_has_not_run():
    """result_rows of a stage done while its helper is not (results.json kept the stage's row alone): the row
    stands on its own figures, with no parts, rather than failing on the helper's missing entry."""
    stages = [{"name": "gen", "part_of": "sft"}, {"name": "sft"}, {"name": "dpo"}]
    done = {"sft": {"stage": "sft", "seconds": 60.0, "metrics": {"accuracy": 0.5}}}
    assert stage_results.result_rows(stages, done) == [
        {"stage": "sft", "seconds": 60.0, "metrics": {"accuracy": 0.5}, "parts": []}]
    done["gen"] = {"stage": "gen", "seconds": 30.0, "metrics": {"pass@1": 0.25}}
    assert stage_results.result_rows(stages, done) == [
        {"stage": "sft", "seconds": 90.0, "metrics": {"accuracy": 0.5, "gen/pass@1": 0.25}, "parts": ["gen"],
         "part_seconds": {"gen": 30.0}}]


KILN = ["kiln", "train", "--config=configs/pretrain.py"]


@pytest.mark.parametrize("main, argv, message", [
    ("local", ["--num_processes=2", "--devices_per_process=0"], "--num_processes and --devices_per_process of at "
                                                                 "least 1"),
    ("multinode", ["--nodes=1", "--node_rank=0", "--coordinator=h:1", "--processes_per_node=0"],
     "--nodes and --processes_per_node must be at least 1"),
    ("slurm", ["--nodes=1", "--gpus_per_node=8", "--time=10:5:00"], "--time='10:5:00' is not HH:MM:SS"),
])
def test_launchers_refuse_a_count_of_zero_and_a_malformed_time(main, argv, message, capsys):
    """Dry runs: zero devices per process, or zero processes per node (nothing started, exit 0), went through."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"launch.{main}").main([*argv, "--dry-run", "--", *KILN])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_local_gives_each_process_one_cpu_device_by_default(capsys):
    assert local.main(["--num_processes=1", "--port=1234", "--dry-run", "--", *KILN]) == 0
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=1 " in capsys.readouterr().out


def test_each_process_variables_win_over_this_environment(monkeypatch):
    """A launcher started from inside a multi-process job (JAX_PROCESS_ID set here) still gives each process
    its own id: the process's variables go on top of the environment, not under it."""
    seen = []

    class Process:
        returncode = 0

        def __init__(self, command, env, stdout, stderr):
            seen.append((env["JAX_PROCESS_ID"], env["PATH"]))

        def poll(self):
            return 0

    monkeypatch.setenv("JAX_PROCESS_ID", "7")
    monkeypatch.setattr(launcher.subprocess, "Popen", Process)
    assert launcher.supervise(KILN, [{"JAX_PROCESS_ID": "0"}, {"JAX_PROCESS_ID": "1"}], [None, None]) == 0
    assert seen == [("0", os.environ["PATH"]), ("1", os.environ["PATH"])]


def test_sample_defaults_are_its_documented_ones(tmp_path, monkeypatch):
    """`kiln sample` without options: 256 new tokens at temperature 1, top_p 1, top_k 0 (off), one sample per
    prompt, seed 0, no stop strings, prompts 64 to a batch (65 prompts: two calls)."""
    sampler = Sampler()
    monkeypatch.setattr(sample, "load_sampler", lambda path, **kw: (sampler, False))
    prompts = [f"--prompt=p{i}" for i in range(65)]
    assert sample.main(["--checkpoint=ck", *prompts, f"--output={tmp_path / 'out.jsonl'}"]) == 0
    assert [len(call.pop("prompts")) for call in sampler.calls] == [64, 1]
    for call, start in zip(sampler.calls, (0, 64)):
        assert (jax.random.key_data(call.pop("seed")) == jax.random.key_data(
            jax.random.fold_in(jax.random.key(0), start))).all()
        assert call == dict(stop=[], max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0, num_samples=1,
                            chat=False)


@pytest.mark.parametrize("num_samples, refused", [(1, False), (2, True)])
def test_greedy_sampling_of_two_samples_is_refused(num_samples, refused):
    """Temperature 0 makes every sample of a prompt the same one: two or more are refused, one is fine."""
    args = argparse.Namespace(temperature=0.0, top_p=1.0, top_k=0, num_samples=num_samples)
    if refused:
        with pytest.raises(ValueError, match="--temperature=0 samples greedily"):
            sample.check_sampling(args)
    else:
        sample.check_sampling(args)


def test_eval_hands_its_batch_size_and_reply_length_to_the_task_accuracy(tmp_path, monkeypatch):
    """eval.batch_size and eval.max_new_tokens reach tasks.accuracy as set (stand-ins as in
    tests/test_eval_cli.py): a dropped one left the default batch of 32 in silence."""
    seen = []

    def accuracy(sampler, evaluated, shots, *, cot, chat, max_new_tokens, batch_size):
        seen.append((max_new_tokens, batch_size))
        return {"accuracy": 0.0, "correct": 0, "n": 1, "examples": []}

    sampler = types.SimpleNamespace(model=None, tokenizer=None)
    monkeypatch.setattr(kiln_eval.generate, "load_sampler", lambda path, **kw: (sampler, False))
    monkeypatch.setattr(kiln_eval, "_task_runs", lambda config, s, chat: [("arithmetic", 0, True, ["q"], [])])
    monkeypatch.setattr(kiln_eval.nnx, "split", lambda model, *filters: (None, None, None))
    monkeypatch.setattr(kiln_eval.evaluate, "make_eval_step", lambda graphdef: lambda *a: None)
    monkeypatch.setattr(kiln_eval.evaluate, "evaluate_sources", lambda *a: {})
    monkeypatch.setattr(kiln_eval.tasks, "accuracy", accuracy)
    config = load("eval.py:smoke", f"--config.run_dir={tmp_path / 'eval'}", "--config.eval.batch_size=5",
                  "--config.eval.max_new_tokens=11")
    kiln_eval.run(config, str(tmp_path / "ckpt"))
    assert seen == [(11, 5)]


def test_kiln_tokenizer_defaults_and_flags_reach_the_trainer(tmp_path, monkeypatch, capsys):
    """Documented defaults: BPE, digits split one per piece, pieces within lines; --no-split_digits, --newlines
    and --model_type reach sentencepiece's trainer (a stand-in here) as given."""
    (tmp_path / "a.txt").write_text("one 12\n")
    trained = []
    monkeypatch.setattr(tokenizer_cli.spm, "train", lambda texts, out, **kw: trained.append((list(texts), kw)) or 0)
    monkeypatch.setattr(tokenizer_cli.tokenizers, "load", lambda out: types.SimpleNamespace(vocab_size=9))
    argv = [f"--input={tmp_path / 'a.txt'}", "--vocab_size=9", f"--out={tmp_path / 't.model'}"]
    assert tokenizer_cli.main(argv) == 0
    assert tokenizer_cli.main([*argv, "--no-split_digits", "--newlines", "--model_type=unigram"]) == 0
    assert [kw for _, kw in trained] == [
        dict(vocab_size=9, model_type="bpe", split_digits=True, newlines=False),
        dict(vocab_size=9, model_type="unigram", split_digits=False, newlines=True)]
    assert trained[0][0] == ["one 12\n"]


def test_lifecycle_wires_each_setting_to_its_stage():
    """Each stage's learning rate is its own setting (rejection sampling's SFT at half SFT's), rs_generate keeps
    replies scoring at least min_reward, and every train stage evaluates at its last step."""
    c = lifecycle.get_config()
    c.sft_lr, c.dpo_lr, c.grpo_lr, c.min_reward = 1e-3, 3e-5, 2e-5, 0.5
    by = {s["name"]: dict(o.split("=", 1) for o in s["overrides"]) for s in lifecycle.stages(c)}
    assert {n: float(by[n]["optim.lr"]) for n in by if "optim.lr" in by[n]} == {
        "sft": 1e-3, "rejection_sampling": 5e-4, "dpo": 3e-5, "grpo": 2e-5}
    assert by["rs_generate"]["rollout.min_reward"] == "0.5"
    assert all(o["train.eval_every"] == o["train.steps"] for o in by.values() if "train.steps" in o)
