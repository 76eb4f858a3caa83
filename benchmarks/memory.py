"""Per-device memory of a full train step by the compiler's own analysis, with nothing allocated.

  kiln bench memory                                   # llama3_8b, 8 x 8192 tokens, FSDP over 8, bf16, remat full
  kiln bench memory --preset=llama3.2_1b --seq=2048 --remat=none --logits_chunk=0

The step (forward, backward, AdamW with float32 moments) is lowered with abstract, sharded inputs
(`jax.ShapeDtypeStruct`) and compiled ahead of time; `memory_analysis()` gives the bytes of one
device's arguments (parameters, optimizer state, batch), outputs, temporaries (activations kept for
the backward pass, gradients, workspace) and the donated bytes outputs reuse. On a CPU host the
devices are fake (`--xla_force_host_platform_device_count`, set here by re-running in a subprocess),
so the figure is the CPU compiler's plan: a GPU's differs in workspace and fusion, not in what is kept.
Prints one row, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchmarks import positive

GIB = 2 ** 30


def measure(preset: str, batch: int, seq: int, fsdp: int, tensor: int, dtype: str, remat: str,
            logits_chunk: int, attention: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from benchmarks.train_step import OPTIM
    from model import presets
    from model.sharding import make_mesh, state_shardings
    from model.transformer import Transformer, param_count
    from train import losses, optim
    from train.step import TrainState, make_train_step, optimizer_shardings

    base = presets.get(preset)
    cfg = base.replace(dtype=dtype, remat=remat, logits_chunk=logits_chunk, attention=attention,
                       max_seq_len=max(seq, base.max_seq_len))
    mesh = make_mesh(data=1, fsdp=fsdp, tensor=tensor, devices=jax.devices()[:fsdp * tensor])
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = nnx.split(abstract, nnx.Param, ...)
    shardings = state_shardings(params, mesh)
    params = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), params,
                          shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    tx = optim.optimizer(OPTIM, 1000, params)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             jax.eval_shape(tx.init, params), optimizer_shardings(params, tx))
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    state = TrainState(step=scalar, params=params, opt_state=opt_state,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P())),
                       nonfinite_streak=scalar, nonfinite_total=scalar)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    data = {k: jax.ShapeDtypeStruct((batch, seq), dt, sharding=rows) for k, dt in
            (("tokens", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32),
             ("segment_ids", jnp.int32), ("positions", jnp.int32))}
    step = jax.jit(make_train_step(graphdef, losses.get("next_token", {}), tx), donate_argnums=(0,))
    with jax.set_mesh(mesh):
        a = step.lower(state, frozen, data).compile().memory_analysis()
    total = a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes - a.alias_size_in_bytes
    return dict(preset=preset, params=param_count(cfg), batch=batch, seq=seq, fsdp=fsdp, tensor=tensor,
                dtype=dtype, param_dtype=cfg.param_dtype, remat=remat, logits_chunk=logits_chunk,
                devices=mesh.size, device=jax.devices()[0].device_kind,
                argument_gib=a.argument_size_in_bytes / GIB, output_gib=a.output_size_in_bytes / GIB,
                temp_gib=a.temp_size_in_bytes / GIB, alias_gib=a.alias_size_in_bytes / GIB,
                peak_memory_mb=total / 2 ** 20, per_device_gib=total / GIB,
                kiln_tokens_per_s=None, reference_tokens_per_s=None, ratio=None, mfu=None,
                versions={"jax": jax.__version__})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama3_8b")
    p.add_argument("--batch", type=positive(int), default=8, help="global batch (rows)")
    p.add_argument("--seq", type=positive(int), default=8192)
    p.add_argument("--fsdp", type=positive(int), default=8)
    p.add_argument("--tensor", type=positive(int), default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--remat", default="full")
    p.add_argument("--logits_chunk", type=int, default=1024)
    p.add_argument("--attention", default="einsum", help="training attention (the kernels of the target chip "
                                                          "do not compile for CPU)")
    p.add_argument("--limit_gib", type=positive(float), default=80.0, help="device memory to check against (H100: 80)")
    a = p.parse_args(argv)
    need = a.fsdp * a.tensor
    import jax
    if jax.device_count() < need:
        if jax.default_backend() != "cpu" or os.environ.get("KILN_MEMORY_CHILD"):
            p.error(f"the mesh needs {need} devices; this machine has {jax.device_count()}")
        env = dict(os.environ, KILN_MEMORY_CHILD="1",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={need}")
        args = sys.argv[1:] if argv is None else argv  # `kiln bench memory` passes [] when given no options
        return subprocess.run([sys.executable, "-m", "benchmarks.memory", *args], env=env).returncode
    row = measure(a.preset, a.batch, a.seq, a.fsdp, a.tensor, a.dtype, a.remat, a.logits_chunk, a.attention)
    row["limit_gib"], row["fits"] = a.limit_gib, row["per_device_gib"] <= a.limit_gib
    print(f"{a.preset} ({row['params'] / 1e9:.2f}B params) batch {a.batch}x{a.seq} {a.dtype}, fsdp {a.fsdp} x tensor "
          f"{a.tensor}, remat {a.remat}, logits chunk {a.logits_chunk}: {row['per_device_gib']:.1f} GiB per device "
          f"(arguments {row['argument_gib']:.1f}, outputs {row['output_gib']:.1f}, temporaries {row['temp_gib']:.1f}, "
          f"donated {row['alias_gib']:.1f}); {'fits' if row['fits'] else 'does NOT fit'} in {a.limit_gib:.0f} GiB")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
