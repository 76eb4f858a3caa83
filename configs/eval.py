"""Evaluation (`kiln eval --checkpoint=RUN_OR_HF_DIR --config=configs/eval.py[:variant]`).

Default: the built-in arithmetic problems. The held-out 5% (the split pre-training and SFT leave
out) is evaluated, the few-shot examples come from the training 95%, 0- and 4-shot, with and
without a chain of thought; bits per byte on the held-out problems' text.
Variants:
  smoke  a handful of problems, 0-shot, short generations: seconds on a CPU (fits the tiny model).
  gsm8k  GSM8K from $KILN_DATA_DIR: test.jsonl evaluated, examples from train.jsonl (8-shot as in
         the chain-of-thought paper, and 0-shot).
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    "smoke": {"eval.num_problems": 4, "eval.max_new_tokens": 48, "eval.shots": (0,), "train.eval_steps": 1,
              "data.seq_len": 256, "data.synthetic.num_examples": 2000},
    "gsm8k": {"eval.shots": (0, 8), "eval.max_new_tokens": 320, "data.seq_len": 2048},
}


def get_config(variant: str = "") -> ConfigDict:
    c = base.get_config()
    c.stage = "eval"
    c.run_dir = f"runs/eval{'_' + variant if variant else ''}"
    c.train.eval_steps = 0  # bits per byte over the whole eval source
    c.data.seq_len = 512
    if variant == "gsm8k":
        test, train = (base.source(f"$KILN_DATA_DIR/gsm8k/{split}.jsonl", "gsm8k") for split in ("test", "train"))
        c.eval.tasks.gsm8k = base.task(test, train)
        c.data.eval_sources.gsm8k = test
    else:
        heldout = base.source(format="synthetic", start=0.95)
        c.eval.tasks.arithmetic = base.task(heldout, base.source(format="synthetic", end=0.95))
        c.data.eval_sources.arithmetic = base.source(format="synthetic", start=0.95)
    return base.with_variant(c, VARIANTS, variant)
