"""The Step-1 demo job: a tiny model goes Kiln -> Hugging Face -> Kiln checkpoint -> Kiln, logits unchanged."""
from __future__ import annotations

import sys
import tempfile

import jax
import numpy as np
from flax import nnx

from model import hf, presets
from model.transformer import Transformer
from train import checkpoint


def main() -> int:
    cfg = presets.get("tiny", family="gemma2", act="gelu_tanh", norm_plus_one=True, sandwich_norm=True,
                      embed_scale=True, tie_embeddings=True, attn_softcap=50.0, final_softcap=30.0,
                      sliding_window=8, window_layers=(0,))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, cfg.vocab_size)
    logits = np.asarray(model(tokens))
    with tempfile.TemporaryDirectory() as d:
        hf.save(model, cfg, f"{d}/hf")
        _, from_hf = hf.load(f"{d}/hf")
        checkpoint.save_params(f"{d}/ckpt", 0, from_hf, cfg)
        _, restored = checkpoint.load_params(f"{d}/ckpt")
        err = float(np.abs(np.asarray(restored(tokens)) - logits).max())
    print(f"{cfg.family} tiny model: logits {logits.shape}, max |diff| after HF + checkpoint round trip = {err:.2e}")
    return 0 if err == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
