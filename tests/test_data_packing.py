"""Packing, property-based: for any document lengths and loss masks, both pack methods make rows
whose segments are whole or cut documents, never mixed, with nothing lost and nothing doubled."""
import collections
import types

import grain
import numpy as np
from hypothesis import given, settings, strategies as st

from configs import base
from data import examples, pipeline

# Padding is not always id 0 (a tokenizer without a padding token, as Llama 2's, pads with its EOS).
PAD_999 = types.SimpleNamespace(pad_id=999)


# Random documents: document d's token i is 1000 * (d + 1) + i, so a token says which document it
# is from and where; each document has its own random loss mask.
DOCUMENTS = st.lists(st.lists(st.booleans(), min_size=2, max_size=60), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, derandomize=True)  # the same examples every run
@given(masks=DOCUMENTS, seq_len=st.integers(4, 24), bins=st.integers(1, 3),
       method=st.sampled_from(pipeline.PACK_METHODS))
def test_packing_properties(masks, seq_len, bins, method):
    """Whatever the lengths and masks: segments are contiguous pieces of one document each, with
    positions from 0; padding is segment 0 and untrained; every (token, target, mask) is kept once."""
    docs = [examples.shift(1000 * (d + 1) + np.arange(len(m)), m) for d, m in enumerate(masks)]
    cfg = base.get_config().data
    cfg.seq_len, cfg.packing, cfg.pack_method, cfg.packing_bins = seq_len, True, method, bins
    ds = grain.MapDataset.source(docs).to_iter_dataset()
    rows = list(pipeline._rows(ds, "pretrain", cfg, PAD_999))
    packed = collections.Counter()
    for n, row in enumerate(rows):
        seg, tokens, targets, mask = row["segment_ids"], row["tokens"], row["targets"], row["loss_mask"]
        assert all(len(v) == seq_len for v in row.values())
        ids = [s for s in dict.fromkeys(seg.tolist()) if s > 0]
        assert ids == list(range(1, len(ids) + 1))  # numbered in order
        for s in ids:
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))
            assert np.array_equal(row["positions"][where], np.arange(len(where)))
            # One contiguous piece of one document, and no target from another document.
            assert np.array_equal(tokens[where], tokens[where[0]] + np.arange(len(where)))
            assert np.array_equal(targets[where], tokens[where] + 1) and len(set(targets[where] // 1000)) == 1
        pad = seg == 0
        assert np.array_equal(pad, tokens < 1000) and not mask[pad].any()
        assert (tokens[pad] == 999).all() and (targets[pad] == 999).all()
        assert not row["positions"][pad].any()
        if method == "concat" and n < len(rows) - 1:
            assert not pad.any()  # only the stream's last row is padded
        packed.update(zip(tokens[~pad].tolist(), targets[~pad].tolist(), mask[~pad].tolist()))
    given_ = collections.Counter(t for d in docs for t in zip(d["tokens"].tolist(), d["targets"].tolist(),
                                                              d["loss_mask"].tolist()))
    assert packed == given_
