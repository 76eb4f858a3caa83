"""`kiln data preview --config=FILE[:variant] [--config.KEY=VALUE ...] [--num_examples=N] [--kind=KIND]`

Prints the first N rows of the training pipeline as the model sees them, decoded: trained text
(loss on) inside ⟦ ⟧, special tokens by name inside ⟪ ⟫ (so that text which merely spells one,
such as a typed "<|user|>", stays plain and tells itself apart; a marker character typed in text
is doubled), each packed segment on its own, padding counted;
then statistics: per-source kept / truncated / dropped counts and tokens per example, and the
padding and trained fractions of the batches shown. The output is a function of the config alone.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from typing import Any

import numpy as np

from data import pipeline, stats, tokenizer as tokenizers
from data.tokenizer import Tokenizer
from launch.config import ConfigError, load_config
from train.build import tokenizer_name

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"
SPECIAL_OPEN, SPECIAL_CLOSE = "⟪", "⟫"
# Marker characters typed in text are doubled, so a lone marker is always the preview's own.
_ESCAPE = str.maketrans({c: c * 2 for c in TRAINED_OPEN + TRAINED_CLOSE + SPECIAL_OPEN + SPECIAL_CLOSE})
_MIN_STAT_BATCHES = 4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["preview", "reference"], help="reference: see `kiln data reference --help`")
    p.add_argument("--config", required=True, help="configs/STAGE.py[:variant]")
    p.add_argument("--num_examples", type=int, default=3, help="rows to print (default 3)")
    p.add_argument("--kind", choices=pipeline.KINDS, default=None,
                   help="pipeline to preview (default: the config's stage decides)")
    p.add_argument("--max_stat_examples", type=int, default=1000,
                   help="examples per source that the statistics look at (default 1000)")
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["reference"]:
        from launch import reference_cli
        return reference_cli.main(argv[1:])
    args, rest = parser().parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        raise ConfigError(f"unknown argument(s) {' '.join(unknown)}; expected --config.KEY=VALUE overrides")
    for flag in ("num_examples", "max_stat_examples"):  # 0 statistics printed "-3 examples: ok 0, ..."
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be positive, got {getattr(args, flag)}")
    config = load_config(args.config, rest)
    kind = args.kind or pipeline.STAGE_KINDS.get(config.stage, "pretrain")
    data = config.data
    data.tokenizer = tokenizer_name(config)
    with tempfile.TemporaryDirectory() as scratch:  # "train" tokenizers are trained here, deterministically
        tok = tokenizers.resolve(data, scratch)
        # Everything that can fail on bad data runs before anything is printed.
        num_batches = max(math.ceil(args.num_examples / data.batch_size), _MIN_STAT_BATCHES)
        it = pipeline.train_iterator(data, kind, tok, seed=config.seed)
        batches = [next(it) for _ in range(num_batches)]
        it.close()
        summary = stats.summarize(data, kind, tok, max_examples=args.max_stat_examples)
        print(f"kiln data preview: {args.config}, stage {config.stage}, {kind} pipeline, seed {config.seed}")
        print(f"tokenizer {data.tokenizer} (vocab {tok.vocab_size}), seq_len {data.seq_len}, "
              f"global batch {data.batch_size}, packing {data.pack_method if data.packing else 'off'}, "
              f"chat template {data.chat_template}")
        print(f"legend: {TRAINED_OPEN}trained{TRAINED_CLOSE} (loss on), other text untrained; "
              f"{SPECIAL_OPEN}<special>{SPECIAL_CLOSE} a special token (text that spells one stays plain, "
              "a marker typed in text is doubled); [segment N ...] starts a packed sequence")
        rows = [(b, r) for b in range(num_batches) for r in range(data.batch_size)][:args.num_examples]
        for b, r in rows:
            print(f"\n=== batch {b}, row {r} ===")
            print(render_row(batches[b], r, kind, tok))
    print(f"\nstatistics: first {args.max_stat_examples} examples of each source")
    for s in summary:
        print(f"  {s.line()}")
    print(f"  batches {num_batches} x {data.batch_size}: {stats.batch_stats(batches, kind)}")
    return 0


def render_row(batch: dict[str, Any], r: int, kind: str, tok: Tokenizer) -> str:
    """One row of a batch as text."""
    if kind == "prompts":
        segments = batch["prompt_segment_ids"][r]
        ids = batch["prompt_tokens"][r][segments > 0]
        return (f"[{int((segments == 0).sum())} left-padding positions]\n{_text(ids.tolist(), tok)}\n"
                f"[reference answer: {batch['answer'][r]!r}]")
    if kind == "preference":
        return "\n".join(f"--- {side} ---\n{_sequence(batch, r, side + '_', tok)}" for side in ("chosen", "rejected"))
    return _sequence(batch, r, "", tok)


def _sequence(batch: dict[str, Any], r: int, prefix: str, tok: Tokenizer) -> str:
    """The packed segments of one row: each segment is its first input then its targets."""
    tokens, targets = batch[f"{prefix}tokens"][r], batch[f"{prefix}targets"][r]
    mask, segments = batch[f"{prefix}loss_mask"][r] > 0, batch[f"{prefix}segment_ids"][r]
    out = []
    for seg in [s for s in np.unique(segments) if s > 0]:
        where = np.flatnonzero(segments == seg)
        ids = [int(tokens[where[0]])] + targets[where].tolist()
        trained = [False] + mask[where].tolist()
        out.append(f"[segment {seg}: {len(where)} positions, {int(mask[where].sum())} trained]\n"
                   f"{_spans(ids, trained, tok)}")
    padding = int((segments == 0).sum())
    if padding:
        out.append(f"[padding: {padding} positions]")
    return "\n".join(out)


def _spans(ids: list[int], trained: list[bool], tok: Tokenizer) -> str:
    """Text with the trained runs bracketed."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = _text(ids[start:i], tok)
            out.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained[start] else text)
            start = i
    return "".join(out)


def _text(ids: list[int], tok: Tokenizer) -> str:
    """Decoded text (marker characters doubled), special tokens written as their names inside ⟪ ⟫."""
    out, run = [], []
    for t in ids:
        if tok.is_special(t):
            out.append(tok.decode(run).translate(_ESCAPE) + f"{SPECIAL_OPEN}{tok.piece(t)}{SPECIAL_CLOSE}")
            run = []
        else:
            run.append(t)
    return "".join(out) + tok.decode(run).translate(_ESCAPE)
