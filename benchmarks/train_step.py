"""Train-step throughput, compile time, MFU and peak memory of Kiln's shared step, optionally side by
side with Hugging Face transformers + PyTorch on the same architecture, weights and batch.

  kiln bench train_step                          # 34M Llama (d512, 8 layers, vocab 8192, untied), 8x256 fp32
  kiln bench train_step --reference=torch        # the same step in transformers + torch, interleaved
  kiln bench train_step --preset=llama3.2_1b --batch=8 --seq=2048 --dtype=bfloat16 --remat=full --trace=DIR

Both sides run forward, backward and AdamW (clip 1.0, weight decay 0.1) on one fixed random batch.
After one untimed step each (Kiln: compilation), they alternate in `--rounds` rounds of `--steps`
steps, so machine noise hits both; a side's step time is the median over all its timed steps.
`--trace=DIR` captures a `jax.profiler` trace of a few Kiln steps (TensorBoard / XProf).
Prints one row per side and the ratio, then one JSON object with the figures as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import types
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import positive
from launch.host_memory import keep_freed_memory
from model import presets
from model.config import ModelConfig
from model.sharding import make_mesh, shard_module
from model.transformer import Transformer, param_count
from train import flops, losses, optim
from train.step import init_state, make_train_step

OPTIM = types.SimpleNamespace(lr=3e-4, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2,
                              weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)


def model_config(preset: str, seq: int, dtype: str, remat: str, untied: bool, scan_layers: bool = True) -> ModelConfig:
    overrides = dict(dtype=dtype, remat=remat, max_seq_len=max(seq, 1024), scan_layers=scan_layers)
    if untied:
        overrides["tie_embeddings"] = False
    return presets.get(preset, **overrides)


def random_batch(cfg: ModelConfig, batch: int, seq: int) -> dict[str, np.ndarray]:
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((batch, seq), np.float32),
                segment_ids=np.ones((batch, seq), np.int32),
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy())


class KilnStep:
    """Kiln's jitted train step on one batch; `run()` does one step and waits for it."""

    def __init__(self, cfg: ModelConfig, host: dict[str, np.ndarray], grad_accum: int = 1):
        self.mesh = make_mesh(data=1, fsdp=-1, tensor=1)
        with jax.set_mesh(self.mesh):
            model = shard_module(Transformer(cfg, rngs=nnx.Rngs(0)), self.mesh)
            self.model = model
            graphdef, params, self.frozen = nnx.split(model, nnx.Param, ...)
            tx = optim.optimizer(OPTIM, 1000, params)
            self.state = init_state(params, tx, 0)
            self.step = jax.jit(make_train_step(graphdef, losses.get("next_token", {}), tx, grad_accum),
                                donate_argnums=(0,))
            self.data = {k: jax.device_put(v, NamedSharding(self.mesh, P(("data", "fsdp")))) for k, v in host.items()}
        self.loss = self.first_loss = float("nan")

    def compile_seconds(self) -> float:
        """Seconds to compile the step, timed as the first call minus a second one (which only runs)."""
        start = time.perf_counter()
        self.run()
        first = time.perf_counter() - start
        start = time.perf_counter()
        self.run()
        return max(first - (time.perf_counter() - start), 0.0)

    def run(self) -> None:
        with jax.set_mesh(self.mesh):
            self.state, m = self.step(self.state, self.frozen, self.data)
        self.loss = float(m["loss"])  # waits for the step
        if self.first_loss != self.first_loss:  # NaN: this was the first step
            self.first_loss = self.loss

    def memory_mb(self) -> float:
        """Peak device memory of the step by the compiler's own analysis (arguments, outputs, temporaries)."""
        with jax.set_mesh(self.mesh):
            a = self.step.lower(self.state, self.frozen, self.data).compile().memory_analysis()
        if a is None:
            return float("nan")
        return (a.argument_size_in_bytes + a.output_size_in_bytes + a.temp_size_in_bytes
                - a.alias_size_in_bytes) / 2 ** 20


class TorchStep:
    """The same model (exported through `model.hf.save`) in transformers + torch: forward with the
    labels' cross-entropy, backward, gradient clipping and AdamW, as a TRL / torchtune loop does it."""

    def __init__(self, model: Transformer, cfg: ModelConfig, host: dict[str, np.ndarray], dtype: str):
        import torch
        import transformers

        from model import hf

        self.torch = torch
        with tempfile.TemporaryDirectory() as d:
            hf.save(model, cfg, d)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                d, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2),
                                     eps=OPTIM.eps, weight_decay=OPTIM.weight_decay)
        self.tokens = torch.from_numpy(host["tokens"].astype(np.int64))
        self.targets = torch.from_numpy(host["targets"].astype(np.int64))
        self.loss = self.first_loss = float("nan")

    def run(self) -> None:
        torch = self.torch
        logits = self.model(input_ids=self.tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIM.clip_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = float(loss)
        if self.first_loss != self.first_loss:
            self.first_loss = self.loss


def timed(run: Callable[[], None], steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        out.append(time.perf_counter() - start)
    return out


def versions() -> dict[str, str]:
    import flax
    import optax
    out = {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
           "flax": flax.__version__, "optax": optax.__version__}
    try:
        import torch
        import transformers
        out.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return out


def trace(kiln: KilnStep, directory: str, steps: int = 3) -> None:
    """A jax.profiler trace of `steps` Kiln steps into `directory` (open with TensorBoard / XProf)."""
    with jax.profiler.trace(directory):
        for _ in range(steps):
            kiln.run()


def measure(preset: str, batch: int, seq: int, dtype: str, steps: int, remat: str, untied: bool,
            grad_accum: int = 1, reference: str | None = None, rounds: int = 3, trace_dir: str | None = None,
            scan_layers: str = "auto") -> dict:
    """Figures of Kiln's step (and the reference's, interleaved) for one configuration. `scan_layers`
    auto: unrolled layers on CPU (7% faster there for `small`), scanned elsewhere."""
    scan = jax.default_backend() != "cpu" if scan_layers == "auto" else scan_layers == "true"
    cfg = model_config(preset, seq, dtype, remat, untied, scan)
    host = random_batch(cfg, batch, seq)
    kiln = KilnStep(cfg, host, grad_accum)
    # Exported before Kiln's first step, which donates (frees) the initial weights.
    ref = TorchStep(kiln.model, cfg, host, dtype) if reference == "torch" else None
    compile_s = kiln.compile_seconds()
    memory_mb = kiln.memory_mb()
    if ref is not None:
        ref.run()
    kiln_times, ref_times = [], []
    for _ in range(rounds):
        kiln_times += timed(kiln.run, steps)
        if ref is not None:
            ref_times += timed(ref.run, steps)
    if trace_dir:
        trace(kiln, trace_dir)
    step_s = float(np.median(kiln_times))
    tps = batch * seq / step_s
    fpt = flops.flops_per_token(cfg, seq)
    peak = flops.total_peak_flops(dtype, list(kiln.mesh.devices.flat))
    row = dict(preset=preset, params=param_count(cfg), batch=batch, seq=seq, dtype=dtype, remat=remat,
               scan_layers=scan, tied=cfg.tie_embeddings, devices=kiln.mesh.size, device=jax.devices()[0].device_kind,
               kiln_tokens_per_s=tps, tokens_per_s=tps, step_s=step_s, compile_s=compile_s,
               tflops_per_s=tps * fpt / 1e12, peak_tflops=peak / 1e12, mfu=tps * fpt / peak,
               peak_memory_mb=memory_mb, host_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               loss=kiln.loss, first_loss=kiln.first_loss, reference=reference, reference_tokens_per_s=None, ratio=None, versions=versions())
    if ref is not None:
        ref_step_s = float(np.median(ref_times))
        row.update(reference_tokens_per_s=batch * seq / ref_step_s, reference_step_s=ref_step_s,
                   ratio=ref_step_s / step_s, reference_loss=ref.loss,
                   reference_first_loss=ref.first_loss, torch_threads=ref.torch.get_num_threads())
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln bench train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=positive(int), default=8)
    p.add_argument("--seq", type=positive(int), default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=positive(int), default=5, help="timed steps per side per round")
    p.add_argument("--rounds", type=positive(int), default=3, help="rounds alternating the two sides")
    p.add_argument("--remat", default="none")
    p.add_argument("--grad_accum", type=positive(int), default=1)
    p.add_argument("--scan_layers", choices=["auto", "true", "false"], default="auto",
                   help="scan the layers (one compiled layer) or unroll them; auto: unrolled on CPU")
    p.add_argument("--tied", action="store_true", help="keep the preset's tied embeddings (default: untied, "
                                                       "the 34M reference shape for `small`)")
    p.add_argument("--reference", choices=["torch"], default=None)
    p.add_argument("--trace", default=None, metavar="DIR", help="write a jax.profiler trace of 3 Kiln steps here")
    a = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    row = measure(a.preset, a.batch, a.seq, a.dtype, a.steps, a.remat, not a.tied, a.grad_accum, a.reference,
                  a.rounds, a.trace, a.scan_layers)
    shape = f"{row['preset']} ({row['params'] / 1e6:.1f}M params) batch {a.batch}x{a.seq} {a.dtype}"
    print(f"kiln   {shape} on {row['devices']}x {row['device']}: {row['tokens_per_s']:,.0f} tokens/s, "
          f"{row['step_s'] * 1e3:.1f} ms/step, {row['tflops_per_s']:.2f} TFLOP/s, MFU {100 * row['mfu']:.1f}% "
          f"(peak {row['peak_tflops']:.2f} TFLOP/s), compile {row['compile_s']:.1f}s, "
          f"peak memory {row['peak_memory_mb']:,.0f} MB")
    if a.reference:
        print(f"torch  {shape}: {row['reference_tokens_per_s']:,.0f} tokens/s, {row['reference_step_s'] * 1e3:.1f} "
              f"ms/step ({row['torch_threads']} threads)")
        print(f"kiln / torch: {row['ratio']:.2f}x")
    if a.trace:
        print(f"profile trace in {a.trace} (tensorboard --logdir {a.trace})")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    keep_freed_memory()  # before JAX allocates (launch/host_memory.py)
    sys.exit(main())
