"""Ablation: LoRA rank against full fine-tuning (`kiln sweep --config=configs/sweeps/lora_rank.py`), as
in the LoRA paper's rank study and "LoRA Learns Less and Forgets Less": held-out SFT loss of full
SFT and of LoRA on all seven projections at ranks 2, 8 and 32 (alpha = 2 x rank).

Each point trains configs/sft.py from the pre-trained model (`runs/pretrain`) on the built-in task:
full SFT at lr 3e-4, LoRA at 2e-3 (the Step 4 table's settings); 2 seeds.
Variants:
  smoke  full SFT and LoRA rank 4, one seed, the tiny SFT smoke model: seconds on a CPU.
"""
from ml_collections import ConfigDict

RANKS = (2, 8, 32)


def get_config(variant: str = "") -> ConfigDict:
    smoke = variant == "smoke"
    if variant not in ("", "smoke"):
        raise ValueError(f"unknown variant {variant!r}; expected smoke")
    full = {"peft.method": "none", "optim.lr": 1e-3 if smoke else 3e-4}
    lora = tuple({"peft.method": "lora", "peft.lora_rank": r, "peft.lora_alpha": 2.0 * r, "optim.lr": 2e-3}
                 for r in ((4,) if smoke else RANKS))
    steps = ("train.steps=4", "train.eval_every=4", "checkpoint.every=4") if smoke else (
        "model.init_from=runs/pretrain",)
    return ConfigDict(dict(
        run_dir=f"runs/sweeps/lora_rank{'_smoke' if smoke else ''}", base=f"configs/sft.py{':smoke' if smoke else ''}",
        overrides=("train.progress=false", *steps), points=(full, *lora),
        labels=("full", *(f"lora_r{p['peft.lora_rank']}" for p in lora)), seeds=(0,) if smoke else (0, 1),
        metrics=("eval/loss", "eval/bits_per_byte"), plot=dict(x="", series="", y=("eval/loss",))))
