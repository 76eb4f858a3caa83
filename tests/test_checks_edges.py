"""The edges of the checks made before any model is built or any stage runs: each range's bounds (the value
just outside refused naming its key, the bound itself taken), each source of a check (every recorded setting,
every kind of directory), and what a check must leave alone. Nothing here loads or trains a model."""
import json
import os
import re
import types

import pytest

from configs import base
from data import sources
from launch import pipeline
from launch.config import ConfigError
from test_config_overrides import load
from test_data_sources import data_cfg, records, write_jsonl
from test_misuse import ROOT, one_error_line
from test_misuse_post import fake_run, saved_run, stub_eval
from test_pipeline_run import recipe_file
from train import preflight


@pytest.mark.parametrize("spec, overrides, message", [
    ("dpo.py:smoke", ["loss.label_smoothing=-0.1"], "'loss.label_smoothing' must be in [0, 0.5) (the fraction of "
                                                    "flipped labels), got -0.1"),
    ("dpo.py:smoke", ["loss.nll_coef=-0.1"], "'loss.nll_coef' must be 0 or more, got -0.1"),
    ("dpo.py:smoke", ["loss.preference_type=simpo", "loss.simpo_gamma=-0.5"],
     "'loss.simpo_gamma' must be 0 or more, got -0.5"),
    ("reward.py:smoke", ["loss.margin=-0.1"], "'loss.margin' must be 0 or more, got -0.1"),
    ("grpo.py:smoke", ["loss.clip_eps_low=0.0"], "'loss.clip_eps_low' must be in (0, 1), got 0.0"),
    ("grpo.py:smoke", ["loss.clip_eps_low=1.0"], "'loss.clip_eps_low' must be in (0, 1), got 1.0"),
    ("grpo.py:smoke", ["loss.clip_eps_high=0.0"], "'loss.clip_eps_high' must be positive, got 0.0"),
    ("ppo.py:smoke", ["loss.value_coef=-0.1"], "'loss.value_coef' must be 0 or more, got -0.1"),
    ("ppo.py:smoke", ["loss.value_clip=-0.1"], "'loss.value_clip' must be 0 (unclipped) or more, got -0.1"),
    ("ppo.py:smoke", ["rollout.gamma=-0.1"], "'rollout.gamma' must be in [0, 1], got -0.1"),
    ("ppo.py:smoke", ["rollout.gamma=1.1"], "'rollout.gamma' must be in [0, 1], got 1.1"),
    ("ppo.py:smoke", ["rollout.lam=-0.1"], "'rollout.lam' must be in [0, 1], got -0.1"),
    ("ppo.py:smoke", ["rollout.kl_target=-0.1"], "'rollout.kl_target' must be 0 (a fixed KL coefficient) or more, "
                                                 "got -0.1"),
    ("sft.py:smoke", ["peft.method=lora", "peft.lora_targets=()"],
     "'peft.lora_targets' = (): choose among q, k, v, o, gate, up, down"),
    ("sft.py:smoke", ["peft.method=lora", "peft.lora_targets=('q','qkv')"],
     "'peft.lora_targets' = ('q', 'qkv'): choose among q, k, v, o, gate, up, down"),
])
def test_each_post_training_range_refuses_the_value_just_outside_it(spec, overrides, message):
    """Every range check_post_training gained, at the bound the existing cases leave untried (the lower bound
    of a two-sided range, a strict bound given its own value), and LoRA with no target at all (it trained
    nothing). Each message names its own key and value: a rule that read another key's value (value_clip's
    for value_coef) let the bad one through. A target that is no Hugging Face name gets no "is 'X' here" hint."""
    with pytest.raises(ConfigError, match="^config key " + re.escape(message) + "$"):
        load(spec, *[f"--config.{o}" for o in overrides])


@pytest.mark.parametrize("spec, overrides", [
    ("dpo.py:smoke", ["loss.label_smoothing=0.0", "loss.nll_coef=0.0", "loss.beta=1e-3"]),
    ("dpo.py:smoke", ["loss.preference_type=simpo", "loss.simpo_gamma=0.0", "loss.label_smoothing=0.49"]),
    ("reward.py:smoke", ["loss.margin=0.0", "loss.center_coef=0.0"]),
    ("grpo.py:smoke", ["loss.clip_eps_low=0.999", "loss.clip_eps_high=5.0", "rollout.format_penalty=0.0"]),
    ("ppo.py:smoke", ["loss.value_coef=0.0", "loss.value_clip=0.0", "rollout.gamma=0.0", "rollout.lam=0.0",
                      "rollout.kl_target=0.0", "rollout.kl_horizon=1"]),
    ("ppo.py:smoke", ["rollout.gamma=1.0", "rollout.lam=1.0"]),
    ("sft.py:smoke", ["peft.method=lora", "peft.lora_targets=('down',)", "peft.lora_alpha=0.5"]),
])
def test_each_post_training_range_takes_its_bounds(spec, overrides):
    """The closed ends are settings in use: 0 turns a coefficient off (value_clip 0 is unclipped PPO, kl_target
    0 a fixed KL coefficient), GAE's gamma=lam=1 is the undiscounted return, gamma=0 the one-step one."""
    load(spec, *[f"--config.{o}" for o in overrides])


STAGE = {"name": "pre", "command": "train", "config": "configs/pretrain.py:smoke", "overrides": ["train.steps=1"]}


def test_a_recipe_stage_may_give_fractional_minutes_but_part_of_only_as_a_name(tmp_path, monkeypatch):
    """`minutes` is a number (the progress line's estimate): 1.5 is as good as 2. A `part_of` that is no string
    (a list of stage names) was a TypeError's traceback from the set of later stage names."""
    monkeypatch.chdir(ROOT)
    later = dict(STAGE, name="post")
    _, stages = pipeline.load_recipe(recipe_file(tmp_path, [dict(STAGE, minutes=1.5, part_of="post"), later]), [])
    assert stages[0]["minutes"] == 1.5
    path = recipe_file(tmp_path, [dict(STAGE, part_of=["post"]), later])
    with pytest.raises(ConfigError, match=re.escape(f"{path}: stage 0 (pre): `part_of` must be the name of a later "
                                                    "stage, got ['post']")):
        pipeline.load_recipe(path, [])


@pytest.mark.parametrize("text", ['{"checkpoint": "runs/sft", "pass@1": 0.5', '{"checkpoint": "runs/sft"}'])
def test_kiln_eval_refuses_a_results_file_that_is_no_complete_evaluation(tmp_path, text):
    """A results.json kiln eval cannot read (cut short), or one without an evaluation's tasks, would be replaced
    by the new evaluation, its contents lost: it is refused, as rejection sampling's is."""
    from launch import eval as eval_cli

    (tmp_path / "results.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'results.json'} is not an evaluation's results")):
        eval_cli._earlier_checkpoint(str(tmp_path))
    (tmp_path / "results.json").write_text('{"checkpoint": "runs/sft", "tasks": {}}')
    assert eval_cli._earlier_checkpoint(str(tmp_path)) == "runs/sft"


@pytest.mark.parametrize("spec, stage", [("rejection_sampling.py:smoke", "rejection_sampling"),
                                         ("reward.py:smoke", "reward")])
def test_kiln_eval_refuses_every_config_that_is_no_evaluation_config(tmp_path, capsys, monkeypatch, spec, stage):
    """Not only a training run's config: rejection sampling's (which also writes a results.json) and a reward
    model's are refused alike, before any checkpoint is read."""
    monkeypatch.chdir(ROOT)
    argv = ["eval", f"--checkpoint={tmp_path / 'missing'}", f"--config=configs/{spec}",
            f"--config.run_dir={tmp_path / 'eval'}"]
    assert one_error_line(capsys, argv) == (f"kiln eval: error: --config=configs/{spec} is a config of stage "
                                            f"{stage!r}; kiln eval reads an evaluation config, such as configs/eval.py")


def test_kiln_eval_sets_the_earlier_evaluations_table_aside_with_its_results(tmp_path, monkeypatch):
    """The evaluation that another checkpoint's replaces keeps both its files in superseded/: results.md (the
    table a reader opens) as well as results.json. (Stand-ins for the model and the metrics.)"""
    eval_cli = stub_eval(monkeypatch)
    config = load("eval.py:smoke", f"--config.run_dir={tmp_path / 'eval'}")
    for ckpt in ("a", "b"):
        eval_cli.run(config, str(tmp_path / ckpt))
    [superseded] = os.listdir(tmp_path / "eval" / "superseded")
    kept = tmp_path / "eval" / "superseded" / superseded
    assert sorted(os.listdir(kept)) == ["results.json", "results.md"]
    assert str(tmp_path / "a") in (kept / "results.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--top_p=0"], "--top_p must be in (0, 1], got 0.0"),
    (["--top_k=0", "--top_p=1", "--temperature=0"], None),  # the bounds themselves: off, off, greedy
    (["--temperature=0", "--num_samples=1"], None),  # one greedy sample per prompt is fine
])
def test_sample_settings_at_their_bounds(flags, message):
    """top_p=0 keeps no token at all; top_k=0 and top_p=1 are "off", and greedy sampling of one sample each
    is what --temperature=0 is for."""
    from launch import sample

    args = sample.parser().parse_args(["--checkpoint=ck", "--prompt=hi", *flags])
    if message is None:
        sample.check_sampling(args)
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            sample.check_sampling(args)


def test_the_reference_model_is_named_alike_however_its_path_is_given(tmp_path):
    """reference.json records the model precomputed log-probs were scored under: the run, its checkpoints
    directory, its latest step's directory and a link to the run are one model, named one way, so a DPO run
    given any of them is not refused for another model."""
    from train import reference

    sft = saved_run(tmp_path / "sft", 2, 6)
    os.symlink(sft, tmp_path / "link")
    names = {reference.reference_model(load("dpo.py:smoke", f"--config.model.init_from={path}"))
             for path in (sft, f"{sft}/checkpoints", f"{sft}/checkpoints/6", tmp_path / "link")}
    assert names == {f"{sft}/checkpoints step 6"}


def test_precomputed_log_probs_without_a_recorded_model_are_taken_as_they_are(tmp_path):
    """A reference.json that records encoding settings but no model (written before the model was recorded)
    says nothing about the reference: a run that starts from an existing model trains on it. A start that does
    not exist is not compared (it is named where it is loaded)."""
    from train import reference

    sft = saved_run(tmp_path / "sft", 2)
    (tmp_path / "scored").mkdir()
    config = load("dpo.py:smoke", "--config.loss.reference=data", f"--config.model.init_from={sft}",
                  f"--config.data.sources.train.path={tmp_path}/scored/train.jsonl",
                  "--config.data.sources.train.format=jsonl")
    (tmp_path / "scored" / "reference.json").write_text(json.dumps(reference.encoding(config.data)))
    reference.check_precomputed(config)
    # A model that is recorded, and a start that does not exist: that is named where the start is loaded.
    (tmp_path / "scored" / "reference.json").write_text(json.dumps(dict(reference.encoding(config.data),
                                                                        model=f"{sft}/checkpoints step 2")))
    config.model.init_from = str(tmp_path / "missing")
    reference.check_precomputed(config)


def test_kiln_data_reference_records_the_model_it_scored_under(tmp_path, monkeypatch):
    """reference.json holds the reference model beside the encoding settings: without it, a DPO run from
    another model takes the log-probs in silence. (Stand-ins for the model and the scoring.)"""
    from launch import reference_cli
    from train import reference

    sft = saved_run(tmp_path / "sft", 3)
    monkeypatch.setattr(reference_cli, "build_model", lambda *args: (None,))
    monkeypatch.setattr(reference_cli, "model_config", lambda *args: None)
    monkeypatch.setattr(reference_cli, "tokenizer_name", lambda config: "byte")
    monkeypatch.setattr(reference_cli, "_score_source", lambda *args: ([], 0))
    argv = ["--config=configs/dpo.py:smoke", f"--out={tmp_path / 'ref'}", f"--config.model.init_from={sft}"]
    monkeypatch.chdir(ROOT)
    assert reference_cli.main(argv) == 0
    recorded = json.loads((tmp_path / "ref" / "reference.json").read_text())
    assert set(recorded) == {*reference.ENCODING_KEYS, "model"} and recorded["model"] == f"{sft}/checkpoints step 3"


@pytest.mark.parametrize("where", ["step", "checkpoints"])
def test_an_adapter_to_start_from_that_is_a_kiln_checkpoint_is_named_so(tmp_path, where):
    """A Kiln run's step directory (config.json is the run's, above it) and a bare checkpoints directory (no
    config.json) are Kiln checkpoints too, not "no adapter_config.json" directories."""
    lora = ["--config.peft.method=lora", "--config.peft.lora_rank=8", "--config.peft.lora_alpha=16"]
    run = saved_run(tmp_path / "lora", 4)
    if where == "step":
        (tmp_path / "lora" / "config.json").write_text('{"stage": "sft"}')
    path = f"{run}/checkpoints/4" if where == "step" else run
    with pytest.raises(ValueError, match=re.escape(f"peft.adapter_from='{path}' is a Kiln run, not a PEFT adapter "
                                                   "directory")):
        preflight.stage_kind(load("sft.py:smoke", *lora, f"--config.peft.adapter_from={path}"))


def test_evaluation_sources_are_not_read_before_a_run_that_never_evaluates(tmp_path):
    """train.eval_every=0 turns evaluation off: an evaluation source that is missing does not stop the run
    (it would never be read)."""
    missing = [f"--config.data.eval_sources.heldout.path={tmp_path}/missing.jsonl",
               "--config.data.eval_sources.heldout.format=jsonl", "--config.data.eval_sources.heldout.start=0.0"]
    preflight.check_eval_sources(load("sft.py:smoke", *missing, "--config.train.eval_every=0"), "sft")
    with pytest.raises(sources.DataError, match="missing.jsonl"):
        preflight.check_eval_sources(load("sft.py:smoke", *missing, "--config.train.eval_every=5"), "sft")


@pytest.mark.parametrize("name", ["misspelt", "rm:v2"])
def test_a_reward_directory_that_is_no_reward_model_run_is_refused(tmp_path, name):
    """rollout.reward naming a directory that holds no Kiln run (a misspelt run name), or a policy's run whose
    name has a colon (not MODULE:FUNCTION: the directory is there), is refused before any model is loaded."""
    from train import rewards

    path = str(tmp_path / name)
    if name == "misspelt":
        os.mkdir(path)
    else:
        fake_run(tmp_path / name, "sft")
    what = "no Kiln run" if name == "misspelt" else "a run of stage 'sft'"
    with pytest.raises(ValueError, match=re.escape(f"rollout.reward='{path}' is neither 'verifier', a Kiln "
                                                   f"reward-model run nor MODULE:FUNCTION: it is {what}")):
        rewards.check(path)
    rewards.check(fake_run(tmp_path / "rm", "reward"))


def rejection_config(tmp_path, *overrides, web=""):
    """Rejection sampling's smoke config into tmp_path/rs; with `web`, a second source (after "train" in key
    order) reading that file."""
    config = load("rejection_sampling.py:smoke", f"--config.run_dir={tmp_path / 'rs'}",
                  f"--config.model.init_from={tmp_path / 'policy'}", *overrides)
    if web:
        with config.unlocked():
            config.data.sources.web = base.source(str(tmp_path / web), "jsonl")
    return config


@pytest.mark.parametrize("override, web_then, web_now, key", [
    ("seed=7", "", "", "seed"),
    ("data.batch_size=4", "", "", "data.batch_size"),
    ("rollout.min_reward=0.5", "", "", "rollout.min_reward"),
    ("data.synthetic.max_digits=3", "", "", "data.synthetic.max_digits"),
    ("", "", "web.jsonl", "data.sources.web."),
    ("", "web.jsonl", "other.jsonl", "data.sources.web.path"),
])
def test_rejection_sampling_rerun_with_any_recorded_setting_changed_is_refused(tmp_path, override, web_then, web_now,
                                                                             key):
    """Every setting that chooses the outputs is recorded and compared, not only the ones a test changes: the
    seed and the batch size (each chunk of prompts samples from its own key: other samples), the reward to keep a reply, the built-in task's problems, a source added since (its
    keys are in this run's settings alone) and the second source's file. Results recorded without settings
    (before they were recorded) are refused too: nothing says what made them."""
    from train import rejection

    (tmp_path / "rs").mkdir()
    (tmp_path / "rs" / "results.json").write_text(json.dumps({"settings": rejection.settings(
        rejection_config(tmp_path, web=web_then))}))
    changed = rejection_config(tmp_path, *([f"--config.{override}"] if override else []), web=web_now)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'rs'} holds the outputs of rejection sampling with "
                                                   f"{key}")):
        rejection.check_settings(changed)
    (tmp_path / "rs" / "results.json").write_text('{"pass@1": 0.5}')
    with pytest.raises(ValueError, match="records no settings"):
        rejection.check_settings(changed)


def test_rejection_sampling_rerun_after_its_policy_trained_on_is_refused(tmp_path):
    """The policy is recorded with its step: a recipe re-run that trained the SFT stage further would have
    taken the old policy's samples for the new one's (as DPO's reference and adapters' base record theirs)."""
    from train import rejection

    saved_run(tmp_path / "policy", 2)
    (tmp_path / "rs").mkdir()
    (tmp_path / "rs" / "results.json").write_text(json.dumps({"settings": rejection.settings(
        rejection_config(tmp_path))}))
    assert rejection.check_settings(rejection_config(tmp_path))["settings"]["model.init_from"].endswith(" step 2")
    saved_run(tmp_path / "policy", 4)
    with pytest.raises(ValueError, match="with model.init_from=.* step 2', and this run has .* step 4'"):
        rejection.check_settings(rejection_config(tmp_path))


def test_rejection_sampling_records_the_policy_as_the_path_it_names(tmp_path, monkeypatch):
    """model.init_from with $VARS is the same policy as its expansion: the recorded settings compare equal."""
    from train import rejection

    monkeypatch.setenv("KILN_TEST_RUNS", str(tmp_path))
    spelt = load("rejection_sampling.py:smoke", "--config.model.init_from=$KILN_TEST_RUNS/policy")
    assert rejection.settings(spelt) == rejection.settings(rejection_config(tmp_path))


def test_a_whole_model_run_from_a_hugging_face_directory_records_no_start_step(tmp_path, monkeypatch):
    """A Hugging Face directory has no steps to train on: its start item is not written (a Kiln run's latest
    step is). The start is recorded as an absolute path, which a resume from another directory still finds."""
    from train import checkpoint

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "dpo"), async_save=False, start="hf")
    assert (ckpt.start, ckpt.start_step) == (str(tmp_path / "hf"), None)
    ckpt.close()
    ckpt = checkpoint.Checkpointer(str(tmp_path / "dpo"), async_save=False, start=saved_run(tmp_path / "sft", 5))
    assert ckpt.start_step == 5
    ckpt.close()


@pytest.mark.parametrize("reference, rollout_reference, base, recorded", [
    (None, None, "", False),  # SFT, or GRPO at beta 0: nothing is rebuilt from the start on resume
    ("ref", None, "", True),  # whole-model DPO
    (None, "ref", "", True),  # whole-model GRPO / PPO (the rollout's reference)
    ("ref", None, "BASE", False),  # LoRA DPO: the adapters' base is recorded instead
])
def test_the_start_is_recorded_for_a_whole_model_run_with_a_reference(tmp_path, reference, rollout_reference, base,
                                                                      recorded):
    """Only a run whose reference is rebuilt from model.init_from on resume records its start (a recorded
    start refuses a resume once the start's run trained on: an SFT run would be refused for nothing)."""
    from train import trainer

    config = load("dpo.py:smoke", f"--config.model.init_from={saved_run(tmp_path / 'sft', 1)}")
    run = types.SimpleNamespace(config=config, reference=reference, rollout_reference=rollout_reference, base=base)
    assert trainer._reference_start(run) == (str(tmp_path / "sft") if recorded else "")


def test_llama31_dpo_settings_yield_to_the_overrides_of_every_stage(monkeypatch):
    """The recipe's Llama 3 DPO settings come before the user's overrides, those of every stage included: an
    override the user gives all stages also holds for the DPO stages."""
    from launch.config import load_config
    from test_pipeline import RECIPE

    monkeypatch.chdir(ROOT)
    stages = pipeline.load_recipe(f"{RECIPE}:smoke", ["--config.overrides=('data.mask_special_tokens=false',)"])[1]
    [dpo] = [s for s in stages if s["name"] == "dpo_1"]
    c = load_config(dpo["config"], [f"--config.{o}" for o in dpo["overrides"]])
    assert (c.loss.nll_coef, c.data.mask_special_tokens) == (0.2, False)


def test_a_text_file_with_windows_line_ends_read_as_one_document(tmp_path):
    r"""data.text_separator="" (the whole file one document) reads "\r\n" as "\n" as well."""
    (tmp_path / "doc.txt").write_bytes(b"One doc,\r\nline two.\r\n")
    got, _ = records(tmp_path / "doc.txt", "text", "pretrain", data_cfg(text_separator=""))
    assert got == [{"text": "One doc,\nline two.\n"}]


def test_a_source_path_with_any_pattern_character_says_it_is_a_pattern(tmp_path):
    """A '?' or '[...]' pattern matching files is a pattern as '*' is, not a file that was not found."""
    (tmp_path / "shards").mkdir()
    write_jsonl(tmp_path / "shards" / "0.jsonl", [{"prompt": "q", "completion": "a"}])
    for pattern in ("?.jsonl", "[0-9].jsonl"):
        with pytest.raises(sources.DataError, match=re.escape(f"'{tmp_path}/shards/{pattern}' is a pattern")):
            records(tmp_path / "shards" / pattern, "jsonl", "sft")
