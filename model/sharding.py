"""Logical axis names -> mesh axes.

Every parameter carries `axes` metadata (one logical name per dimension) and the forward pass
constrains its main activations by logical name too. A rule table maps each logical name to mesh
axes (`data`, `fsdp`, `tensor`); the table is data (it lives in the run config), so changing the
parallelism layout never touches model code. A mesh axis that does not divide a dimension is
dropped for that array (it is replicated instead), so tiny test models run on any mesh.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

# FSDP shards the embedding dimension of weights and the batch of activations; tensor parallelism
# shards heads, the MLP hidden dimension and the vocabulary.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("act_seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_seq", None),
    ("lora_rank", None),
    ("prefix", None),
)

_rules: contextvars.ContextVar[Rules] = contextvars.ContextVar("kiln_sharding_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def use_rules(rules: Sequence[Sequence[Any]]) -> Iterator[None]:
    """Sets the logical-axis rule table for the model code traced inside the block."""
    token = _rules.set(tuple((name, _as_tuple(target)) for name, target in rules))
    try:
        yield
    finally:
        _rules.reset(token)


def _as_tuple(target: Any) -> tuple[str, ...]:
    if target is None:
        return ()
    if isinstance(target, str):
        return (target,)
    return tuple(target)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh_shape: dict[str, int] | None = None, rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes`; with `shape` and `mesh_shape`, non-dividing mesh axes are dropped."""
    table = dict((name, _as_tuple(t)) for name, t in (rules or _rules.get()))
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(axes):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to mesh.rules")
        targets = []
        for mesh_axis in table.get(name, ()) if name is not None else ():
            size = (mesh_shape or {}).get(mesh_axis, 1)
            if mesh_axis in used or (mesh_shape is not None and mesh_axis not in mesh_shape):
                continue
            if shape is not None and shape[dim] % (size * math.prod(mesh_shape[a] for a in targets)) != 0:
                continue
            targets.append(mesh_axis)
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else tuple(targets))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical axes; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def use_cpu_devices(n: int) -> None:
    """Gives JAX's CPU backend n devices, so that a mesh of n devices exists on a host without
    accelerators; the devices share the host's cores (on a 2-core CPU the sampler with its heads over two
    devices keeps both cores busy: docs/performance.md). Accelerators' devices are unaffected. Only before
    the backends start (the first JAX operation); after that the devices stay as they are."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends have started
        pass


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None, *,
              dcn_data: int = 1, dcn_fsdp: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes; one of the three may be -1 (the remaining devices).

    With `dcn_data` x `dcn_fsdp` > 1 the devices form that many granules (TPU slices, or processes,
    i.e. hosts or nodes, joined by the slower data-centre network) and `data`/`fsdp`/`tensor` describe
    one granule: the mesh's data axis is dcn_data * data long, granules outermost, so that only the
    data (or fsdp) axis crosses the network and tensor parallelism stays inside a granule. One process
    without slices splits its devices into equal groups in order (a stand-in to test with).
    """
    devices = list(devices if devices is not None else jax.devices())
    granules = _granules(devices, dcn_data * dcn_fsdp)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    per, known = len(granules[0]), math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per % known:
            raise ValueError(f"mesh: {per} devices{' per granule' if len(granules) > 1 else ''} are not divisible "
                             f"by data*fsdp*tensor={known}")
        sizes[sizes.index(-1)] = per // known
    if math.prod(sizes) != per:
        raise ValueError(f"mesh: data*fsdp*tensor={math.prod(sizes)} does not match the {per} devices"
                         f"{' per granule' if len(granules) > 1 else ''}; set one of mesh.data/fsdp/tensor to -1")
    # [dcn_data, dcn_fsdp, data, fsdp, tensor] -> data axis (dcn_data, data), fsdp axis (dcn_fsdp, fsdp).
    grid = np.asarray([d for g in granules for d in g]).reshape(dcn_data, dcn_fsdp, *sizes)
    grid = grid.transpose(0, 2, 1, 3, 4).reshape(dcn_data * sizes[0], dcn_fsdp * sizes[1], sizes[2])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _granules(devices: list[Any], count: int) -> list[list[Any]]:
    """`devices` as `count` equal groups: by TPU slice, else by process, else in order (one process)."""
    if count < 1:
        raise ValueError(f"mesh: dcn_data * dcn_fsdp must be at least 1, got {count}")
    if count == 1:
        return [devices]
    for key in ("slice_index", "process_index"):
        ids = sorted({getattr(d, key, 0) for d in devices})
        if len(ids) > 1:
            if len(ids) != count:
                raise ValueError(f"mesh: the devices span {len(ids)} {key.split('_')[0]}es but mesh.dcn_data * "
                                 f"mesh.dcn_fsdp = {count}; make the product the number of slices or processes")
            groups = [[d for d in devices if getattr(d, key, 0) == i] for i in ids]
            break
    else:
        if len(devices) % count:
            raise ValueError(f"mesh: {len(devices)} devices do not split into dcn_data * dcn_fsdp = {count} groups")
        n = len(devices) // count
        groups = [devices[i * n:(i + 1) * n] for i in range(count)]
    if len({len(g) for g in groups}) > 1:
        raise ValueError(f"mesh: the {count} granules hold different numbers of devices ({[len(g) for g in groups]})")
    return groups


def var_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """The NamedSharding of one Variable, from its `axes` metadata."""
    axes = var.get_metadata().get("axes")
    shape = var.get_value().shape
    if axes is None or len(axes) != len(shape):
        raise ValueError(f"parameter of shape {shape} lacks logical `axes` metadata matching its rank")
    return NamedSharding(mesh, logical_to_spec(axes, shape, dict(mesh.shape), rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings for every Variable of an nnx State (a pytree prefix of the state)."""
    return jax.tree.map(lambda v: var_sharding(v, mesh, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(module: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Places every parameter of `module` on `mesh` according to the rule table (in place)."""
    state = nnx.state(module)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))
    return module


def to_host(tree: Any) -> Any:
    """Every array of `tree` whole on this host: as it is with one process; gathered from every
    process when the array spans several (each then holds the same full copy)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)


def replicated(tree: Any, mesh: Mesh) -> Any:
    """Host arrays that every process holds identically as global arrays copied to every device of
    `mesh` (what a jitted function spanning several processes needs; one process: unchanged)."""
    if jax.process_count() == 1:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec())

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
    return jax.tree.map(one, tree)
