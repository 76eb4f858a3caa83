"""Named mesh presets for common hardware, as `--config.mesh.KEY=VALUE` overrides.

Usage:
    python -m launch.slurm --nodes=4 --gpus_per_node=8 --per=node --mesh=4x8xh100 -- kiln train --config=...
    python -c 'from configs import meshes; print(*meshes.overrides("v5e-8"))'

data * fsdp * tensor is the number of devices in one slice (TPU) or node (GPU); dcn_data / dcn_fsdp
is how many slices or nodes the data / fsdp axis spans over the slower data-centre network
(model/sharding.py, make_mesh). Every preset sets all five keys, so that it replaces the stage
config's mesh. JAX counts one device per TPU chip: v4 and v5p names count TensorCores (two per
chip), v5e and v6e names count chips.

FSDP first: on one slice or NVLink node the parameter all-gathers overlap with compute and every
matmul stays whole, so 8 H100s use fsdp=8 rather than fsdp=4, tensor=2; tensor parallelism pays once
the global batch is smaller than the device count (fsdp splits the batch too) or one layer's gathered
weights no longer fit.
Across nodes, data parallelism: only the once-a-step gradient all-reduce crosses the network, where
dcn_fsdp would all-gather the weights over it in every layer. A preset spanning N nodes needs one
process per node (make_mesh tells nodes apart by process).
"""
from __future__ import annotations

DEFAULTS = {"data": 1, "fsdp": 1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1}

PRESETS = {
    "v4-8": {"fsdp": 4},  # TPU v4-8: 4 chips, 1 host
    "v4-32": {"fsdp": 16},  # TPU v4-32: 16 chips, 4 hosts
    "v5e-8": {"fsdp": 8},  # TPU v5e-8 (v5litepod-8): 8 chips, 1 host
    "v5e-256": {"fsdp": 256},  # TPU v5e-256: 256 chips, 64 hosts
    "v5p-128": {"fsdp": 64},  # TPU v5p-128: 64 chips, 16 hosts
    "v6e-8": {"fsdp": 8},  # TPU v6e-8 (Trillium): 8 chips, 1 host
    "v6e-256": {"fsdp": 256},  # TPU v6e-256: 256 chips, 64 hosts
    "2xv5e-256": {"fsdp": 256, "dcn_data": 2},  # two TPU v5e-256 slices (multislice), 512 chips
    "8xh100": {"fsdp": 8},  # one node of 8 NVIDIA H100s joined by NVLink
    "4x8xh100": {"fsdp": 8, "dcn_data": 4},  # 4 nodes of 8 H100s, InfiniBand between the nodes
}


def _preset(name: str) -> dict[str, int]:
    if name not in PRESETS:
        raise ValueError(f"unknown mesh preset {name!r}; known presets: {', '.join(PRESETS)}")
    return {**DEFAULTS, **PRESETS[name]}


def overrides(name: str) -> list[str]:
    """The preset's mesh as `--config.mesh.KEY=VALUE` strings; ValueError for an unknown name."""
    return [f"--config.mesh.{key}={value}" for key, value in _preset(name).items()]


def dcn_size(name: str) -> int:
    """How many slices or nodes the preset spans (dcn_data * dcn_fsdp)."""
    preset = _preset(name)
    return preset["dcn_data"] * preset["dcn_fsdp"]
