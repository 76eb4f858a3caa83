"""Direct preference optimisation and its variants (stage "dpo"): the policy learns from preference
pairs against a frozen reference, its own starting weights (with fresh LoRA adapters: the base with
the adapters off), or against log-probs precomputed into the pairs (`kiln data reference`).

`loss.preference_type`: sigmoid (DPO; with loss.label_smoothing, conservative DPO) | hinge | ipo |
robust | simpo | orpo (no reference model); `loss.beta`; `loss.nll_coef` adds the chosen reply's NLL
(Llama 3: 0.2). Metrics: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected (TRL's names), also on the held-out pairs.

Default: pairs from the built-in arithmetic task (a worked solution against the same steps with one
slip carried through), the last 5% held out, from the SFT model (`runs/sft`).
Variants:
  smoke  synthetic pairs, a tiny model from scratch (its reference: the same fresh weights): seconds.
  hh     Anthropic HH-RLHF harmless-base from $KILN_DATA_DIR (first 90% train, last 10% held out).
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    "smoke": {"model.init_from": "", "model.preset": "tiny", "data.seq_len": 256, "data.batch_size": 8,
              "data.synthetic.num_examples": 2000, "optim.lr": 1e-3, "optim.warmup_steps": 2, "train.steps": 20,
              "train.log_every": 5, "train.eval_every": 10, "train.eval_steps": 2, "checkpoint.every": 10},
    "hh": {"data.seq_len": 1024},
}


def get_config(variant: str = "") -> ConfigDict:
    c = base.get_config()
    c.stage = "dpo"
    c.loss.type = "dpo"
    c.loss.preference_type, c.loss.beta = "sigmoid", 0.1
    c.run_dir = f"runs/dpo{'_' + variant if variant else ''}"
    c.model.init_from = "runs/sft"
    c.data.seq_len = 256  # a pair is one per row, unpacked: a prompt and reply take ~100 BPE tokens
    c.data.batch_size = 8
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-5, 5, 0.0
    c.train.steps, c.train.eval_every, c.train.eval_steps, c.checkpoint.every = 60, 30, 0, 30
    c.data.sources.train, c.data.eval_sources.heldout = base.preference_pairs(hh=variant == "hh")
    return base.with_variant(c, VARIANTS, variant)
