"""`kiln sweep`: a 2-point, 1-seed ablation end to end (table, JSON, plot), re-runs skip finished
points, --print lists the commands, and malformed sweeps are one clear error."""
import json
import math
import os

import pytest

from launch import main as kiln, sweep
from launch.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # stage configs are named relative to the repository, as the README runs them


@pytest.mark.slow
def test_two_point_sweep_tabulates_plots_and_skips_finished_points(in_root, tmp_path, capsys):
    out_dir = str(tmp_path / "sweep")
    args = ["sweep", "--config=configs/sweeps/lora_rank.py:smoke", f"--config.run_dir={out_dir}",
            "--config.overrides=('train.progress=false','train.steps=2','train.eval_every=2','checkpoint.every=2')"]
    assert kiln.main(args) == 0
    first = capsys.readouterr().out
    with open(os.path.join(out_dir, "results.json")) as f:
        results = json.load(f)
    assert [p["point"] for p in results["points"]] == ["full", "lora_r4"]
    for p in results["points"]:
        assert len(p["runs"]) == 1 and p["std"]["eval/loss"] == 0.0
        with open(os.path.join(p["runs"][0]["run_dir"], "metrics.jsonl")) as f:
            evals = [json.loads(line) for line in f if "eval/loss" in line]
        assert p["mean"]["eval/loss"] == evals[-1]["eval/loss"]  # the run's own last evaluation
    assert results["points"][0]["overrides"] == {"peft.method": "none", "optim.lr": 1e-3}
    table = open(os.path.join(out_dir, "results.md")).read()
    assert "| full | 1 |" in table and "| lora_r4 | 1 |" in table and table.strip() in first
    with open(os.path.join(out_dir, "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    mtime = os.path.getmtime(results["points"][0]["runs"][0]["run_dir"] + "/metrics.jsonl")
    assert kiln.main(args) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier, skipped") == 2 and "training" not in again
    assert os.path.getmtime(results["points"][0]["runs"][0]["run_dir"] + "/metrics.jsonl") == mtime


def test_print_lists_one_train_command_per_point_and_seed(in_root, capsys):
    assert kiln.main(["sweep", "--config=configs/sweeps/dpo_beta.py", "--print"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 9 * 2 and all(line.startswith("kiln train --config=configs/dpo.py ") for line in lines)
    assert "--config.loss.preference_type=robust --config.loss.label_smoothing=0.1 --config.seed=1" in lines[-1]


@pytest.mark.parametrize("override, message", [
    ("--config.seeds=()", "a sweep sets 'seeds'"),
    ("--config.metrics=()", "a sweep sets 'metrics'"),
    ("--steps=3", "unknown argument '--steps=3'; sweep values are set with --config.KEY=VALUE, --print prints"),
    ("--config.labels=('a','a')", "labels name each of its 2 points once"),
    ("--config.overrides=('optim.lrr=1',)", "optim.lrr"),
])
def test_malformed_sweeps_are_one_clear_error(in_root, override, message, capsys):
    assert kiln.main(["sweep", "--config=configs/sweeps/lora_rank.py:smoke", override, "--print"]) == 1
    assert message in capsys.readouterr().err


def test_every_sweep_and_its_variants_plan(in_root):
    for name in ("dpo_beta", "replay", "lora_rank"):
        for variant in ("", ":smoke", ":small"):
            runs = sweep.plan(sweep.load_sweep(f"configs/sweeps/{name}.py{variant}", []))
            assert len({args[-1] for _, _, args in runs}) == len(runs) >= 2
    # The small variants start from the main job's models, on its two-step task.
    for name, stage in (("dpo_beta", "sft"), ("lora_rank", "anneal"), ("replay", "anneal")):
        small = sweep.load_sweep(f"configs/sweeps/{name}.py:small", [])
        config = load_config(small.base, sweep.plan(small)[0][2])
        assert config.model.init_from == f"runs/lifecycle/{stage}"
        if name != "replay":
            assert (config.data.synthetic.max_digits, config.data.synthetic.min_ops, config.data.synthetic.max_ops) == (1, 2, 2)
    replay = load_config("configs/continue.py:synthetic", [])
    assert (replay.data.sources.train.max_digits, replay.data.eval_sources.old.max_ops) == (2, 1)


def write_sweep(tmp_path, **fields):
    path = tmp_path / "sweep_file.py"
    settings = dict(run_dir=str(tmp_path / "out"), base="configs/sft.py:smoke", overrides=("optim.lr=0.002",),
                    seeds=(0, 3), metrics=("eval/loss",), **fields)
    path.write_text(f"from ml_collections import ConfigDict\ndef get_config(variant=''):\n    return ConfigDict({settings!r})\n")
    return str(path)


def test_a_grid_is_every_combination_in_order(in_root, tmp_path):
    spec = write_sweep(tmp_path, grid=(("optim.lr", (0.001, 0.01)), ("peft.method", ("none", "lora")),
                                       ("data.sources.train.path", ("a b/c",))))
    s = sweep.load_sweep(spec, [])
    assert sweep.points(s) == [
        ("lr=0.001_method=none_path=a-b-c", {"optim.lr": 0.001, "peft.method": "none", "data.sources.train.path": "a b/c"}),
        ("lr=0.001_method=lora_path=a-b-c", {"optim.lr": 0.001, "peft.method": "lora", "data.sources.train.path": "a b/c"}),
        ("lr=0.01_method=none_path=a-b-c", {"optim.lr": 0.01, "peft.method": "none", "data.sources.train.path": "a b/c"}),
        ("lr=0.01_method=lora_path=a-b-c", {"optim.lr": 0.01, "peft.method": "lora", "data.sources.train.path": "a b/c"})]
    runs = sweep.plan(s)
    assert [(name, seed) for name, seed, _ in runs] == [(n, seed) for n, _ in sweep.points(s) for seed in (0, 3)]
    name, seed, args = runs[3]
    out = str(tmp_path / "out")
    assert args == ["--config.optim.lr=0.002", "--config.optim.lr=0.001", "--config.peft.method=lora",
                    "--config.data.sources.train.path=a b/c", "--config.seed=3",
                    f"--config.run_dir={out}/lr=0.001_method=lora_path=a-b-c/seed_3"]
    config = load_config(s.base, args)  # the point's value wins over the sweep's overrides
    assert (config.optim.lr, config.seed, config.peft.method) == (0.001, 3, "lora")


@pytest.mark.parametrize("fields, message", [
    (dict(grid=(("optim.lr", (0.1,)),), points=({"optim.lr": 0.1},)), "a sweep sets either 'grid' or 'points'"),
    (dict(), "a sweep sets either 'grid' or 'points'"),
    (dict(points=({"optim.lr": 0.1}, {"optim.lr": 0.2}), labels=("a", "a")), "labels name each of its 2 points once"),
    (dict(points=({"optim.lr": 0.1}, {"optim.lr": 0.2}), labels=("a",)), "labels name each of its 2 points once"),
])
def test_grid_or_points_and_labels_are_checked(in_root, tmp_path, fields, message):
    from launch.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        sweep.plan(sweep.load_sweep(write_sweep(tmp_path, **fields), []))


def test_summary_is_the_mean_and_sample_std_over_seeds(in_root, tmp_path):
    s = sweep.load_sweep(write_sweep(tmp_path, points=({"optim.lr": 0.1}, {"optim.lr": 0.2}), labels=("lo", "hi")), [])
    runs = sweep.plan(s)
    dirs = [args[-1].split("=", 1)[1] for _, _, args in runs]
    done = {dirs[0]: {"eval/loss": 1.0}, dirs[1]: {"eval/loss": 2.0}, dirs[2]: {"eval/loss": 4.0}}  # hi seed 3: not yet
    results = sweep.summarise(s, runs, done)
    lo, hi = results["points"]
    assert (lo["point"], [r["seed"] for r in lo["runs"]], lo["mean"], lo["std"]) == (
        "lo", [0, 3], {"eval/loss": 1.5}, {"eval/loss": pytest.approx(0.5 ** 0.5)})
    assert (hi["point"], len(hi["runs"]), hi["mean"], hi["std"]) == ("hi", 1, {"eval/loss": 4.0}, {"eval/loss": 0.0})
    assert sweep.markdown(results).splitlines()[2:] == ["| lo | 2 | 1.5000 ± 0.7071 |", "| hi | 1 | 4.0000 ± 0.0000 |"]
    assert sweep.summarise(s, runs, {})["points"] == []
    # A run that never logged a metric counts as NaN (not 0): the point's mean says so.
    lo = sweep.summarise(s, runs, {dirs[0]: {"eval/loss": 1.0}, dirs[1]: {}})["points"][0]
    assert [r["metrics"]["eval/loss"] for r in lo["runs"]][0] == 1.0 and math.isnan(lo["mean"]["eval/loss"])


def test_runs_go_point_by_point_then_seed_by_seed_in_the_order_given(in_root, tmp_path):
    """`--config.seeds=(3, 0)` runs seed 3 first at each point: the sweep's own order, not a sorted one."""
    spec = write_sweep(tmp_path, points=({"optim.lr": 0.1}, {"optim.lr": 0.2}))
    s = sweep.load_sweep(spec, ["--config.seeds=(3, 0)"])
    assert [(name, seed) for name, seed, _ in sweep.plan(s)] == [("lr=0.1", 3), ("lr=0.1", 0), ("lr=0.2", 3),
                                                                 ("lr=0.2", 0)]


def test_a_point_that_sets_nothing_is_named_base(in_root, tmp_path):
    """An empty point (the base config alone, beside the variations) runs in run_dir/base."""
    s = sweep.load_sweep(write_sweep(tmp_path, points=({}, {"optim.lr": 0.1})), [])
    assert sweep.points(s) == [("base", {}), ("lr=0.1", {"optim.lr": 0.1})]


def test_a_rerun_skips_finished_runs_and_tabulates_them(in_root, tmp_path, monkeypatch, capsys):
    """Stand-in training (it writes metrics.jsonl and its last step): the first run trains every
    (point, seed), a re-run trains none and tabulates the same figures; the plot draws the metric
    `plot.y` names against `plot.x`."""
    from launch import stage_results

    trained = []

    def train(config):
        os.makedirs(config.run_dir, exist_ok=True)
        with open(os.path.join(config.run_dir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 2, "loss": 1.0, "eval/loss": 10 * config.optim.lr + config.seed}) + "\n")
        with open(os.path.join(config.run_dir, "step"), "w") as f:
            f.write("2")
        trained.append((config.optim.lr, config.seed))
        return {}

    def latest_step(run_dir):
        with open(os.path.join(run_dir, "step")) as f:  # FileNotFoundError: no checkpoint yet
            return int(f.read())

    from matplotlib.figure import Figure
    drawn, savefig = [], Figure.savefig
    monkeypatch.setattr(sweep.trainer, "train", train)
    monkeypatch.setattr(stage_results.checkpoint, "latest_step", latest_step)
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: drawn.append(fig) or savefig(fig, *a, **kw))
    spec = write_sweep(tmp_path, points=({"optim.lr": 0.1}, {"optim.lr": 0.2}),
                       plot={"x": "optim.lr", "y": ("eval/loss",), "series": ""})
    argv = [f"--config={spec}", "--config.overrides=('train.steps=2',)", "--config.metrics=('eval/loss','train/loss')"]
    assert sweep.main(argv) == 0
    first = capsys.readouterr().out
    assert trained == [(0.1, 0), (0.1, 3), (0.2, 0), (0.2, 3)]
    assert sweep.main(argv) == 0
    again = capsys.readouterr().out
    assert len(trained) == 4 and again.count("finished earlier, skipped") == 4
    assert first.splitlines()[-4:] == again.splitlines()[-4:] == [
        "| point | seeds | eval/loss | train/loss |", "|---|---|---|---|",
        "| lr=0.1 | 2 | 2.5000 ± 2.1213 | 1.0000 ± 0.0000 |", "| lr=0.2 | 2 | 3.5000 ± 2.1213 | 1.0000 ± 0.0000 |"]
    [ax] = drawn[-1].axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("optim.lr", "eval/loss")
    assert ax.lines[0].get_xydata().tolist() == [[0.1, 2.5], [0.2, 3.5]]
