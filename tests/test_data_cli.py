"""`kiln data preview` and the SFT / preference stage configs."""
import json

import pytest

from launch import main as kiln
from launch.config import load_config


def preview(capsys, *args):
    code = kiln.main(["data", "preview", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_stage_configs_name_their_sources():
    gsm8k = load_config("configs/sft.py:gsm8k")
    assert gsm8k.stage == "sft"
    assert (gsm8k.data.sources.train.path, gsm8k.data.sources.train.format) == ("$KILN_DATA_DIR/gsm8k/train.jsonl", "gsm8k")
    assert gsm8k.data.eval_sources.test.path == "$KILN_DATA_DIR/gsm8k/test.jsonl"
    hh = load_config("configs/preference.py:hh_rlhf")
    assert hh.stage == "dpo" and hh.data.sources.train.format == "hh_rlhf" and hh.data.sources.train.end == 0.9
    for spec in ("configs/sft.py", "configs/sft.py:smoke", "configs/preference.py", "configs/preference.py:smoke"):
        assert load_config(spec).data.sources.train.format == "synthetic"


def test_preview_is_deterministic_and_shows_spans(capsys):
    code, out, _ = preview(capsys, "--config=configs/sft.py:smoke", "--num_examples=2")
    assert code == 0
    assert "####" in out and "⟦" in out and "[segment 1:" in out and "<|assistant|>" in out
    assert "statistics" in out and "source train (synthetic): 1000 examples: ok 1000" in out
    assert preview(capsys, "--config=configs/sft.py:smoke", "--num_examples=2")[1] == out


def test_preview_other_kinds_and_a_trained_tokenizer(capsys):
    code, out, _ = preview(capsys, "--config=configs/preference.py:smoke", "--num_examples=1")
    assert code == 0 and "--- chosen ---" in out and "--- rejected ---" in out
    code, out, _ = preview(capsys, "--config=configs/sft.py:smoke", "--kind=prompts", "--num_examples=1")
    assert code == 0 and "[reference answer:" in out and "left-padding positions" in out
    args = ["--config=configs/sft.py:smoke", "--config.data.tokenizer=train", "--config.data.tokenizer_vocab_size=400",
            "--kind=pretrain", "--num_examples=1", "--max_stat_examples=50"]
    code, out, _ = preview(capsys, *args)
    assert code == 0 and "(vocab 400)" in out
    assert preview(capsys, *args)[1] == out


def test_preview_reports_bad_data_in_one_line(capsys, tmp_path, monkeypatch):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n{oops\n")
    code, out, err = preview(capsys, "--config=configs/sft.py:smoke", f"--config.data.sources.train.path={path}",
                             "--config.data.sources.train.format=jsonl")
    assert code == 1 and err.strip() == (f"kiln data: error: {path}:2: malformed JSON: Expecting property name "
                                         "enclosed in double quotes (column 2) (set data.skip_bad_records=true to "
                                         "skip such records)")
    monkeypatch.delenv("KILN_DATA_DIR", raising=False)
    code, _, err = preview(capsys, "--config=configs/sft.py:gsm8k")
    assert code == 1 and "uses $KILN_DATA_DIR, which is not set" in err and len(err.strip().splitlines()) == 1
    assert preview(capsys, "--config=configs/sft.py:smoke", "--bogus")[0] == 1


@pytest.mark.parametrize("spec", ["configs/sft.py:gsm8k", "configs/preference.py:hh_rlhf"])
def test_preview_on_the_real_data_sets(capsys, data_dir, spec):
    code, out, _ = preview(capsys, f"--config={spec}", "--num_examples=2", "--max_stat_examples=200")
    assert code == 0 and ("####" in out if "gsm8k" in spec else "--- rejected ---" in out)
    assert preview(capsys, f"--config={spec}", "--num_examples=2", "--max_stat_examples=200")[1] == out
