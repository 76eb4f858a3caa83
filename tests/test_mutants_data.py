"""Mutation-testing holes in the data layer, closed: each test guards behaviour that a small planted bug
(an off-by-one, a dropped mask, an ignored argument) used to change without any test failing."""
import gzip
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec
from ml_collections import ConfigDict
import tokenizers as hf
from sentencepiece import sentencepiece_model_pb2

from configs import base
from data import examples, loader, pipeline, sources, spm, stats, synthetic
from data import tokenizer as tk
from test_data_pipeline import BYTE, data_cfg, take
from test_data_sources import data_cfg as data_cfg_sources, records, write_array_record, write_jsonl
from test_tokenizer import LLAMA3, hf_dir, sp_path  # noqa: F401  (sp_path: a fixture, a small sentencepiece model)


def test_a_document_shorter_than_two_windows_keeps_every_window_whole():
    """The epoch offsets of a short document are drawn from the shifts that still leave a whole window
    (6 tokens, windows of 4: offsets 0..2), not from the whole window length, which would cut windows
    short at the document's end; a document shorter than a window is always read from its start."""
    doc = examples.shift(np.arange(7), np.ones(7))  # tokens 0..5, targets 1..6
    ds = pipeline._shifted_windows(doc, 4, seed=5)
    windows = [ds[e] for e in range(40)]  # one window an epoch
    assert all(w["tokens"].tolist() == list(range(w["tokens"][0], w["tokens"][0] + 4)) for w in windows)
    assert {int(w["tokens"][0]) for w in windows} == {0, 1, 2}
    short = examples.shift(np.arange(4), np.ones(4))  # 3 positions, windows of 4
    ds = pipeline._shifted_windows(short, 4, seed=5)
    assert all(ds[e]["tokens"].tolist() == [0, 1, 2] and ds[e]["targets"].tolist() == [1, 2, 3] for e in range(20))


def test_a_one_token_prompt_sits_at_the_end_of_its_row():
    """A prompt row is left-padded whatever the prompt's length: one token is a real prompt (segment 1)."""
    for ids, want in (([9], [0, 0, 0, 9]), ([7, 8, 9], [0, 7, 8, 9])):
        row = pipeline._prompt_row(4, 0, {"prompt": np.array(ids, np.int32), "answer": "x"})
        n = len(ids)
        assert row["prompt_tokens"].tolist() == want
        assert row["prompt_segment_ids"].tolist() == [0] * (4 - n) + [1] * n
        assert row["prompt_positions"].tolist() == [0] * (4 - n) + list(range(n))


def test_one_text_document_without_shifted_windows_is_shuffled_by_window(tmp_path):
    """data.shift_windows=false: a single document is cut into windows on the fixed grid and the windows
    are shuffled, so the rows of one batch are different windows and one epoch reads each once; the
    last, partial window (35 positions of 64) is padded and untrained after its end."""
    text = "".join(f"line {i} of the play.\n" for i in range(60))  # 1,250 bytes: 1,251 positions
    (tmp_path / "play.txt").write_text(text)
    ids = BYTE.encode(text, add_bos=True, add_eos=True)
    cfg = data_cfg({"play": base.source(str(tmp_path / "play.txt"), "text")}, seq_len=64, packing=False,
                   shift_windows=False)
    inputs, outputs = np.asarray(ids[:-1]), np.asarray(ids[1:])
    grid = range(0, len(inputs), 64)  # 20 windows: 19 whole and the last of 35 positions
    order = []
    for batch in take(pipeline.train_iterator(cfg, "pretrain", BYTE, seed=3), 6):
        rows = zip(batch["tokens"], batch["targets"], batch["loss_mask"], batch["segment_ids"])
        for tokens, targets, mask, seg in rows:
            start = next(s for s in grid if np.array_equal(tokens[:len(inputs[s:s + 64])], inputs[s:s + 64]))
            n = len(inputs[start:start + 64])
            assert np.array_equal(targets[:n], outputs[start:start + n])
            assert seg.tolist() == [1] * n + [0] * (64 - n) and mask.tolist() == [1] * n + [0] * (64 - n)
            order.append(start // 64)
    assert len(grid) == 20 and len(inputs) - grid[-1] == 35
    epoch = order[:20]
    assert sorted(epoch) == list(range(20)) and epoch != sorted(epoch)


# -- sources ----------------------------------------------------------------------------------------
def test_a_blank_slice_of_one_text_document_has_no_records(tmp_path):
    """A whole-file document whose selected characters are only whitespace is no document: a clear error, not
    a run that trains on blanks."""
    (tmp_path / "t.txt").write_text("text\n" + " " * 20)
    with pytest.raises(sources.DataError, match=r"has no records in \[start=0.5, end=1.0\]"):
        records(tmp_path / "t.txt", "text", "pretrain", start=0.5)
    assert records(tmp_path / "t.txt", "text", "pretrain", end=0.5)[0] == [{"text": "text\n" + " " * 7}]


def test_array_record_shards_are_read_in_sorted_path_order(tmp_path):
    """A pattern's shards are read in the order of their names (not the order the file system lists them),
    so that a run's records, slices and shuffles are the same on every machine."""
    for shard, texts in ((2, ["e"]), (0, ["a", "b"]), (1, ["c", "d"])):
        write_array_record(tmp_path / f"part-{shard}.array_record", [{"text": t} for t in texts])
    got, _ = records(tmp_path / "part-*.array_record", "array_record", "pretrain")
    assert [r["text"] for r in got] == ["a", "b", "c", "d", "e"]
    got, _ = records(tmp_path / "part-*.array_record", "array_record", "pretrain", start=0.4, end=0.8)
    assert [r["text"] for r in got] == ["c", "d"]


def test_a_bad_array_record_is_named_by_its_index_in_the_file_also_in_a_slice(tmp_path):
    """With start > 0 the error still names the record's own index (2 of 0..3), where the user can find it."""
    path = write_array_record(tmp_path / "r.array_record", [{"text": "a"}, {"text": "b"}, b"{oops", {"text": "d"}])
    src = sources.load("s", base.source(path, "array_record", start=0.5), data_cfg_sources(), "pretrain")
    with pytest.raises(sources.DataError, match=r"r.array_record: record 2: malformed JSON"):
        src.records[0]


def test_head_reads_the_first_records_of_the_file_whatever_the_slice(tmp_path):
    """`head` (a check of a large file) reads the file's first records with no slice taken; without it the
    slice [start, end) applies."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in "abcd"])
    src = base.source(str(path), "jsonl", start=0.5)

    def texts(head: int = 0) -> list[str]:
        return [r["text"] for r in sources.load("s", src, data_cfg_sources(), "pretrain", head=head).records]

    assert texts(head=3) == ["a", "b", "c"] and texts() == ["c", "d"]


def test_any_gzip_file_is_read_compressed(tmp_path):
    """A JSON Lines file is gunzipped by its ".gz" ending, whatever comes before it."""
    with gzip.open(tmp_path / "docs.json.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert records(tmp_path / "docs.json.gz", "jsonl", "pretrain")[0] == [{"text": "zipped"}]


# -- examples ---------------------------------------------------------------------------------------
def test_a_pair_carries_its_margin_into_the_batch(tmp_path):
    """A reward-model margin (Llama 2) rides along with its pair: in the encoded example and in the batch."""
    enc = examples.Encoder(BYTE, seq_len=32)
    pair, status = enc.preference({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b",
                                   "margin": 2.5})
    assert status == examples.OK and pair["margin"] == np.float32(2.5) and pair["margin"].dtype == np.float32
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2.5}])
    cfg = data_cfg(eval_sources={"p": base.source(str(path), "jsonl")}, seq_len=32, batch_size=2)
    (batch,) = pipeline.eval_iterator(cfg, "preference", BYTE, "p")
    assert batch["margin"].tolist() == [2.5, 0.0]  # the padding row's margin is zero


# -- stats, loader, synthetic -------------------------------------------------------------------------
def test_source_stats_count_load_skips_and_report_the_mean_length(tmp_path):
    """Three documents of 2, 3 and 7 positions (BOS + text; its mean 4.0 is not its median 3) and one bad
    line skipped on load; by default up to 1000 records are looked at."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, b"{oops", {"text": "bb"}, {"text": "cccccc"}])
    cfg = data_cfg_sources(skip_bad_records=True)
    cfg.sources = ConfigDict({"d": base.source(str(path), "jsonl")})
    [got] = stats.summarize(cfg, "pretrain", BYTE)
    assert (got.examples, got.statuses, got.skipped_on_load, got.tokens) == (3, {"ok": 3}, 1, [2, 3, 7])
    assert got.line().endswith("bad records skipped on load 1; tokens per example mean 4.0, min 2, max 7")
    cfg = data_cfg_sources()
    cfg.synthetic.num_examples = 300
    assert [s.examples for s in stats.summarize(cfg, "sft", BYTE)] == [300]


def test_global_batch_shards_float_and_bool_arrays_too():
    """Loss masks (float32) and boolean arrays are numbers to shard like token ids, not host-side values."""
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    batch = {"loss_mask": np.arange(16, dtype=np.float32).reshape(8, 2), "valid": np.arange(8) % 3 == 0}
    arrays = loader.global_batch(batch, mesh)
    for key, value in batch.items():
        assert isinstance(arrays[key], jax.Array) and arrays[key].dtype == value.dtype
        assert arrays[key].sharding.spec[0] == ("data", "fsdp")
        assert np.array_equal(np.asarray(arrays[key]), value)


def test_a_word_answer_loses_its_final_period():
    """An answer that is not a number is compared without a final period, on either side."""
    assert synthetic.extract_answer("so\n#### yes.") == "yes"
    assert synthetic.verify("#### Paris.", "Paris") and synthetic.verify("#### Paris", "Paris.")


def test_operands_of_no_digits_are_refused_by_name():
    """max_digits=0 is a clear error naming the knob, not an empty random range."""
    with pytest.raises(ValueError, match="synthetic task needs max_digits >= 1"):
        synthetic.problem(0, max_digits=0)


def test_rows_pad_with_the_tokenizers_pad_id():
    """Padding is the tokenizer's pad id, which is not always 0 (a sentencepiece model without a pad token
    pads with EOS): unpacked rows, pair rows, left-padded prompt rows and evaluation's filler rows alike."""
    tok = tk.ByteTokenizer()
    tok.pad_id = tok.eos_id  # 2
    cfg = data_cfg(seq_len=256, packing=False, eval_sources={"e": base.source(format="synthetic", end=3 / 300)})
    batches = {kind: next(pipeline.train_iterator(cfg, kind, tok, seed=0)) for kind in ("sft", "preference", "prompts")}
    batches["eval"] = next(pipeline.eval_iterator(cfg, "sft", tok, "e"))  # 3 examples and 1 filler row
    assert (batches["eval"]["segment_ids"][3] == 0).all()
    for kind, batch in batches.items():
        for prefix in {"preference": ("chosen_", "rejected_"), "prompts": ("prompt_",)}.get(kind, ("",)):
            pad = batch[f"{prefix}segment_ids"] == 0
            assert pad.any() and (batch[f"{prefix}tokens"][pad] == 2).all()
            if prefix != "prompt_":
                assert (batch[f"{prefix}targets"][pad] == 2).all()


def test_token_bytes_are_int32():
    """token_bytes is int32, as its docstring and the batches' target_bytes promise."""
    table = tk.load("byte").token_bytes()
    assert table.dtype == np.int32 and table.shape == (264,) and table.sum() == 256


def test_sentencepiece_unknown_token_is_special(sp_path):
    """<unk> (id 3) has no text of its own: it is special, as the control tokens are, and ordinary pieces are not."""
    tok = tk.load(sp_path)
    assert [tok.is_special(i) for i in (0, 1, 2, 3, 7)] == [True] * 5
    assert not any(tok.is_special(i) for i in tok.encode_text("Hello world 12"))


def test_cut_line_keeps_a_line_of_exactly_the_limit_whole():
    """A line of exactly `limit` bytes is one piece; one byte more is cut."""
    assert spm.cut_line("abcd", 4) == ["abcd"]
    assert spm.cut_line("abcde", 4) == ["abcd", "e"]


def test_blank_texts_are_no_text_to_train_a_tokenizer_on(tmp_path):
    """Blank lines are dropped before training: texts of only whitespace are the clear "no text" error."""
    with pytest.raises(tk.TokenizerError, match="no text to train a tokenizer on"):
        spm.train(["", "  \n \t\n"], str(tmp_path / "t.model"), vocab_size=400)


def test_cut_line_cuts_before_a_tab_as_before_a_space():
    """A tab is whitespace to cut at, as a space is: the piece after the cut starts with it."""
    assert spm.cut_line("aaaa\tbbbbbb", 8) == ["aaaa", "\tbbbbbb"]


def test_hf_encode_adds_no_special_tokens_of_its_post_processor(tmp_path):
    """A Llama 3 tokenizer.json's post-processor adds <|begin_of_text|> when asked to: text encodes without it,
    and encode(add_bos=True) holds exactly one BOS."""
    path = hf_dir(tmp_path, LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    raw = hf.Tokenizer.from_file(f"{path}/tokenizer.json")
    raw.post_processor = hf.processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                          special_tokens=[("<|begin_of_text|>", 0)])
    raw.save(f"{path}/tokenizer.json")
    tok = tk.load(path)
    assert tok.encode("hi", add_bos=True) == [0, *tok.encode_text("hi")] and 0 not in tok.encode_text("hi")


def test_hf_byte_level_added_token_counts_its_utf8_bytes(tmp_path):
    """An added (non-special) token of a byte-level tokenizer adds its content's UTF-8 bytes: "héllo" is 6."""
    path = hf_dir(tmp_path, LLAMA3, {"eos_token": "<|end_of_text|>"})
    raw = hf.Tokenizer.from_file(f"{path}/tokenizer.json")
    raw.add_tokens(["héllo"])
    raw.save(f"{path}/tokenizer.json")
    tok = tk.load(path)
    added = tok.token_id("héllo")
    assert not tok.is_special(added) and tok.token_bytes()[added] == 6


def test_resolve_train_uses_the_configured_vocabulary_size_and_model_type(tmp_path):
    """data.tokenizer="train" trains the model data.tokenizer_vocab_size and data.tokenizer_model_type ask for."""
    cfg = base.get_config().data
    cfg.tokenizer, cfg.tokenizer_vocab_size, cfg.tokenizer_model_type = "train", 350, "unigram"
    cfg.synthetic.num_examples = 300
    tok = tk.resolve(cfg, str(tmp_path))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "tokenizer.model").read_bytes())
    assert tok.vocab_size == 350 and proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM


def test_batch_slots_that_do_not_split_over_the_processes_are_refused():
    """8 saved batch slots cannot be re-divided over 3 processes: an error, not 2 slots each and 2 lost."""
    saved = pipeline.combine_states([{"parents": [{"slot": i} for i in range(p * 4, p * 4 + 4)]} for p in range(2)])
    with pytest.raises(ValueError, match="the checkpoint's 8 batch slots do not split over 3 processes"):
        pipeline.process_state(saved, 0, 3)


def test_global_batch_splits_over_the_batch_axes_the_mesh_has():
    """On a mesh without an fsdp axis, the batch dimension is split over "data" alone (tensor replicates)."""
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    tokens = np.arange(24, dtype=np.int32).reshape(8, 3)
    arrays = loader.global_batch({"tokens": tokens}, mesh)
    assert arrays["tokens"].sharding.spec == PartitionSpec(("data",), None)
    assert arrays["tokens"].addressable_shards[0].data.shape == (4, 3)
    assert np.array_equal(np.asarray(arrays["tokens"]), tokens)


def test_a_source_path_in_the_home_directory_is_expanded(tmp_path, monkeypatch):
    """A source path may start with "~", as a shell path does."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "d.jsonl", [{"text": "home"}])
    assert records("~/d.jsonl", "jsonl", "pretrain")[0] == [{"text": "home"}]


def test_an_evaluation_source_is_read_from_eval_sources_when_a_training_source_has_its_name(tmp_path):
    """An evaluation source and a training source of one name are two sources: evaluation reads its own."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "train"}])
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": "held"}])
    cfg = data_cfg_sources(sources=ConfigDict({"x": base.source(str(train), "jsonl")}),
                           eval_sources=ConfigDict({"x": base.source(str(held), "jsonl")}))
    assert sources.eval_source(cfg, "pretrain", "x").records[0] == {"text": "held"}


def test_an_unset_braced_variable_in_a_path_is_named(monkeypatch):
    """"${VAR}" is checked as "$VAR" is: unset, it is named, not reported as a file not found."""
    monkeypatch.delenv("KILN_UNSET_DIR", raising=False)
    with pytest.raises(sources.DataError, match=r"uses \$KILN_UNSET_DIR, which is not set"):
        records("${KILN_UNSET_DIR}/d.jsonl", "jsonl", "pretrain")


def test_a_role_token_named_in_tokenizer_config_must_exist(tmp_path):
    """tokenizer_config.json naming an EOS the vocabulary lacks is a clear error, not a tokenizer without EOS."""
    path = hf_dir(tmp_path, LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|nope|>"})
    with pytest.raises(tk.TokenizerError, match="has no token '<|nope|>'"):
        tk.load(path)


def test_the_shuffle_is_the_same_in_every_python_process():
    """A run is a function of its config and seeds: the data order must not depend on Python's per-process
    string hashing (PYTHONHASHSEED), or resumed and multi-host runs would read other data."""
    code = ("import json; from configs import base; from data import pipeline, tokenizer; "
            "cfg = base.get_config().data; cfg.seq_len, cfg.batch_size, cfg.packing = 256, 2, False; "
            "batch = next(pipeline.train_iterator(cfg, 'sft', tokenizer.load('byte'), seed=0)); "
            "print(json.dumps(batch['tokens'].tolist()))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = [subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, PYTHONHASHSEED=str(h)),
                              capture_output=True, text=True, check=True).stdout for h in (1, 2)]
    cfg = base.get_config().data
    cfg.seq_len, cfg.batch_size, cfg.packing = 256, 2, False
    here = next(pipeline.train_iterator(cfg, "sft", BYTE, seed=0))["tokens"].tolist()
    assert [json.loads(o) for o in outputs] == [here, here]


def test_hf_roles_found_by_the_llama2_and_gpt2_names(tmp_path):
    """Without tokenizer_config.json: Llama 2's <s> / </s> are BOS / EOS (padding with EOS); GPT-2's
    <|endoftext|> is EOS and padding, and there is no BOS."""
    found = []
    for name, specials in (("llama2", ["<s>", "</s>"]), ("gpt2", ["<|endoftext|>"])):
        (tmp_path / name).mkdir()
        path = hf_dir(tmp_path / name, specials, {})
        os.remove(os.path.join(path, "tokenizer_config.json"))
        tok = tk.load(path)
        found.append((tok.bos_id, tok.eos_id, tok.pad_id))
    assert found == [(0, 1, 1), (None, 0, 0)]
