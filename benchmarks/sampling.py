"""New tokens/s of Kiln's sampler against Hugging Face `generate`, same weights, same batch, one run.

  python -m benchmarks.sampling                      # small preset, batch 16, 64-token prompts, 128 new, greedy, fp32
  python -m benchmarks.sampling --batch=4 --new_tokens=32 --repeats=1 --tensor=1

The Kiln model is exported with `model.hf.save` and loaded by `transformers.AutoModelForCausalLM`
(torch on the CPU), so both sides run the same weights on the same prompts. Both decode greedily
for exactly `--new_tokens` tokens (no stop id). Each side runs once untimed first (Kiln: compiling
the program; torch: warming its allocator), then the best of `--repeats` timed runs counts. Kiln runs
once per `--tensor` value: on 1 device, and with its heads split over N devices (on a CPU-only host,
N CPU devices sharing the cores: tensor parallelism is how the sampler uses a second core, since XLA
runs attention's batched products on one thread). Prints one row per run and the ratio of the fastest
to HF, then one JSON object with the figures as the last line.
"""
from __future__ import annotations

import argparse
import json
import sys
import os
import tempfile
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from benchmarks import positive
from launch.host_memory import keep_freed_memory
from model import hf, presets, sampling
from model.sharding import make_mesh, shard_module, use_cpu_devices
from model.transformer import Transformer, param_count


def best_time(run: Callable[[], np.ndarray], repeats: int) -> tuple[float, float, np.ndarray]:
    """(seconds of the untimed first run, best seconds of `repeats` more, the last output)."""
    start = time.perf_counter()
    out = run()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return first, min(times), out


def measure(preset: str, batch: int, prompt_len: int, new_tokens: int, dtype: str, repeats: int,
            tensors: Sequence[int] = (1,)) -> dict:
    import torch
    import transformers

    cfg = presets.get(preset, dtype=dtype, param_dtype=dtype, max_seq_len=max(prompt_len + new_tokens, 1024))
    prompts = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    kiln_runs = {}
    for tensor in tensors:
        model = Transformer(cfg, rngs=nnx.Rngs(0))  # the same weights for every run
        mesh = make_mesh(data=1, fsdp=1, tensor=tensor, devices=jax.devices()[:tensor]) if tensor > 1 else None
        if mesh is not None:
            with jax.set_mesh(mesh):
                shard_module(model, mesh)

        def kiln() -> np.ndarray:
            return sampling.generate(model, prompts.tolist(), max_new_tokens=new_tokens, temperature=0.0,
                                     mesh=mesh).tokens

        kiln_runs[tensor] = best_time(kiln, repeats)
    tensor = min(kiln_runs, key=lambda t: kiln_runs[t][1])
    kiln_first, kiln_s, kiln_tokens = kiln_runs[tensor]
    with tempfile.TemporaryDirectory() as d:
        hf.save(model, cfg, d)
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch_dtype).eval()
    ids = torch.from_numpy(prompts.astype(np.int64))

    def reference() -> np.ndarray:
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
        return out[:, prompt_len:].numpy()

    hf_first, hf_s, hf_tokens = best_time(reference, repeats)
    new = batch * new_tokens
    return dict(preset=preset, params=param_count(cfg), batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                dtype=dtype, device=jax.devices()[0].device_kind, torch_threads=torch.get_num_threads(),
                kiln_tokens_per_s=new / kiln_s, hf_tokens_per_s=new / hf_s, ratio=hf_s / kiln_s, tensor=tensor,
                kiln_tokens_per_s_by_tensor={str(t): new / run[1] for t, run in kiln_runs.items()},
                kiln_s=kiln_s, hf_s=hf_s, kiln_first_s=kiln_first, hf_first_s=hf_first,
                # Greedy on near-uniform random weights: rounding differences may flip a near-tie, after
                # which a row legitimately diverges; the figure says the two decode the same model.
                greedy_agreement=float(np.mean(kiln_tokens == hf_tokens)),
                tensor_agreement=float(min(np.mean(run[2] == kiln_tokens) for run in kiln_runs.values())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln bench sampling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=positive(int), default=16)
    p.add_argument("--prompt_len", type=positive(int), default=64)
    p.add_argument("--new_tokens", type=positive(int), default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=positive(int), default=3)
    p.add_argument("--tensor", default="1,2", help="Kiln runs with the heads split over each of these device "
                   "counts (comma-separated; default 1,2)")
    a = p.parse_args(argv)
    try:
        tensors = sorted({int(t) for t in a.tensor.split(",")})
    except ValueError:
        p.error(f"--tensor takes device counts separated by commas, got {a.tensor!r}")
    if tensors[0] < 1:
        p.error(f"--tensor counts must be at least 1, got {a.tensor!r}")
    use_cpu_devices(tensors[-1])  # on a CPU-only host: one CPU device per split (before JAX starts)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # before transformers' tokenizers start threads
    row = measure(a.preset, a.batch, a.prompt_len, a.new_tokens, a.dtype, a.repeats, tensors)
    shape = f"{row['preset']} ({row['params'] / 1e6:.1f}M params) batch {a.batch}, {a.prompt_len}-token prompts, " \
            f"{a.new_tokens} new tokens, greedy, {a.dtype}"
    for tensor, tokens_per_s in row["kiln_tokens_per_s_by_tensor"].items():
        where = "1 device" if tensor == "1" else f"heads over {tensor} devices"
        print(f"kiln sampler  {shape}, {where}: {tokens_per_s:,.0f} new tokens/s")
    print(f"kiln, fastest ({row['tensor']} device(s)): {row['kiln_s']:.2f}s, first run with compile "
          f"{row['kiln_first_s']:.1f}s; the runs' greedy tokens agree {100 * row['tensor_agreement']:.1f}%")
    print(f"hf generate   {shape}: {row['hf_tokens_per_s']:,.0f} new tokens/s ({row['hf_s']:.2f}s, torch "
          f"{row['torch_threads']} threads)")
    print(f"kiln / hf: {row['ratio']:.2f}x; greedy tokens agreeing: {100 * row['greedy_agreement']:.1f}%")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    keep_freed_memory()  # before JAX allocates (launch/host_memory.py)
    sys.exit(main())
