"""Train-step throughput and MFU of Kiln's shared step on synthetic batches.

  python -m benchmarks.train_step --preset=small --batch=8 --seq=256 --dtype=float32
  python -m benchmarks.train_step --preset=small --untied   # the 34M DESIGN.md reference model

Prints one row per measured configuration, then one JSON object with the figures as the last line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import presets
from model.sharding import make_mesh, shard_module
from model.transformer import Transformer, param_count
from train import flops, losses, optim
from train.step import init_state, make_train_step

OPTIM = types.SimpleNamespace(lr=3e-4, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2,
                              weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)


def measure(preset: str, batch: int, seq: int, dtype: str, steps: int, remat: str, untied: bool,
            grad_accum: int = 1) -> dict:
    overrides = dict(dtype=dtype, remat=remat, max_seq_len=max(seq, 1024))
    if untied:
        overrides["tie_embeddings"] = False
    cfg = presets.get(preset, **overrides)
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    with jax.set_mesh(mesh):
        model = shard_module(Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
        graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
        tx = optim.optimizer(OPTIM, 1000, params)
        state = init_state(params, tx, 0)
        step = jax.jit(make_train_step(graphdef, losses.get("next_token", {}), tx, grad_accum),
                       donate_argnums=(0,))
        rng = np.random.RandomState(0)
        tokens = rng.randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
        host = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((batch, seq), np.float32),
                    segment_ids=np.ones((batch, seq), np.int32),
                    positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)))
        data = {k: jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")))) for k, v in host.items()}
        start = time.perf_counter()
        state, m = step(state, frozen, data)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, frozen, data)
        jax.block_until_ready((state, m))
        elapsed = time.perf_counter() - start
    tps = batch * seq * steps / elapsed
    fpt = flops.flops_per_token(cfg, seq)
    peak = flops.total_peak_flops(dtype, list(mesh.devices.flat))
    return dict(preset=preset, params=param_count(cfg), batch=batch, seq=seq, dtype=dtype, remat=remat,
                devices=mesh.size, device=jax.devices()[0].device_kind, tokens_per_s=tps,
                step_s=elapsed / steps, compile_s=compile_s, tflops_per_s=tps * fpt / 1e12,
                peak_tflops=peak / 1e12, mfu=tps * fpt / peak, loss=float(m["loss"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln bench train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--remat", default="none")
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--untied", action="store_true", help="untie embeddings (the 34M DESIGN.md reference shape)")
    a = p.parse_args(argv)
    row = measure(a.preset, a.batch, a.seq, a.dtype, a.steps, a.remat, a.untied, a.grad_accum)
    print(f"{row['preset']} ({row['params'] / 1e6:.1f}M params) batch {a.batch}x{a.seq} {a.dtype} on "
          f"{row['devices']}x {row['device']}: {row['tokens_per_s']:,.0f} tokens/s, {row['step_s'] * 1e3:.1f} ms/step, "
          f"{row['tflops_per_s']:.2f} TFLOP/s, MFU {100 * row['mfu']:.1f}% (peak {row['peak_tflops']:.2f} TFLOP/s), "
          f"compile {row['compile_s']:.1f}s")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
