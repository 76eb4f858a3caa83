"""`kiln data reference --config=configs/dpo.py[:variant] --out=DIR [--config.KEY=VALUE ...]`

Precomputes DPO's reference log-probs once, so that training keeps no reference model in memory:
every preference pair of the config's training and evaluation sources, encoded as training encodes
it (the config's tokenizer, chat template and seq_len), is scored by the starting policy (the model
`kiln train` would build: `model.init_from`, `peft.*`, dtypes), and written (JSON Lines, atomically)
to DIR/train.NAME.jsonl and DIR/eval.NAME.jsonl as {"prompt", "chosen", "rejected", [margin],
"ref_chosen_logps", "ref_rejected_logps"}: the summed log-probs of each reply's trained tokens.
DIR/reference.json records the data settings that decide those tokens (tokenizer, chat template,
seq_len, ...); a run training on the files with other settings is refused.
Prints the overrides that train on them (`loss.reference=data` and each source's path and format);
train with the same data settings. Pairs that training would drop are left out (and counted).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data import pipeline, sources, tokenizer as tokenizers, views
from data.examples import Encoder
from launch.config import ConfigError, load_config
from model.sharding import make_mesh, use_rules
from train import preflight, records
from train.losses.dpo import sequence_logps
from train.reference import SETTINGS_FILE, encoding, reference_model
from train.build import build_model, model_config, tokenizer_name


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln data reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a DPO config, configs/dpo.py[:variant]")
    p.add_argument("--out", required=True, help="the directory to write one JSON Lines file per source into")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        raise ConfigError(f"unknown argument(s) {' '.join(unknown)}; expected --config.KEY=VALUE overrides")
    config = load_config(args.config, rest)
    # Found now, not once the model is loaded and the pairs scored.
    if not args.out.strip():
        raise ConfigError("--out is empty; name the directory to write the reference log-probs into")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} is a file; name the directory to write the reference log-probs into")
    above = sources.file_above(args.out)
    if above:
        raise ConfigError(f"--out {args.out}: {above} is a file, not a directory; name a directory to write the "
                          "reference log-probs into")
    if config.loss.preference_type in ("simpo", "orpo"):
        raise ConfigError(f"loss.preference_type={config.loss.preference_type} compares the policy with no reference: "
                          "there are no reference log-probs to precompute")
    if not config.model.init_from:
        raise ConfigError("kiln data reference: model.init_from names no reference model")
    preflight.check_start(config)
    config.data.tokenizer = tokenizer_name(config)
    with tempfile.TemporaryDirectory() as scratch:
        tok = tokenizers.resolve(config.data, scratch)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    with jax.set_mesh(mesh), use_rules(config.mesh.rules):
        cfg = model_config(config, tok.vocab_size)
        model = build_model(config, cfg, mesh, tok)[0]
    score = jax.jit(lambda batch: sequence_logps(model, batch)[:2])
    enc, width = Encoder.from_config(config.data, tok), config.data.batch_size
    os.makedirs(args.out, exist_ok=True)
    recorded = dict(encoding(config.data), model=reference_model(config))
    settings = os.path.join(args.out, SETTINGS_FILE)
    # Until every file is written, the directory may hold an earlier run's files under these settings.
    records.write_text_atomic(settings, json.dumps(dict(recorded, unfinished=True), indent=1) + "\n")
    overrides = ["--config.loss.reference=data"]
    for group, key in (("sources", "train"), ("eval_sources", "eval")):
        for name, src in config.data[group].items():
            path = os.path.join(args.out, f"{key}.{name}.jsonl")
            kept, dropped = _score_source(f"data.{group}.{name}", src, config, enc, score, width, tok.pad_id)
            records.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
            print(f"{path}: {len(kept)} pairs" + (f" ({dropped} that training would drop left out)" if dropped else ""))
            overrides += [f"--config.data.{group}.{name}.path={path}", f"--config.data.{group}.{name}.format=jsonl"]
            # The file holds exactly the pairs the slice selected: it is read whole.
            overrides += [f"--config.data.{group}.{name}.{k}={v}" for k, v in (("start", 0.0), ("end", 1.0)) if k in src]
    records.write_text_atomic(settings, json.dumps(recorded, indent=1) + "\n")
    print("train on them with: " + " ".join(overrides))
    return 0


def _score_source(where: str, src: Any, config: Any, enc: Encoder, score: Any, width: int, pad: int
                  ) -> tuple[list[dict[str, Any]], int]:
    """(the source's pairs with their reference log-probs, how many were dropped)."""
    recs = sources.load(where, src, config.data, "preference").records
    out, rows, dropped = [], [], 0

    def flush() -> None:
        pairs = [pipeline._pair_row(config.data.seq_len, pad, example) for _, example in rows]
        pairs += [pipeline._empty_row("preference", config.data.seq_len, pad)] * (width - len(pairs))
        keys = [k for k in pairs[0] if k.startswith(("chosen_", "rejected_"))]
        chosen, rejected = score({k: jnp.asarray(np.stack([r[k] for r in pairs])) for k in keys})
        for (record, _), c, r in zip(rows, np.asarray(chosen), np.asarray(rejected)):
            out.append(dict(record, ref_chosen_logps=float(c), ref_rejected_logps=float(r)))
        rows.clear()

    for i in range(len(recs)):
        record = recs[i]
        example, _ = enc("preference", record) if record is not None else (None, "")
        if example is None:
            dropped += 1
            continue
        rows.append(({k: v for k, v in record.items() if k not in views.REFERENCE_FIELDS}, example))
        if len(rows) == width:
            flush()
    if rows:
        flush()
    return out, dropped
