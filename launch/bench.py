"""`kiln bench NAME [ARGS ...]`: Kiln's benchmarks (modules in benchmarks/), each printing readable
rows and, as its last line, one JSON object with the figures.

  train_step  tokens/s, step and compile time, MFU, memory of the full train step; --reference=torch
              runs the same model in transformers + torch side by side
  memory      per-device bytes of a full train step by the compiler's analysis (llama3_8b, FSDP over 8)
  sampling    new tokens/s of Kiln's sampler against Hugging Face `generate`, same weights and batch
  data        tokens/s the data pipelines deliver (needs $KILN_DATA_DIR)
  shakespeare eval bits/byte on held-out Tiny Shakespeare reached in a wall-clock budget (needs $KILN_DATA_DIR)
  gpu_check   bf16 precision, a sharded forward and train-step MFU on an accelerator

`kiln bench NAME --help` lists a benchmark's options.
"""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = {"train_step": "benchmarks.train_step", "sampling": "benchmarks.sampling",
              "data": "benchmarks.data_throughput", "shakespeare": "benchmarks.shakespeare", "memory": "benchmarks.memory", "gpu_check": "benchmarks.gpu_check"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: kiln bench NAME [ARGS ...]\n\n{__doc__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    return importlib.import_module(BENCHMARKS[name]).main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
