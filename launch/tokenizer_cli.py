"""`kiln tokenizer --input=FILES --vocab_size=N --model_type=bpe|unigram --out=PATH`

Trains a sentencepiece tokenizer on text files (comma-separated paths or glob patterns; UTF-8
text, or .jsonl / .jsonl.gz whose records' `--text_field` is used): byte fallback, digits split
one per token, ids 0-3 pad/bos/eos/unk, then the chat control tokens as control symbols. Lines
over sentencepiece's 64 KB sentence limit are cut into pieces (and counted). The same inputs and
settings always give the same model.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Iterator

from ml_collections import ConfigDict

from data import sources, spm, tokenizer as tokenizers


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="comma-separated files or glob patterns")
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--model_type", choices=spm.MODEL_TYPES, default="bpe")
    p.add_argument("--split_digits", action=argparse.BooleanOptionalAction, default=True,
                   help="every digit its own piece (default); --no-split_digits lets numbers merge with a space")
    p.add_argument("--newlines", action="store_true",
                   help="pieces may span line breaks (train on whole texts rather than lines)")
    p.add_argument("--out", required=True, help="where to write the .model file")
    p.add_argument("--text_field", default="text", help="the text field of .jsonl inputs (default: text)")
    p.add_argument("--skip_bad_records", action="store_true",
                   help="skip .jsonl records that are not JSON objects with the text field (and count them)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    paths = input_paths(args.input)
    check_out(args.out, paths)
    num_cut = spm.train(_texts(paths, args.text_field, args.skip_bad_records), args.out, vocab_size=args.vocab_size,
                        model_type=args.model_type, split_digits=args.split_digits,
                        newlines=args.newlines)
    tok = tokenizers.load(args.out)
    cut = f"; {num_cut} line(s) over 64 KB cut into pieces" if num_cut else ""
    print(f"wrote {args.out}: sentencepiece {args.model_type}, vocab {tok.vocab_size}, from {len(paths)} file(s){cut}")
    return 0


def input_paths(spec: str) -> list[str]:
    """The files that `spec` names, in order; a clear error for a pattern that matches nothing."""
    paths = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        matches = sorted(glob.glob(sources.expand_path(part, "--input")))
        if not matches:
            raise sources.DataError(f"--input {part!r} matches no file")
        paths += matches
    if not paths:
        raise sources.DataError("--input names no file")
    seen: dict[str, str] = {}  # real path -> the name it was first given as
    for path in paths:  # a file read twice would weigh double in the vocabulary, in silence
        first = seen.get(os.path.realpath(path))
        if first is not None:
            also = f" (also as {path})" if path != first else ""
            raise sources.DataError(f"--input names {first} twice{also}; name each file once")
        seen[os.path.realpath(path)] = path
    return paths


def check_out(out: str, inputs: list[str]) -> None:
    """DataError, before any training, if writing `out` would replace an input file or cannot work."""
    if not out.strip():
        raise sources.DataError("--out is empty; name the file to write, such as tokenizer.model")
    above = sources.file_above(out)  # the directories missing are made
    if above:
        raise sources.DataError(f"--out {out}: {above} is a file, not a directory; name a file in a directory")
    if os.path.isdir(out):
        raise sources.DataError(f"--out {out} is a directory; name the file to write, such as "
                                f"{os.path.join(out, 'tokenizer.model')}")
    if any(os.path.exists(out) and os.path.samefile(out, p) for p in inputs):
        raise sources.DataError(f"--out {out} is one of the --input files: writing it would replace the text; "
                                "name another file")


def _texts(paths: list[str], text_field: str, skip_bad: bool) -> Iterator[str]:
    # The data layer's readers, so bad UTF-8 or JSON is reported with its file and line.
    data_cfg = ConfigDict(dict(text_separator="", skip_bad_records=skip_bad))
    for path in paths:
        fmt = "jsonl" if path.endswith((".jsonl", ".jsonl.gz")) else "text"
        src = ConfigDict(dict(path=path, format=fmt, weight=1.0))
        if fmt == "jsonl":
            src.text_field = text_field
        try:
            loaded = sources.load(path, src, data_cfg, "pretrain")
        except sources.BadRecordError as e:  # there is no data.skip_bad_records here
            raise sources.BadRecordError(e.where, e.why, "pass --skip_bad_records") from None
        if loaded.skipped:
            print(f"{path}: {loaded.skipped} bad record(s) skipped", file=sys.stderr)
        for record in loaded.records:
            yield record["text"]
