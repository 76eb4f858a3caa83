"""A careless user's inputs to the `kiln` command: each is one clear line on stderr (what, where, how
to fix), never a traceback, and nothing already on disk is lost. Each test calls the command or the
function it reaches before any model or data is built, so all of them are fast."""
import os

import pytest
from ml_collections import ConfigDict

from launch import main as kiln, sweep
from launch.config import ConfigError
from train import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_error_line(capsys, argv):
    """Runs `kiln ARGV`, which must fail; returns its single stderr line."""
    assert kiln.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    return line


@pytest.mark.parametrize("text, variant, message", [
    ("def get_config(:\n", "", "bad.py line 1: config file has a syntax error"),
    ("import no_such_module_kiln\n", "", "the config file failed to load (ModuleNotFoundError: No module named"),
    ("def get_config(variant=''):\n    return 3\n", "", "get_config returned int, not an ml_collections ConfigDict"),
    ("from configs import base\ndef get_config():\n    return base.get_config()\n", ":smoke",
     "bad.py:smoke: get_config failed (TypeError: get_config() takes 0 positional arguments"),
])
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, capsys, text, variant, message):
    """A config (or recipe, or sweep) file that does not parse, import or return a ConfigDict was a
    Python traceback."""
    (tmp_path / "bad.py").write_text(text)
    line = one_error_line(capsys, ["train", f"--config={tmp_path / 'bad.py'}{variant}"])
    assert line.startswith("kiln train: error: ") and message in line, line


def write_sweep(tmp_path, **fields):
    path = tmp_path / "sweep_file.py"
    settings = dict(run_dir=str(tmp_path / "out"), base="configs/pretrain.py:smoke", overrides=(),
                    seeds=(0,), metrics=("eval/loss",), **fields)
    path.write_text(f"from ml_collections import ConfigDict\ndef get_config(variant=''):\n    return ConfigDict({settings!r})\n")
    return str(path)


@pytest.mark.parametrize("fields, message", [
    (dict(points=()), "the sweep's points are empty"),
    (dict(grid=()), "the sweep's grid is empty"),
    (dict(grid=(("optim.lr", (0.1, 0.2)), ("seed", ()))), "the sweep's grid is empty"),
])
def test_an_empty_sweep_is_refused(tmp_path, fields, message):
    """Empty points crashed after the last run with an UnboundLocalError; an empty grid ran the base
    config alone under the sweep's name, and a key without values planned no run and said nothing."""
    with pytest.raises(ConfigError, match=message):
        sweep.load_sweep(write_sweep(tmp_path, **fields), [])
