"""Proximal policy optimisation from rewards (stage "ppo"; InstructGPT, "Secrets of RLHF"): a value
model beside the policy, per-token KL to the reference in the reward with the score on the last
token, GAE advantages (whitened; returns taken before), clipped policy and value losses, several
epochs of mini-batches per rollout batch.

`rollout.value_from` the value model's start (a reward-model run; "": the policy, new head);
`loss.beta` the KL coefficient (`rollout.kl_target` > 0 adapts it), `loss.kl_estimator` k1 | k3;
`rollout.gamma`, `rollout.lam`; `loss.clip_eps_low` / `loss.clip_eps_high`, `loss.value_coef`,
`loss.value_clip`; `rollout.epochs`. Metrics: reward/mean, reward/std, kl, entropy, clip_frac,
completion_length, value_loss, explained_variance, kl_coef.

Default: from the SFT model (`runs/sft`), value model from the same weights, the built-in task's
verifier reward; 8 prompts x 4 replies per rollout, 2 epochs of 2 mini-batches of 16, 30 rollouts.
Variants:
  smoke  a tiny model from scratch, a few short rollouts: seconds on a CPU.
  gsm8k  GSM8K training questions from $KILN_DATA_DIR, longer replies.
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    "smoke": base.RL_SMOKE,
    "gsm8k": {"rollout.max_new_tokens": 320, "data.seq_len": 512},
}


def get_config(variant: str = "") -> ConfigDict:
    c = base.rl_config("ppo", variant)
    c.loss.beta, c.loss.kl_estimator, c.loss.aggregation = 0.05, "k1", "dapo"
    c.loss.value_coef, c.loss.value_clip = 0.1, 0.2
    c.rollout.batch_prompts, c.rollout.num_samples, c.rollout.epochs = 8, 4, 2
    c.rollout.gamma, c.rollout.lam = 1.0, 0.95
    return base.with_variant(c, VARIANTS, variant)
