"""Kiln checkpoints: an orbax CheckpointManager directory of numbered steps.

Each step holds the item `params` (the model's parameters as a pure dict) and `model_config`
(JSON of the ModelConfig), so a checkpoint alone rebuilds its model. Restoring goes onto an
abstract, sharded target, so a checkpoint saved on one mesh loads onto another.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from model.config import ModelConfig
from model.sharding import Rules, var_sharding
from model.transformer import Transformer


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read, with the reason."""


def checkpoint_dir(path: str) -> str:
    """The CheckpointManager directory for a run directory or a checkpoints directory."""
    inner = os.path.join(path, "checkpoints")
    return os.path.abspath(inner if os.path.isdir(inner) else path)


def save_params(path: str, step: int, model: Transformer, cfg: ModelConfig) -> None:
    """Writes the parameters and config of `model` as step `step` under `path` (blocking)."""
    with ocp.CheckpointManager(checkpoint_dir(path)) as mgr:
        mgr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
            model_config=ocp.args.JsonSave(cfg.to_dict())))
        mgr.wait_until_finished()


def latest_step(path: str) -> int:
    directory = checkpoint_dir(path)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    with ocp.CheckpointManager(directory) as mgr:
        step = mgr.latest_step()
    if step is None:
        raise CheckpointError(f"{path}: no finished checkpoint step in {directory}")
    return step


def read_model_config(path: str, step: int | None = None) -> ModelConfig:
    directory = checkpoint_dir(path)
    step = latest_step(path) if step is None else step
    with ocp.CheckpointManager(directory) as mgr:
        try:
            raw = mgr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))["model_config"]
        except FileNotFoundError as e:
            raise CheckpointError(f"{directory}/{step}: not a Kiln checkpoint (no model_config item): {e}") from None
    return ModelConfig.from_dict(raw)


def load_params(path: str, step: int | None = None, mesh: Mesh | None = None,
                rules: Rules | None = None) -> tuple[ModelConfig, Transformer]:
    """Rebuilds the model saved at `path` (latest step by default), sharded on `mesh` if given."""
    step = latest_step(path) if step is None else step
    cfg = read_model_config(path, step)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    def abstract(var: nnx.Variable) -> nnx.Variable:
        sharding = var_sharding(var, mesh, rules) if mesh is not None else None
        return var.replace(jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype, sharding=sharding))

    target = nnx.to_pure_dict(jax.tree.map(abstract, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    with ocp.CheckpointManager(checkpoint_dir(path)) as mgr:
        restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    nnx.replace_by_pure_dict(state, restored)
    return cfg, nnx.merge(graphdef, state)


# -- full training state -----------------------------------------------------------------------------
def _flat(tree: Any) -> dict[str, Any]:
    """A pytree as {"path/to/leaf": leaf}, a layout orbax stores for any pytree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key(k) for k in path) or "_": leaf for path, leaf in leaves}


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _unflat(target: Any, flat: dict[str, Any]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    return jax.tree_util.tree_unflatten(treedef, [flat["/".join(_key(k) for k in p) or "_"] for p, _ in paths])


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Saves and restores (train state, data-iterator state) under `run_dir/checkpoints`.

    Items per step: `params` (trainable parameters, pure dict), `train_state` (optimizer, step, RNG,
    counters), `data` (iterator state, JSON) and `model_config` (JSON). Orbax writes each step into
    a temporary directory and renames it when complete, so a crash mid-save leaves nothing that
    `latest_step` would pick up.
    """

    def __init__(self, run_dir: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                               enable_async_checkpointing=async_save)
        self.directory = os.path.join(os.path.abspath(run_dir), "checkpoints")
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: Any, data_state: dict[str, Any], model_config: ModelConfig) -> None:
        step = int(state.step)
        rest = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng,
                "nonfinite_streak": state.nonfinite_streak, "nonfinite_total": state.nonfinite_total}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(state.params)),
            train_state=ocp.args.StandardSave(_flat(rest)),
            data=ocp.args.JsonSave(data_state),
            model_config=ocp.args.JsonSave(model_config.to_dict())), force=True)

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """(state shaped and sharded like `like`, data-iterator state) at `step`."""
        rest = {"opt_state": like.opt_state, "step": like.step, "rng": like.rng,
                "nonfinite_streak": like.nonfinite_streak, "nonfinite_total": like.nonfinite_total}
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(like.params))),
            train_state=ocp.args.StandardRestore(_abstract(_flat(rest))),
            data=ocp.args.JsonRestore()))
        params = jax.tree.map(lambda x: x, like.params)
        nnx.replace_by_pure_dict(params, out["params"])
        rest = _unflat(rest, out["train_state"])
        return type(like)(params=params, **rest), out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
