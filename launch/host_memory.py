"""Host memory for a process that computes on the CPU: freed blocks are kept for reuse.

XLA's CPU runtime allocates the temporaries of each run of a program as one block, from the worker
thread that runs it, and frees the block when the run ends. glibc serves a block that large with a
fresh `mmap` (any block over 64 MB in a thread's own arena, whatever `M_MMAP_MAX` says) and unmaps
it on free, so every run faults its whole scratch space in again, page by page: the `small` train
step (1.5 GB of temporaries) took 370,000 page faults and ~1 s of kernel time per step. With one
arena, no `mmap` and no trimming, a run reuses the pages of the run before it. The cost: the
process keeps its peak heap until it exits, as JAX's accelerator allocators keep theirs.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform

# mallopt's parameters (glibc's malloc.h) and the values set: one arena, no mmap, and a trim threshold
# of -1, which mallopt(3) documents as "never trim".
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
# With one of these installed (and JAX_PLATFORMS not naming cpu first), JAX computes on an accelerator.
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax-rocm", "libtpu")  # distribution name prefixes
OPT_OUT = "KILN_KEEP_FREED_MEMORY"  # =0: leave glibc's defaults


def computes_on_cpu() -> bool:
    """Whether JAX will run this process's programs on the CPU, judged without starting JAX."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return not any(n.lower().replace("_", "-").startswith(_ACCELERATOR_PLUGINS) for n in names)


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse (one arena, no mmap, no trimming) when JAX
    computes on the CPU; returns whether it did. Call it first in a process, before JAX's threads
    allocate: a thread that already has an arena of its own keeps it. `KILN_KEEP_FREED_MEMORY=0`
    leaves glibc's defaults."""
    if os.environ.get(OPT_OUT, "1") == "0" or platform.libc_ver()[0] != "glibc" or not computes_on_cpu():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)  # mallopt returns 1 on success
