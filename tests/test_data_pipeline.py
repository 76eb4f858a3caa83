"""Pipelines: packing keeps masks and segments aligned, resume is exact, process shards are disjoint
and complete, mixtures follow their weights, evaluation is one padded pass, batches shard on a mesh."""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec
from ml_collections import ConfigDict

from configs import base
from data import loader, pipeline, sources, synthetic
from data import tokenizer as tk

BYTE = tk.load("byte")
U, A, E = 5, 6, 7  # <|user|>, <|assistant|>, <|end|>


def data_cfg(sources_=None, eval_sources=None, **overrides):
    cfg = base.get_config().data
    cfg.seq_len, cfg.batch_size, cfg.synthetic.num_examples = 128, 4, 300
    for key, value in overrides.items():
        cfg[key] = value
    if sources_ is not None:
        cfg.sources = ConfigDict(sources_)
    if eval_sources is not None:
        cfg.eval_sources = ConfigDict(eval_sources)
    return cfg


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def segments_of(batch, r, prefix=""):
    """[(ids of the segment's sequence, trained flags of those ids)] of row r."""
    seg = batch[f"{prefix}segment_ids"][r]
    out = []
    for s in sorted(set(seg[seg > 0].tolist())):
        where = np.flatnonzero(seg == s)
        assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
        assert np.array_equal(batch[f"{prefix}positions"][r][where], np.arange(len(where)))
        # Next-token alignment: each target is the following input of the same segment.
        assert np.array_equal(batch[f"{prefix}targets"][r][where[:-1]], batch[f"{prefix}tokens"][r][where[1:]])
        ids = [int(batch[f"{prefix}tokens"][r][where[0]])] + batch[f"{prefix}targets"][r][where].tolist()
        out.append((ids, [0] + (batch[f"{prefix}loss_mask"][r][where] > 0).astype(int).tolist()))
    pad = seg == 0
    assert not batch[f"{prefix}loss_mask"][r][pad].any() and not batch[f"{prefix}target_bytes"][r][pad].any()
    assert np.array_equal(batch[f"{prefix}target_bytes"][r],
                          np.where(batch[f"{prefix}loss_mask"][r] > 0, BYTE.token_bytes()[batch[f"{prefix}targets"][r]], 0))
    return out


@pytest.fixture
def docs(tmp_path):
    """Documents of many lengths, some longer than a row."""
    texts = [f"doc {i}: " + "abcdefghij"[i % 10] * (7 * i % 300) for i in range(40)]
    return texts, write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])


@pytest.fixture
def pairs(tmp_path):
    rows = [{"prompt": f"A{i} " + "p" * (i % 13), "completion": f"c{i} " + "x" * (i % 17)} for i in range(60)]
    return rows, write_jsonl(tmp_path / "pairs.jsonl", rows)


# -- packing ----------------------------------------------------------------------------------------
def test_sft_packing_exact_layout(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "cc", "completion": "d"},
                                               {"prompt": "e", "completion": "ff"}])
    cfg = data_cfg(eval_sources={"t": base.source(path, "jsonl")}, seq_len=16, batch_size=2)
    (batch,) = list(pipeline.eval_iterator(cfg, "sft", BYTE, "t"))
    a, b, c, d, e, f = (BYTE.encode_text(ch)[0] for ch in "abcdef")
    # Row 0 packs examples 0 (6 positions) and 1 (7); example 2 (7) does not fit and opens row 1.
    assert batch["tokens"][0].tolist() == [1, U, a, E, A, b, 1, U, c, c, E, A, d, 0, 0, 0]
    assert batch["targets"][0].tolist() == [U, a, E, A, b, E, U, c, c, E, A, d, E, 0, 0, 0]
    assert batch["loss_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    assert batch["segment_ids"][0].tolist() == [1] * 6 + [2] * 7 + [0] * 3
    assert batch["positions"][0].tolist() == [*range(6), *range(7), 0, 0, 0]
    assert batch["target_bytes"][0].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert batch["tokens"][1].tolist() == [1, U, e, E, A, f, f] + [0] * 9
    assert batch["loss_mask"][1].tolist() == [0, 0, 0, 0, 1, 1, 1] + [0] * 9


def test_pretrain_packing_keeps_segments_positions_and_masks_aligned(docs):
    texts, path = docs
    sequences = [BYTE.encode(t, add_bos=True, add_eos=True) for t in texts]
    cfg = data_cfg({"d": base.source(path, "jsonl")}, seq_len=64)
    n_segments = 0
    for batch in take(pipeline.train_iterator(cfg, "pretrain", BYTE, seed=0), 6):
        for r in range(4):
            for ids, trained in segments_of(batch, r):
                assert all(trained[1:])  # pre-training trains every target
                # Every segment is a contiguous piece of one document (long ones are cut in pieces).
                assert any(ids == s[i:i + len(ids)] for s in sequences for i in range(0, len(s), 64))
                n_segments += 1
    assert n_segments > 24  # rows hold several documents


def test_sft_packing_trains_exactly_each_completion(pairs):
    rows, path = pairs
    completion_of = {r["prompt"]: r["completion"] for r in rows}
    cfg = data_cfg({"p": base.source(path, "jsonl")}, seq_len=96)
    for batch in take(pipeline.train_iterator(cfg, "sft", BYTE, seed=1), 4):
        for r in range(4):
            segments = segments_of(batch, r)
            assert len(segments) >= 2  # conversations of at most 39 positions: two always fit in 96
            for ids, trained in segments:
                prompt = BYTE.decode(ids[2:ids.index(E)])
                assert BYTE.decode([i for i, t in zip(ids, trained) if t]) == completion_of[prompt]


def test_unpacked_rows_hold_one_example_at_the_left_with_positions_from_zero(pairs):
    """Without packing (and for preference pairs), each row is one example from slot 0: segment 1,
    positions 0..n-1, then padding (segment 0, position 0, pad tokens, untrained)."""
    rows, path = pairs
    completion_of = {r["prompt"]: r["completion"] for r in rows}
    cfg = data_cfg({"p": base.source(path, "jsonl")}, seq_len=64, packing=False)
    pair_cfg = data_cfg(seq_len=256)  # the synthetic source's preference pairs
    batches = [(b, "") for b in take(pipeline.train_iterator(cfg, "sft", BYTE, seed=0), 2)]
    batches += [(b, p) for b in take(pipeline.train_iterator(pair_cfg, "preference", BYTE, seed=0), 2)
                for p in ("chosen_", "rejected_")]
    for batch, prefix in batches:
        for r in range(4):
            seg, pos = batch[f"{prefix}segment_ids"][r], batch[f"{prefix}positions"][r]
            n = int((seg > 0).sum())
            assert n > 0 and (seg[:n] == 1).all() and (seg[n:] == 0).all()
            assert pos.tolist() == list(range(n)) + [0] * (len(pos) - n)
            assert (batch[f"{prefix}tokens"][r][n:] == BYTE.pad_id).all()
            [(ids, trained)] = segments_of(batch, r, prefix)
            if not prefix:
                assert BYTE.decode([i for i, t in zip(ids, trained) if t]) == completion_of[BYTE.decode(ids[2:ids.index(E)])]


def test_prompt_rows_are_left_padded_with_positions_from_zero():
    """A prompt sits at the end of its row (generation continues after it), its positions 0..n-1."""
    batch = next(pipeline.train_iterator(data_cfg(seq_len=256), "prompts", BYTE, seed=0))
    for r in range(4):
        seg, pos, tokens = batch["prompt_segment_ids"][r], batch["prompt_positions"][r], batch["prompt_tokens"][r]
        n = int((seg > 0).sum())
        pad = len(seg) - n
        assert 0 < n < len(seg) and (seg[pad:] == 1).all() and (seg[:pad] == 0).all()
        assert pos.tolist() == [0] * pad + list(range(n))
        assert (tokens[:pad] == BYTE.pad_id).all()
        assert tokens[pad] == BYTE.bos_id and tokens[pad + 1] == U and tokens[-1] == A  # BOS <|user|> ... <|assistant|>


def test_a_pair_truncated_on_either_side_is_counted_truncated():
    enc = pipeline.Encoder(BYTE, seq_len=12)
    prompt = [{"role": "user", "content": "ab"}]  # <s><|user|>ab<|end|><|assistant|>: 6 ids, then reply and <|end|>
    for chosen, rejected in (("x" * 10, "y"), ("y", "x" * 10)):
        pair, status = enc.preference({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        assert status == "truncated"
        long = "chosen_" if len(chosen) > 1 else "rejected_"
        assert len(pair[f"{long}tokens"]) == 12 and pair[f"{long}loss_mask"].sum() == 12 - 5  # reply cut after 7
    assert enc.preference({"prompt": prompt, "chosen": "x", "rejected": "y"})[1] == "ok"
    dropped = pipeline.Encoder(BYTE, seq_len=12, truncate=False)
    assert dropped.preference({"prompt": prompt, "chosen": "y", "rejected": "x" * 10}) == (None, "too_long")


def test_pairs_with_reference_numbers_are_not_mixed_with_pairs_without():
    """A padding row gets zeros for the numbers real pairs carry; a real pair lacking them is an error."""
    row = pipeline._pair_row(8, 0, {f"{side}_{k}": np.ones(3, np.float32 if k == "loss_mask" else np.int32)
                                    for side in ("chosen", "rejected") for k in ("tokens", "targets", "loss_mask")})
    with_refs = dict(row, ref_chosen_logps=np.float32(-1.5), ref_rejected_logps=np.float32(-2.5))
    empty = pipeline._empty_row("preference", 8, 0)
    batch = pipeline._assemble("preference", BYTE.token_bytes(), [with_refs, empty])
    assert batch["ref_chosen_logps"].tolist() == [-1.5, 0.0] and batch["ref_rejected_logps"].tolist() == [-2.5, 0.0]
    assert "margin" not in batch
    assert "ref_chosen_logps" not in pipeline._assemble("preference", BYTE.token_bytes(), [row, empty])
    with pytest.raises(sources.DataError, match="a batch mixes pairs with 'ref_chosen_logps' and pairs without"):
        pipeline._assemble("preference", BYTE.token_bytes(), [with_refs, row])


def test_concat_pack_method_has_no_padding(docs):
    _, path = docs
    cfg = data_cfg({"d": base.source(path, "jsonl")}, seq_len=64, pack_method="concat")
    for batch in take(pipeline.train_iterator(cfg, "pretrain", BYTE, seed=0), 3):
        assert (batch["segment_ids"] > 0).all() and (batch["loss_mask"] == 1).all()
        for r in range(4):
            segments_of(batch, r)


def test_single_text_document_is_cut_into_windows(tmp_path):
    text = "".join(f"line {i} of the play.\n" for i in range(200))
    (tmp_path / "play.txt").write_text(text)
    cfg = data_cfg(eval_sources={"tail": base.source(str(tmp_path / "play.txt"), "text", start=0.5)}, seq_len=64)
    ids = BYTE.encode(text[len(text) // 2:], add_bos=True, add_eos=True)
    batches = list(pipeline.eval_iterator(cfg, "pretrain", BYTE, "tail"))
    tokens = np.concatenate([b["tokens"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    n = len(ids) - 1
    assert np.array_equal(tokens.reshape(-1)[:n], ids[:-1]) and np.array_equal(targets.reshape(-1)[:n], ids[1:])
    assert (np.concatenate([b["segment_ids"] for b in batches]).reshape(-1)[n:] == 0).all()


def test_single_document_windows_shift_every_epoch(tmp_path):
    text = "".join(f"line {i} of the play.\n" for i in range(60))  # 1,330 bytes
    (tmp_path / "play.txt").write_text(text)
    ids = BYTE.encode(text, add_bos=True, add_eos=True)
    src = {"play": base.source(str(tmp_path / "play.txt"), "text")}
    length = 64
    n = (len(ids) - 1 - length + 1) // length  # 19 whole windows an epoch, whatever the offset

    def starts(shift, batches):
        """Where each whole row of the first batches starts in the document."""
        it = pipeline.train_iterator(data_cfg(src, seq_len=length, shift_windows=shift), "pretrain", BYTE, seed=3)
        grid = np.lib.stride_tricks.sliding_window_view(ids, length)
        return [int(np.flatnonzero((grid == row).all(1))[0]) for b in take(it, batches)
                for row, seg in zip(b["tokens"], b["segment_ids"]) if (seg == 1).all()]

    found = starts(True, 4 * n // 4)
    assert len(found) == 4 * n
    epochs = [sorted(found[e * n:(e + 1) * n]) for e in range(4)]
    for e in epochs:  # each epoch: the whole grid at one offset, each window once
        assert 0 <= e[0] < length and e == list(range(e[0], e[0] + n * length, length))
    assert len({e[0] for e in epochs}) > 1
    fixed = starts(False, 10)
    assert len(fixed) >= 36 and all(s % length == 0 for s in fixed)


def test_single_document_windows_follow_the_seeds(tmp_path):
    (tmp_path / "play.txt").write_text("".join(f"line {i} of the play.\n" for i in range(60)))
    src = {"play": base.source(str(tmp_path / "play.txt"), "text")}

    def first(seed, **overrides):
        return next(pipeline.train_iterator(data_cfg(src, seq_len=64, **overrides), "pretrain", BYTE, seed=seed))

    assert same(first(3), first(3))
    assert not np.array_equal(first(3)["tokens"], first(4)["tokens"])
    assert not np.array_equal(first(3)["tokens"], first(3, shuffle_seed=1)["tokens"])


def test_all_dropped_source_is_a_clear_error(pairs):
    cfg = data_cfg({"p": base.source(pairs[1], "jsonl")}, seq_len=6)
    with pytest.raises(sources.DataError, match=r"first 60 examples were all dropped \(empty_mask: 60\)"):
        pipeline.train_iterator(cfg, "sft", BYTE, seed=0)


# -- determinism, resume, sharding, mixtures ----------------------------------------------------------
CASES = {
    "pretrain": dict(kind="pretrain"),
    "pretrain_concat": dict(kind="pretrain", pack_method="concat"),
    "pretrain_unpacked": dict(kind="pretrain", packing=False),
    "pretrain_one_document": dict(kind="pretrain", one_document=True),  # shifted windows, over 3 epochs
    "sft_mixture": dict(kind="sft", mixture=True),
    "preference": dict(kind="preference"),
    "prompts": dict(kind="prompts"),
}


def case_cfg(case, docs, pairs):
    opts = dict(CASES[case])
    kind, mixture = opts.pop("kind"), opts.pop("mixture", False)
    srcs = {"syn": base.source(format="synthetic")}
    if opts.pop("one_document", False):
        path = os.path.join(os.path.dirname(docs[1]), "play.txt")
        with open(path, "w") as f:
            f.write("".join(f"line {i} of the play.\n" for i in range(100)))
        return kind, data_cfg({"play": base.source(path, "text")}, seq_len=192, **opts)
    if kind == "pretrain":
        srcs["docs"] = base.source(docs[1], "jsonl", weight=0.5)
    if mixture:
        srcs["pairs"] = base.source(pairs[1], "jsonl", weight=2.0)
    return kind, data_cfg(srcs, seq_len=192, **opts)


@pytest.mark.parametrize("case", CASES)
def test_restored_iterator_continues_exactly(case, docs, pairs):
    kind, cfg = case_cfg(case, docs, pairs)
    it = pipeline.train_iterator(cfg, kind, BYTE, seed=5)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 4)
    resumed = pipeline.train_iterator(cfg, kind, BYTE, seed=5)
    resumed.set_state(state)
    assert all(same(x, y) for x, y in zip(expected, take(resumed, 4)))


@pytest.mark.parametrize("case", ["pretrain", "sft_mixture", "prompts"])
def test_two_processes_see_disjoint_shards_that_make_the_one_process_stream(case, docs, pairs):
    kind, cfg = case_cfg(case, docs, pairs)
    whole = take(pipeline.train_iterator(cfg, kind, BYTE, seed=2), 3)
    shards = [take(pipeline.train_iterator(cfg, kind, BYTE, seed=2, process_index=p, process_count=2), 3)
              for p in range(2)]
    for step, batch in enumerate(whole):
        first, second = shards[0][step], shards[1][step]
        assert same(batch, {k: np.concatenate([first[k], second[k]]) for k in batch})
        key = "prompt_tokens" if kind == "prompts" else "tokens"
        assert not any(np.array_equal(x, y) for x in first[key] for y in second[key])


def test_shuffle_is_a_function_of_the_seeds():
    cfg = data_cfg()
    first = lambda c, seed: next(pipeline.train_iterator(c, "sft", BYTE, seed=seed))  # noqa: E731
    assert same(first(cfg, 0), first(cfg, 0))
    assert not np.array_equal(first(cfg, 0)["tokens"], first(cfg, 1)["tokens"])
    assert not np.array_equal(first(cfg, 0)["tokens"], first(data_cfg(shuffle_seed=9), 0)["tokens"])


def test_mixture_follows_the_weights(pairs, tmp_path):
    other = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"B{i}", "completion": "y"} for i in range(7)])
    cfg = data_cfg({"a": base.source(pairs[1], "jsonl", weight=3.0), "b": base.source(other, "jsonl", weight=1.0)},
                   packing=False)
    firsts = [BYTE.decode(b["tokens"][r][2:3].tolist()) for b in take(pipeline.train_iterator(cfg, "sft", BYTE, seed=0), 24)
              for r in range(4)]
    assert firsts.count("A") == 72 and firsts.count("B") == 24  # each slot interleaves A, A, A, B


def test_grain_worker_processes_are_deterministic_and_resumable():
    """data.num_workers = 2 builds batches in two grain worker processes (not one, not in the calling thread),
    and a restored iterator continues exactly."""
    cfg = data_cfg(num_workers=2, batch_size=2)
    it = pipeline.train_iterator(cfg, "sft", BYTE, seed=0)
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    assert len(state["iterators_in_use_indices"]) == 2  # grain's state holds one iterator per worker process
    expected = take(it, 2)
    it.close()
    resumed = pipeline.train_iterator(cfg, "sft", BYTE, seed=0)
    resumed.set_state(state)
    assert all(same(x, y) for x, y in zip(expected, take(resumed, 2)))
    resumed.close()


# -- evaluation -------------------------------------------------------------------------------------
def test_eval_iterator_is_one_padded_pass_split_across_processes():
    cfg = data_cfg(eval_sources={"h": base.source(format="synthetic", start=0.9, end=0.9 + 10 / 300)},
                   batch_size=4)
    batches = list(pipeline.eval_iterator(cfg, "prompts", BYTE, "h"))
    assert len(batches) == 3
    answers = [a for b in batches for a in b["answer"]]
    expected = [synthetic.problem(i).answer for i in range(270, 280)]
    assert answers == expected + ["", ""]
    last = batches[-1]["prompt_segment_ids"]
    assert (last[2:] == 0).all() and (last[:2] > 0).any(axis=1).all()  # two real prompts, two empty rows
    halves = [list(pipeline.eval_iterator(cfg, "prompts", BYTE, "h", process_index=p, process_count=2)) for p in (0, 1)]
    for whole, first, second in zip(batches, *halves):
        assert same(whole, {k: np.concatenate([first[k], second[k]]) for k in whole})
    cfg.seq_len = 512  # whole examples: every solution and its <|end|> trained once
    sft = list(pipeline.eval_iterator(cfg, "sft", BYTE, "h"))
    assert sum(b["loss_mask"].sum() for b in sft) == sum(
        len(synthetic.problem(i).solution.encode()) + 1 for i in range(270, 280))
    with pytest.raises(sources.DataError, match="no evaluation source 'x'"):
        pipeline.eval_iterator(cfg, "sft", BYTE, "x")


# -- global arrays ----------------------------------------------------------------------------------
def test_global_batch_shards_the_batch_dimension_over_the_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    batch = next(pipeline.train_iterator(data_cfg(batch_size=8), "prompts", BYTE, seed=0))
    arrays = loader.global_batch(batch, mesh)
    assert arrays["prompt_tokens"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
    assert len(arrays["prompt_tokens"].addressable_shards) == 8
    assert arrays["prompt_tokens"].addressable_shards[3].data.shape == (1, 128)
    assert np.array_equal(np.asarray(arrays["prompt_tokens"]), batch["prompt_tokens"])
    assert arrays["answer"] is batch["answer"]
