"""`kiln data preview` and the SFT / preference stage configs."""
import json
import re
import types

import numpy as np
import pytest

from configs import base
from data import pipeline, stats
from data import tokenizer as tk
from launch import data_cli, main as kiln
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
    for spec in ("configs/sft.py", "configs/sft.py:smoke"):
        assert load_config(spec).data.sources.train.format == "synthetic"


def test_preview_is_deterministic_and_shows_spans(capsys):
    code, out, _ = preview(capsys, "--config=configs/sft.py:smoke", "--num_examples=2")
    assert code == 0
    # Each packed conversation trains exactly its reply: from after the assistant header to <|end|>.
    rows = out.split("\n=== ", 1)[1]  # after the legend
    replies = re.findall(r"⟪<\|assistant\|>⟫⟦[^⟦⟧]*\n#### \d+⟪<\|end\|>⟫⟧", rows)
    assert len(replies) == rows.count("[segment ") == rows.count("⟦") > 2
    assert "statistics" in out and "source train (synthetic): 1000 examples: ok 1000" in out
    assert preview(capsys, "--config=configs/sft.py:smoke", "--num_examples=2")[1] == out


def test_preview_tells_typed_control_strings_from_real_ones(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "say <|user|> ⟪x⟫", "completion": "ok"}) + "\n")
    cfg = base.get_config().data
    cfg.eval_sources.t, cfg.seq_len, cfg.batch_size = base.source(str(tmp_path / "t.jsonl"), "jsonl"), 32, 1
    (batch,) = pipeline.eval_iterator(cfg, "sft", tk.load("byte"), "t")
    # The typed "<|user|>" is plain text, the real one is marked; a typed marker is doubled.
    assert data_cli.render_row(batch, 0, "sft", tk.load("byte")) == (
        "[segment 1: 26 positions, 3 trained]\n"
        "⟪<s>⟫⟪<|user|>⟫say <|user|> ⟪⟪x⟫⟫⟪<|end|>⟫⟪<|assistant|>⟫⟦ok⟪<|end|>⟫⟧\n[padding: 6 positions]")


def test_preview_other_kinds_and_a_trained_tokenizer(capsys):
    code, out, _ = preview(capsys, "--config=configs/sft.py:smoke", "--kind=preference", "--num_examples=1")
    answers = re.findall(r"--- (chosen|rejected) ---\n[^⟦]*⟪<\|assistant\|>⟫⟦[^⟦⟧]*#### (-?\d+)⟪<\|end\|>⟫⟧\n", out)
    assert code == 0 and [side for side, _ in answers] == ["chosen", "rejected"] and answers[0][1] != answers[1][1]
    code, out, _ = preview(capsys, "--config=configs/sft.py:smoke", "--kind=prompts", "--num_examples=1")
    assert code == 0 and re.search(r"\[\d+ left-padding positions\]\n⟪<s>⟫⟪<\|user\|>⟫[^⟪⟦]+⟪<\|end\|>⟫"
                                   r"⟪<\|assistant\|>⟫\n\[reference answer: '\d+'\]", out)
    args = ["--config=configs/sft.py:smoke", "--config.data.tokenizer=train", "--config.data.tokenizer_vocab_size=400",
            "--kind=pretrain", "--num_examples=1", "--max_stat_examples=50"]
    code, out, _ = preview(capsys, *args)
    assert code == 0 and "(vocab 400)" in out
    assert preview(capsys, *args)[1] == out


def test_preview_reports_bad_data_in_one_line(capsys, tmp_path, monkeypatch):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n{oops\n")
    code, out, err = preview(capsys, "--config=configs/sft.py:smoke", f"--config.data.sources.train.path={path}",
                             "--config.data.sources.train.format=jsonl", "--config.data.sources.train.end=1.0")
    assert code == 1 and err.strip() == (f"kiln data: error: {path}:2: malformed JSON: Expecting property name "
                                         "enclosed in double quotes (column 2) (set data.skip_bad_records=true to "
                                         "skip such records)")
    monkeypatch.delenv("KILN_DATA_DIR", raising=False)
    code, _, err = preview(capsys, "--config=configs/sft.py:gsm8k")
    assert code == 1 and "uses $KILN_DATA_DIR, which is not set" in err and len(err.strip().splitlines()) == 1
    assert preview(capsys, "--config=configs/sft.py:smoke", "--bogus")[0] == 1


HH_RLHF = ["--config=configs/sft.py", "--kind=preference", "--config.data.seq_len=1024",
           "--config.data.sources.train.format=hh_rlhf", "--config.data.sources.train.end=1.0",
           "--config.data.sources.train.path=$KILN_DATA_DIR/hh-rlhf/harmless-base-test.jsonl.gz"]


@pytest.mark.parametrize("args", [["--config=configs/sft.py:gsm8k"], HH_RLHF], ids=["gsm8k", "hh_rlhf"])
def test_preview_on_the_real_data_sets(capsys, data_dir, args):
    code, out, _ = preview(capsys, *args, "--num_examples=2", "--max_stat_examples=200")
    assert code == 0 and ("####" in out if "gsm8k" in args[0] else "--- rejected ---" in out)
    assert preview(capsys, *args, "--num_examples=2", "--max_stat_examples=200")[1] == out


def test_batch_stats_by_hand():
    """Rows, sequences per row, padding and trained fractions, counted by hand on two small batches."""
    first = {"segment_ids": np.array([[1, 1, 2, 0], [1, 1, 1, 1]]), "loss_mask": np.array([[0, 1, 1, 0], [1, 1, 1, 0.]])}
    second = {"segment_ids": np.array([[1, 2, 3, 0]]), "loss_mask": np.array([[1, 0, 1, 0.]])}
    # 3 rows with 2 + 1 + 3 documents; padding 2 of 12 positions; 7 of 12 trained.
    assert stats.batch_stats([first, second], "sft") == \
        "3 rows, 2.00 sequences per row, padding 16.7%, trained tokens 58.3%"
    pair = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in first.items()}
    pair["rejected_segment_ids"] = np.array([[1, 0, 0, 0], [1, 1, 0, 0]])
    # 2 rows; documents 2 + 1 + 1 + 1 = 5; padding 1 + 5 of 16; trained 5 + 5 of 16.
    assert stats.batch_stats([pair], "preference") == \
        "2 rows, 2.50 sequences per row, padding 37.5%, trained tokens 62.5%"
    prompts = {"prompt_segment_ids": np.array([[0, 0, 1, 1], [0, 1, 1, 1]])}
    assert stats.batch_stats([prompts], "prompts") == "2 rows, 1.00 sequences per row, padding 37.5%"


def test_source_stats_count_statuses_and_pair_lengths_by_hand(tmp_path):
    rows = [{"prompt": "ab", "chosen": "xyz", "rejected": "q"},  # <s><|user|>ab<|end|><|assistant|>xyz<|end|>: 9 + 7 positions
            {"prompt": "a", "chosen": "b", "rejected": "cc"},  # 6 + 7
            {"prompt": "a" * 20, "chosen": "b", "rejected": "c"}]  # over 12 positions: dropped
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = base.get_config().data
    cfg.sources = {"p": base.source(str(tmp_path / "p.jsonl"), "jsonl")}
    cfg.seq_len, cfg.truncate = 12, False
    [got] = stats.summarize(cfg, "preference", tk.load("byte"))
    assert (got.examples, got.statuses, got.tokens) == (3, {"ok": 2, "too_long": 1}, [16, 13])
    assert got.line().endswith(": 3 examples: ok 2, truncated 0, too_long 1, empty_mask 0, same_replies 0, bad_record 0; "
                               "bad records "
                               "skipped on load 0; tokens per example mean 14.5, min 13, max 16")


def test_reference_scores_pairs_in_padded_batches_and_counts_the_dropped(monkeypatch):
    """`kiln data reference`'s loop with stand-ins for the source, the encoder and the model: pairs go
    to the model `width` at a time, the last batch padded with empty rows whose scores are dropped;
    each kept record gets its two scores (old ones replaced), in order; a pair training would drop,
    or a record that cannot be read, is counted instead."""
    from launch import reference_cli

    records = [dict(prompt="p0", chosen="c", rejected="r", ref_chosen_logps=9.0), None,
               dict(prompt="p2", chosen="c", rejected="r"), dict(prompt="long", chosen="c", rejected="r"),
               dict(prompt="p4", chosen="c", rejected="r")]
    monkeypatch.setattr(reference_cli.sources, "load", lambda where, src, data, kind: types.SimpleNamespace(
        records=records))
    monkeypatch.setattr(reference_cli.pipeline, "_pair_row", lambda seq_len, pad, example: {
        "chosen_tokens": np.array([example]), "rejected_tokens": np.array([10 * example]), "margin": 0})
    monkeypatch.setattr(reference_cli.pipeline, "_empty_row", lambda kind, seq_len, pad: {
        "chosen_tokens": np.array([-1]), "rejected_tokens": np.array([-1]), "margin": 0})
    batches = []

    def score(batch):
        batches.append({k: v.tolist() for k, v in batch.items()})
        return -batch["chosen_tokens"][:, 0], -batch["rejected_tokens"][:, 0]

    def encode(kind, record):
        return (None, "too long") if record["prompt"] == "long" else (int(record["prompt"][1]) + 1, "")

    config = types.SimpleNamespace(data=types.SimpleNamespace(seq_len=8))
    kept, dropped = reference_cli._score_source("data.sources.train", None, config, encode, score, 2, 0)
    assert batches == [{"chosen_tokens": [[1], [3]], "rejected_tokens": [[10], [30]]},
                       {"chosen_tokens": [[5], [-1]], "rejected_tokens": [[50], [-1]]}]
    assert kept == [dict(prompt="p0", chosen="c", rejected="r", ref_chosen_logps=-1.0, ref_rejected_logps=-10.0),
                    dict(prompt="p2", chosen="c", rejected="r", ref_chosen_logps=-3.0, ref_rejected_logps=-30.0),
                    dict(prompt="p4", chosen="c", rejected="r", ref_chosen_logps=-5.0, ref_rejected_logps=-50.0)]
    assert dropped == 2


def test_rows_render_by_hand():
    """A packed row: a segment's first input then its targets, its trained run bracketed, and one
    position of padding counted; a prompt row counts its left padding."""
    tok = tk.load("byte")
    a, b, c, d = tok.encode("abcd")
    pad = tok.pad_id
    row = {"tokens": np.array([[a, b, c, pad]]), "targets": np.array([[b, c, d, pad]]),
           "loss_mask": np.array([[0, 1, 1, 0]]), "segment_ids": np.array([[1, 1, 1, 0]])}
    assert data_cli.render_row(row, 0, "pretrain", tok) == (
        "[segment 1: 3 positions, 2 trained]\nab⟦cd⟧\n[padding: 1 positions]")
    h, i = tok.encode("hi")
    prompt = {"prompt_tokens": np.array([[pad, pad, pad, h, i]]), "prompt_segment_ids": np.array([[0, 0, 0, 1, 1]]),
              "answer": ["42"]}
    assert data_cli.render_row(prompt, 0, "prompts", tok) == "[3 left-padding positions]\nhi\n[reference answer: '42']"


def test_preview_reads_enough_batches_for_its_rows_from_the_configs_seed(capsys, monkeypatch):
    """9 rows of batches of 2 need 5 batches (rounded up); the iterator is seeded with the config's
    seed; 0 rows is refused."""
    seeds, iterator = [], pipeline.train_iterator
    monkeypatch.setattr(data_cli.pipeline, "train_iterator",
                        lambda *a, seed: seeds.append(seed) or iterator(*a, seed=seed))
    code, out, _ = preview(capsys, "--config=configs/pretrain.py:smoke", "--config.data.batch_size=2",
                           "--config.seed=5", "--num_examples=9", "--max_stat_examples=10")
    headers = re.findall(r"=== batch (\d+), row (\d+) ===", out)
    assert code == 0 and headers == [(str(b), str(r)) for b in range(5) for r in range(2)][:9]
    assert "batches 5 x 2:" in out and seeds == [5]
    code, _, err = preview(capsys, "--config=configs/pretrain.py:smoke", "--num_examples=0")
    assert code == 1 and "--num_examples must be positive, got 0" in err
