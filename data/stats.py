"""What a pipeline does to its data, in numbers: kept, truncated and dropped examples per source,
tokens per example, and the padding and trained fractions of batches."""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable

import numpy as np

from data import examples, sources
from data.examples import Encoder
from data.tokenizer_base import Tokenizer


@dataclasses.dataclass
class SourceStats:
    name: str
    where: str
    examples: int                    # examples looked at
    statuses: dict[str, int]         # examples.STATUSES -> count
    skipped_on_load: int             # bad records skipped while reading the file
    tokens: list[int]                # length of each kept example (a pair: chosen + rejected)

    def line(self) -> str:
        counts = ", ".join(f"{s} {self.statuses.get(s, 0)}" for s in examples.STATUSES)
        lengths = (f"; tokens per example mean {np.mean(self.tokens):.1f}, min {min(self.tokens)}, "
                   f"max {max(self.tokens)}") if self.tokens else ""
        return (f"source {self.name} ({self.where}): {self.examples} examples: {counts}; "
                f"bad records skipped on load {self.skipped_on_load}{lengths}")


def summarize(data_cfg: Any, kind: str, tokenizer: Tokenizer, *, max_examples: int = 1000) -> list[SourceStats]:
    """Counts over the first `max_examples` records of each training source, in file order."""
    enc = Encoder.from_config(data_cfg, tokenizer)
    out = []
    for src in sources.train_sources(data_cfg, kind):
        statuses: collections.Counter[str] = collections.Counter()
        tokens = []
        n = min(len(src.records), max_examples)
        for i in range(n):
            example, status = enc(kind, src.records[i])
            statuses[status] += 1
            if example is not None:
                tokens.append(_length(kind, example))
        out.append(SourceStats(src.name, src.where, n, dict(statuses), src.skipped, tokens))
    return out


def _length(kind: str, example: examples.Example) -> int:
    if kind == "prompts":
        return len(example["prompt"])
    if kind == "preference":
        return len(example["chosen_tokens"]) + len(example["rejected_tokens"])
    return len(example["tokens"])


def batch_stats(batches: Iterable[dict[str, np.ndarray]], kind: str) -> str:
    """One line: rows, padding fraction and trained fraction over `batches`."""
    prefixes = {"prompts": ("prompt_",), "preference": ("chosen_", "rejected_")}.get(kind, ("",))
    positions = padding = trained = rows = documents = 0
    for batch in batches:
        for p in prefixes:
            segments = batch[f"{p}segment_ids"]
            positions += segments.size
            padding += int((segments == 0).sum())
            documents += int(segments.max(axis=1).sum())
            if kind != "prompts":
                trained += int(batch[f"{p}loss_mask"].sum())
        rows += len(batch[f"{prefixes[0]}segment_ids"])
    line = (f"{rows} rows, {documents / max(rows, 1):.2f} sequences per row, "
            f"padding {100 * padding / max(positions, 1):.1f}%")
    return line if kind == "prompts" else f"{line}, trained tokens {100 * trained / max(positions, 1):.1f}%"
