"""`kiln data reference --config=configs/dpo.py[:variant] --out=FILE.jsonl [--config.KEY=VALUE ...]`

Precomputes DPO's reference log-probs once, so that training keeps no reference model in memory:
every preference pair of the config's training sources, encoded exactly as training encodes it
(the config's tokenizer, chat template and seq_len), is scored by the reference (`model.init_from`),
and written out (JSON Lines, atomically) as {"prompt", "chosen", "rejected", "ref_chosen_logps",
"ref_rejected_logps"}: the summed log-probs of each reply's trained tokens. Train on the file with
`--config.data.sources.train.path=FILE.jsonl --config.data.sources.train.format=jsonl
--config.loss.reference=data`. Pairs that training would drop are left out (and counted).
"""
from __future__ import annotations

import argparse
import json
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from data import pipeline, sources, tokenizer as tokenizers
from data.examples import Encoder
from launch.config import ConfigError, load_config
from train import checkpoint, records
from train.losses.dpo import sequence_logps
from train.trainer import init_source, tokenizer_name


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kiln data reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a DPO config, configs/dpo.py[:variant]")
    p.add_argument("--out", required=True, help="the JSON Lines file to write")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        raise ConfigError(f"unknown argument(s) {' '.join(unknown)}; expected --config.KEY=VALUE overrides")
    config = load_config(args.config, rest)
    if not config.model.init_from:
        raise ConfigError("kiln data reference: model.init_from names no reference model")
    config.data.tokenizer = tokenizer_name(config)
    with tempfile.TemporaryDirectory() as scratch:
        tok = tokenizers.resolve(config.data, scratch)
    model = checkpoint.load_model(init_source(config))[1]
    score = jax.jit(lambda batch: sequence_logps(model, batch)[:2])
    enc, width, rows = Encoder.from_config(config.data, tok), config.data.batch_size, []
    out, dropped = [], 0

    def flush() -> None:
        if not rows:
            return
        pairs = [pipeline._pair_row(config.data.seq_len, tok.pad_id, example) for _, example in rows]
        pairs += [pipeline._empty_row("preference", config.data.seq_len, tok.pad_id)] * (width - len(pairs))
        chosen, rejected = score({k: jnp.asarray(np.stack([r[k] for r in pairs])) for k in pairs[0]})
        for (record, _), c, r in zip(rows, np.asarray(chosen), np.asarray(rejected)):
            out.append(dict(record, ref_chosen_logps=float(c), ref_rejected_logps=float(r)))
        rows.clear()

    for name, src in config.data.sources.items():
        recs = sources.load(f"data.sources.{name}", src, config.data, "preference").records
        for i in range(len(recs)):
            record = recs[i]
            example, _ = enc("preference", record)
            if example is None:
                dropped += 1
                continue
            rows.append(({k: record[k] for k in ("prompt", "chosen", "rejected")}, example))
            if len(rows) == width:
                flush()
    flush()
    records.write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in out))
    print(f"kiln data reference: {len(out)} pairs scored by {init_source(config)} into {args.out}"
          + (f"; {dropped} that training would drop left out" if dropped else ""))
    return 0
