"""Grain pipelines for every stage: `train_iterator` (infinite, shuffled, mixed, resumable) and
`eval_iterator` (one pass, in order).

How a training batch is made:
1. Each source's records become examples (data/examples.py), lazily; a source that is a single
   document (a whole text file) is tokenized once and cut into `seq_len` windows instead, for
   training on a grid shifted by a fresh offset every epoch (`data.shift_windows`), so that the
   model does not see the same windows on every pass.
2. Each source is globally shuffled from the seeds, reshuffled every epoch, and repeated forever.
3. Row slot j of every global batch (j < batch_size) is built from examples j, j+B, j+2B, ... of
   each source, packed into rows of one source each, and the sources' rows are interleaved by
   their weights (`grain.IterDataset.mix`): a weight is a share of rows, that is of tokens.
   A process builds only its own slots, so process p's rows are exactly rows [p*B/P, (p+1)*B/P)
   of the one-process batch, and no process tokenizes another's data.
4. The slots are zipped into a batch. The iterator's `get_state()` is grain's (a JSON-able dict)
   and `set_state()` resumes exactly. Batches are made in the calling thread (JAX dispatches the
   train step asynchronously, so the next batch is built while the step runs); `data.num_workers`
   > 0 makes them in that many grain worker processes instead: deterministic for a given count,
   but another count gives other batches.

Batches are dicts of numpy arrays with a leading per-process batch dimension, per kind:
  pretrain, sft: tokens, targets, segment_ids, positions (int32), loss_mask (float32) and
                 target_bytes (int32, UTF-8 bytes of each trained target), each [B, seq_len]
  preference:    the same six keys prefixed chosen_ and rejected_, one pair per row, and [B] float32
                 ref_chosen_logps / ref_rejected_logps / margin when the pairs carry them
  prompts:       prompt_tokens, prompt_positions, prompt_segment_ids (left-padded), answer (object [B])
"""
from __future__ import annotations

import functools
import zlib
from typing import Any

import grain
import numpy as np
from absl import flags
from grain import experimental as gx

from data import examples, sources, views
from data.examples import Encoder
from data.tokenizer_base import Tokenizer

KINDS = ("pretrain", "sft", "preference", "prompts")
# The batches each training stage reads; stages not listed (the pre-training family) read "pretrain".
STAGE_KINDS = {"sft": "sft", "dpo": "preference", "reward": "preference", "rejection_sampling": "prompts",
               "ppo": "prompts", "grpo": "prompts", "rloo": "prompts"}
PACK_METHODS = ("first_fit", "concat")
# Examples looked at up front: a source whose every one is dropped would make the iterator spin forever.
_PREFLIGHT = 64
# Slots read their examples in the calling thread: the parallelism is across slots and workers.
_IN_THREAD = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def train_iterator(data_cfg: Any, kind: str, tokenizer: Tokenizer, *, seed: int, process_index: int = 0,
                   process_count: int = 1) -> DataIterator:
    """An infinite iterator over this process's batches of `data_cfg.batch_size // process_count` rows."""
    batch, local = _batch_sizes(data_cfg, kind, process_count)
    enc = Encoder.from_config(data_cfg, tokenizer)
    srcs = sources.train_sources(data_cfg, kind)
    # Seeded by name, so that adding a source to a mixture leaves the others' order alone.
    streams = {src.name: _stream(src, enc, kind, data_cfg.shift_windows,
                                 _seed(data_cfg.shuffle_seed, seed, zlib.crc32(src.name.encode()))) for src in srcs}

    def slot(j: int) -> grain.IterDataset:
        rows = {name: _rows(ds[j::batch].to_iter_dataset(_IN_THREAD), kind, data_cfg, tokenizer)
                for name, ds in streams.items()}
        return next(iter(rows.values())) if len(rows) == 1 else grain.IterDataset.mix(
            rows, {src.name: src.weight for src in srcs})

    slots = [slot(j) for j in range(process_index * local, (process_index + 1) * local)]
    ds = gx.ZipIterDataset(slots).map(functools.partial(_assemble, kind, tokenizer.token_bytes()))
    if data_cfg.num_workers > 0:
        # grain's worker processes read absl flags; a program that does not use absl never parses them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
    return DataIterator(iter(ds))


def eval_iterator(data_cfg: Any, kind: str, tokenizer: Tokenizer, name: str, *, process_index: int = 0,
                  process_count: int = 1) -> DataIterator:
    """One pass, in order, over `data_cfg.eval_sources[name]`; the last batch is padded with rows
    whose loss_mask is all zero (for prompts: empty prompts with answer "")."""
    batch, local = _batch_sizes(data_cfg, kind, process_count)
    src = sources.eval_source(data_cfg, kind, name)
    enc = Encoder.from_config(data_cfg, tokenizer)
    rows = _rows(_examples(src, enc, kind).to_iter_dataset(_IN_THREAD), kind, data_cfg, tokenizer)
    # Every process packs the whole (small) evaluation set, so all agree on the number of batches.
    lo, hi = process_index * local, (process_index + 1) * local
    token_bytes = tokenizer.token_bytes()

    def assemble(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        rows = list(rows) + [_empty_row(kind, data_cfg.seq_len, tokenizer.pad_id)] * (batch - len(rows))
        return _assemble(kind, token_bytes, rows[lo:hi])

    return DataIterator(iter(rows.batch(batch, drop_remainder=False, batch_fn=assemble)))


class DataIterator:
    """A grain iterator whose state survives a JSON round trip (orbax `JsonSave`)."""

    def __init__(self, iterator: grain.DatasetIterator):
        self._it = iterator

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return self._it.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(_slices_as_tuples(state))

    def close(self) -> None:
        """Stops grain's worker processes, if any."""
        self._it.close()


def _slices_as_tuples(state: Any) -> Any:
    # grain's concat-then-split packer compares its remainder slices with a tuple sentinel, and
    # JSON gives them back as lists.
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in s.items()} if k == "remainder_slices" else _slices_as_tuples(s))
                for k, s in state.items()}
    if isinstance(state, list):
        return [_slices_as_tuples(s) for s in state]
    return state


def _batch_sizes(data_cfg: Any, kind: str, process_count: int) -> tuple[int, int]:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if data_cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size={data_cfg.batch_size} is not divisible by {process_count} processes")
    if data_cfg.packing and data_cfg.pack_method not in PACK_METHODS:
        raise ValueError(f"data.pack_method={data_cfg.pack_method!r}; expected one of {', '.join(PACK_METHODS)}")
    return data_cfg.batch_size, data_cfg.batch_size // process_count


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1)[0])


def _stream(src: sources.Source, enc: Encoder, kind: str, shift_windows: bool, seed: int) -> grain.MapDataset:
    """The source's training examples, shuffled from `seed`, reshuffled every epoch, repeated forever."""
    if shift_windows and kind == "pretrain" and len(src.records) == 1:
        return _shifted_windows(enc.document(src.records[0])[0], enc.seq_len, seed)
    return _examples(src, enc, kind).shuffle(seed=seed).repeat()


def _shifted_windows(doc: examples.Example, length: int, seed: int) -> grain.MapDataset:
    """One document's windows of `length` positions, every epoch on a grid shifted by an offset in
    [0, length) drawn from `seed` and the epoch: each epoch covers the document once (but for the few
    positions the shift leaves out at its ends), and a token comes with other context each time."""
    n_tokens = len(doc["tokens"])
    n = max(1, (n_tokens - length + 1) // length)  # windows per epoch, whole at every offset
    shifts = min(length, max(n_tokens - n * length, 0) + 1)

    def window(index: int, i: int) -> examples.Example:
        start = _seed(seed, index // n) % shifts + i * length
        return {k: v[start:start + length] for k, v in doc.items()}

    return grain.MapDataset.range(n).shuffle(seed=seed).repeat().map_with_index(window)


def _examples(src: sources.Source, enc: Encoder, kind: str) -> grain.MapDataset:
    """The source's examples (None where one is dropped), checked to yield something."""
    if kind == "pretrain" and len(src.records) == 1:
        # One document (a whole text file): tokenize it once and cut it into row-sized windows, so
        # that shuffling and slot assignment work at the level of windows.
        pieces = examples.windows(enc.document(src.records[0])[0], enc.seq_len)
        return grain.MapDataset.source(pieces)
    first = [enc(kind, src.records[i]) for i in range(min(len(src.records), _PREFLIGHT))]
    if all(ex is None for ex, _ in first):
        counts = ", ".join(f"{s}: {n}" for s in examples.STATUSES if (n := [st for _, st in first].count(s)))
        raise sources.DataError(
            f"source {src.name} ({src.where}): the first {len(first)} examples were all dropped ({counts}); "
            f"data.seq_len={enc.seq_len} may be too short (data.truncate={enc.truncate})")
    return src.records.map(lambda record: enc(kind, record)[0])


def _rows(ds: grain.IterDataset, kind: str, data_cfg: Any, tokenizer: Tokenizer) -> grain.IterDataset:
    """Examples -> rows of `seq_len` (packed or one per row), without target_bytes."""
    length, pad = data_cfg.seq_len, tokenizer.pad_id
    if kind == "preference":
        return ds.map(functools.partial(_pair_row, length, pad))
    if kind == "prompts":
        return ds.map(functools.partial(_prompt_row, length, pad))
    if kind == "pretrain" and not (data_cfg.packing and data_cfg.pack_method == "concat"):
        ds = gx.FlatMapIterDataset(ds, _Windows(length))  # long documents become several pieces
    if not data_cfg.packing:
        return ds.map(functools.partial(_padded_row, length, pad, ""))
    lengths = {"tokens": length, "targets": length, "loss_mask": length}
    if data_cfg.pack_method == "concat":
        packed = gx.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    else:
        packed = gx.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=data_cfg.packing_bins,
                                            shuffle_bins=False, padding_struct={"tokens": pad, "targets": pad,
                                                                                "loss_mask": 0.0})
    return packed.map(functools.partial(_packed_row, pad))


class _Windows(gx.FlatMapTransform):
    """A document -> its pieces of at most `length` positions."""

    def __init__(self, length: int):
        self.length = length
        self.max_fan_out = 2**31  # pieces per document are not bounded

    def flat_map(self, example: examples.Example) -> list[examples.Example]:
        return examples.windows(example, self.length)


def _packed_row(pad: int, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segments = packed["tokens_segment_ids"].astype(np.int32)
    real = segments > 0
    return {"tokens": np.where(real, packed["tokens"], pad).astype(np.int32),
            "targets": np.where(real, packed["targets"], pad).astype(np.int32),
            "loss_mask": np.where(real, packed["loss_mask"], 0).astype(np.float32),
            "segment_ids": segments, "positions": np.where(real, packed["tokens_positions"], 0).astype(np.int32)}


def _padded_row(length: int, pad: int, prefix: str, example: examples.Example) -> dict[str, np.ndarray]:
    """One example at the start of a row, right-padded (segment 0)."""
    n = len(example[f"{prefix}tokens"])
    row = {"tokens": np.full(length, pad, np.int32), "targets": np.full(length, pad, np.int32),
           "loss_mask": np.zeros(length, np.float32), "segment_ids": np.zeros(length, np.int32),
           "positions": np.zeros(length, np.int32)}
    row["tokens"][:n], row["targets"][:n] = example[f"{prefix}tokens"], example[f"{prefix}targets"]
    row["loss_mask"][:n], row["segment_ids"][:n], row["positions"][:n] = example[f"{prefix}loss_mask"], 1, np.arange(n)
    return row


def _pair_row(length: int, pad: int, pair: examples.Example) -> dict[str, np.ndarray]:
    row = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in _padded_row(length, pad, f"{side}_", pair).items()}
    return dict(row, **{k: pair[k] for k in views.PAIR_FIELDS if k in pair})


def _prompt_row(length: int, pad: int, example: examples.Example) -> dict[str, Any]:
    """A prompt at the end of a row (left-padded, segment 0), so generation continues after it."""
    ids = example["prompt"]
    row = {"prompt_tokens": np.full(length, pad, np.int32), "prompt_positions": np.zeros(length, np.int32),
           "prompt_segment_ids": np.zeros(length, np.int32), "answer": example["answer"]}
    if len(ids):
        row["prompt_tokens"][-len(ids):], row["prompt_positions"][-len(ids):] = ids, np.arange(len(ids))
        row["prompt_segment_ids"][-len(ids):] = 1
    return row


def _empty_row(kind: str, length: int, pad: int) -> dict[str, Any]:
    if kind == "prompts":
        return _prompt_row(length, pad, {"prompt": np.zeros(0, np.int32), "answer": ""})
    empty = {k: np.zeros(0, np.int32) for k in ("tokens", "targets", "loss_mask")}
    if kind == "preference":
        return _pair_row(length, pad, {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in empty.items()})
    return _padded_row(length, pad, "", empty)


def _with_pair_fields(rows: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair rows each with the same optional numbers (precomputed reference log-probs, margins) or
    without: empty (padding) rows get zeros; a real pair lacking one that others carry is an error."""
    out = list(rows)
    for field in views.PAIR_FIELDS:
        if not any(field in r for r in out):
            continue
        for i, r in enumerate(out):
            if field not in r:
                if r["chosen_loss_mask"].any():
                    raise sources.DataError(f"a batch mixes pairs with {field!r} and pairs without; give it to every "
                                            "pair of every preference source, or to none")
                out[i] = dict(r, **{field: np.float32(0.0)})
    return out


def _assemble(kind: str, token_bytes: np.ndarray, rows: tuple[dict[str, Any], ...] | list[dict[str, Any]]
              ) -> dict[str, np.ndarray]:
    """Rows -> a batch; adds target_bytes (the bytes-per-token of trained targets, for bits-per-byte)."""
    rows = _with_pair_fields(rows) if kind == "preference" else rows
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "answer"}
    if kind == "prompts":
        batch["answer"] = np.array([r["answer"] for r in rows], dtype=object)
        return batch
    for prefix in (("chosen_", "rejected_") if kind == "preference" else ("",)):
        trained = batch[f"{prefix}loss_mask"] > 0
        batch[f"{prefix}target_bytes"] = np.where(trained, token_bytes[batch[f"{prefix}targets"]], 0).astype(np.int32)
    return batch


def combine_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One JSON object for the iterator states of every process of a run (process order); a single
    process's state is kept as it is."""
    return states[0] if len(states) == 1 else {"processes": states}


def process_state(saved: dict[str, Any], process_index: int, process_count: int) -> dict[str, Any]:
    """This process's iterator state from `combine_states`' object, also when the run that saved it had
    a different number of processes: each process reads batch slots (its rows of every global batch),
    so the slots of all processes, in order, are re-divided (in-thread iterators only; with
    data.num_workers the counts must match)."""
    states = saved.get("processes", [saved])
    if len(states) == process_count:
        return states[process_index]
    if not all(set(s) == {"parents"} for s in states):
        raise ValueError(f"the checkpoint's data state was saved by {len(states)} processes and this run has "
                         f"{process_count}; with data.num_workers > 0 resume with {len(states)} processes")
    slots = [slot for s in states for slot in s["parents"]]
    if len(slots) % process_count:
        raise ValueError(f"the checkpoint's {len(slots)} batch slots do not split over {process_count} processes")
    local = len(slots) // process_count
    return {"parents": slots[process_index * local:(process_index + 1) * local]}
