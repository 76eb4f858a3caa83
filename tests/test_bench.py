"""`kiln bench`: the dispatcher and a tiny train-step benchmark's JSON figures."""
import json

import pytest

from launch import main as kiln


@pytest.mark.slow
def test_train_step_benchmark_prints_its_figures_as_json(capsys):
    assert kiln.main(["bench", "train_step", "--preset=tiny", "--batch=8", "--seq=32", "--steps=2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["preset"] == "tiny" and row["batch"] == 8 and row["seq"] == 32
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["compile_s"] > 0


def test_train_step_reference_runs_the_same_model_in_torch(capsys):
    """The torch side is the same model on the same batch: before any update both give the same loss."""
    assert kiln.main(["bench", "train_step", "--preset=tiny", "--batch=8", "--seq=32", "--steps=1", "--rounds=2",
                      "--reference=torch"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    row = json.loads(out[-1])
    assert any(line.startswith("kiln / torch:") for line in out)
    assert row["reference_tokens_per_s"] > 0 and row["ratio"] == pytest.approx(
        row["reference_step_s"] / row["step_s"])
    assert row["first_loss"] == pytest.approx(row["reference_first_loss"], rel=1e-5)
    assert row["peak_memory_mb"] > 0 and row["versions"]["torch"]


def test_unknown_benchmark_is_one_clear_error(capsys):
    assert kiln.main(["bench", "nope"]) == 1
    assert "unknown benchmark 'nope'; expected one of train_step, sampling" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["train_step", "sampling", "data", "gpu_check"])
def test_every_benchmark_has_help(name, capsys):
    try:
        code = kiln.main(["bench", name, "--help"])
    except SystemExit as stop:  # argparse's help
        code = stop.code
    assert code == 0 and "kiln bench" in capsys.readouterr().out
