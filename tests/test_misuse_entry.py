"""A careless user's inputs to the entry points the other misuse tests reach least: config arguments on
the command line, `kiln tokenizer`, `kiln data reference`, the cluster launchers and `kiln bench`. Each is
one clear line (what, where, how to fix) before any work is done or any file is written, never a
traceback, a silent wrong result or an output a later run trusts by mistake. All of them are fast."""
import os

import pytest

from data import spm
from data.tokenizer_base import TokenizerError
from launch.config import ConfigError, load_config
from launch.train import split_args
from test_misuse import ROOT, one_error_line
from test_tokenizer import CORPUS


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


@pytest.mark.parametrize("out, message", [
    ("text.txt/tok.model", "--out {tmp}/text.txt/tok.model: {tmp}/text.txt is a file, not a directory; name a file "
                           "in a directory"),
    ("text.txt/new/tok.model", "--out {tmp}/text.txt/new/tok.model: {tmp}/text.txt is a file, not a directory; "
                               "name a file in a directory"),
    ("", "--out is empty; name the file to write, such as tokenizer.model"),
])
def test_tokenizer_checks_where_it_writes_before_training(tmp_path, capsys, monkeypatch, out, message):
    """`--out` under a file trained first, then failed on the errno line "File exists: TEXT"; `--out=` (an unset
    shell variable) trained, then failed renaming '.tmpPID' to '' and left that file in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("\n".join(CORPUS))
    line = one_error_line(capsys, ["tokenizer", f"--input={tmp_path / 'text.txt'}", "--vocab_size=400",
                                   f"--out={tmp_path}/{out}" if out else "--out="])
    assert line == "kiln tokenizer: error: " + message.format(tmp=tmp_path)
    assert os.listdir(tmp_path) == ["text.txt"]


def test_a_tokenizer_write_that_fails_leaves_no_temporary_file(tmp_path):
    """spm.train wrote PATH.tmpPID, then renamed it: a failed rename (PATH a directory, as a run directory's
    tokenizer.model made by hand might be) left the temporary file beside it."""
    (tmp_path / "tok.model").mkdir()
    with pytest.raises(OSError):
        spm.train(CORPUS, str(tmp_path / "tok.model"), vocab_size=400)
    assert os.listdir(tmp_path) == ["tok.model"]


@pytest.mark.parametrize("vocab_size, message", [
    (300, "tokenizer vocab_size 300 is below the 326 pieces the training text needs (the fixed pieces and one per "
          "character it uses): set at least 326"),
    (5000, "tokenizer vocab_size 5000 is more pieces than the training text holds: set at most 810, or train on "
           "more text"),
])
def test_a_vocabulary_the_text_cannot_fill_names_the_sizes_it_can(tmp_path, vocab_size, message):
    """sentencepiece's own line ("... Increase vocab_size or decrease character_coverage with --character_coverage
    option.") named an option kiln tokenizer does not have. The sizes it names are the bounds: both train."""
    out = str(tmp_path / "tok.model")
    with pytest.raises(TokenizerError) as e:
        spm.train(CORPUS, out, vocab_size=vocab_size)
    assert str(e.value) == message and not os.path.exists(out)
    for bound in (326, 810):
        spm.train(CORPUS, out, vocab_size=bound)
