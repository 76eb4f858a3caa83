"""Data pipeline throughput: tokens per second that the pipelines deliver, on one process.

  python -m benchmarks.data_throughput [--batches=N]      (needs $KILN_DATA_DIR)

Rows: pre-training on tinyshakespeare.txt (the whole file as one document, cut into windows; and
split into paragraphs, tokenized on the fly and first-fit packed), and SFT packing on GSM8K, each
with the byte tokenizer and with a 2048-piece BPE trained on that source. A token is a
non-padding position of a batch. "setup" is the time to build the iterator (reading and, for
a whole-file document, tokenizing it), "tokens/s" the steady state after the first batch.
The last line is one JSON object with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from ml_collections import ConfigDict

from benchmarks import positive
from configs import base
from data import pipeline, tokenizer as tokenizers


def config(source: ConfigDict, seq_len: int, batch_size: int, separator: str = "") -> ConfigDict:
    c = base.get_config().data
    c.sources = ConfigDict({"train": source})
    c.seq_len, c.batch_size, c.text_separator = seq_len, batch_size, separator
    return c


def measure(data_cfg: ConfigDict, kind: str, tok: tokenizers.Tokenizer, batches: int) -> dict[str, float]:
    start = time.perf_counter()
    it = pipeline.train_iterator(data_cfg, kind, tok, seed=0)
    next(it)
    setup = time.perf_counter() - start
    tokens = positions = 0
    start = time.perf_counter()
    for _ in range(batches):
        segments = next(it)["segment_ids"]
        tokens += int((segments > 0).sum())
        positions += segments.size
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "setup_s": setup, "padding": 1 - tokens / positions}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln bench data", description=__doc__)
    p.add_argument("--batches", type=positive(int), default=40, help="batches timed per row (default 40)")
    args = p.parse_args(argv)
    root = os.environ.get("KILN_DATA_DIR")
    if not root:
        print("benchmarks.data_throughput: error: set KILN_DATA_DIR to the shared data directory", file=sys.stderr)
        return 1
    shakespeare = base.source(f"{root}/tinyshakespeare.txt", "text")
    gsm8k = base.source(f"{root}/gsm8k/train.jsonl", "gsm8k")
    cases = [("pretrain", "tinyshakespeare, whole file", config(shakespeare, 256, 16)),
             ("pretrain", "tinyshakespeare, paragraphs", config(shakespeare, 256, 16, separator="\n\n")),
             ("sft", "gsm8k train", config(gsm8k, 1024, 16))]
    figures = {}
    print(f"{'pipeline':<10} {'data':<30} {'tokenizer':<10} {'seq x batch':>12} {'setup s':>8} "
          f"{'padding':>8} {'tokens/s':>10}")
    with tempfile.TemporaryDirectory() as scratch:
        for kind, name, data_cfg in cases:
            for tok_name in ("byte", "bpe2048"):
                if tok_name == "byte":
                    tok = tokenizers.load("byte")
                else:  # a BPE trained on this source, as `data.tokenizer="train"` does
                    data_cfg.tokenizer = "train"
                    tok = tokenizers.resolve(data_cfg, os.path.join(scratch, kind + name))
                r = measure(data_cfg, kind, tok, args.batches)
                print(f"{kind:<10} {name:<30} {tok_name:<10} {data_cfg.seq_len:>5} x {data_cfg.batch_size:<4} "
                      f"{r['setup_s']:>8.2f} {100 * r['padding']:>7.1f}% {r['tokens_per_s']:>10,.0f}")
                key = f"{kind}_{name.split(',')[0].split()[0]}{'_paragraphs' if 'paragraphs' in name else ''}_{tok_name}"
                figures[f"{key}_tokens_per_s"] = round(r["tokens_per_s"])
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
