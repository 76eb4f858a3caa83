"""Rejection sampling (stage "rejection_sampling", run by `kiln generate`): K replies per prompt from
the policy, scored, the best kept as SFT data and best-vs-worst as preference pairs.

Default: 256 training prompts of the built-in arithmetic task, 8 samples each at temperature 1,
from the SFT model (`runs/sft`), scored by the task's verifier (the final answer); only right
answers are kept (min_reward 1). The paper samples 10-30 per prompt and scores with a reward model:
set rollout.reward to a reward-model run (configs/reward.py) and rollout.min_reward as wanted.
Variants:
  smoke  a few prompts, 4 samples, short replies (the tiny policy is named by model.init_from).
  gsm8k  GSM8K training questions from $KILN_DATA_DIR, answers checked the same way.
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    "smoke": {"rollout.num_prompts": 6, "rollout.num_samples": 4, "rollout.max_new_tokens": 24,
              "rollout.min_reward": 0.0, "data.batch_size": 8, "data.synthetic.num_examples": 2000},
    "gsm8k": {"rollout.max_new_tokens": 320, "rollout.num_prompts": 512},
}


def get_config(variant: str = "") -> ConfigDict:
    c = base.get_config()
    c.stage = "rejection_sampling"
    c.run_dir = f"runs/rejection_sampling{'_' + variant if variant else ''}"
    c.model.init_from = "runs/sft"
    c.data.batch_size = 16  # prompts per sampler call (times num_samples rows)
    c.rollout.num_prompts, c.rollout.num_samples, c.rollout.temperature = 256, 8, 1.0
    c.rollout.max_new_tokens, c.rollout.reward, c.rollout.min_reward = 128, "verifier", 1.0
    if variant == "gsm8k":
        c.data.sources.train = base.source("$KILN_DATA_DIR/gsm8k/train.jsonl", "gsm8k")
    else:
        c.data.sources.train = base.source(format="synthetic", end=0.95)
    return base.with_variant(c, VARIANTS, variant)
