"""`kiln sample --checkpoint=RUN_OR_HF_DIR --prompt=TEXT [--prompt=...] | --prompts=FILE.jsonl [options]`

Samples completions and writes one JSON object per (prompt, sample) to stdout or `--output`
(written whole through a temporary file): the prompt (`prompt` or `messages`), `sample`, `text`,
`token_ids`, `logprobs`, `finish_reason` ("stop" or "length").

`--checkpoint` is a Kiln run directory, a checkpoints or step directory, or a Hugging Face
directory; `--prompts` holds one {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}
per line. Tokenizer and chat template: `--tokenizer` / `--chat_template`, else what the checkpoint
says (`train.generate.load_sampler`). Text prompts become a user turn of the template with `--chat`;
by default they do for a run whose stage trained on conversations (sft, dpo, ...), not for
pre-training runs or Hugging Face directories (whose config cannot say whether the model was
instruction-tuned). `messages` records always use the template.

Prompts are sampled `--batch_size` at a time, the batch starting at prompt i drawing from
fold_in(key(--seed), i): the same seed and batch size give the same samples.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax

from data import chat
from data.sources import expand_path
from model.sharding import make_mesh, use_cpu_devices
from train.generate import load_sampler
from train.records import write_text_atomic


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Kiln run / checkpoint directory or Hugging Face directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE.jsonl", help='one {"prompt": ...} or {"messages": [...]} per line')
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); the text ends before it")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="text prompts as a user turn of the chat template (default: see above)")
    p.add_argument("--chat_template", choices=sorted(chat.FORMATS), default=None)
    p.add_argument("--tokenizer", default=None, help='"byte", a tokenizer file or a directory holding one')
    p.add_argument("--batch_size", type=int, default=64, help="prompts per compiled batch (default 64)")
    p.add_argument("--tensor", type=int, default=1, help="devices that split the attention heads (default 1); on a "
                   "CPU-only host, that many CPU devices: --tensor=2 on 2 cores samples ~1.2x faster")
    p.add_argument("--output", default=None, help="JSONL file to write (default: stdout)")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.tensor > 1:
        use_cpu_devices(args.tensor)  # so that --tensor=N also runs on a CPU-only host (before JAX starts)
    records = _records(args)
    for name in ("batch_size", "num_samples", "max_new_tokens", "tensor"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    check_sampling(args)
    if args.output:
        check_output(args.output, args.prompts)
    mesh = make_mesh(data=1, fsdp=-1, tensor=args.tensor)
    sampler, use_chat = load_sampler(args.checkpoint, tokenizer=args.tokenizer, chat_template=args.chat_template,
                                     chat=args.chat, mesh=mesh)
    if sampler.chat_template is None and any("messages" in r for r in records):
        raise ValueError(f"the prompts hold chat messages but tokenizer {sampler.tokenizer.name} has no chat control "
                         f"tokens that Kiln knows; pass --chat_template ({', '.join(chat.FORMATS)})")
    as_text = "as a user turn" if use_chat else "as text"
    print(f"sampling {len(records)} prompt(s) x {args.num_samples} from {sampler.model.cfg.family} "
          f"({args.checkpoint}), tokenizer {sampler.tokenizer.name}, chat template {sampler.chat_template or 'none'} "
          f"(text prompts {as_text})", file=sys.stderr)
    key = jax.random.key(args.seed)
    rows = []
    for start in range(0, len(records), args.batch_size):
        chunk = records[start:start + args.batch_size]
        outs = sampler.complete([r.get("messages", r.get("prompt")) for r in chunk], stop=args.stop,
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=jax.random.fold_in(key, start), num_samples=args.num_samples,
                                chat=use_chat)
        for out in outs:
            row = dict(chunk[out.pop("prompt_index")])
            row["sample"] = out.pop("sample_index")
            rows.append(dict(row, **out))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.output:
        write_text_atomic(args.output, text)
        print(f"wrote {len(rows)} sample(s) to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _records(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The prompts as records {"prompt": str} or {"messages": [...]}; ValueError naming the bad line."""
    if bool(args.prompt) == bool(args.prompts):
        raise ValueError("give prompts with --prompt=TEXT (repeatable) or --prompts=FILE.jsonl, not both")
    if args.prompt:
        return [{"prompt": p} for p in args.prompt]
    where = args.prompts
    try:
        with open(expand_path(where, "--prompts"), "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"--prompts {where}: cannot read it ({e.strerror or e})") from None
    records = []
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} line {n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} line {n}: not valid JSON ({e.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            records.append({"prompt": record["prompt"]})
        elif isinstance(record, dict) and "messages" in record:
            try:
                records.append({"messages": chat.check_messages(record["messages"])})
            except chat.ChatError as e:
                raise ValueError(f"{where} line {n}: {e}") from None
        else:
            raise ValueError(f'{where} line {n}: expected an object with a string "prompt" or a "messages" list')
    if not records:
        raise ValueError(f"{where}: no prompts in the file")
    return records


def check_sampling(args: argparse.Namespace) -> None:
    """ValueError for sampling settings out of range, before the model is loaded, and for greedy sampling
    of several samples per prompt, which would be one sample repeated."""
    for name, ok, rule in (("temperature", args.temperature >= 0, "0 (greedy) or more"),
                           ("top_p", 0 < args.top_p <= 1, "in (0, 1]"), ("top_k", args.top_k >= 0, "0 (off) or more")):
        if not ok:
            raise ValueError(f"--{name} must be {rule}, got {getattr(args, name)}")
    if args.temperature == 0 and args.num_samples > 1:
        raise ValueError(f"--temperature=0 samples greedily: the --num_samples={args.num_samples} samples of each "
                         f"prompt would be one sample {args.num_samples} times; set a positive --temperature (or "
                         "--num_samples=1)")


def check_output(path: str, prompts: str | None = None) -> None:
    """ValueError unless `path` can be written as a file other than the `prompts` file (checked before
    any sampling is done)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"--output {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"--output {path} is a directory; name a file such as {os.path.join(path, 'samples.jsonl')}")
    if prompts and os.path.exists(path) and os.path.samefile(path, expand_path(prompts, "--prompts")):
        raise ValueError(f"--output {path} is the --prompts file: writing it would replace the prompts; "
                         "name another file")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"--output {path}: directory {directory} is not writable")
