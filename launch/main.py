"""The `kiln` command: dispatches `kiln SUBCOMMAND ...` to its module.

Bad input ends with one line on stderr naming the problem and exit status 1; `--debug` shows the
Python traceback instead.
"""
from __future__ import annotations

import importlib
import sys

from launch.host_memory import keep_freed_memory

# subcommand -> (module, one-line help). Modules expose `main(argv: list[str]) -> int`.
COMMANDS = {
    "train": ("launch.train", "train one stage from a config"),
    "tokenizer": ("launch.tokenizer_cli", "train a sentencepiece tokenizer"),
    "data": ("launch.data_cli", "preview a data pipeline (kiln data preview --config=...), precompute DPO reference log-probs (kiln data reference)"),
    "convert": ("launch.convert", "convert between Hugging Face directories and Kiln checkpoints"),
    "sample": ("launch.sample", "sample from a checkpoint (kiln sample --checkpoint=... --prompt=...)"),
    "eval": ("launch.eval", "evaluate a checkpoint (kiln eval --checkpoint=... --config=configs/eval.py)"),
    "generate": ("launch.generate", "rejection sampling (kiln generate --config=configs/rejection_sampling.py)"),
    "pipeline": ("launch.pipeline", "run a recipe of stages in order (kiln pipeline --config=configs/recipes/...)"),
    "sweep": ("launch.sweep", "run an ablation grid over seeds, tabulated and plotted "
                              "(kiln sweep --config=configs/sweeps/...)"),
    "bench": ("launch.bench", "throughput and MFU benchmarks (kiln bench train_step | sampling | data | shakespeare | memory | gpu_check)"),
}


# Subcommands that run the same compiled programs many times (train steps, decode loops, benchmarks): their
# process keeps freed memory for the next run instead of faulting fresh pages in (launch/host_memory.py).
# The one-shot commands start faster without it: with one malloc arena, XLA compiles 20-40% slower.
KEEP_FREED_MEMORY = ("train", "pipeline", "sweep", "generate", "bench")


class UsageError(Exception):
    """Bad input from the user: reported as one line, without a traceback."""


# Errors of bad input that are not ValueErrors: a run directory in use, a run that cannot go on. Looked
# up only in modules already imported (one that raised is), so that `kiln` starts without importing JAX.
_RUNTIME_ERRORS = (("train.rundir", "RunDirError"), ("train.trainer", "TrainingError"))


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported as one line rather than a traceback."""
    loaded = tuple(getattr(sys.modules[m], n) for m, n in _RUNTIME_ERRORS if m in sys.modules)
    return (UsageError, ValueError, FileNotFoundError, KeyError, OSError, *loaded)


def usage() -> str:
    lines = ["usage: kiln SUBCOMMAND [ARGS ...]", "", "subcommands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kiln: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return module.main(rest)
    except Exception as e:
        if debug or not isinstance(e, user_errors()):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"kiln {name}: error: {msg}", file=sys.stderr)
        return 1


def cli() -> int:
    """The `kiln` console script (and `python -m launch.main`): `main` in a process of its own. The
    subcommands in KEEP_FREED_MEMORY first set up the host's memory for CPU computation."""
    if sys.argv[1:2] and sys.argv[1] in KEEP_FREED_MEMORY:
        keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(cli())
