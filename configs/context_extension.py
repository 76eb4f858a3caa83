"""Context-length extension: a pre-trained model continues at 4x its sequence length with YaRN RoPE scaling.

Eval runs at the long length before the first step and at the end, so the gain is read off
metrics.jsonl (Llama 3.1 / Qwen2 reports: a short, low-LR phase on long sequences).
"""
from configs import base

SHAKESPEARE = "$KILN_DATA_DIR/tinyshakespeare.txt"

VARIANTS = {
    "smoke": {"model.init_from": "", "model.preset": "tiny", "data.seq_len": 128, "data.batch_size": 8,
              "model.rope_scaling.original_max_position_embeddings": 32, "train.steps": 10,
              "train.log_every": 5, "train.eval_every": 10, "train.eval_steps": 2, "checkpoint.every": 10,
              "optim.warmup_steps": 2, "data.synthetic.num_examples": 2000},
    # After configs/pretrain.py:shakespeare (trained at 256 tokens): 1024-token Shakespeare windows.
    "shakespeare": {"run_dir": "runs/context_extension_shakespeare", "model.init_from": "runs/pretrain_shakespeare", "data.batch_size": 4,
                    "train.steps": 24, "train.eval_every": 24, "train.eval_steps": 5, "checkpoint.every": 24,
                    "optim.warmup_steps": 4},
    "llama3": {"model.rope_scaling.type": "llama3", "model.rope_scaling.factor": 4.0,
               "model.rope_scaling.low_freq_factor": 1.0, "model.rope_scaling.high_freq_factor": 4.0},
}


def get_config(variant: str = ""):
    c = base.get_config()
    c.stage = "context_extension"
    c.run_dir = "runs/context_extension"
    c.model.init_from = "runs/pretrain"
    c.model.max_seq_len = 1024
    c.model.rope_scaling.type = "yarn"
    c.model.rope_scaling.factor = 4.0
    c.model.rope_scaling.original_max_position_embeddings = 256  # the pre-training sequence length
    c.data.seq_len = 1024
    c.data.batch_size = 8
    c.data.sources.train = base.source(format="synthetic", start=0.0, end=0.95)
    c.data.eval_sources.eval = base.source(format="synthetic", start=0.95, end=1.0)
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 10
    c.train.steps = 100
    c.train.eval_every = 100
    c.train.eval_steps = 8
    c.checkpoint.every = 50
    if variant == "shakespeare":
        c.data.sources.train = base.source(SHAKESPEARE, "text", 1.0, start=0.0, end=0.9)
        c.data.eval_sources.eval = base.source(SHAKESPEARE, "text", 1.0, start=0.9, end=1.0)
    return base.with_variant(c, VARIANTS, variant)
