"""Ablation: continued training's replay fraction against forgetting (`kiln sweep
--config=configs/sweeps/replay.py`), as in the continual pre-training literature (Ibrahim et al.,
2024): more replay of the old domain costs adaptation to the new one and saves the old one.

Each point continues the Tiny Shakespeare model (`runs/pretrain_shakespeare`) on GSM8K text
(configs/continue.py) with a share of Shakespeare replayed; bits per byte on both domains' held-out
text, 2 seeds. Needs $KILN_DATA_DIR.
Variants:
  smoke  two points, one seed, halves of the built-in corpus as the two domains: seconds on a CPU.
  small  built-in data (configs/continue.py:synthetic): the main job's annealed model (one-step problems,
         runs/lifecycle/anneal) continues on two- and three-step problems with two-digit numbers, 60 steps
         of 4 x 256 tokens; about 6 minutes on 2 CPU cores.
"""
from ml_collections import ConfigDict

FRACTIONS = (0.0, 0.1, 0.2, 0.5)


def get_config(variant: str = "") -> ConfigDict:
    smoke = variant == "smoke"
    if variant not in ("", "smoke", "small"):
        raise ValueError(f"unknown variant {variant!r}; expected smoke or small")
    points = tuple({"data.sources.replay.weight": r, "data.sources.train.weight": round(1.0 - r, 6)}
                   for r in ((0.0, 0.5) if smoke else FRACTIONS))
    steps = {"smoke": ("train.steps=4", "train.eval_every=4", "checkpoint.every=4"),
             "small": ("train.steps=60", "train.eval_every=60", "checkpoint.every=60", "optim.warmup_steps=10")}
    return ConfigDict(dict(
        run_dir=f"runs/sweeps/replay{'_' + variant if variant else ''}",
        base=f"configs/continue.py{':smoke' if smoke else ':synthetic' if variant == 'small' else ''}",
        overrides=("train.progress=false", *steps.get(variant, ())), points=points,
        labels=tuple(f"replay_{p['data.sources.replay.weight']}" for p in points), seeds=(0,) if smoke else (0, 1),
        metrics=("eval/old/bits_per_byte", "eval/new/bits_per_byte"),
        plot=dict(x="data.sources.replay.weight", series="", y=("eval/old/bits_per_byte", "eval/new/bits_per_byte"))))
