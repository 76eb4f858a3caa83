"""Data sources: a named config entry {path, format, weight, ...} becomes records for a pipeline kind.

Formats: `synthetic` (built-in arithmetic task, no file), `text` (.txt: documents split by
`data.text_separator`, "" = the whole file is one document; Windows line ends read as "\n"), `jsonl` (.jsonl / .jsonl.gz, field
names configurable per source), `array_record` (each record a UTF-8 JSON object, read lazily),
`gsm8k` and `hh_rlhf`. A synthetic source may set its own `max_digits` / `min_ops` / `max_ops` /
`problems_per_document` (default `data.synthetic.*`). Every source takes `start` / `end` fractions selecting a contiguous slice
of its records (of its characters when it is a single text document).

Records, by kind (chats are lists of {role, content}; a prompt/completion pair becomes a user
and an assistant turn):
  pretrain    {"text": str}
  sft         {"messages": chat}
  preference  {"prompt": chat, "chosen": str, "rejected": str} (JSON Lines may add the reference model's
              summed log-probs of each reply, "ref_chosen_logps" and "ref_rejected_logps" (`kiln data
              reference`), and a reward-model "margin" by which chosen should win (Llama 2))
  prompts     {"prompt": chat, "answer": str}        (the reference answer for verifiers)
  tokenizer   {"text": str}                          (all of a record's text, to train tokenizers on)

JSON Lines sources are read whole when loaded, so every malformed line is reported up front
with its file and line number (or skipped and counted under `data.skip_bad_records`).
"""
from __future__ import annotations

import codecs
import dataclasses
import glob
import gzip
import json
import math
import os
import re
from typing import Any, Callable, Iterator

import grain

from data import synthetic, views
from data.views import RecordError

KINDS = ("pretrain", "sft", "preference", "prompts", "tokenizer")
FORMATS = ("synthetic", "text", "jsonl", "array_record", "gsm8k", "hh_rlhf")
_OPTIONS = {"synthetic": ("max_digits", "min_ops", "max_ops", "problems_per_document"), "text": (), "jsonl": tuple(views.FIELDS), "array_record": tuple(views.FIELDS),
            "gsm8k": ("calculator_annotations",), "hh_rlhf": ()}
_COMMON = ("path", "format", "weight", "start", "end")
_KINDS_OF = {"text": ("pretrain", "tokenizer"), "gsm8k": ("pretrain", "sft", "prompts", "tokenizer")}


class DataError(ValueError):
    """Bad data or a bad source entry, naming the file (and line) where there is one."""


class BadRecordError(DataError):
    """A malformed record that data.skip_bad_records would skip: `where` (file and line, or record index) and
    `why`; the message ends with how to skip such records, `skip_hint` (a command without that config key, such
    as kiln tokenizer, re-raises it with its own)."""

    def __init__(self, where: str, why: str, skip_hint: str = "set data.skip_bad_records=true"):
        super().__init__(f"{where}: {why} ({skip_hint} to skip such records)")
        self.where, self.why, self.skip_hint = where, why, skip_hint

    def __reduce__(self):  # raised in a data worker process, it is pickled back to the trainer
        return type(self), (self.where, self.why, self.skip_hint)


@dataclasses.dataclass
class Source:
    """A loaded source. `records` holds the kind's records; a lazily read format (array_record)
    yields None for a bad record skipped under `data.skip_bad_records`."""
    name: str
    weight: float
    records: grain.MapDataset
    skipped: int  # bad records skipped while loading
    where: str


def expand_path(path: str, what: str) -> str:
    """`path` with `$VARS` and `~` expanded; a clear error naming an unset variable."""
    missing = [v for v in re.findall(r"\$\{?(\w+)\}?", path) if v not in os.environ]
    if missing:
        raise DataError(f"{what} path {path!r} uses ${missing[0]}, which is not set")
    return os.path.expanduser(os.path.expandvars(path))


def file_above(path: str) -> str | None:
    """The first of the directories above `path` that exists, when it is a file: making `path` would fail
    (NotADirectoryError), found before any work rather than once the output is ready."""
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    return None if os.path.isdir(above) else above


def train_sources(data_cfg: Any, kind: str) -> list[Source]:
    """The training sources with a positive weight (the mixture); weight 0 switches a source off."""
    for name, src in data_cfg.sources.items():
        if not isinstance(src.weight, (int, float)) or not math.isfinite(src.weight) or src.weight < 0:
            raise DataError(f"source {name}: weight {src.weight} must be a finite number >= 0")
    if not any(src.weight > 0 for src in data_cfg.sources.values()):
        raise DataError("every training source has weight 0 (or there is none): data.sources needs a positive weight")
    return [load(name, src, data_cfg, kind) for name, src in data_cfg.sources.items() if src.weight > 0]


def eval_source(data_cfg: Any, kind: str, name: str) -> Source:
    """The evaluation source `name`."""
    if name not in data_cfg.eval_sources:
        known = ", ".join(data_cfg.eval_sources) or "none"
        raise DataError(f"no evaluation source {name!r} in data.eval_sources (defined: {known})")
    return load(name, data_cfg.eval_sources[name], data_cfg, kind)


def tokenizer_texts(data_cfg: Any) -> Iterator[str]:
    """All text of every training source (in order), for training a tokenizer."""
    for src in train_sources(data_cfg, "tokenizer"):
        for record in src.records:
            if record is not None:
                yield record["text"]


def load(name: str, src: Any, data_cfg: Any, kind: str, head: int = 0) -> Source:
    """Reads source entry `src` (named `name`) as records of `kind`; `head` > 0 reads only the first `head`
    records of a JSON Lines file, with no slice taken (a check of a file too large to read twice)."""
    fmt = src.format
    if fmt not in FORMATS:
        raise DataError(f"source {name}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS[:-1])}")
    unknown = sorted(set(src.keys()) - set(_COMMON) - set(_OPTIONS[fmt]))
    if unknown:
        raise DataError(f"source {name}: unknown field(s) {', '.join(unknown)} for format {fmt!r}; "
                        f"it takes {', '.join(_COMMON + _OPTIONS[fmt])}")
    if kind not in _KINDS_OF.get(fmt, KINDS):
        raise DataError(f"source {name}: format {fmt!r} has no {kind} records (it gives: "
                        f"{', '.join(k for k in _KINDS_OF[fmt] if k != 'tokenizer')})")
    start, end = float(src.get("start", 0.0)), float(src.get("end", 1.0))
    if not 0.0 <= start < end <= 1.0:
        raise DataError(f"source {name}: start={start}, end={end}; need 0 <= start < end <= 1")
    if fmt == "synthetic":
        return _synthetic(name, src, data_cfg, kind, start, end)
    path = expand_path(src.path, f"source {name}")
    if fmt == "array_record":
        return _array_record(name, src, data_cfg, kind, path, start, end)
    if not os.path.isfile(path):
        # "not found" sent the user to check a path that exists: a directory, or a pattern of files.
        if os.path.isdir(path):
            raise DataError(f"source {name}: {path!r} is a directory; format {fmt!r} reads one file: name it")
        if glob.glob(path):
            raise DataError(f"source {name}: {path!r} is a pattern; format {fmt!r} reads one file: give each file a "
                            "source of its own (array_record sources take patterns)")
        raise DataError(f"source {name}: file {path!r} not found")
    if fmt == "text":
        records = [{"text": doc} for doc in _text_documents(path, data_cfg.text_separator, start, end)]
        skipped = 0
    else:
        view = {"jsonl": views.jsonl(src, kind), "gsm8k": views.gsm8k(src, kind), "hh_rlhf": views.hh_rlhf(kind)}[fmt]
        records, skipped = _read_json_lines(path, view, data_cfg.skip_bad_records, head)
        if not head:
            lo, hi = _bounds(len(records), start, end)
            records = records[lo:hi]
    if not records:
        why = f" ({skipped} bad records skipped)" if skipped else ""
        raise DataError(f"source {name}: {path} has no records in [start={start}, end={end}]{why}")
    return Source(name, float(src.weight), grain.MapDataset.source(records), skipped, path)


def _bounds(n: int, start: float, end: float) -> tuple[int, int]:
    """The index range [lo, hi) of the fractions [start, end) of n items."""
    return round(n * start), round(n * end)


# -- formats ---------------------------------------------------------------------------------------
def _synthetic(name: str, src: Any, data_cfg: Any, kind: str, start: float, end: float) -> Source:
    cfg = data_cfg.synthetic
    lo, hi = _bounds(cfg.num_examples, start, end)
    if hi <= lo:
        raise DataError(f"source {name}: no synthetic examples in [start={start}, end={end}] of "
                        f"data.synthetic.num_examples={cfg.num_examples}")
    seed, digits = int(cfg.seed), int(src.get("max_digits", cfg.max_digits))
    min_ops, max_ops = int(src.get("min_ops", cfg.min_ops)), int(src.get("max_ops", cfg.max_ops))
    if not 1 <= min_ops <= max_ops:
        raise DataError(f"source {name}: the synthetic task needs 1 <= min_ops <= max_ops, got {min_ops} and {max_ops}")
    per_doc = int(src.get("problems_per_document", cfg.problems_per_document))
    if per_doc < 1:
        raise DataError(f"source {name}: problems_per_document must be at least 1, got {per_doc}")

    def get(i: int) -> synthetic.Problem:
        return synthetic.problem(i, seed=seed, max_digits=digits, max_ops=max_ops, min_ops=min_ops)

    if kind in ("pretrain", "tokenizer") and per_doc > 1:
        # A worksheet: consecutive problems of the slice, each "question\nsolution", a blank line
        # between them (the layout of a few-shot prompt); the last one may hold fewer.
        records = grain.MapDataset.range(0, -(-(hi - lo) // per_doc)).map(
            lambda d: {"text": "\n\n".join(_text(get(i)) for i in range(lo + d * per_doc, min(lo + (d + 1) * per_doc, hi)))})
    else:
        make = _synthetic_view(kind)
        records = grain.MapDataset.range(lo, hi).map(lambda i: make(get(i)))
    return Source(name, float(src.weight), records, 0, "synthetic")


def _text(p: synthetic.Problem) -> str:
    return f"{p.question}\n{p.solution}"


def _synthetic_view(kind: str) -> Callable[[synthetic.Problem], dict[str, Any]]:
    def view(p: synthetic.Problem) -> dict[str, Any]:
        user = [{"role": "user", "content": p.question}]
        return {"pretrain": lambda: {"text": _text(p)},
                "tokenizer": lambda: {"text": _text(p)},
                "sft": lambda: {"messages": user + [{"role": "assistant", "content": p.solution}]},
                "preference": lambda: {"prompt": user, "chosen": p.solution, "rejected": p.wrong_solution},
                "prompts": lambda: {"prompt": user, "answer": p.answer}}[kind]()
    return view


def _text_documents(path: str, separator: str, start: float, end: float) -> list[str]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start})") from None
    # Line ends as Windows editors save them, read as text mode reads them: a separator such as "\n\n" found
    # none in "\r\n\r\n" and the whole file was one document.
    text = text.replace("\r\n", "\n")
    if not separator:  # one document: the slice is of its characters
        lo, hi = _bounds(len(text), start, end)
        return [text[lo:hi]] if text[lo:hi].strip() else []
    docs = [d for d in text.split(separator) if d.strip()]
    lo, hi = _bounds(len(docs), start, end)
    return docs[lo:hi]


def _open_lines(path: str) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from enumerate(f, 1)
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise DataError(f"{path}: cannot read: {e}") from None


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"not valid UTF-8 (byte {e.start} of the record)") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    return record


def _read_json_lines(path: str, view: Callable[[dict], dict], skip_bad: bool,
                     limit: int = 0) -> tuple[list[dict], int]:
    """(the records of a JSON Lines file, the bad ones skipped); `limit` > 0: its first `limit` records only."""
    records, skipped = [], 0
    for line_no, raw in _open_lines(path):
        if limit and len(records) == limit:
            break
        if line_no == 1 and raw.startswith(codecs.BOM_UTF8):  # as Windows editors save UTF-8
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw.strip():
            continue
        try:
            records.append(view(_parse_json(raw)))
        except RecordError as e:
            if not skip_bad:
                raise BadRecordError(f"{path}:{line_no}", str(e)) from None
            skipped += 1
    return records, skipped


def _array_record(name: str, src: Any, data_cfg: Any, kind: str, path: str, start: float, end: float) -> Source:
    paths = sorted(glob.glob(path))
    if not paths:
        raise DataError(f"source {name}: no file matches {path!r}")
    reader = grain.sources.ArrayRecordDataSource(paths)
    lo, hi = _bounds(len(reader), start, end)
    if hi <= lo:
        raise DataError(f"source {name}: {path} has no records in [start={start}, end={end}]")
    view, skip_bad = views.jsonl(src, kind), data_cfg.skip_bad_records

    def read(i: int) -> dict[str, Any] | None:
        try:
            return view(_parse_json(reader[i]))
        except RecordError as e:
            if skip_bad:
                return None
            raise BadRecordError(f"{path}: record {i}", str(e)) from None

    return Source(name, float(src.weight), grain.MapDataset.range(lo, hi).map(read), 0, path)


# -- record views ----------------------------------------------------------------------------------
