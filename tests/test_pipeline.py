"""`kiln pipeline`: the lifecycle recipe's smoke run (every stage, results table and plot), skipping
finished stages and resuming an interrupted one; the Llama 3.1-style recipe's rounds (slow); recipes
that name stages wrongly."""
import json
import os
import shutil

import pytest

from launch import pipeline, stage_results
from launch.config import ConfigError
from train import checkpoint
from test_pipeline_run import recipe_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs/recipes/llama31_posttrain.py")
NAMES = ["pretrain", "sft", "eval_sft", "reward_1", "rejection_sampling_1", "sft_1", "dpo_1", "eval_1"]


LIFECYCLE = os.path.join(ROOT, "configs/recipes/lifecycle.py")
STAGES = ["tokenizer", "pretrain", "context_extension", "anneal", "sft", "reward", "rejection_sampling", "dpo", "grpo"]


def run_in_root(recipe, stages):
    cwd = os.getcwd()
    os.chdir(ROOT)  # stage configs are named relative to the repository
    try:
        return pipeline.run(recipe, stages)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lifecycle"))
    recipe, stages = pipeline.load_recipe(f"{LIFECYCLE}:smoke", [f"--config.run_dir={root}"])
    return root, recipe, stages, run_in_root(recipe, stages)


@pytest.mark.slow  # ~2 min: over the default suite's budget until the smoke stages get cheaper
def test_lifecycle_runs_every_stage_and_writes_the_results_table(lifecycle):
    root, _, _, results = lifecycle
    assert [r["stage"] for r in results["stages"]] == STAGES
    assert json.load(open(os.path.join(root, "results.json")))["stages"] == results["stages"]
    by = {r["stage"]: r for r in results["stages"]}
    for name in STAGES[1:5] + STAGES[6:]:
        m = by[name]["metrics"]
        assert 0.0 <= m["accuracy"] <= 1.0 and m["accuracy"] == max(v for k, v in m.items() if k.endswith("/accuracy")
                                                                       and k.startswith("arithmetic/"))
        assert by[name]["seconds"] > 0
    assert 0.0 <= by["reward"]["metrics"]["pair_accuracy"] <= 1.0 and "accuracy" not in by["reward"]["metrics"]
    assert by["tokenizer"]["metrics"]["vocab_size"] == 384
    # The rejection-sampling row holds its generation's figures; its model trained on those samples.
    assert {"rs_generate/kept_fraction", "rs_generate/best_of_k"} <= set(by["rejection_sampling"]["metrics"])
    config = lambda name: json.load(open(os.path.join(root, name, "config.json")))  # noqa: E731
    assert config("rejection_sampling")["data"]["sources"]["train"]["path"] == os.path.join(root, "rs_generate",
                                                                                           "sft.jsonl")
    assert config("grpo")["model"]["init_from"] == os.path.join(root, "dpo")
    assert config("pretrain")["data"]["tokenizer"] == os.path.join(root, "tokenizer", "tokenizer.model")
    # Every policy is evaluated on the same held-out problems.
    evals = [json.load(open(os.path.join(root, n, "eval", "results.json"))) for n in ("pretrain", "grpo")]
    assert [(t["shots"], t["n"]) for t in evals[0]["tasks"]] == [(t["shots"], t["n"]) for t in evals[1]["tasks"]] == [(0, 4)]
    table = open(os.path.join(root, "results.md")).read()
    assert all(f"| {name} |" in table for name in STAGES)
    with open(os.path.join(root, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_lifecycle_rerun_skips_finished_stages_and_resumes_the_interrupted_one(lifecycle, capsys):
    root, recipe, stages, _ = lifecycle
    # dpo "killed" after its first checkpoint (step 2 of 4): its last checkpoint and the later stage are gone.
    shutil.rmtree(os.path.join(root, "dpo", "checkpoints", "4"))
    shutil.rmtree(os.path.join(root, "dpo", "eval"))
    shutil.rmtree(os.path.join(root, "grpo"))
    capsys.readouterr()
    results = run_in_root(recipe, stages)
    out = capsys.readouterr()
    ran = [s["name"] for s in stages if f"{s['name']}: kiln" in out.out
           and "skipped" not in out.out.split(f"{s['name']}: kiln")[1].split("\n")[0]]
    assert ran == ["dpo", "grpo"]
    assert "resumed from step 2" in out.out + out.err
    assert checkpoint.latest_step(os.path.join(root, "dpo")) == 4
    assert [r["stage"] for r in results["stages"]] == STAGES


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline"))
    recipe, stages = pipeline.load_recipe(f"{RECIPE}:smoke", [f"--config.run_dir={root}"])
    cwd = os.getcwd()
    os.chdir(ROOT)  # stage configs are named relative to the repository
    try:
        results = pipeline.run(recipe, stages)
    finally:
        os.chdir(cwd)
    return root, recipe, stages, results


@pytest.mark.slow
def test_recipe_runs_every_stage_on_the_previous_ones_outputs(smoke):
    root, _, _, results = smoke
    assert [r["stage"] for r in results["stages"]] == NAMES
    assert json.load(open(os.path.join(root, "results.json"))) == results
    assert "| dpo_1 | train |" in open(os.path.join(root, "results.md")).read()
    by = {r["stage"]: r for r in results["stages"]}
    assert set(by["eval_1"]["metrics"]) >= {"accuracy", "arithmetic/0shot_cot/accuracy"}
    assert "eval/accuracy" in by["reward_1"]["metrics"] and "eval/rewards/accuracies" in by["dpo_1"]["metrics"]
    # Each stage started from the one the recipe named.
    config = lambda name: json.load(open(os.path.join(root, name, "config.json")))  # noqa: E731
    assert config("dpo_1")["model"]["init_from"] == os.path.join(root, "sft_1")
    assert config("sft_1")["data"]["sources"]["train"]["path"] == os.path.join(root, "rejection_sampling_1", "sft.jsonl")
    rs = json.load(open(os.path.join(root, "rejection_sampling_1", "results.json")))
    assert rs["policy"] == os.path.join(root, "sft") and rs["reward"] == os.path.join(root, "reward_1")


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_resumes_the_interrupted_one(smoke, capsys):
    root, recipe, stages, _ = smoke
    # dpo_1 "killed" after its step-2 checkpoint: its last checkpoint and the later stage are gone.
    shutil.rmtree(os.path.join(root, "dpo_1", "checkpoints", "4"))
    shutil.rmtree(os.path.join(root, "eval_1"))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        pipeline.run(recipe, stages)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    skipped = [n for n in NAMES if f"{n}: kiln" in out.out and "skipped" in out.out.split(f"{n}: kiln")[1].split("\n")[0]]
    assert skipped == NAMES[:6]
    assert "resumed from step 2" in out.out + out.err
    assert checkpoint.latest_step(os.path.join(root, "dpo_1")) == 4
    assert os.path.isfile(os.path.join(root, "eval_1", "results.json"))


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "command": "train", "config": "c", "overrides": ["model.init_from=@b"]}], "@b names no earlier stage"),
    ([{"name": "a", "command": "fit", "config": "c"}], "command must be one of tokenizer, train, generate, eval"),
    ([{"name": "a", "command": "generate", "config": "c", "part_of": "b"}], "part_of='b' names no later stage"),
    ([{"name": "a", "command": "generate", "config": "c", "evaluate": {"config": "e"}}], "only a train stage"),
    ([{"name": "a", "command": "eval", "config": "c"}], "an eval stage names its `checkpoint`"),
    ([{"name": "a", "command": "train", "config": "c"}] * 2, "every stage needs a name of its own"),
    ([{"name": "a", "command": "train", "config": ""}], "`config` must name a config file, such as"),
    ([{"name": "a", "command": "train", "config": "c", "evaluate": "configs/eval.py:smoke"}],
     "`evaluate` must be a dict of config and overrides"),
    ([{"name": "a", "command": "train", "config": "c", "evaluate": {"config": "e", "checkpoint": "x"}}],
     "evaluate: unknown field 'checkpoint'; the fields are config, overrides"),  # it evaluates its own stage's model
])
def test_bad_recipes_are_named(tmp_path, stages, message):
    with pytest.raises(ConfigError, match=message):
        pipeline.load_recipe(recipe_file(tmp_path, stages), [])


def test_a_recipe_may_return_a_tuple_of_stages_naming_any_file_each_writes(tmp_path, monkeypatch):
    """stages(config) may be a tuple as well as a list, and @NAME/FILE may name each file a stage's command
    writes (an eval stage's results.json and results.md; anything in a train stage's run directory)."""
    monkeypatch.chdir(ROOT)
    stages = ({"name": "sft", "command": "train", "config": "configs/sft.py:smoke"},
              {"name": "ev", "command": "eval", "config": "configs/eval.py:smoke", "checkpoint": "@sft"},
              {"name": "tok", "command": "tokenizer", "config": "configs/pretrain.py:smoke"},
              {"name": "more", "command": "train", "config": "configs/sft.py:smoke",
               "overrides": ["data.sources.train.path=@ev/results.md", "data.eval_sources.heldout.path=@ev/results.json",
                             "data.tokenizer=@tok/tokenizer.model", "model.init_from=@sft/model"]})
    _, loaded = pipeline.load_recipe(recipe_file(tmp_path, stages), [])
    assert loaded == list(stages)


def test_a_stage_stopped_before_its_first_checkpoint_is_not_finished(tmp_path):
    from launch.config import load_config
    (tmp_path / "checkpoints").mkdir()  # what a run killed during set-up leaves
    config = load_config(os.path.join(ROOT, "configs/sft.py:smoke"), [f"--config.run_dir={tmp_path}"])
    assert not stage_results.finished("train", config)
    assert not stage_results.finished("eval", config)


@pytest.mark.parametrize("command, words", [("pipeline", "Runs a recipe"), ("generate", "Rejection sampling, a stage")])
def test_help_describes_the_command_itself(command, words, capsys):
    from launch import main
    with pytest.raises(SystemExit) as stop:
        main.main([command, "--help"])
    assert stop.value.code == 0 and words in capsys.readouterr().out


def test_llama31_dpo_is_llama3s_unless_overridden(monkeypatch):
    """The recipe's DPO stages train as Llama 3 did; `llama3_dpo=false` and the dpo overrides (later) undo it."""
    from launch.config import load_config
    monkeypatch.chdir(ROOT)

    def dpo(*overrides):
        stage = {s["name"]: s for s in pipeline.load_recipe(f"{RECIPE}:smoke", list(overrides))[1]}["dpo_1"]
        c = load_config(stage["config"], [f"--config.{o}" for o in stage["overrides"]])
        return c.loss.nll_coef, c.data.mask_special_tokens

    assert dpo() == (0.2, True)
    assert dpo("--config.llama3_dpo=false") == (0.0, False)
    assert dpo("--config.dpo_overrides=('loss.nll_coef=0.5',)") == (0.5, True)


def test_llama31_lifecycle_variant_runs_rounds_like_the_main_job(monkeypatch):
    """Two rounds from the lifecycle's SFT model: no SFT from a base, and each round's stage configs
    resolve to the lifecycle's task, sizes and evaluation (what its table compares against)."""
    from launch.config import load_config
    monkeypatch.chdir(ROOT)
    recipe, stages = pipeline.load_recipe(f"{RECIPE}:lifecycle", [])
    assert [s["name"] for s in stages] == ["eval_sft", *(f"{k}_{r}" for r in (1, 2)
                                                         for k in ("rejection_sampling", "sft", "dpo", "eval"))]
    assert stages[0]["checkpoint"] == "runs/lifecycle/sft"
    by_name = {s["name"]: s for s in stages}

    def config(name):
        s = by_name[name]
        return load_config(s["config"], [f"--config.{o}" for o in s["overrides"]])

    rs, sft, dpo, ev = config("rejection_sampling_2"), config("sft_2"), config("dpo_1"), config("eval_2")
    for c in (rs, sft, dpo, ev):
        task = c.data.synthetic
        assert (task.max_digits, task.min_ops, task.max_ops, task.num_examples) == (1, 2, 2, 20000)
    assert (rs.model.init_from, rs.rollout.num_prompts, rs.rollout.num_samples, rs.seed) == ("@dpo_1", 512, 4, 2)
    assert (sft.model.init_from, sft.train.steps, sft.optim.lr) == ("@dpo_1", 40, 5e-4)
    assert sft.data.sources.train.path == "@rejection_sampling_2/sft.jsonl"
    assert dpo.data.sources.train.path == "@rejection_sampling_1/pairs.jsonl"
    for c in (sft, dpo):  # rejection sampling's file, all of it (format=synthetic would read the built-in task)
        assert (c.data.sources.train.format, c.data.sources.train.end) == ("jsonl", 1.0)
    assert (dpo.model.init_from, dpo.train.steps, dpo.optim.lr, dpo.data.seq_len) == ("@sft_1", 20, 3e-5, 128)
    # DPO as Llama 3 trains it (section 4.1.4): the chosen reply's NLL at 0.2, the end token masked out;
    # no other stage gets either.
    assert (dpo.loss.nll_coef, dpo.data.mask_special_tokens) == (0.2, True)
    assert (sft.loss.nll_coef, sft.data.mask_special_tokens, rs.data.mask_special_tokens) == (0.0, False, False)
    assert (ev.eval.num_problems, tuple(ev.eval.shots), ev.data.seq_len) == (500, (0, 1), 512)
    assert by_name["eval_2"]["checkpoint"] == "@dpo_2"
