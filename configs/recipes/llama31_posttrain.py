"""Llama 3.1-style post-training (`kiln pipeline --config=configs/recipes/llama31_posttrain.py`):
SFT, then `rounds` rounds of
  reward model (from the current policy, on preference pairs) -> rejection sampling from the current
  policy (K samples per prompt, scored by that reward model or by the task's verifier) -> SFT of the
  current policy on the kept samples -> DPO from that SFT model on best-vs-worst pairs of the samples
  -> evaluation (held-out accuracy, 0- and 4-shot, with and without a chain of thought);
each round starts from the previous round's DPO model. Every stage is a stage config of configs/
with the overrides below; `results.md` gets a row per stage.

Settings (override with --config.KEY=VALUE): base (the pre-trained model; "" pre-trains one with
configs/pretrain.py:smoke), sft (false: base is already the SFT policy, round 1 samples from it),
rounds, scorer (reward_model | verifier), variant (of every stage config), llama3_dpo (DPO as Llama 3
trains it, section 4.1.4: the chosen reply's NLL beside the DPO loss at coefficient 0.2, and the
turn's end token masked out of both replies' log-probs; the dpo overrides below come after it), and
extra overrides:
`overrides` for every stage, `<kind>_overrides` for the stages of one kind (sft: every SFT, the rounds'
included; reward, rejection_sampling, dpo, eval).
Variants:
  smoke      a tiny model pre-trained in the recipe, one round, a few steps per stage: a few minutes on a CPU.
  lifecycle  two rounds from the main job's SFT model (runs/lifecycle/sft, configs/recipes/lifecycle.py)
             with its task, stage sizes and evaluation: about 5 minutes on 2 CPU cores.
"""
from ml_collections import ConfigDict

from configs import base
from configs.recipes import lifecycle


def _lifecycle() -> dict:
    """Settings that run the rounds like configs/recipes/lifecycle.py runs its rejection sampling, its SFT
    on the kept samples, DPO and evaluation, on its task, from its SFT model."""
    recipe = {s["name"]: s for s in lifecycle.stages(lifecycle.get_config())}
    task = lifecycle.start_from("sft")[1:]  # the task's overrides (after model.init_from)
    # What the rounds set themselves, or the task sets for every stage, is left out of the per-kind lists.
    set_here = ("model.init_from", "data.sources.train.", "rollout.reward", "rollout.min_reward",
                *(t.split("=")[0] for t in task))

    def own(overrides: list[str]) -> tuple[str, ...]:
        return tuple(o for o in overrides if not o.startswith(set_here))

    return dict(run_dir="runs/llama31_lifecycle", base="runs/lifecycle/sft", sft=False, overrides=task,
                sft_overrides=own(recipe["rejection_sampling"]["overrides"]),
                rejection_sampling_overrides=own(recipe["rs_generate"]["overrides"]),
                dpo_overrides=own(recipe["dpo"]["overrides"]), eval_overrides=own(recipe["sft"]["evaluate"]["overrides"]))


VARIANTS = {
    "smoke": dict(run_dir="runs/llama31_smoke", base="", rounds=1, scorer="reward_model", variant="smoke", steps=4,
                  min_reward=-1e9),
    "lifecycle": _lifecycle(),
}


def get_config(variant: str = "") -> ConfigDict:
    c = ConfigDict(dict(run_dir="runs/llama31", base="runs/pretrain", sft=True, rounds=2, scorer="verifier",
                        variant="", steps=0, min_reward=1.0,  # steps 0: each stage config's own train.steps
                        llama3_dpo=True,
                        overrides=(), sft_overrides=(), reward_overrides=(), rejection_sampling_overrides=(),
                        dpo_overrides=(), eval_overrides=()))
    return base.with_variant(c, VARIANTS, variant)


def stages(c: ConfigDict) -> list[dict]:
    def cfg(stage: str) -> str:
        return base.stage_file(stage, c.variant)

    steps = ([f"train.steps={c.steps}", f"checkpoint.every={max(c.steps // 2, 1)}", f"train.eval_every={c.steps}"]
             if c.steps else [])

    def stage(name: str, command: str, kind: str, overrides: list[str], **more) -> dict:
        paper = ["loss.nll_coef=0.2", "data.mask_special_tokens=true"] if kind == "dpo" and c.llama3_dpo else []
        extra = [*paper, *c.overrides, *c.get(f"{kind}_overrides", ())]
        return dict(name=name, command=command, config=cfg(kind), overrides=[*extra, *overrides], **more)

    out, start = [], c.base
    if not start:
        out.append(dict(name="pretrain", command="train", config=cfg("pretrain"), overrides=steps))
        start = "@pretrain"
    policy = start
    if c.sft:
        out.append(stage("sft", "train", "sft", [f"model.init_from={start}", *steps]))
        policy = "@sft"
    out.append(stage("eval_sft", "eval", "eval", [], checkpoint=policy))
    for r in range(1, c.rounds + 1):
        scorer = f"@reward_{r}" if c.scorer == "reward_model" else "verifier"
        if c.scorer == "reward_model":
            out.append(stage(f"reward_{r}", "train", "reward", [f"model.init_from={policy}", *steps]))
        out += [
            stage(f"rejection_sampling_{r}", "generate", "rejection_sampling",
                  [f"model.init_from={policy}", f"rollout.reward={scorer}", f"rollout.min_reward={c.min_reward}",
                   f"seed={r}"]),
            stage(f"sft_{r}", "train", "sft", [f"model.init_from={policy}", "data.sources.train.format=jsonl",
                                               "data.sources.train.end=1.0",
                                               f"data.sources.train.path=@rejection_sampling_{r}/sft.jsonl", *steps]),
            stage(f"dpo_{r}", "train", "dpo", [f"model.init_from=@sft_{r}", "data.sources.train.format=jsonl",
                                               "data.sources.train.end=1.0",
                                               f"data.sources.train.path=@rejection_sampling_{r}/pairs.jsonl", *steps]),
            stage(f"eval_{r}", "eval", "eval", [], checkpoint=f"@dpo_{r}"),
        ]
        policy = f"@dpo_{r}"
    return out
