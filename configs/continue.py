"""Continued training on a new domain with replay of the old one and LR re-warming.

The model learned Tiny Shakespeare (configs/pretrain.py:shakespeare); it now trains on GSM8K text,
replaying `data.sources.replay.weight` of Shakespeare (weights are normalised, so 0.2 means 20% of
the tokens). A fresh optimizer warms the LR up again. Both domains are evaluated, before the first
step and at the end, so forgetting (eval/old) and adaptation (eval/new) are visible side by side.
Variants:
  smoke      built-in data only, a tiny model: "old" and "new" are disjoint halves of the synthetic corpus
             (each evaluated on 5% it does not train on).
  synthetic  built-in data only: the old domain is one-step problems on one-digit numbers (what the main
             job's pre-training read; start from runs/lifecycle/anneal), the new one two- and three-step
             problems on two-digit numbers, in worksheets of 4.
  no_replay  replay weight 0.
"""
from configs import base

SHAKESPEARE = "$KILN_DATA_DIR/tinyshakespeare.txt"
REPLAY = 0.2

VARIANTS = {
    # Built-in data only: "old" and "new" are disjoint halves of the synthetic corpus.
    "smoke": {"model.init_from": "", "model.preset": "tiny", "data.seq_len": 64,
              "data.batch_size": 8, "train.steps": 10, "train.log_every": 5, "train.eval_every": 10,
              "train.eval_steps": 2, "checkpoint.every": 10, "optim.warmup_steps": 2,
              "data.synthetic.num_examples": 2000},
    "synthetic": {},  # its sources are set in get_config
    "no_replay": {"data.sources.replay.weight": 0.0},
}


def get_config(variant: str = ""):
    c = base.get_config()
    c.stage = "continue"
    c.run_dir = "runs/continue"
    c.model.init_from = "runs/pretrain_shakespeare"
    c.data.seq_len = 256
    c.data.batch_size = 4
    c.data.sources.train = base.source("$KILN_DATA_DIR/gsm8k/train.jsonl", "gsm8k", 1.0 - REPLAY)
    c.data.sources.replay = base.source(SHAKESPEARE, "text", REPLAY, start=0.0, end=0.9)
    c.data.eval_sources.new = base.source("$KILN_DATA_DIR/gsm8k/test.jsonl", "gsm8k", 1.0)
    c.data.eval_sources.old = base.source(SHAKESPEARE, "text", 1.0, start=0.9, end=1.0)
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 30  # re-warming: a fresh optimizer ramps up from zero again
    c.train.steps = 100
    c.train.eval_every = 100
    c.train.eval_steps = 10
    c.checkpoint.every = 100
    if variant == "synthetic":
        c.model.init_from = "runs/lifecycle/anneal"
        c.data.synthetic.problems_per_document = 4
        new, old = dict(max_digits=2, min_ops=2, max_ops=3), dict(max_digits=1, min_ops=1, max_ops=1)
        c.data.sources.train = base.source(format="synthetic", weight=1.0 - REPLAY, end=0.95, **new)
        c.data.sources.replay = base.source(format="synthetic", weight=REPLAY, end=0.95, **old)
        c.data.eval_sources.new = base.source(format="synthetic", start=0.95, **new)
        c.data.eval_sources.old = base.source(format="synthetic", start=0.95, **old)
    if variant == "smoke":
        c.data.sources.train = base.source(format="synthetic", weight=1.0 - REPLAY, start=0.5, end=0.95)
        c.data.sources.replay = base.source(format="synthetic", weight=REPLAY, start=0.05, end=0.5)
        c.data.eval_sources.new = base.source(format="synthetic", start=0.95, end=1.0)
        c.data.eval_sources.old = base.source(format="synthetic", start=0.0, end=0.05)
    return base.with_variant(c, VARIANTS, variant)
