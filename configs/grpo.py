"""Group-relative policy optimisation (stage "grpo"; DeepSeekMath), with Dr. GRPO, DAPO's clip-higher
and token-mean loss, and RLOO as settings: the policy samples rollout.num_samples replies per prompt,
a verifier or reward model scores them, each reply's advantage is its score against its group's.

`rollout.advantage` grpo ((r - mean) / (std + 1e-4)) | dr_grpo (r - mean) | rloo (leave-one-out mean);
`loss.aggregation` grpo (per-reply mean) | dapo (token mean) | dr_grpo (token sum / max length);
`loss.clip_eps_low` / `loss.clip_eps_high`; `loss.beta` the KL (k3) coefficient (0: no reference
model in memory); `rollout.epochs` the updates per rollout batch (mu). Metrics: reward/mean,
reward/std, kl, entropy, clip_frac, completion_length (TRL's names), rollout/tokens_per_s.

Default: from the SFT model (`runs/sft`) on the built-in arithmetic task's training prompts, scored by
the task's verifier (1 for the right final answer), 8 prompts x 8 replies per rollout, 4 mini-batches
of 16, 30 rollouts. Evaluate with `kiln eval --checkpoint=runs/grpo --config=configs/eval.py`.
Variants:
  smoke   a tiny model from scratch, a few short rollouts: seconds on a CPU.
  rloo    RLOO's leave-one-out baseline, no KL term.
  dr_grpo Dr. GRPO: unscaled advantages, token sum over the maximum length.
  gsm8k   GSM8K training questions from $KILN_DATA_DIR, longer replies.
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    "smoke": base.RL_SMOKE,
    "rloo": {"rollout.advantage": "rloo", "loss.beta": 0.0},
    "dr_grpo": {"rollout.advantage": "dr_grpo", "loss.aggregation": "dr_grpo"},
    "gsm8k": {"rollout.max_new_tokens": 320, "data.seq_len": 512},
}


def get_config(variant: str = "") -> ConfigDict:
    c = base.rl_config("grpo", variant)
    c.loss.beta, c.loss.kl_estimator, c.loss.aggregation = 0.04, "k3", "grpo"
    c.rollout.batch_prompts, c.rollout.num_samples, c.rollout.temperature = 8, 8, 1.0
    return base.with_variant(c, VARIANTS, variant)
