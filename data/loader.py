"""Host batches -> global jax arrays sharded over the batch dimension of a mesh."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh, axes: Sequence[str] = ("data", "fsdp")
                 ) -> dict[str, Any]:
    """Each numeric array (this process's rows) becomes one global array whose batch dimension is
    split over the mesh `axes` (those the mesh has); the global batch is the processes' rows in
    process order. Non-numeric entries (e.g. reference answers) stay host-side as they are."""
    batch_axes = tuple(a for a in axes if a in mesh.axis_names) or None
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray) and (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
            spec = PartitionSpec(batch_axes, *([None] * (value.ndim - 1)))
            out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
        else:
            out[key] = value
    return out
