"""`kiln pipeline`'s runner in seconds: the stages' own work (training, generation, evaluation) is
replaced by stand-ins that record the config each stage got and write the files a real stage writes,
on a clock that advances by known amounts. What is left is the runner itself: the run directory of
each stage, `@NAME` references resolved to earlier stages' directories, the stage's evaluation, its
row of metrics (a helper's joining its stage's), the progress line, and a re-run that skips finished
stages and runs the interrupted ones. (tests/test_pipeline.py runs real recipes end to end, slowly.)"""
import json
import os
import re

import pytest

from data import tokenizer as tokenizers
from launch import pipeline, stage_results
from launch.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGES = [
    dict(name="pretrain", command="train", config="configs/pretrain.py:smoke", minutes=2,
         overrides=["train.steps=4"], evaluate={"config": "configs/eval.py:smoke", "overrides": ["eval.num_problems=3"]}),
    dict(name="rm", command="train", config="configs/reward.py:smoke", minutes=1,
         overrides=["model.init_from=@pretrain", "train.steps=2", "run_dir=@pretrain/not_here"]),  # NAME wins
    dict(name="gen", command="generate", config="configs/rejection_sampling.py:smoke", part_of="sft", minutes=1,
         overrides=["model.init_from=@pretrain", "rollout.reward=@rm"]),
    dict(name="sft", command="train", config="configs/sft.py:smoke", minutes=3,
         overrides=["model.init_from=@pretrain", "data.sources.train.format=jsonl", "data.sources.train.end=1.0",
                    "data.sources.train.path=@gen/sft.jsonl", "train.steps=4"]),
    dict(name="final", command="eval", config="configs/eval.py:smoke", checkpoint="@sft"),
]
# Seconds each stand-in takes, by the directory it writes to.
SECONDS = {"pretrain": 120, "pretrain/eval": 30, "rm": 60, "gen": 30, "sft": 180, "final": 15}
TASKS = [dict(task="arithmetic", shots=0, chain_of_thought=True, accuracy=0.25),
         dict(task="arithmetic", shots=0, chain_of_thought=False, accuracy=0.5),
         dict(task="arithmetic", shots=1, chain_of_thought=True, accuracy=0.125)]


class Fake:
    """Stand-ins for the stages' work, a clock, and the calls made."""

    def __init__(self, root):
        self.root, self.now, self.calls = root, 0.0, []

    def _done(self, run_dir):
        self.now += SECONDS[os.path.relpath(run_dir, self.root)]
        self.calls.append(os.path.relpath(run_dir, self.root))

    def train(self, config):
        os.makedirs(os.path.join(config.run_dir, "checkpoints"), exist_ok=True)  # a Kiln run, not a Hugging Face one
        with open(os.path.join(config.run_dir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 1, "loss": 2.0, "lr": 0.001}) + "\n")
            row = {"step": config.train.steps, "loss": 1.5, "eval/loss": 1.75}
            if config.stage == "reward":
                row["eval/accuracy"] = 0.875
            f.write(json.dumps(row) + "\n")
        with open(os.path.join(config.run_dir, "step"), "w") as f:
            f.write(str(config.train.steps))
        self.seen[config.run_dir] = config
        self._done(config.run_dir)
        return {}

    def generate(self, config):
        os.makedirs(config.run_dir, exist_ok=True)
        with open(os.path.join(config.run_dir, "results.json"), "w") as f:
            json.dump({"kept_fraction": 0.75, "best_of_k": 0.5, "policy": config.model.init_from,
                       "settings": pipeline.rejection.settings(config)}, f)
        self.seen[config.run_dir] = config
        self._done(config.run_dir)

    def evaluate(self, config, checkpoint_path):
        os.makedirs(config.run_dir, exist_ok=True)
        with open(os.path.join(config.run_dir, "results.json"), "w") as f:
            json.dump({"checkpoint": checkpoint_path, "metrics": {"eval/arithmetic/bits_per_byte": 3.0}, "tasks": TASKS}, f)
        self.evaluated[config.run_dir] = checkpoint_path
        self._done(config.run_dir)

    def latest_step(self, run_dir):
        with open(os.path.join(run_dir, "step")) as f:  # FileNotFoundError: no checkpoint yet
            return int(f.read())


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # stage configs are named relative to the repository
    f = Fake(str(tmp_path / "recipe"))
    f.seen, f.evaluated = {}, {}
    monkeypatch.setattr(pipeline.trainer, "train", f.train)
    monkeypatch.setattr(pipeline.rejection, "run", f.generate)
    monkeypatch.setattr(pipeline.eval_cli, "run", f.evaluate)
    monkeypatch.setattr(stage_results.checkpoint, "latest_step", f.latest_step)
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: f.now)
    return f


def recipe_file(tmp_path, stages=STAGES):
    path = tmp_path / "recipe_file.py"
    path.write_text("from ml_collections import ConfigDict\n"
                    f"def get_config(variant=''):\n    return ConfigDict(dict(run_dir={str(tmp_path / 'recipe')!r}))\n"
                    f"def stages(c):\n    return {stages!r}\n")
    return str(path)


def test_each_stage_runs_in_its_directory_on_the_earlier_stages_outputs(fake, tmp_path, capsys):
    root = fake.root
    recipe, stages = pipeline.load_recipe(recipe_file(tmp_path), [])
    results = pipeline.run(recipe, stages)
    assert fake.calls == ["pretrain", "pretrain/eval", "rm", "gen", "sft", "final"]
    at = lambda *parts: os.path.join(root, *parts)  # noqa: E731
    seen = fake.seen
    assert seen[at("pretrain")].train.steps == 4 and seen[at("pretrain")].stage == "pretrain"
    assert seen[at("rm")].model.init_from == at("pretrain") and seen[at("rm")].stage == "reward"
    assert (seen[at("gen")].model.init_from, seen[at("gen")].rollout.reward) == (at("pretrain"), at("rm"))
    assert seen[at("sft")].model.init_from == at("pretrain")
    assert seen[at("sft")].data.sources.train.path == at("gen", "sft.jsonl")
    # The stage's evaluation goes into NAME/eval, of NAME's model; an eval stage evaluates its checkpoint.
    assert fake.evaluated == {at("pretrain", "eval"): at("pretrain"), at("final"): at("sft")}

    # One row per stage; the helper `gen` joins `sft`'s row: its metrics prefixed, its time added.
    rows = {r["stage"]: r for r in results["stages"]}
    assert [r["stage"] for r in results["stages"]] == ["pretrain", "rm", "sft", "final"]
    assert {k: r["seconds"] for k, r in rows.items()} == {"pretrain": 150, "rm": 60, "sft": 210, "final": 15}
    assert rows["sft"]["parts"] == ["gen"] and rows["sft"]["run_dir"] == at("sft")
    assert rows["pretrain"]["metrics"] == {
        "train/loss": 1.5, "train/lr": 0.001, "eval/loss": 1.75, "eval/arithmetic/bits_per_byte": 3.0,
        "arithmetic/0shot_cot/accuracy": 0.25, "arithmetic/0shot/accuracy": 0.5, "arithmetic/1shot_cot/accuracy": 0.125,
        "accuracy": 0.5}  # the best setting's
    assert rows["rm"]["metrics"]["pair_accuracy"] == 0.875 and "accuracy" not in rows["rm"]["metrics"]
    assert rows["sft"]["metrics"] == {"train/loss": 1.5, "train/lr": 0.001, "eval/loss": 1.75,
                                      "gen/kept_fraction": 0.75, "gen/best_of_k": 0.5}
    assert rows["final"]["metrics"]["accuracy"] == 0.5 and rows["final"]["command"] == "eval"
    with open(os.path.join(root, "results.json")) as f:
        assert json.load(f) == json.loads(json.dumps(results))
    with open(os.path.join(root, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The table: minutes, and a helper's figures in its stage's empty columns.
    table = stage_results.markdown(results).splitlines()
    assert table[2] == "| pretrain | train | 2.5 | 0.500 |  | 1.750 |  |  |  |  |  | 1.500 |"
    assert table[3] == "| rm | train | 1.0 |  | 0.875 | 1.750 |  |  |  |  |  | 1.500 |"
    assert table[4] == "| sft | train | 3.5 |  |  | 1.750 |  |  |  | 0.500 | 0.750 | 1.500 |"
    out = capsys.readouterr().out.splitlines()
    # Progress: the time so far and the expected minutes of this stage and the later ones.
    assert "[1/5] pretrain: kiln train configs/pretrain.py:smoke (pipeline 0.0 min so far, about 7 min left)" in out
    assert "[4/5] sft: kiln train configs/sft.py:smoke (pipeline 4.0 min so far, about 3 min left)" in out
    assert "[5/5] final: kiln eval configs/eval.py:smoke (pipeline 7.0 min so far)" in out


def test_rerun_skips_finished_stages_and_runs_the_unfinished_ones(fake, tmp_path, capsys):
    root = fake.root
    recipe, stages = pipeline.load_recipe(recipe_file(tmp_path), [])
    pipeline.run(recipe, stages)
    # pretrain trained but its evaluation is gone; sft stopped at step 2 of 4; final never ran.
    os.remove(os.path.join(root, "pretrain", "eval", "results.json"))
    with open(os.path.join(root, "sft", "step"), "w") as f:
        f.write("2")
    os.remove(os.path.join(root, "final", "results.json"))
    fake.calls.clear()
    capsys.readouterr()
    results = pipeline.run(recipe, stages)
    assert fake.calls == ["pretrain", "pretrain/eval", "sft", "final"]
    out = capsys.readouterr().out
    assert "[2/5] rm: kiln train configs/reward.py:smoke: finished earlier, skipped" in out
    assert "[3/5] gen: kiln generate configs/rejection_sampling.py:smoke: finished earlier, skipped" in out
    # A skipped stage keeps the time it took when it ran.
    seconds = {r["stage"]: r["seconds"] for r in results["stages"]}
    assert (seconds["pretrain"], seconds["rm"], seconds["final"]) == (150, 60, 15)
    # sft ran again and gen (part of it) did not: gen's earlier time still counts, once.
    assert seconds["sft"] == 210
    assert [r["stage"] for r in stage_results.read_results(root)] == ["pretrain", "rm", "sft", "final"]
    fake.calls.clear()
    pipeline.run(recipe, stages)
    assert fake.calls == []
    # gen ran again and sft, which it is part of, did not: sft's own time plus gen's new time, gen's not twice.
    os.remove(os.path.join(root, "gen", "results.json"))
    results = pipeline.run(recipe, stages)
    assert fake.calls == ["gen"] and {r["stage"]: r["seconds"] for r in results["stages"]}["sft"] == 210


def test_finished_means_the_last_step_reached(fake, tmp_path):
    from launch.config import load_config
    config = load_config("configs/sft.py:smoke", [f"--config.run_dir={tmp_path}", "--config.train.steps=4"])
    assert not stage_results.finished("train", config)  # no checkpoint
    for step, done in ((3, False), (4, True), (5, True)):
        (tmp_path / "step").write_text(str(step))
        assert stage_results.finished("train", config) is done
    assert not stage_results.finished("tokenizer", config)
    (tmp_path / "tokenizer.model").write_text("")
    assert stage_results.finished("tokenizer", config) and not stage_results.finished("generate", config)


@pytest.mark.parametrize("name", ["..", "a/b", "superseded", "sft v2"])
def test_a_stage_name_is_a_directory_name_of_its_own(tmp_path, name):
    """A stage named ".." ran in the pipeline's parent directory, "a/b" in a nested one, and
    "superseded" in the folder where earlier records are set aside."""
    stages = [dict(name=name, command="train", config="configs/pretrain.py:smoke")]
    with pytest.raises(ConfigError, match=r"a stage's name is its directory: letters, digits, _ and - only"):
        pipeline.load_recipe(recipe_file(tmp_path, stages), [])


def test_a_hyphenated_stage_name_is_referred_to_whole(fake, tmp_path, monkeypatch):
    """`@pre-train` names the stage pre-train (a '-' is a directory name's letter), not a stage `pre`."""
    monkeypatch.setitem(SECONDS, "pre-train", 60)
    stages = [dict(name="pre-train", command="train", config="configs/pretrain.py:smoke"),
              dict(name="sft", command="train", config="configs/sft.py:smoke", overrides=["model.init_from=@pre-train"])]
    pipeline.run(*pipeline.load_recipe(recipe_file(tmp_path, stages), []))
    assert fake.seen[os.path.join(fake.root, "sft")].model.init_from == os.path.join(fake.root, "pre-train")


def test_a_stage_cannot_name_itself(tmp_path):
    stages = [dict(name="a", command="train", config="c", overrides=["model.init_from=@a"])]
    with pytest.raises(ConfigError, match="@a names no earlier stage"):
        pipeline.load_recipe(recipe_file(tmp_path, stages), [])
    stages = [dict(name="a", command="train", config="c"),
              dict(name="b", command="train", config="c", evaluate={"config": "e", "overrides": ["x=@c"]})]
    with pytest.raises(ConfigError, match="@c names no earlier stage"):
        pipeline.load_recipe(recipe_file(tmp_path, stages), [])
    stages = [dict(name="a", command="train", config="c"), dict(name="b", command="eval", config="e", checkpoint="@b")]
    with pytest.raises(ConfigError, match="@b names no earlier stage"):
        pipeline.load_recipe(recipe_file(tmp_path, stages), [])


@pytest.mark.parametrize("owner", ["a", "b"])
def test_a_helper_is_part_of_a_later_stage(tmp_path, owner):
    """A helper's figures join a stage that uses them, which runs after it: part_of naming an earlier
    stage (or the helper itself) would file them under a row already written."""
    stages = [dict(name="a", command="train", config="configs/pretrain.py:smoke"),
              dict(name="b", command="generate", config="configs/rejection_sampling.py:smoke", part_of=owner)]
    with pytest.raises(ConfigError, match=f"stage 1 \\(b\\): part_of='{owner}' names no later stage"):
        pipeline.load_recipe(recipe_file(tmp_path, stages), [])


def test_only_an_eval_stage_names_a_checkpoint(tmp_path):
    """A train stage's `checkpoint` would be ignored in silence (it trains from model.init_from)."""
    stages = [dict(name="a", command="train", config="configs/pretrain.py:smoke", checkpoint="runs/x")]
    with pytest.raises(ConfigError, match="an eval stage names its `checkpoint`, and only an eval stage does"):
        pipeline.load_recipe(recipe_file(tmp_path, stages), [])


@pytest.mark.parametrize("where, message", [
    ("overrides", "stage 3 (sft): unknown config key 'train.stepz'"),
    ("evaluate", "stage 0 (pretrain): unknown config key 'eval.num_problemz'"),
])
def test_a_late_stage_typo_stops_the_pipeline_before_any_stage_runs(fake, tmp_path, where, message):
    """A misspelt key in the fourth stage was found only when that stage started, after the stages
    before it had run (minutes to hours)."""
    stages = [dict(s, overrides=[*s.get("overrides", ())]) for s in STAGES]
    if where == "overrides":
        stages[3]["overrides"].append("train.stepz=4")
    else:
        stages[0]["evaluate"] = {"config": "configs/eval.py:smoke", "overrides": ["eval.num_problemz=3"]}
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.run(*pipeline.load_recipe(recipe_file(tmp_path, stages), []))
    assert fake.calls == [] and not os.path.exists(tmp_path / "recipe")


def test_a_damaged_results_json_is_set_aside_and_rebuilt(fake, tmp_path, capsys):
    """results.json cut short (a kill of an older version, a hand edit) stopped every re-run with a bare
    JSON message naming no file; now it moves to superseded/ and the stages' outputs rebuild it."""
    recipe, stages = pipeline.load_recipe(recipe_file(tmp_path), [])
    first = pipeline.run(recipe, stages)
    path = os.path.join(fake.root, "results.json")
    with open(path) as f:
        damaged = f.read()[:100]
    with open(path, "w") as f:
        f.write(damaged)
    capsys.readouterr()
    results = pipeline.run(recipe, stages)
    assert f"warning: {path} cannot be read (" in capsys.readouterr().err
    assert [r["metrics"] for r in results["stages"]] == [r["metrics"] for r in first["stages"]]
    [aside] = os.listdir(os.path.join(fake.root, "superseded"))
    with open(os.path.join(fake.root, "superseded", aside, "results.json")) as f:
        assert f.read() == damaged


def test_train_metrics_drop_a_torn_last_row_and_name_a_damaged_one(tmp_path):
    """A kill mid-write tears the last row of metrics.jsonl (dropped, as resuming drops it); a damaged
    row before it is named by file and line (both were a bare JSON message)."""
    rows = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "eval/loss": 1.75}\n'
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 3, "lo')
    assert stage_results.train_metrics(str(tmp_path)) == {"train/loss": 1.5, "eval/loss": 1.75}
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n' + rows)
    message = f"{tmp_path}/metrics.jsonl line 1: not a JSON row; delete the line"
    with pytest.raises(ValueError, match=re.escape(message)):
        stage_results.train_metrics(str(tmp_path))


def test_a_preempted_stage_stops_the_pipeline(fake, tmp_path, monkeypatch, capsys):
    """SIGTERM pre-empts the running stage, which saves and returns: the pipeline went on to the next
    stage, from the unfinished model, and a re-run then skipped that stage as finished, its model
    built on the pre-empted one for good."""
    real = fake.train
    monkeypatch.setattr(pipeline.trainer, "train", lambda config: (
        {"preempted_at": 3} if config.stage == "reward" else real(config)))
    assert pipeline.main([f"--config={recipe_file(tmp_path)}"]) == 0
    assert fake.calls == ["pretrain", "pretrain/eval"]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"stopped the pipeline in stage rm at step 3 (pre-empted) in {fake.root}; run the same command to resume")
    assert [r["stage"] for r in stage_results.read_results(fake.root)] == ["pretrain"]


def test_rows_of_stages_not_reached_keep_their_figures(fake, tmp_path, monkeypatch):
    """A re-run pre-empted in rm leaves results.json with the later rows as the first run wrote them:
    sft's row with its helper's figures once prefixed (gen/kept_fraction), its time gen's included."""
    first = pipeline.run(*pipeline.load_recipe(recipe_file(tmp_path), []))
    os.remove(os.path.join(fake.root, "rm", "step"))  # rm must run again
    real = fake.train
    monkeypatch.setattr(pipeline.trainer, "train", lambda config: (
        {"preempted_at": 1} if config.stage == "reward" else real(config)))
    pipeline.run(*pipeline.load_recipe(recipe_file(tmp_path), []))
    rows = {r["stage"]: r for r in stage_results.read_results(fake.root)}
    sft = next(r for r in first["stages"] if r["stage"] == "sft")
    assert (rows["sft"]["metrics"], rows["sft"]["seconds"]) == (sft["metrics"], sft["seconds"])


def test_a_finished_stage_with_other_settings_is_named(fake, tmp_path, capsys):
    """A re-run after editing a finished stage's overrides skipped it in silence: the table then showed
    results of settings the recipe no longer names, and later stages built on that model. Optimizer or
    step changes are noted; model, data or seed changes stop the pipeline."""
    pipeline.run(*pipeline.load_recipe(recipe_file(tmp_path), []))
    rm = os.path.join(fake.root, "rm")
    with open(os.path.join(rm, "config.json"), "w") as f:  # what the real trainer writes
        json.dump(fake.seen[rm].to_dict(), f)
    lr = fake.seen[rm].optim.lr

    def edited(override):
        return [dict(s, overrides=[*s["overrides"], override]) if s["name"] == "rm" else s for s in STAGES]
    fake.calls.clear()
    capsys.readouterr()
    pipeline.run(*pipeline.load_recipe(recipe_file(tmp_path, edited("optim.lr=0.5")), []))
    assert fake.calls == []
    assert (f"[2/5] rm: kiln train configs/reward.py:smoke: finished earlier with other settings (optim.lr: {lr!r} -> "
            f"0.5; move {rm} aside to run it again), skipped") in capsys.readouterr().out
    with pytest.raises(ConfigError, match=re.escape(f"{rm} finished with other settings (seed: 0 -> 7), which the run")):
        pipeline.run(*pipeline.load_recipe(recipe_file(tmp_path, edited("seed=7")), []))


def test_a_tokenizer_stage_trains_the_tokenizer_the_later_stages_read(fake, tmp_path):
    """The one stage kind no stand-in replaces: it trains a tokenizer on its config's training sources into
    its own directory (sentencepiece, a few hundred pieces of the built-in task: well under a second), its
    row reports the vocabulary size, and `@tok/tokenizer.model` hands it to the next stage."""
    stages = [dict(name="tok", command="tokenizer", config="configs/pretrain.py:smoke",
                   overrides=["data.tokenizer_vocab_size=384"]),
              dict(name="pretrain", command="train", config="configs/pretrain.py:smoke",
                   overrides=["data.tokenizer=@tok/tokenizer.model", "train.steps=4"])]
    recipe, parsed = pipeline.load_recipe(recipe_file(tmp_path, stages), [])
    results = pipeline.run(recipe, parsed)
    model = os.path.join(fake.root, "tok", "tokenizer.model")
    assert fake.seen[os.path.join(fake.root, "pretrain")].data.tokenizer == model
    assert tokenizers.load(model).vocab_size == 384
    assert results["stages"][0]["stage"] == "tok" and results["stages"][0]["metrics"] == {"vocab_size": 384.0}
