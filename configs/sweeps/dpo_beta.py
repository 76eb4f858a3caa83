"""Ablation: DPO's beta against its loss type (sigmoid DPO, IPO, robust DPO with 10% assumed label
noise), as in the IPO and robust-DPO papers' comparisons (`kiln sweep --config=configs/sweeps/dpo_beta.py`).

Each point trains configs/dpo.py from the SFT model (`runs/sft`) on the built-in task's preference
pairs for 30 steps; held-out pair accuracy and reward margin, 2 seeds (the seed orders the data).
Variants:
  smoke  two points, one seed, the tiny DPO smoke model: seconds on a CPU.
  small  from the main job's SFT model (runs/lifecycle/sft, 3.3M parameters) on its two-step task,
         held-out pairs of 128-token rows: about 12 minutes on 2 CPU cores.
"""
from ml_collections import ConfigDict

from configs.recipes import lifecycle

BETAS, TYPES = (0.05, 0.1, 0.5), ("sigmoid", "ipo", "robust")


def get_config(variant: str = "") -> ConfigDict:
    smoke = variant == "smoke"
    if variant not in ("", "smoke", "small"):
        raise ValueError(f"unknown variant {variant!r}; expected smoke or small")
    betas, types = ((0.1,), ("sigmoid", "ipo")) if smoke else (BETAS, TYPES)
    robust = {"loss.label_smoothing": 0.1}  # the assumed label-noise rate robust DPO corrects for
    points = tuple({"loss.beta": b, "loss.preference_type": t, **(robust if t == "robust" else {})}
                   for t in types for b in betas)
    steps = ("train.steps=4", "train.eval_every=4", "checkpoint.every=4") if smoke else (
        "train.steps=30", "train.eval_every=30", "checkpoint.every=30", "train.eval_steps=10", "optim.lr=5e-5")
    if variant == "small":
        steps = (*lifecycle.start_from("sft"), "data.seq_len=128", "train.steps=30", "train.eval_every=30",
                 "checkpoint.every=30", "train.eval_steps=16", "optim.lr=3e-5")
    return ConfigDict(dict(
        run_dir=f"runs/sweeps/dpo_beta{'_' + variant if variant else ''}", base=f"configs/dpo.py{':smoke' if smoke else ''}",
        overrides=("train.progress=false", *steps), points=points, seeds=(0,) if smoke else (0, 1),
        metrics=("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss"),
        plot=dict(x="loss.beta", series="loss.preference_type", y=("eval/rewards/accuracies", "eval/rewards/margins"))))
