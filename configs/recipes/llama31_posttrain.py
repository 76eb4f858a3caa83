"""Llama 3.1-style post-training (`kiln pipeline --config=configs/recipes/llama31_posttrain.py`):
SFT, then `rounds` rounds of
  reward model (from the current policy, on preference pairs) -> rejection sampling from the current
  policy (K samples per prompt, scored by that reward model or by the task's verifier) -> SFT of the
  current policy on the kept samples -> DPO from that SFT model on best-vs-worst pairs of the samples
  -> evaluation (held-out accuracy, 0- and 4-shot, with and without a chain of thought);
each round starts from the previous round's DPO model. Every stage is a stage config of configs/
with the overrides below; `results.md` gets a row per stage.

Settings (override with --config.KEY=VALUE): base (the pre-trained model; "" pre-trains one with
configs/pretrain.py:smoke), rounds, scorer (reward_model | verifier), variant (of every stage config).
Variants:
  smoke  a tiny model pre-trained in the recipe, one round, a few steps per stage: a few minutes on a CPU.
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    "smoke": dict(run_dir="runs/llama31_smoke", base="", rounds=1, scorer="reward_model", variant="smoke", steps=4,
                  min_reward=-1e9),
}


def get_config(variant: str = "") -> ConfigDict:
    c = ConfigDict(dict(run_dir="runs/llama31", base="runs/pretrain", rounds=2, scorer="verifier", variant="",
                        steps=0, min_reward=1.0))  # steps 0: each stage config's own train.steps
    return base.with_variant(c, VARIANTS, variant)


def stages(c: ConfigDict) -> list[dict]:
    def cfg(stage: str) -> str:
        return base.stage_file(stage, c.variant)

    steps = ([f"train.steps={c.steps}", f"checkpoint.every={max(c.steps // 2, 1)}", f"train.eval_every={c.steps}"]
             if c.steps else [])
    out, start = [], c.base
    if not start:
        out.append(dict(name="pretrain", command="train", config=cfg("pretrain"), overrides=steps))
        start = "@pretrain"
    out += [dict(name="sft", command="train", config=cfg("sft"), overrides=[f"model.init_from={start}", *steps]),
            dict(name="eval_sft", command="eval", config=cfg("eval"), checkpoint="@sft")]
    policy = "@sft"
    for r in range(1, c.rounds + 1):
        scorer = f"@reward_{r}" if c.scorer == "reward_model" else "verifier"
        if c.scorer == "reward_model":
            out.append(dict(name=f"reward_{r}", command="train", config=cfg("reward"),
                            overrides=[f"model.init_from={policy}", *steps]))
        out += [
            dict(name=f"rejection_sampling_{r}", command="generate", config=cfg("rejection_sampling"),
                 overrides=[f"model.init_from={policy}", f"rollout.reward={scorer}", f"rollout.min_reward={c.min_reward}",
                            f"seed={r}"]),
            dict(name=f"sft_{r}", command="train", config=cfg("sft"),
                 overrides=[f"model.init_from={policy}", "data.sources.train.format=jsonl",
                            f"data.sources.train.path=@rejection_sampling_{r}/sft.jsonl", *steps]),
            dict(name=f"dpo_{r}", command="train", config=cfg("dpo"),
                 overrides=[f"model.init_from=@sft_{r}", "data.sources.train.format=jsonl",
                            f"data.sources.train.path=@rejection_sampling_{r}/pairs.jsonl", *steps]),
            dict(name=f"eval_{r}", command="eval", config=cfg("eval"), checkpoint=f"@dpo_{r}"),
        ]
        policy = f"@dpo_{r}"
    return out
