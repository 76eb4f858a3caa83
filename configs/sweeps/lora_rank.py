"""Ablation: LoRA rank against full fine-tuning (`kiln sweep --config=configs/sweeps/lora_rank.py`), as
in the LoRA paper's rank study and "LoRA Learns Less and Forgets Less": held-out SFT loss of full
SFT and of LoRA on all seven projections at ranks 2, 8 and 32 (alpha = 2 x rank).

Each point trains configs/sft.py from the pre-trained model (`runs/pretrain`) on the built-in task:
full SFT at lr 3e-4, LoRA at 2e-3 (the Step 4 table's settings); 2 seeds.
Variants:
  smoke  full SFT and LoRA rank 4, one seed, the tiny SFT smoke model: seconds on a CPU.
  small  from the main job's annealed model (runs/lifecycle/anneal, 3.3M parameters) on its two-step
         task, 60 steps of 8 x 256 tokens, full SFT at lr 1e-3 (the main job's): about 9 minutes on 2 CPU cores.
"""
from ml_collections import ConfigDict

from configs.recipes import lifecycle

RANKS = (2, 8, 32)


def get_config(variant: str = "") -> ConfigDict:
    smoke = variant == "smoke"
    if variant not in ("", "smoke", "small"):
        raise ValueError(f"unknown variant {variant!r}; expected smoke or small")
    full = {"peft.method": "none", "optim.lr": 3e-4 if variant == "" else 1e-3}
    lora = tuple({"peft.method": "lora", "peft.lora_rank": r, "peft.lora_alpha": 2.0 * r, "optim.lr": 2e-3}
                 for r in ((4,) if smoke else RANKS))
    steps = ("train.steps=4", "train.eval_every=4", "checkpoint.every=4") if smoke else (
        "model.init_from=runs/pretrain",)
    if variant == "small":
        steps = (*lifecycle.start_from("anneal"), "data.seq_len=256", "data.batch_size=8", "train.steps=60",
                 "train.eval_every=60", "checkpoint.every=60", "optim.warmup_steps=10")
    return ConfigDict(dict(
        run_dir=f"runs/sweeps/lora_rank{'_' + variant if variant else ''}", base=f"configs/sft.py{':smoke' if smoke else ''}",
        overrides=("train.progress=false", *steps), points=(full, *lora),
        labels=("full", *(f"lora_r{p['peft.lora_rank']}" for p in lora)), seeds=(0,) if smoke else (0, 1),
        metrics=("eval/loss", "eval/bits_per_byte"), plot=dict(x="", series="", y=("eval/loss",))))
