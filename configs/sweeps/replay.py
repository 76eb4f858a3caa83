"""Ablation: continued training's replay fraction against forgetting (`kiln sweep
--config=configs/sweeps/replay.py`), as in the continual pre-training literature (Ibrahim et al.,
2024): more replay of the old domain costs adaptation to the new one and saves the old one.

Each point continues the Tiny Shakespeare model (`runs/pretrain_shakespeare`) on GSM8K text
(configs/continue.py) with a share of Shakespeare replayed; bits per byte on both domains' held-out
text, 2 seeds. Needs $KILN_DATA_DIR.
Variants:
  smoke  two points, one seed, halves of the built-in corpus as the two domains: seconds on a CPU.
"""
from ml_collections import ConfigDict

FRACTIONS = (0.0, 0.1, 0.2, 0.5)


def get_config(variant: str = "") -> ConfigDict:
    smoke = variant == "smoke"
    if variant not in ("", "smoke"):
        raise ValueError(f"unknown variant {variant!r}; expected smoke")
    points = tuple({"data.sources.replay.weight": r, "data.sources.train.weight": round(1.0 - r, 6)}
                   for r in ((0.0, 0.5) if smoke else FRACTIONS))
    steps = ("train.steps=4", "train.eval_every=4", "checkpoint.every=4") if smoke else ()
    return ConfigDict(dict(
        run_dir=f"runs/sweeps/replay{'_smoke' if smoke else ''}",
        base=f"configs/continue.py{':smoke' if smoke else ''}",
        overrides=("train.progress=false", *steps), points=points,
        labels=tuple(f"replay_{p['data.sources.replay.weight']}" for p in points), seeds=(0,) if smoke else (0, 1),
        metrics=("eval/old/bits_per_byte", "eval/new/bits_per_byte"),
        plot=dict(x="data.sources.replay.weight", series="", y=("eval/old/bits_per_byte", "eval/new/bits_per_byte"))))
