"""Data-layer rules that only show off the default path: windows of a single document at their edge
lengths, sources seeded by name, weight-0 sources, the synthetic family's config-level knobs and its
operand and slip ranges, pairs that prefer the right solution, and encoders built from the config."""
import re

import numpy as np
import pytest

from configs import base
from data import chat, examples, pipeline, sources, synthetic
from data import tokenizer as tk
from data.examples import Encoder
from test_data_pipeline import BYTE, data_cfg, write_jsonl
from test_data_sources import SpelledTokenizer, records, trained_text


def test_single_document_windows_at_the_edge_lengths():
    """15 tokens in windows of 4: three whole windows fit at every offset 0..3 (3 + 3 * 4 = 15), so each
    epoch has three, the offsets over the epochs are all four, and the order within an epoch is
    shuffled (not the document's)."""
    doc = examples.shift(np.arange(16), np.ones(16))  # token i is i
    ds = pipeline._shifted_windows(doc, 4, seed=5)
    epochs = []
    for e in range(10):
        windows = [ds[3 * e + i] for i in range(3)]
        starts = [int(w["tokens"][0]) for w in windows]
        for w, start in zip(windows, starts):
            assert w["tokens"].tolist() == list(range(start, start + 4))
        assert sorted(starts) == [min(starts), min(starts) + 4, min(starts) + 8]
        epochs.append(starts)
    assert sorted({min(s) for s in epochs}) == [0, 1, 2, 3]
    assert any(s != sorted(s) for s in epochs)


def test_each_source_is_shuffled_by_its_name(tmp_path):
    """A source's order is seeded by its name (so that adding another source leaves its order alone):
    one file under two names is read in two orders."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"P{i}", "completion": "c"} for i in range(40)])

    def first(name):
        cfg = data_cfg({name: base.source(path, "jsonl")}, packing=False)
        return next(pipeline.train_iterator(cfg, "sft", BYTE, seed=0))["tokens"]

    assert np.array_equal(first("a"), first("a"))
    assert not np.array_equal(first("a"), first("b"))


def test_a_source_of_weight_zero_is_switched_off_and_not_read():
    cfg = data_cfg({"on": base.source(), "off": base.source("/nonexistent/x.jsonl", "jsonl", weight=0.0)})
    assert [s.name for s in sources.train_sources(cfg, "sft")] == ["on"]


def test_synthetic_config_level_knobs_reach_every_source():
    """data.synthetic's seed and difficulty apply to a source that does not set its own."""
    cfg = data_cfg()
    cfg.synthetic.seed, cfg.synthetic.max_digits, cfg.synthetic.min_ops, cfg.synthetic.max_ops = 7, 3, 2, 3
    got, _ = records("", "synthetic", "prompts", cfg)
    want = [synthetic.problem(i, seed=7, max_digits=3, min_ops=2, max_ops=3) for i in range(20)]
    assert [g["prompt"][0]["content"] for g in got[:20]] == [p.question for p in want]
    assert [g["answer"] for g in got[:20]] == [p.answer for p in want]
    with pytest.raises(sources.DataError, match=r"no synthetic examples in \[start=0.9999, end=1.0\] of "
                                                 r"data.synthetic.num_examples=300"):
        records("", "synthetic", "prompts", cfg, start=0.9999)


def test_synthetic_preference_pairs_prefer_the_right_solution():
    cfg = data_cfg()
    cfg.synthetic.num_examples = 50
    pairs, _ = records("", "synthetic", "preference", cfg)
    for i, pair in enumerate(pairs):
        p = synthetic.problem(i)
        assert (pair["chosen"], pair["rejected"]) == (p.solution, p.wrong_solution)
        assert synthetic.verify(pair["chosen"], p.answer) and not synthetic.verify(pair["rejected"], p.answer)


def test_synthetic_problems_are_fixed():
    """Problems are a pure function of (seed, index) on every machine and every version: held-out splits
    and saved results depend on it."""
    assert synthetic.problem(0) == synthetic.Problem(
        question="Ava has 42 cards. Ava gives 1 cards to Lena. Then Ava collects until there are 8 times as many "
                 "cards. How many cards does Ava have now?",
        solution="Ava starts with 42 cards.\nGiving 1 away leaves 42 - 1 = 41.\n8 times as many is 41 * 8 = 328.\n#### 328",
        answer="328",
        wrong_solution="Ava starts with 42 cards.\nGiving 1 away leaves 42 - 1 = 32.\n8 times as many is 32 * 8 = 256.\n"
                       "#### 256")
    p = synthetic.problem(2)
    assert (p.question, p.solution) == (
        "Nia has 68 shells. Then Nia splits the shells into 4 equal groups and keeps one group. Then Nia collects "
        "until there are 6 times as many shells. How many shells does Nia have now?",
        "Nia starts with 68 shells.\nOne of 4 equal groups is 68 / 4 = 17.\n6 times as many is 17 * 6 = 102.\n#### 102")
    p = synthetic.problem(3, seed=1, max_digits=3, max_ops=3)
    assert (p.question, p.answer) == ("Tariq has 628 coins. Tariq finds 539 more coins. How many coins does Tariq "
                                      "have now?", "1167")


def test_synthetic_operands_and_slips_cover_their_ranges():
    """Over many problems: multipliers and divisors are every one of 2..9, every value stays positive
    (a gift leaves at least one), and slips are every nonzero integer in -9..9."""
    mul, div, slips = set(), set(), set()
    for i in range(600):
        p = synthetic.problem(i, max_digits=1, max_ops=3)
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (-?\d+)", p.solution):
            assert int(c) >= 1
            {"*": mul, "/": div}.get(op, set()).add(int(b))
        right = [int(n) for n in re.findall(r"= (-?\d+)", p.solution)]
        wrong = [int(n) for n in re.findall(r"= (-?\d+)", p.wrong_solution)]
        slips.add(next(w - r for r, w in zip(right, wrong) if w != r))
    assert mul == div == set(range(2, 10))
    assert slips == set(range(-9, 10)) - {0}


def test_answers_compare_as_numbers_after_dollars_and_commas():
    assert synthetic.extract_answer("so\n#### $1,234.50") == "1234.50"
    assert synthetic.verify("#### $1,234.", "1234") and synthetic.verify("#### 1234.50", "$1,234.5")
    assert not synthetic.verify("#### 12.5", "12") and not synthetic.verify("#### 12", "12.5")
    assert synthetic.extract_answer("#### \n42") is None  # the answer is on the "####" line
    assert synthetic.extract_answer("#### .5.") == ".5" and synthetic.verify("#### .5", "0.5")


def test_the_answer_is_the_number_its_line_starts_with():
    """GSM8K's answers are read as the number after `####` (its regex `#### (-?[0-9.,]+)`): a model writing
    "#### 12 apples" answered 12, and the text after a second `####` on the line is not part of the first."""
    assert synthetic.extract_answer("so\n#### 12 apples") == "12" and synthetic.verify("#### 12 apples.", "12")
    assert synthetic.extract_answer("#### 7 then #### 8") == "8"
    assert synthetic.extract_answer("#### -$5 each") == "-5" and synthetic.verify("#### 3.0 in all", "3")
    assert synthetic.extract_answer("#### .5 cups") == ".5" and synthetic.extract_answer("#### $ 5 each") == "5"
    assert synthetic.extract_answer("#### yes") == "yes"  # not a number: the line, as before


def test_encoder_from_config_takes_template_masking_and_truncation():
    cfg = data_cfg(mask_special_tokens=True, seq_len=8, truncate=False)
    chat_ = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ab"}]}
    enc = Encoder.from_config(cfg, BYTE)
    assert (enc.template, enc.mask_special_tokens, enc.seq_len, enc.truncate) == ("kiln", True, 8, False)
    ex, status = enc("sft", chat_)  # <s> <|user|> q <|end|> <|assistant|> a b <|end|>: 7 positions
    assert status == examples.OK and trained_text(ex) == "ab" and ex["loss_mask"].sum() == 2  # no <|end|>
    assert enc("sft", {"messages": [chat_["messages"][0], {"role": "assistant", "content": "abcd"}]}) == (
        None, examples.TOO_LONG)
    cfg.chat_template = "chatml"
    with pytest.raises(tk.TokenizerError, match="has no token '<|im_start|>'"):
        Encoder.from_config(cfg, BYTE)("sft", chat_)


def test_a_long_document_is_kept_whole_for_the_pipeline_to_cut():
    """Pre-training never truncates: a document longer than a row is "ok", BOS + text + EOS, every target trained."""
    ex, status = Encoder(BYTE, seq_len=4)("pretrain", {"text": "abcdefgh"})
    assert status == examples.OK
    assert ex["tokens"].tolist() == [1, *BYTE.encode_text("abcdefgh")] and ex["loss_mask"].tolist() == [1] * 9


def test_pairs_keep_the_whole_prompt_and_train_only_the_reply():
    """<s> <|system|> s <|end|> <|user|> u <|end|> <|assistant|> a <|end|> <|user|> v <|end|> <|assistant|>, then
    the reply and <|end|>: every turn of a multi-turn prompt, the earlier assistant turn untrained."""
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
              {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    pair, status = Encoder(BYTE, seq_len=64).preference({"prompt": prompt, "chosen": "c", "rejected": "r"})
    s, u, a, v, c, r = BYTE.encode_text("suavcr")
    head = [1, 4, s, 7, 5, u, 7, 6, a, 7, 5, v, 7, 6]
    assert status == examples.OK
    for side, reply in (("chosen", c), ("rejected", r)):
        assert pair[f"{side}_tokens"].tolist() == head + [reply]
        assert pair[f"{side}_targets"].tolist() == head[1:] + [reply, 7]
        assert pair[f"{side}_loss_mask"].tolist() == [0] * 13 + [1, 1]


def test_prompts_use_the_configured_template():
    """A prompt ends in the template's own assistant header: ChatML's "<|im_start|>assistant\\n"."""
    enc = Encoder(SpelledTokenizer(), seq_len=64, template="chatml")
    ex, status = enc("prompts", {"prompt": [{"role": "user", "content": "hi"}], "answer": "1"})
    ims, ime = 302, 303
    assert status == examples.OK and ex["answer"] == "1"
    assert ex["prompt"].tolist() == [ims, *b"user\nhi", ime, *b"\n", ims, *b"assistant\n"]


def test_pipeline_settings_that_cannot_work_are_refused():
    """An unknown kind, a batch that does not split over the processes, an unknown pack method; without
    packing the pack method is unused and not checked."""
    with pytest.raises(ValueError, match="unknown data kind 'dpo'"):
        pipeline.train_iterator(data_cfg(), "dpo", BYTE, seed=0)
    with pytest.raises(ValueError, match="data.batch_size=4 is not divisible by 3 processes"):
        pipeline.train_iterator(data_cfg(), "sft", BYTE, seed=0, process_count=3)
    with pytest.raises(ValueError, match="data.pack_method='best_fit'; expected one of first_fit, concat"):
        pipeline.eval_iterator(data_cfg(pack_method="best_fit", eval_sources={"e": base.source()}), "sft", BYTE, "e")
    batch = next(pipeline.train_iterator(data_cfg(packing=False, pack_method="best_fit"), "sft", BYTE, seed=0))
    assert batch["segment_ids"].shape == (4, 128) and batch["segment_ids"].max() == 1


def test_a_source_of_one_record_is_one_document_only_for_pretraining(tmp_path):
    """A one-record pre-training source is a document cut into windows; one conversation stays one
    SFT example, every row of the batch."""
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "completion": "ab"}])
    cfg = data_cfg({"one": base.source(path, "jsonl")}, packing=False, seq_len=16)
    batch = next(pipeline.train_iterator(cfg, "sft", BYTE, seed=0))
    q, a, b = BYTE.encode_text("qab")
    for r in range(4):  # <s> <|user|> q <|end|> <|assistant|> a b <|end|>
        assert batch["tokens"][r].tolist() == [1, 5, q, 7, 6, a, b] + [0] * 9
        assert batch["loss_mask"][r].tolist() == [0, 0, 0, 0, 1, 1, 1] + [0] * 9


class NoBosTokenizer(SpelledTokenizer):
    bos_id = None  # as Qwen2's


def test_a_template_with_bos_renders_none_for_a_tokenizer_without_one():
    ids, mask = chat.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                            NoBosTokenizer(), "gemma")
    st, et = 300, 301
    assert ids == [st, *b"user\nhi", et, *b"\n", st, *b"model\nyo", et, *b"\n"]
    assert [i for i, m in zip(ids, mask) if m] == [*b"yo", et]


def test_jsonl_views_of_other_kinds(tmp_path):
    """Preference lines carry reference log-probs in pairs (and a margin); renamed fields are read by their
    names; messages keep only role and content; prompts without an answer field get "" (answer_field="");
    a tokenizer record is all of its strings, nested ones included."""
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "p.jsonl", [dict(pair, ref_chosen_logps=-1, ref_rejected_logps=-2.5, margin=3)])
    (got,), _ = records(path, "jsonl", "preference")
    assert (got["ref_chosen_logps"], got["ref_rejected_logps"], got["margin"]) == (-1.0, -2.5, 3.0)
    half = write_jsonl(tmp_path / "h.jsonl", [dict(pair, ref_chosen_logps=-1)])
    with pytest.raises(sources.DataError, match="h.jsonl:1: field 'ref_chosen_logps' without 'ref_rejected_logps'"):
        records(half, "jsonl", "preference")
    renamed = write_jsonl(tmp_path / "r.jsonl", [{"q": "q", "good": "a", "bad": "b", "body": "text"}])
    (got,), _ = records(renamed, "jsonl", "preference", prompt_field="q", chosen_field="good", rejected_field="bad")
    assert got == {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    assert records(renamed, "jsonl", "pretrain", text_field="body")[0] == [{"text": "text"}]
    (got,), _ = records(path, "jsonl", "prompts", answer_field="")
    assert got == {"prompt": [{"role": "user", "content": "q"}], "answer": ""}
    named = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi", "name": "x"},
                                                             {"role": "assistant", "content": "yo"}]}])
    assert records(named, "jsonl", "sft")[0] == [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "yo"}]}]
    nested = write_jsonl(tmp_path / "n.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "n": 3, "t": "end"}])
    assert records(nested, "jsonl", "tokenizer")[0] == [{"text": "user\nhi\nend"}]


def test_hh_rlhf_text_kinds(tmp_path):
    """Pre-training reads the chosen dialogue (stripped); a tokenizer learns from both dialogues."""
    chosen, rejected = "\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: hi\n\nAssistant: go away"
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    assert records(path, "hh_rlhf", "pretrain")[0] == [{"text": chosen.strip()}]
    assert records(path, "hh_rlhf", "tokenizer")[0] == [{"text": f"{chosen}\n{rejected}"}]


def test_gsm8k_text_kinds_read_the_worked_solution(tmp_path):
    """Pre-training and tokenizer text: the question, then the worked steps (calculator calls removed) and
    the final line; prompts: the number after "####"."""
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}])
    for kind in ("pretrain", "tokenizer"):
        assert records(path, "gsm8k", kind)[0] == [{"text": "Q?\n2 + 3 = 5\n#### 5"}]
    assert records(path, "gsm8k", "prompts")[0] == [{"prompt": [{"role": "user", "content": "Q?"}], "answer": "5"}]


def test_text_document_slices_end_where_asked(tmp_path):
    """Documents between separators keep their text as it is (indentation included)."""
    (tmp_path / "t.txt").write_text("one\n\n  two\n\nthree \n\nfour\n\nfive")
    cfg = data_cfg(text_separator="\n\n")
    assert [d["text"] for d in records(tmp_path / "t.txt", "text", "pretrain", cfg, end=0.4)[0]] == ["one", "  two"]
    assert [d["text"] for d in records(tmp_path / "t.txt", "text", "pretrain", cfg, start=0.4, end=0.8)[0]] == [
        "three ", "four"]


def test_a_bad_record_error_survives_the_trip_from_a_data_worker_process():
    """Raised in a grain worker process (data.num_workers > 0), the error is pickled back to the trainer: it
    must arrive whole, naming the record and how to skip it, not as a TypeError from rebuilding it."""
    import pickle
    from data.sources import BadRecordError
    e = pickle.loads(pickle.dumps(BadRecordError("/d/x.array_record: record 7", "malformed JSON (column 2)")))
    assert isinstance(e, BadRecordError) and (e.where, e.why) == ("/d/x.array_record: record 7", "malformed JSON (column 2)")
    assert str(e) == ("/d/x.array_record: record 7: malformed JSON (column 2) (set data.skip_bad_records=true to skip "
                      "such records)")
