"""Sources and their bad data, the synthetic task, and exact masks on the real data sets."""
import gzip
import json
import math
import re

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from ml_collections import ConfigDict

from configs import base
from data import chat, examples, sources, synthetic, views
from data import tokenizer as tk
from data.examples import Encoder

BYTE = tk.load("byte")


def data_cfg(**overrides):
    cfg = base.get_config().data
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def records(path, fmt, kind, cfg=None, **fields):
    src = sources.load("s", base.source(str(path), fmt, **fields), cfg or data_cfg(), kind)
    return [src.records[i] for i in range(len(src.records))], src


def write_jsonl(path, rows):
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return path


def write_array_record(path, rows) -> str:
    """An array_record file of `rows` (dicts as JSON, bytes as they are), one record per group."""
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in rows:
        writer.write(r if isinstance(r, bytes) else json.dumps(r).encode())
    writer.close()
    return str(path)


def trained_text(example, tok=BYTE):
    return tok.decode(example["targets"][example["loss_mask"] > 0].tolist())


# -- synthetic task ----------------------------------------------------------------------------------
def test_synthetic_problems_are_deterministic_and_verifiable():
    p = synthetic.problem(7, seed=3, max_digits=2, max_ops=3)
    assert p == synthetic.problem(7, seed=3, max_digits=2, max_ops=3)
    assert p != synthetic.problem(8, seed=3, max_digits=2, max_ops=3)
    assert p != synthetic.problem(7, seed=4, max_digits=2, max_ops=3)
    for i in range(200):
        q = synthetic.problem(i, max_digits=3, max_ops=4)
        assert q.solution.endswith(f"#### {q.answer}")
        assert synthetic.extract_answer(q.solution) == q.answer
        assert synthetic.verify(q.solution, q.answer)
        assert not synthetic.verify(q.wrong_solution, q.answer)
        # Every worked step (the lines between the start and the answer) is true arithmetic: "a op b = c".
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (-?\d+)", q.solution)
        assert len(steps) == q.solution.count("\n") - 1
        for a, op, b, c in steps:
            assert eval(f"{a} {'//' if op == '/' else op} {b}") == int(c)
    one_step = [synthetic.problem(i, max_digits=1, max_ops=1) for i in range(50)]
    assert all(q.solution.count("\n") == 2 for q in one_step)  # start, one step, answer
    assert all(int(n) < 10 for q in one_step for n in re.findall(r"\d+", q.question))  # every operand
    # min_ops: exactly that many steps when it equals max_ops; min_ops=1 is the default family.
    assert all(synthetic.problem(i, max_digits=1, min_ops=2, max_ops=2).solution.count("\n") == 3 for i in range(50))
    counts = {synthetic.problem(i, min_ops=2, max_ops=3).solution.count("\n") - 1 for i in range(50)}
    assert counts == {2, 3}
    assert synthetic.problem(5, max_ops=3, min_ops=1) == synthetic.problem(5, max_ops=3)
    with pytest.raises(ValueError, match="min_ops <= max_ops"):
        synthetic.problem(0, min_ops=3, max_ops=2)


def test_extract_answer_and_verify():
    assert synthetic.extract_answer("steps\n#### 1,234.") == "1234"
    assert synthetic.extract_answer("#### $5\nmore\n#### 7") == "7"
    assert synthetic.extract_answer("no answer") is None
    assert synthetic.extract_answer("####   ") is None
    assert synthetic.verify("so\n#### 12.0", "12") and not synthetic.verify("#### 13", "12")
    assert synthetic.verify("#### abc", "abc") and not synthetic.verify("12", "12")


def test_synthetic_source_slices_and_kinds():
    cfg = data_cfg()
    cfg.synthetic.num_examples = 100
    train, _ = records("", "synthetic", "prompts", cfg, end=0.9)
    held, _ = records("", "synthetic", "prompts", cfg, start=0.9)
    assert (len(train), len(held)) == (90, 10)
    assert held[0]["answer"] == synthetic.problem(90, max_digits=2, max_ops=2).answer
    pair, _ = records("", "synthetic", "preference", cfg)
    assert pair[0]["chosen"] != pair[0]["rejected"] and pair[0]["prompt"][0]["role"] == "user"
    hard, _ = records("", "synthetic", "prompts", cfg, max_digits=3, max_ops=3)  # per-source difficulty
    assert [h["answer"] for h in hard[:20]] == [synthetic.problem(i, max_digits=3, max_ops=3).answer for i in range(20)]
    assert [h["answer"] for h in hard[:20]] != [t["answer"] for t in train[:20]]
    two, _ = records("", "synthetic", "prompts", cfg, min_ops=2)
    assert [t["answer"] for t in two[:20]] == [synthetic.problem(i, min_ops=2, max_ops=2).answer for i in range(20)]
    with pytest.raises(sources.DataError, match="min_ops <= max_ops"):
        records("", "synthetic", "prompts", cfg, min_ops=3)


def test_synthetic_worksheets_hold_consecutive_problems_in_few_shot_layout():
    cfg = data_cfg()
    cfg.synthetic.num_examples = 100
    docs, _ = records("", "synthetic", "pretrain", cfg, start=0.5, end=0.6, problems_per_document=4)
    text = lambda i: f"{synthetic.problem(i).question}\n{synthetic.problem(i).solution}"
    # Problems 50..59 in documents of 4, 4 and 2, each "question\nsolution" with a blank line between.
    assert [d["text"] for d in docs] == ["\n\n".join(text(i) for i in range(lo, hi)) for lo, hi in ((50, 54), (54, 58), (58, 60))]
    cfg.synthetic.problems_per_document = 3  # the default for every source
    assert len(records("", "synthetic", "tokenizer", cfg)[0]) == 34
    sft, _ = records("", "synthetic", "sft", cfg)  # other kinds stay one problem per record
    assert len(sft) == 100 and sft[1]["messages"][0]["content"] == synthetic.problem(1).question
    with pytest.raises(sources.DataError, match="problems_per_document must be at least 1, got 0"):
        records("", "synthetic", "pretrain", cfg, problems_per_document=0)


# -- files and bad data ------------------------------------------------------------------------------
def test_text_documents_separator_and_character_slices(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\ntwo\n\n\n\nthree\n\nfour")
    docs, _ = records(tmp_path / "t.txt", "text", "pretrain", data_cfg(text_separator="\n\n"))
    assert [d["text"] for d in docs] == ["one", "two", "three", "four"]
    docs, _ = records(tmp_path / "t.txt", "text", "pretrain", data_cfg(text_separator="\n\n"), start=0.5)
    assert [d["text"] for d in docs] == ["three", "four"]
    (tmp_path / "w.txt").write_text("abcdefghij")
    docs, _ = records(tmp_path / "w.txt", "text", "pretrain", start=0.9)
    assert docs == [{"text": "j"}]


def test_jsonl_fields_chats_and_gzip(tmp_path):
    rows = [{"q": "hi", "a": "yo", "extra": 1},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(map(json.dumps, rows)) + "\n\n")
    got, _ = records(tmp_path / "c.jsonl.gz", "jsonl", "sft", prompt_field="q", completion_field="a")
    assert got[0] == {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert got[1]["messages"] == rows[1]["messages"]
    # A prompt to sample from needs some text, not text in every message: an empty system message is fine.
    prompt = [{"role": "system", "content": ""}, {"role": "user", "content": "2+2?"}]
    got, _ = records(write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "answer": "4"}]), "jsonl", "prompts")
    assert got == [{"prompt": prompt, "answer": "4"}]


@pytest.mark.parametrize("bad, message", [
    (b'{"text": "x"', "malformed JSON"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8"),
    (b'{"txt": "x"}', "missing field 'text'"),
    (b'{"text": 3}', "field 'text' is int"),
    (b'["text"]', "expected a JSON object"),
])
def test_bad_jsonl_line_is_an_error_naming_file_and_line_or_a_counted_skip(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "b"}, bad, {"text": "c"}])
    with pytest.raises(sources.DataError, match=f"{path}:3: {message}"):
        records(path, "jsonl", "pretrain")
    got, src = records(path, "jsonl", "pretrain", data_cfg(skip_bad_records=True))
    assert [r["text"] for r in got] == ["a", "b", "c"] and src.skipped == 1


def test_other_bad_sources(tmp_path, monkeypatch):
    (tmp_path / "bin.txt").write_bytes(b"fine\nfine\nbad \xff here\n")
    with pytest.raises(sources.DataError, match=r"bin.txt:3: not valid UTF-8"):
        records(tmp_path / "bin.txt", "text", "pretrain")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(sources.DataError, match="has no records"):
        records(tmp_path / "empty.jsonl", "jsonl", "pretrain")
    with pytest.raises(sources.DataError, match="not found"):
        records(tmp_path / "nope.jsonl", "jsonl", "pretrain")
    with pytest.raises(sources.DataError, match="unknown field.*text_feild"):
        records(tmp_path / "x.jsonl", "jsonl", "pretrain", text_feild="t")
    with pytest.raises(sources.DataError, match="format 'text' has no sft records"):
        records(tmp_path / "bin.txt", "text", "sft")
    with pytest.raises(sources.DataError, match="unknown format 'csv'"):
        records(tmp_path / "x.csv", "csv", "pretrain")
    with pytest.raises(sources.DataError, match="start=0.5, end=0.5"):
        records(tmp_path / "bin.txt", "text", "pretrain", start=0.5, end=0.5)
    monkeypatch.delenv("KILN_DATA_DIR", raising=False)
    with pytest.raises(sources.DataError, match=r"uses \$KILN_DATA_DIR, which is not set"):
        records("$KILN_DATA_DIR/gsm8k/train.jsonl", "gsm8k", "sft")
    write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}])
    with pytest.raises(sources.DataError, match=r"m.jsonl:1: field 'messages': message 1 has role 'robot'"):
        records(tmp_path / "m.jsonl", "jsonl", "sft")


@pytest.mark.parametrize("weights, message", [
    ((1.0, math.nan), "weight nan"), ((1.0, -1.0), "weight -1.0"), ((0.0, 0.0), "every training source has weight 0"),
    ((1.0, math.inf), "weight inf")])
def test_mixture_weights_that_make_no_sense(weights, message):
    cfg = data_cfg()
    cfg.sources = ConfigDict({"a": base.source(weight=weights[0]), "b": base.source(weight=weights[1])})
    with pytest.raises(sources.DataError, match=message):
        sources.train_sources(cfg, "pretrain")


def test_array_record_source_lazy_errors_and_skips(tmp_path):
    path = write_array_record(tmp_path / "r.array_record",
                              [{"prompt": "p0", "completion": "c0"}, b"not json", {"prompt": "p2", "completion": "c2"}])
    src = sources.load("s", base.source(path, "array_record"), data_cfg(), "sft")
    assert len(src.records) == 3 and src.records[2]["messages"][1] == {"role": "assistant", "content": "c2"}
    with pytest.raises(sources.DataError, match=r"r.array_record: record 1: malformed JSON"):
        src.records[1]
    got, _ = records(path, "array_record", "sft", data_cfg(skip_bad_records=True), start=0.3)
    assert got[0] is None and got[1]["messages"][0]["content"] == "p2"
    assert Encoder.from_config(data_cfg(), BYTE)("sft", None) == (None, examples.BAD_RECORD)


# -- over-length policy ------------------------------------------------------------------------------
def test_truncation_dropping_and_empty_masks():
    chat_ = {"messages": [{"role": "user", "content": "q" * 10}, {"role": "assistant", "content": "a" * 10}]}
    # <s> <|user|> q*10 <|end|> <|assistant|> a*10 <|end|> = 25 ids -> 24 positions, 11 trained.
    ex, status = Encoder(BYTE, seq_len=24)("sft", chat_)
    assert status == examples.OK and len(ex["tokens"]) == 24 and ex["loss_mask"].sum() == 11
    ex, status = Encoder(BYTE, seq_len=20)("sft", chat_)
    assert status == examples.TRUNCATED and trained_text(ex) == "a" * 7
    assert Encoder(BYTE, seq_len=20, truncate=False)("sft", chat_) == (None, examples.TOO_LONG)
    assert Encoder(BYTE, seq_len=13)("sft", chat_) == (None, examples.EMPTY_MASK)
    ex, status = Encoder(BYTE, seq_len=5)("prompts", {"prompt": chat_["messages"][:1], "answer": "1"})
    assert status == examples.TRUNCATED and ex["prompt"].tolist() == [*BYTE.encode_text("qqq"), 7, 6]
    prompt = {"prompt": chat_["messages"][:1], "answer": "1"}  # 14 ids with the assistant header
    assert Encoder(BYTE, seq_len=5, truncate=False)("prompts", prompt) == (None, examples.TOO_LONG)
    ex, status = Encoder(BYTE, seq_len=14, truncate=False)("prompts", prompt)
    assert status == examples.OK and len(ex["prompt"]) == 14 and ex["answer"] == "1"


def test_preference_pairs_over_length_policy():
    """<s> <|user|> qqqq <|end|> <|assistant|> = 8 prompt ids, then the reply and <|end|>: the chosen side has
    12 ids (11 positions), the rejected 21 (20). Either side truncated makes the pair TRUNCATED."""
    record = {"prompt": [{"role": "user", "content": "qqqq"}], "chosen": "aaa", "rejected": "b" * 12,
              "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}
    pair, status = Encoder(BYTE, seq_len=14)("preference", record)
    assert status == examples.TRUNCATED
    assert len(pair["chosen_tokens"]) == 11 and pair["chosen_loss_mask"].sum() == 4  # "aaa" and <|end|>
    assert len(pair["rejected_tokens"]) == 14 and pair["rejected_loss_mask"].tolist() == [0] * 7 + [1] * 7
    assert trained_text({k[9:]: v for k, v in pair.items() if k.startswith("rejected_")}) == "b" * 7
    assert pair["ref_chosen_logps"] == np.float32(-1.5) and pair["ref_rejected_logps"] == np.float32(-2.5)
    assert Encoder(BYTE, seq_len=20)("preference", record)[1] == examples.OK
    assert Encoder(BYTE, seq_len=14, truncate=False)("preference", record) == (None, examples.TOO_LONG)
    assert Encoder(BYTE, seq_len=7)("preference", record) == (None, examples.EMPTY_MASK)  # only the prompt fits


class SpelledTokenizer:
    """Bytes as ids, special tokens as ids from 300 on: every id of a rendered conversation is readable."""

    bos_id = 1
    SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]

    def special_id(self, piece):
        return 300 + self.SPECIAL.index(piece)

    def encode_text(self, text):
        return list(text.encode())


def test_gemma_and_chatml_layouts_id_by_id():
    """Gemma: BOS, no system role (the system text joins the first user turn after a blank line), contents
    stripped, the assistant called "model", "\n" after each end of turn (never trained); ChatML: no BOS,
    contents kept as they are."""
    tok, b = SpelledTokenizer(), lambda text: list(text.encode())  # noqa: E731
    st, et, ims, ime = 300, 301, 302, 303
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? "},
            {"role": "assistant", "content": " 4\n"}]
    ids, mask = chat.render(conv, tok, "gemma")
    assert ids == [1, st, *b("user\n"), *b("Be brief.\n\n2+2?"), et, *b("\n"), st, *b("model\n"), *b("4"), et, *b("\n")]
    assert [i for i, m in zip(ids, mask) if m] == [*b("4"), et]
    # As HF's Gemma 3 template: the user text trimmed on its own, the system text kept as it is.
    ids, _ = chat.render([{"role": "system", "content": " Be brief."}, {"role": "user", "content": " 2+2?"}], tok, "gemma")
    assert ids == [1, st, *b("user\n"), *b(" Be brief.\n\n2+2?"), et, *b("\n")]
    ids, mask = chat.render(conv[1:2], tok, "gemma", add_generation_prompt=True)
    assert ids[-len(b("model\n")) - 1:] == [st, *b("model\n")] and not any(mask)
    with pytest.raises(chat.ChatError, match="must precede a user turn"):
        chat.render([conv[0], conv[2]], tok, "gemma")
    ids, mask = chat.render(conv, tok, "chatml", mask_special_tokens=True)
    assert ids == [ims, *b("system\nBe brief."), ime, *b("\n"), ims, *b("user\n2+2? "), ime, *b("\n"),
                   ims, *b("assistant\n 4\n"), ime, *b("\n")]
    assert [i for i, m in zip(ids, mask) if m] == b(" 4\n")


def test_last_turn_only_trains_the_final_assistant_message_alone():
    """Preference pairs train only the reply that differs: with two assistant messages in a row, the earlier
    one (part of the shared prompt) stays untrained."""
    tok, b = SpelledTokenizer(), lambda text: list(text.encode())  # noqa: E731
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "first"},
            {"role": "assistant", "content": "second"}]
    ids, mask = chat.render(conv, tok, "chatml", last_turn_only=True)
    assert [i for i, m in zip(ids, mask) if m] == [*b("second"), 303]
    _, mask = chat.render(conv, tok, "chatml")
    assert sum(mask) == len("first") + len("second") + 2


# -- the real data sets ------------------------------------------------------------------------------
def test_gsm8k_trained_tokens_are_exactly_the_completion(data_dir):
    path = f"{data_dir}/gsm8k/train.jsonl"
    sft, src = records(path, "gsm8k", "sft")
    assert len(sft) == 7473 and src.skipped == 0
    first = sft[0]["messages"]
    assert first[0]["content"].startswith("Natalia sold clips to 48 of her friends in April")
    assert first[1]["content"] == ("Natalia sold 48/2 = 24 clips in May.\n"
                                   "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72")
    prompts, _ = records(path, "gsm8k", "prompts", end=0.001)
    assert [p["answer"] for p in prompts[:2]] == ["72", "10"]
    enc = Encoder(BYTE, seq_len=2048)
    for record in sft[:50]:
        ex, status = enc("sft", record)
        assert status == examples.OK and trained_text(ex) == record["messages"][1]["content"]
        assert ex["loss_mask"].sum() == len(record["messages"][1]["content"].encode()) + 1  # + <|end|>
    raw, _ = records(path, "gsm8k", "sft", calculator_annotations=True)
    assert "<<48/2=24>>" in raw[0]["messages"][1]["content"]


def test_hh_rlhf_pairs_share_the_prompt_and_train_only_the_replies(data_dir):
    pairs, _ = records(f"{data_dir}/hh-rlhf/harmless-base-test.jsonl.gz", "hh_rlhf", "preference")
    assert len(pairs) == 2312  # including the four whose dialogues differ before the last turn marker
    first = pairs[0]
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert first["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert first["chosen"].startswith("No, sorry!  All of these involve a pen")
    enc = Encoder(BYTE, seq_len=4096)
    for record in pairs[:40]:
        pair, status = enc("preference", record)
        assert status == examples.OK
        chosen = {k[7:]: v for k, v in pair.items() if k.startswith("chosen_")}
        rejected = {k[9:]: v for k, v in pair.items() if k.startswith("rejected_")}
        assert trained_text(chosen) == record["chosen"] and trained_text(rejected) == record["rejected"]
        n = int(np.argmax(chosen["loss_mask"]))  # the shared prompt ends where training starts
        assert n == int(np.argmax(rejected["loss_mask"]))
        assert np.array_equal(chosen["tokens"][:n + 1], rejected["tokens"][:n + 1])


def test_hh_rlhf_split_on_a_pair_that_differs_before_the_last_marker():
    chosen = "\n\nHuman: Q\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: No.  Human: Then"
    rejected = "\n\nHuman: Q\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: A drag king"
    prompt, good, bad = views.split_hh(chosen, rejected)
    assert prompt == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "Q2"}]
    assert (good, bad) == ("No.  Human: Then", "A drag king")
    with pytest.raises(views.RecordError, match="share no dialogue"):
        views.split_hh("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: d")
