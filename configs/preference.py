"""Preference optimisation (stage "dpo"): (prompt, chosen, rejected) triples; both replies are
trained against each other after their shared prompt, one pair per row.

Default data: the built-in arithmetic problems, a correct worked solution against one with an
arithmetic slip (data/synthetic.py), the last 5% held out.
Variants:
  smoke    the built-in pairs, a tiny model and few steps: finishes in well under a minute on a CPU.
  hh_rlhf  Anthropic HH-RLHF harmless-base (test split) from $KILN_DATA_DIR, the last 10% held out.
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    "smoke": {"model.preset": "tiny", "data.seq_len": 512, "data.batch_size": 8, "data.synthetic.num_examples": 2000,
              "optim.lr": 1e-3, "optim.warmup_steps": 5, "train.steps": 20, "train.log_every": 5,
              "train.eval_every": 10, "train.eval_steps": 2, "checkpoint.every": 10},
    "hh_rlhf": {"data.seq_len": 1024},
}


def get_config(variant: str = "") -> ConfigDict:
    c = base.get_config()
    c.stage = "dpo"
    c.run_dir = f"runs/dpo{'_' + variant if variant else ''}"
    c.loss.type = "sigmoid"  # the DPO paper's loss; see train.losses.dpo
    c.loss.beta = 0.1
    c.data.seq_len = 512
    if variant == "hh_rlhf":
        path = "$KILN_DATA_DIR/hh-rlhf/harmless-base-test.jsonl.gz"
        c.data.sources.train = base.source(path, "hh_rlhf", end=0.9)
        c.data.eval_sources.heldout = base.source(path, "hh_rlhf", start=0.9)
    else:
        c.data.sources.train = base.source(format="synthetic", end=0.95)
        c.data.eval_sources.heldout = base.source(format="synthetic", start=0.95)
    return base.with_variant(c, VARIANTS, variant)
