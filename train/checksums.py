"""Checksums of checkpointed arrays, so a restore can tell a damaged file from a good one.

Orbax checks neither the bytes nor the values it reads back: random bytes in a data file restore as
finite garbage. Two uint32 sums per array, taken before the write and compared after the read,
catch that; integer sums wrap and are exact in any order, so they do not depend on the mesh.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (narrower types widened, 8-byte types split in two)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums of the array's bits, plain and position-weighted. Unsigned integer sums
    wrap and are exact in any order, so the result does not depend on the mesh."""
    bits = _as_uint32(x).reshape(-1)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.stack([jnp.sum(bits), jnp.sum(bits * weights)])


_checksums = jax.jit(lambda tree: jax.tree.map(_checksum, tree))
_all_finite = jax.jit(lambda arrays: {k: jnp.all(jnp.isfinite(v)) for k, v in arrays.items()
                                    if jnp.issubdtype(v.dtype, jnp.floating)})


def fingerprint(tree: dict[str, Any]) -> dict[str, list[int]]:
    """{"item/path/to/leaf": [sum, weighted sum]} for every array of `tree`."""
    sums = jax.device_get(_checksums(flat(tree)))
    return {k: [int(v) for v in np.asarray(s)] for k, s in sums.items()}


def problem(tree: dict[str, Any], expected: dict[str, list[int]] | None) -> str | None:
    """What is wrong with restored arrays: the first that differs from its checksum in `expected`
    (missing or extra arrays too), else the first float array holding a non-finite value; None if nothing."""
    if expected is not None:
        got = fingerprint(tree)
        for key in sorted(set(got) | set(expected)):
            if got.get(key) != expected.get(key):
                return f"{key} does not match the checksum taken when it was saved (the file is damaged)"
    finite = jax.device_get(_all_finite(flat(tree)))
    bad = sorted(k for k, ok in finite.items() if not ok)
    return f"{bad[0]} holds non-finite values" if bad else None


def flat(tree: Any) -> dict[str, Any]:
    """A pytree as {"path/to/leaf": leaf}: the layout checksums are keyed by, which orbax stores for any pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key(k) for k in path) or "_": leaf for path, leaf in leaves}


def unflat(target: Any, flat_tree: dict[str, Any]) -> Any:
    """`flat`'s inverse: the leaves of `flat_tree` in the structure of `target`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    return jax.tree_util.tree_unflatten(treedef, [flat_tree["/".join(_key(k) for k in p) or "_"] for p, _ in paths])


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)
