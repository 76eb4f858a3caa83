"""Annealing: the learning rate decays linearly to zero while training on a higher-quality mixture.

Llama 3 anneals on upsampled high-quality data at the end of pre-training; here the mixture keeps
a share of the pre-training distribution and upweights the held-out-quality source. Eval runs
before the first step and at the end.
"""
from configs import base

SHAKESPEARE = "$KILN_DATA_DIR/tinyshakespeare.txt"
GSM8K = "$KILN_DATA_DIR/gsm8k/train.jsonl"

VARIANTS = {
    "smoke": {"model.init_from": "", "model.preset": "tiny", "data.seq_len": 64, "data.batch_size": 8,
              "train.steps": 10, "train.log_every": 5, "train.eval_every": 10, "train.eval_steps": 2,
              "checkpoint.every": 10, "data.synthetic.num_examples": 2000},
    # After configs/pretrain.py:shakespeare: half Shakespeare, half GSM8K's worked solutions, from the LR
    # where pre-training's cosine ended (2e-4) down to zero; both domains are evaluated.
    "shakespeare": {"run_dir": "runs/anneal_shakespeare", "model.init_from": "runs/pretrain_shakespeare", "data.batch_size": 4,
                    "train.steps": 60, "train.eval_every": 60, "train.eval_steps": 10, "optim.lr": 2e-4},
}


def get_config(variant: str = ""):
    c = base.get_config()
    c.stage = "anneal"
    c.run_dir = "runs/anneal"
    c.model.init_from = "runs/pretrain"
    c.data.seq_len = 256
    c.data.batch_size = 16
    # Higher-quality mix: longer worked solutions (three-step problems with three-digit numbers) make up
    # 70%; the pre-training distribution is kept as 30%.
    c.data.sources.train = base.source(format="synthetic", weight=0.3, start=0.0, end=0.95)
    c.data.sources.quality = base.source(format="synthetic", weight=0.7, start=0.0, end=0.95, max_digits=3, max_ops=3)
    c.data.eval_sources.eval = base.source(format="synthetic", start=0.95, end=1.0)
    c.optim.schedule = "linear"
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 0.0
    c.train.steps = 200
    c.train.eval_every = 200
    c.train.eval_steps = 10
    c.checkpoint.every = 100
    if variant == "shakespeare":
        c.data.sources.train = base.source(SHAKESPEARE, "text", 0.5, start=0.0, end=0.9)
        c.data.sources.quality = base.source(GSM8K, "gsm8k", 0.5)
        c.data.eval_sources.eval = base.source(SHAKESPEARE, "text", 1.0, start=0.9, end=1.0)
        c.data.eval_sources.quality = base.source("$KILN_DATA_DIR/gsm8k/test.jsonl", "gsm8k", 1.0)
    return base.with_variant(c, VARIANTS, variant)
