"""A careless user's inputs to the entry points the other misuse tests reach least: config arguments on
the command line, `kiln tokenizer`, `kiln data reference`, the cluster launchers and `kiln bench`. Each is
one clear line (what, where, how to fix) before any work is done or any file is written, never a
traceback, a silent wrong result or an output a later run trusts by mistake. All of them are fast."""
import os

import pytest

from launch.config import ConfigError, load_config
from launch.train import split_args
from test_misuse import ROOT, one_error_line


@pytest.mark.parametrize("command, extra", [(["train"], []), (["generate"], []), (["data", "preview"], []),
                                            (["data", "reference"], ["--out=x"]), (["eval"], ["--checkpoint=x"])])
def test_a_config_key_given_twice_is_refused(capsys, monkeypatch, command, extra):
    """The last of two values won in silence: a command line grown by copy and paste trained with the value
    further right, whatever the user read first. The same value twice is harmless."""
    monkeypatch.chdir(ROOT)
    argv = [*command, "--config=configs/pretrain.py:smoke", "--config.seed=1", *extra, "--config.seed=2"]
    assert one_error_line(capsys, argv) == (f"kiln {command[0]}: error: config key 'seed' is set twice, by "
                                            "'--config.seed=1' and '--config.seed=2'; give it once")
    assert split_args(["--config=c.py", "--config.seed=1", "--config.seed=1"], "kiln x")[1] == ["--config.seed=1"] * 2


def test_a_config_file_given_twice_is_refused():
    """`--config=A ... --config=B` ran B alone, A's settings dropped in silence."""
    with pytest.raises(ConfigError, match=r"^--config is given twice \(a.py and b.py:v\); give one config$"):
        split_args(["--config=a.py", "--config.seed=1", "--config", "b.py:v"], "kiln train")
    assert split_args(["--config=a.py", "--config", "a.py"], "kiln train")[0] == "a.py"


@pytest.mark.parametrize("spec, message", [
    ("configs/pretrain.py:", "configs/pretrain.py:: no variant after ':'; name one, or drop the ':' for the base config"),
    ("configs/pretrain:smoke", "config file 'configs/pretrain' not found; did you mean 'configs/pretrain.py:smoke'?"),
])
def test_a_config_spec_missing_its_variant_or_suffix_says_so(monkeypatch, spec, message):
    """`--config=configs/pretrain.py:$VARIANT` with the variable unset ran the full-size base config in silence."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        load_config(spec)
    assert str(e.value) == message
