"""launch/host_memory.py: a CPU process keeps freed blocks, so a program's second run reuses the pages
of its first instead of faulting in fresh ones."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import launch.main
from launch import host_memory

ROOT = Path(__file__).resolve().parent.parent

# Runs a program whose one temporary is a 128 MB product 16 times and prints the page faults of each run.
CHILD = """
import json, resource
from launch.host_memory import keep_freed_memory
applied = keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda a, b: jnp.sum(jnp.sin(a @ b)))
a, b = jnp.ones((8192, 64)), jnp.ones((64, 4096))
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(applied=applied, faults=faults)))
"""


def run_child(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory.platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_second_run_reuses_the_first_runs_pages():
    def faulting(faults: list[int]) -> int:
        """Runs after the first that faulted a fresh 128 MB block (32,768 pages) in."""
        return sum(f > 16_000 for f in faults[1:])

    kept = run_child()
    assert kept["applied"] is True
    # Measured over 10 processes: 0-4 of 9 later runs faulted (the heap grows while small blocks settle
    # into the freed one), the rest 0-2 pages each.
    assert faulting(kept["faults"]) <= 7, kept["faults"]
    default = run_child(**{host_memory.OPT_OUT: "0"})
    assert default["applied"] is False
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.exists() and "[always]" in thp.read_text()):  # with 2 MB pages the faults are too few to tell
        # glibc's default maps a fresh block for every run and unmaps it after: ~32,800 faults each time.
        assert faulting(default["faults"]) == 15, default["faults"]


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cpu,cuda", True), ("cuda", False),
                                                 ("tpu,cpu", False), (" cpu ", True)])
def test_jax_platforms_decides_where_jax_computes(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.computes_on_cpu() is expected


@pytest.mark.parametrize("name, expected", [("jax-cuda12-plugin", False), ("jax_cuda13_plugin", False),
                                            ("jax-rocm7-plugin", False), ("libtpu", False), ("numpy", True)])
def test_an_installed_accelerator_plugin_means_the_host_is_not_computing(monkeypatch, name, expected):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    dist = types.SimpleNamespace(metadata={"Name": name})
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [dist])
    assert host_memory.computes_on_cpu() is expected


def test_opting_out_or_an_accelerator_leaves_malloc_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda _: types.SimpleNamespace(
        mallopt=lambda *a: calls.append(a) or 1))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv(host_memory.OPT_OUT, "0")
    assert host_memory.keep_freed_memory() is False
    monkeypatch.delenv(host_memory.OPT_OUT)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert host_memory.keep_freed_memory() is False
    assert calls == []
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    if host_memory.platform.libc_ver()[0] == "glibc":  # the settings, in order, with mallopt's own numbers
        assert host_memory.keep_freed_memory() is True
        assert calls == [(-8, 1), (-4, 0), (-1, -1)]


@pytest.mark.parametrize("argv, kept", [(["kiln", "train", "--help"], True), (["kiln", "bench", "--help"], True),
                                         (["kiln", "--help"], False), (["kiln", "convert", "--help"], False)])
def test_long_running_kiln_commands_keep_freed_memory(monkeypatch, capsys, argv, kept):
    calls = []
    monkeypatch.setattr(launch.main, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(sys, "argv", argv)
    try:
        status = launch.main.cli()
    except SystemExit as e:  # argparse's --help
        status = e.code
    assert status == 0
    assert calls == ([1] if kept else [])
    assert "usage" in capsys.readouterr().out.lower()


def test_the_kiln_script_is_cli():
    entry = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "kiln"]
    assert [e.value for e in entry] == ["launch.main:cli"]
