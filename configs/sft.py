"""Supervised fine-tuning (stage "sft"): conversations and prompt/completion pairs, trained on the
assistant's replies only, packed several to a row.

Default data: the built-in arithmetic word problems (data/synthetic.py), the last 5% held out;
40 steps of 8 x 512 tokens (the Step 4 results table's full-SFT row; LoRA there used lr 2e-3).
Variants:
  smoke  the built-in problems, a tiny model and few steps: finishes in well under a minute on a CPU.
  gsm8k  GSM8K from $KILN_DATA_DIR: trains on gsm8k/train.jsonl, evaluates on gsm8k/test.jsonl.
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    "smoke": {"model.preset": "tiny", "model.max_seq_len": 512, "data.seq_len": 512, "data.batch_size": 8, "data.synthetic.num_examples": 2000,
              "optim.lr": 1e-3, "optim.warmup_steps": 5, "train.steps": 20, "train.log_every": 5,
              "train.eval_every": 10, "train.eval_steps": 2, "checkpoint.every": 10},
    "gsm8k": {"data.seq_len": 1024},
}


def get_config(variant: str = "") -> ConfigDict:
    c = base.get_config()
    c.stage = "sft"
    c.loss.type = "sft"
    c.run_dir = f"runs/sft{'_' + variant if variant else ''}"
    c.data.seq_len = 512
    if variant == "gsm8k":
        c.data.sources.train = base.source("$KILN_DATA_DIR/gsm8k/train.jsonl", "gsm8k")
        c.data.eval_sources.test = base.source("$KILN_DATA_DIR/gsm8k/test.jsonl", "gsm8k")
    else:
        c.data.sources.train = base.source(format="synthetic", end=0.95)
        c.data.eval_sources.heldout = base.source(format="synthetic", start=0.95)
        # CPU scale, from the `small` model configs/pretrain.py trains: about 9 minutes on 2 cores.
        c.optim.lr, c.optim.warmup_steps = 3e-4, 4
        c.train.steps, c.train.eval_every, c.train.eval_steps, c.checkpoint.every = 40, 40, 4, 40
    return base.with_variant(c, VARIANTS, variant)
