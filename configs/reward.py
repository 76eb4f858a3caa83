"""Reward model (stage "reward"): a scalar head on the decoder, trained with the Bradley–Terry loss on
preference pairs; evaluation reports held-out pair accuracy (`eval/accuracy`).

Default: pairs from the built-in arithmetic task (a worked solution against the same steps with one
slip carried through), the last 5% held out, starting from the SFT model (`runs/sft`, as InstructGPT
starts its reward model from the SFT policy); the head is new, the rest is loaded.
Variants:
  smoke  synthetic pairs, a tiny model from scratch: seconds on a CPU.
  hh     Anthropic HH-RLHF harmless-base from $KILN_DATA_DIR (the shared copy is its 2,312-pair test
         split: the first 90% train, the last 10% are held out), a small byte-level model from scratch.
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    "smoke": {"model.init_from": "", "model.preset": "tiny", "data.seq_len": 256, "data.batch_size": 8,
              "data.synthetic.num_examples": 2000, "optim.lr": 1e-3, "optim.warmup_steps": 2, "train.steps": 20,
              "train.log_every": 5, "train.eval_every": 10, "train.eval_steps": 2, "checkpoint.every": 10},
    # A 4-layer, d_model 256 byte-level model from scratch (the shared data has no English pre-training
    # corpus beyond Shakespeare): 1024 bytes hold 81% of the dialogues whole. ~10 minutes on 2 cores.
    "hh": {"model.init_from": "", "model.preset": "small", "model.d_model": 256, "model.n_layers": 4,
           "model.n_heads": 4, "model.n_kv_heads": 4, "model.d_ff": 704, "data.seq_len": 1024, "data.batch_size": 8,
           "optim.lr": 1e-3, "optim.warmup_steps": 10, "train.steps": 150, "train.eval_every": 75,
           "train.eval_steps": 0, "checkpoint.every": 75},
}


def get_config(variant: str = "") -> ConfigDict:
    c = base.get_config()
    c.stage = "reward"
    c.loss.type = "reward"
    c.run_dir = f"runs/reward{'_' + variant if variant else ''}"
    c.model.init_from = "runs/sft"
    c.data.seq_len = 256  # a pair is one per row, unpacked: a prompt and reply take ~100 BPE tokens
    c.data.batch_size = 8
    c.optim.lr, c.optim.warmup_steps = 1e-4, 5
    c.train.steps, c.train.eval_every, c.train.eval_steps, c.checkpoint.every = 100, 50, 0, 50
    c.data.sources.train, c.data.eval_sources.heldout = base.preference_pairs(hh=variant == "hh")
    return base.with_variant(c, VARIANTS, variant)
