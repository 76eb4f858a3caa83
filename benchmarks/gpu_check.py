"""GPU path check: bf16 vs fp32 logits, a sharded forward, and train-step MFU on the real chip.

  kiln bench gpu_check      (or python -m benchmarks.gpu_check)

Prints one row per check and, as the last line, one JSON object with the figures.
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx

from benchmarks.train_step import measure
from model import presets
from model.sharding import make_mesh, shard_module
from model.transformer import KVCache, Transformer


def precision_check() -> dict:
    """Relative logit error of bf16 compute (fp32 params) against fp32 compute, and KV-cache decoding in bf16."""
    cfg = presets.get("small", max_seq_len=512)
    tokens = jax.random.randint(jax.random.key(0), (4, 256), 0, cfg.vocab_size)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(Transformer(cfg, rngs=nnx.Rngs(0))(tokens))
    model = Transformer(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    shard_module(model, mesh)
    with jax.set_mesh(mesh):
        out = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
        logits, cache = nnx.jit(lambda m, t, c: m.decode(t, c))(model, tokens[:, :200],
                                                               KVCache.init(model.cfg, 4, 256))
    scale = np.abs(ref).max()
    return {"bf16_rel_err": float(np.abs(out - ref).max() / scale),
            "bf16_decode_vs_forward_rel_err": float(np.abs(np.asarray(logits) - out[:, :200]).max() / scale)}


def main(argv: list[str] | None = None) -> int:
    if argv:
        print(__doc__)
        return 0 if argv[0] in ("-h", "--help") else 2
    print(f"devices: {jax.devices()} jax {jax.__version__}")
    figures = precision_check()
    print(f"bf16 logits vs fp32: rel err {figures['bf16_rel_err']:.2e}; "
          f"KV-cache prefill vs forward (bf16): {figures['bf16_decode_vs_forward_rel_err']:.2e}")
    runs = [("small", 32, 1024, "bfloat16", "none"), ("small", 8, 256, "float32", "none"),
            ("llama3.2_1b", 8, 2048, "bfloat16", "full")]
    figures["train_step"] = []
    for preset, batch, seq, dtype, remat in runs:
        try:
            row = measure(preset, batch, seq, dtype, steps=10, remat=remat, untied=False)
        except Exception as e:  # report and continue: one failed size must not hide the others
            row = {"preset": preset, "batch": batch, "seq": seq, "dtype": dtype, "error": repr(e)[:300]}
            print(f"{preset} {batch}x{seq} {dtype}: FAILED {row['error']}")
        else:
            print(f"{preset} {batch}x{seq} {dtype} remat={remat}: {row['tokens_per_s']:,.0f} tokens/s, "
                  f"{row['tflops_per_s']:.1f} TFLOP/s, MFU {100 * row['mfu']:.1f}%, compile {row['compile_s']:.0f}s")
        figures["train_step"].append(row)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
