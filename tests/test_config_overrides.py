"""`--config.KEY=VALUE`: each value parsed by its field's type, and every check `validate` makes, each
named by its key (tests/test_configs.py: every config file loads)."""
import os

import pytest

from launch.config import ConfigError, load_config, parse_value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(spec, *overrides):
    return load_config(os.path.join(ROOT, "configs", spec), list(overrides))


@pytest.mark.parametrize("raw, value", [("true", True), ("True", True), ("YES", True), ("1", True),
                                        ("false", False), ("False", False), ("no", False), ("0", False)])
def test_booleans_in_any_case(raw, value):
    assert load("pretrain.py:smoke", f"--config.train.progress={raw}").train.progress is value


def test_values_take_their_fields_type():
    c = load("eval.py:smoke", "--config.eval.shots=0", "--config.eval.chain_of_thought=True",
             "--config.data.seq_len=384", "--config.optim.lr=1e-3", "--config.data.sources.train.path=/d/a=b.jsonl",
             "config.model.d_model=96", "--config.model.rope_theta=10000")
    assert c.eval.shots == (0,) and c.eval.chain_of_thought == (True,)  # one value of a tuple: a 1-tuple
    assert c.data.seq_len == 384 and type(c.data.seq_len) is int and c.optim.lr == 1e-3
    assert c.data.sources.train.path == "/d/a=b.jsonl"  # the value is everything after the first "="
    assert c.model.d_model == 96 and c.model.rope_theta == 10000.0
    # A placeholder (a field awaiting a value) parses by its declared type: text stays text.
    assert load("pretrain.py:smoke", "--config.model.family=123").model.family == "123"
    c = load("sft.py:smoke", "--config.peft.method=lora", "--config.peft.lora_targets=('q', 'v')",
             "--config.peft.lora_targets=['gate', 'up']")
    assert c.peft.lora_targets == ("gate", "up")
    # A list field (a sweep's or recipe's own settings) likewise takes one value as a 1-list.
    assert parse_value("'q'", list) == ["q"] and parse_value("('q', 'v')", list) == ["q", "v"]


@pytest.mark.parametrize("override, message", [
    ("--config.data.seq_len=2.5", "bad value '2.5' for config key 'data.seq_len'"),
    ("--config.train.progress=maybe", "bad value 'maybe' for config key 'train.progress': expected true or false"),
    ("--config.model=3", "config key 'model' is a group; set one of its fields: attention, d_ff, d_model"),
    ("--config.data.sources=3", "config key 'data.sources' is a group"),
    ("--config.model.d_modl=3", "unknown config key 'model.d_modl'"),
    ("--config.data.sources.training.weight=1", "unknown config key 'data.sources.training.weight'"),
    ("--model.d_model=3", "cannot read argument '--model.d_model=3'; expected --config.KEY=VALUE"),
    ("--config.model.d_model", "expected --config.KEY=VALUE"),
    ("-config.model.d_model=3", "cannot read argument '-config.model.d_model=3'; expected --config.KEY=VALUE"),
    # A tuple that Python cannot read was a SyntaxError's traceback, unquoted names an AST dump.
    ("--config.peft.lora_targets=(q,", "bad value '(q,' for config key 'peft.lora_targets': expected a Python tuple"),
    ("--config.peft.lora_targets=(q,k)", "expected a Python tuple literal such as \"('q', 'v')\" (strings quoted"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load("pretrain.py:smoke", override)


@pytest.mark.parametrize("spec, overrides, message", [
    ("pretrain.py:smoke", ["data.seq_len=0"], "config key 'data.seq_len' must be positive, got 0"),
    ("pretrain.py:smoke", ["train.steps=0"], "config key 'train.steps' must be positive, got 0"),
    ("pretrain.py:smoke", ["checkpoint.keep=0"], "config key 'checkpoint.keep' must be positive, got 0"),
    # Each of these trained on in silence (a NaN or negative rate, warm-up, evaluation period), or was a
    # ZeroDivisionError's traceback (a mesh axis of 0).
    ("pretrain.py:smoke", ["run_dir="], "config key 'run_dir' is empty; name the run's directory"),
    ("pretrain.py:smoke", ["run_dir=  "], "config key 'run_dir' is empty"),  # blanks: the current directory too
    ("pretrain.py:smoke", ["optim.lr=nan"], "bad value 'nan' for config key 'optim.lr': expected a finite number"),
    ("pretrain.py:smoke", ["optim.lr=-1e-3"], "config key 'optim.lr' must be 0 or more, got -0.001"),
    ("pretrain.py:smoke", ["optim.warmup_steps=-1"], "config key 'optim.warmup_steps' must be 0 or more"),
    ("pretrain.py:smoke", ["train.eval_every=-5"], "config key 'train.eval_every' must be 0 or more, got -5"),
    ("pretrain.py:smoke", ["train.eval_steps=-1"], "config key 'train.eval_steps' must be 0 or more, got -1"),
    ("pretrain.py:smoke", ["optim.weight_decay=-0.1"], "config key 'optim.weight_decay' must be 0 or more"),
    ("pretrain.py:smoke", ["optim.clip_norm=-1.0"], "config key 'optim.clip_norm' must be 0 or more, got -1.0"),
    ("pretrain.py:smoke", ["checkpoint.every=-1"], "config key 'checkpoint.every' must be 0 or more, got -1"),
    ("pretrain.py:smoke", ["checkpoint.keep_every=-1"], "config key 'checkpoint.keep_every' must be 0 or more"),
    ("pretrain.py:smoke", ["mesh.data=0"], "config key 'mesh.data' must be a device count of 1 or more (or -1: the "
                                          "rest), got 0"),
    ("pretrain.py:smoke", ["mesh.dcn_data=-1"], "config key 'mesh.dcn_data' must be a device count of 1 or more, "
                                                "got -1"),
    ("pretrain.py:smoke", ["mesh.dcn_fsdp=0"], "config key 'mesh.dcn_fsdp' must be a device count of 1 or more, "
                                               "got 0"),
    ("pretrain.py:smoke", ["optim.grad_accum=3"], "data.batch_size=8 is not divisible by optim.grad_accum=3"),
    ("pretrain.py:smoke", ["data.sources.train.weight=-0.5"], "data.sources.train.weight must be >= 0, got -0.5"),
    ("pretrain.py:smoke", ["data.sources.train.weight=0"], "data.sources weights sum to zero"),
    ("pretrain.py:smoke", ["model.rope_scaling.factor=4.0"],
     "config key 'model.rope_scaling.factor' is set but model.rope_scaling.type is 'none'"),
    ("pretrain.py:smoke", ["model.remat=everything"], "config key 'model.remat' = 'everything'"),
    ("pretrain.py:smoke", ["model.dtype=none"], "config key 'model.dtype' = 'none'; expected one of float32"),
    ("pretrain.py:smoke", ["loss.beta=0.5"], "config key 'loss.beta' is set but loss.type is 'next_token'; it is "
                                             "read by loss.type=dpo or grpo or ppo"),
    ("dpo.py:smoke", ["loss.preference_type=hinge", "loss.label_smoothing=0.1"],
     "loss.label_smoothing applies to preference_type sigmoid, robust or simpo, not 'hinge'"),
    ("dpo.py:smoke", ["loss.preference_type=ipo", "loss.label_smoothing=0.1"], "not 'ipo'"),
    ("dpo.py:smoke", ["loss.simpo_gamma=1.0"], "loss.simpo_gamma is read by preference_type simpo, not 'sigmoid'"),
    ("dpo.py:smoke", ["loss.preference_type=orpo"], "ORPO's loss is the chosen reply's NLL"),
    ("dpo.py:smoke", ["loss.preference_type=orpo", "loss.nll_coef=1.0", "loss.reference=data"],
     "loss.reference='data' is read by preference types with a reference model (sigmoid, hinge, ipo, robust), not "
     "'orpo'"),
    # Post-training and evaluation ranges, named before any model is built (tests/test_misuse_post.py has the rest).
    ("sft.py:smoke", ["peft.method=lora", "peft.lora_dropout=1.0"], "config key 'peft.lora_dropout' must be in "),
    ("rejection_sampling.py:smoke", ["rollout.num_samples=0"], "config key 'rollout.num_samples' must be positive"),
    ("eval.py:smoke", ["eval.max_new_tokens=0"], "config key 'eval.max_new_tokens' must be positive, got 0"),
    ("eval.py:smoke", ["eval.batch_size=0"], "config key 'eval.batch_size' must be positive, got 0"),
    ("eval.py:smoke", ["eval.chain_of_thought=()"], "config key 'eval.chain_of_thought' is empty, so no setting of "
                                                    "eval.tasks would be scored; list (True, False), (True,) or (False,)"),
    ("sft.py:smoke", ["peft.method=prompt_tuning", "peft.prompt_init=text"], "peft.prompt_init=text and "
                                                                             "peft.prompt_init_text go together"),
    ("sft.py:smoke", ["peft.method=prompt_tuning", "peft.prompt_init_text=Solve:"], "go together"),
    ("sft.py:smoke", ["peft.method=prefix_tuning", "peft.lora_rank=4"],
     "config key 'peft.lora_rank' is set but peft.method is 'prefix_tuning'; it is read by peft.method=lora"),
    ("sft.py:smoke", ["peft.lora_rank=4"], "config key 'peft.lora_rank' is set but peft.method is 'none'"),
    ("ppo.py:smoke", ["rollout.advantage=rloo"], "config key 'rollout.advantage' is set but stage is 'ppo'; it is "
                                                  "read by stage=grpo"),
    ("grpo.py:smoke", ["rollout.num_prompts=4"], "config key 'rollout.num_prompts' is set but stage is 'grpo'"),
    ("grpo.py:smoke", ["rollout.min_reward=0.5"], "config key 'rollout.min_reward' is set but stage is 'grpo'; it "
                                                   "is read by stage=rejection_sampling"),
    ("grpo.py:smoke", ["rollout.gamma=0.9"], "config key 'rollout.gamma' is set but stage is 'grpo'; it is read "
                                             "by stage=ppo"),
])
def test_each_check_names_its_key(spec, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load(spec, *(f"--config.{o}" for o in overrides))


@pytest.mark.parametrize("spec, overrides", [
    ("pretrain.py:smoke", ["optim.grad_accum=4", "model.remat=save_out_proj"]),
    ("pretrain.py:smoke", ["mesh.fsdp=1", "mesh.tensor=-1"]),  # -1 on any of data, fsdp, tensor: the rest
    ("anneal.py:smoke", ["data.sources.quality.weight=0.0"]),
    ("pretrain.py:smoke", ["model.rope_scaling.type=linear", "model.rope_scaling.factor=4.0"]),
    ("dpo.py:smoke", ["loss.preference_type=robust", "loss.label_smoothing=0.1"]),
    ("dpo.py:smoke", ["loss.preference_type=simpo", "loss.label_smoothing=0.1", "loss.simpo_gamma=1.0"]),
    ("dpo.py:smoke", ["loss.preference_type=orpo", "loss.nll_coef=1.0"]),
    ("sft.py:smoke", ["peft.method=prompt_tuning", "peft.num_virtual_tokens=8"]),
    ("sft.py:smoke", ["peft.method=prompt_tuning", "peft.prompt_init=text", "peft.prompt_init_text=Solve:"]),
    ("sft.py:smoke", ["peft.method=prefix_tuning", "peft.prefix_hidden=32"]),
    ("ppo.py:smoke", ["rollout.gamma=0.9", "rollout.kl_target=0.1", "loss.value_clip=0.0"]),
    ("grpo.py:smoke", ["rollout.advantage=rloo", "loss.aggregation=dapo"]),
    ("rejection_sampling.py:smoke", ["rollout.num_prompts=3", "rollout.min_reward=0.5"]),
    ("eval.py:smoke", ["eval.num_problems=0"]),  # 0: every problem
    ("pretrain.py:smoke", ["eval.shots=()"]),  # no eval.tasks: no (shots, chain of thought) setting to score
])
def test_what_the_chosen_setting_reads_is_accepted(spec, overrides):
    """The other side of each check: the keys a setting does read (and a weight of 0 next to others)."""
    c = load(spec, *(f"--config.{o}" for o in overrides))
    assert c.is_locked


def test_a_moved_held_out_source_reads_its_file_whole_and_the_built_in_task_keeps_its_split(capsys):
    """data.eval_sources and an eval task's shots move as data.sources do: the Shakespeare held-out text
    (start=0.9 of its file) pointed at another file scores all of it, a shots file gives all its examples. Naming the built-in task (format=synthetic) moves nothing: its end=0.95
    stays the training split, where reading it whole would train on the held-out problems."""
    c = load("pretrain.py:shakespeare", "--config.data.eval_sources.eval.path=/data/mine.txt")
    assert (c.data.eval_sources.eval.start, c.data.eval_sources.eval.end) == (0.0, 1.0)
    assert "note: data.eval_sources.eval.path is set, so data.eval_sources.eval reads the whole new file, not the " \
           "config file's slice [start=0.9, end=1.0]" in capsys.readouterr().err
    c = load("eval.py:smoke", "--config.eval.tasks.arithmetic.shots.path=/data/mine.jsonl",
             "--config.eval.tasks.arithmetic.shots.format=jsonl")  # the few-shot examples' file, likewise
    assert c.eval.tasks.arithmetic.shots.end == 1.0 and "reads the whole new file" in capsys.readouterr().err
    c = load("sft.py:smoke", "--config.data.sources.train.format=synthetic")
    assert c.data.sources.train.end == 0.95 and capsys.readouterr().err == ""


def test_the_command_line_reports_a_bad_config_in_one_line(capsys, monkeypatch):
    from launch import main as kiln
    monkeypatch.chdir(ROOT)
    assert kiln.main(["train", "--config", "configs/pretrain.py:smok"]) == 1  # "--config FILE" as well as "="
    assert capsys.readouterr().err == ("kiln train: error: configs/pretrain.py:smok: unknown config variant 'smok'; "
                                       "this file has: shakespeare, smoke\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        kiln.main(["train", "--config=configs/pretrain.py:smoke", "--config.optim.lrr=1", "--debug"])
    assert kiln.main(["train", "--config=configs/pretrain.py:smoke", "--steps=3"]) == 1
    assert "unknown argument '--steps=3'; config values are set with --config.KEY=VALUE" in capsys.readouterr().err
    assert kiln.main(["tran"]) == 2 and "kiln: unknown subcommand 'tran'" in capsys.readouterr().err
