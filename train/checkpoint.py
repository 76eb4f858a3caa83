"""Kiln checkpoints: an orbax CheckpointManager directory of numbered steps.

Each step holds the item `params` (the model's parameters as a pure dict), `model_config` (JSON of
the ModelConfig), so a checkpoint alone rebuilds its model, and `fingerprint` (JSON: `checksums` of
every array, taken before the write and compared on every restore). A run that trains adapters only
(LoRA) saves only them, plus the item `base` (JSON: the frozen base's directory and step), from
which loading rebuilds the rest. Restoring goes onto an abstract, sharded target, so a checkpoint
saved on one mesh loads onto another.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from data import pipeline
from model import hf, lora
from model.config import DType, ModelConfig
from model.sharding import Rules, var_sharding
from model.transformer import Transformer, trainable
from train import checksums, distributed
from train.modeldir import is_hf_dir, locate

CORRUPT_DIR = "checkpoints.corrupt"  # beside checkpoints/: unreadable steps are moved here, never deleted


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written, with the reason."""


def ensure_writable(directory: str) -> None:
    """Creates `directory` if needed and proves it writable with a probe file; CheckpointError if not.
    Checked before every save too: once orbax's background writer fails, its threads wait minutes
    for signals that never come."""
    if "://" in directory:  # object stores (gs://...) are orbax's business
        return
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"checkpoint directory {directory} is not writable ({e.strerror or e}); "
                              "fix its permissions or choose another run_dir") from None


def verify(tree: dict[str, Any], expected: dict[str, list[int]] | None, where: str) -> None:
    """Raises CheckpointError if a restored array differs from its checksum or a float is not finite."""
    problem = checksums.problem(tree, expected)
    if problem:
        raise CheckpointError(f"{where}: {problem}")


# -- parameters only (init_from, kiln convert) -------------------------------------------------------------
def save_params(path: str, step: int, model: Transformer, cfg: ModelConfig) -> None:
    """Writes the parameters and config of `model` as step `step` under `path` (blocking)."""
    directory = locate(path)[0]
    with ocp.CheckpointManager(directory) as mgr:
        # Orbax skips, without a word, a step at or below one the directory already holds.
        if mgr.latest_step() is not None and mgr.latest_step() >= step:
            raise CheckpointError(f"{directory} already holds checkpoint step {mgr.latest_step()}; write into a new "
                                  "directory (or a later --step)")
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        mgr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), model_config=ocp.args.JsonSave(cfg.to_dict()),
            fingerprint=ocp.args.JsonSave(checksums.fingerprint({"params": params}))))
        mgr.wait_until_finished()


def latest_step(path: str) -> int:
    """The step `path` names, or its latest finished one."""
    directory, step = locate(path)
    if step is not None:
        return step
    if os.path.isfile(directory):
        raise CheckpointError(f"{path} is a file; name a Kiln run, checkpoints or step directory, or a Hugging Face "
                              "directory")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    with ocp.CheckpointManager(directory) as mgr:
        step = mgr.latest_step()
    if step is None and any(name.endswith(".safetensors") for name in os.listdir(directory)):
        raise CheckpointError(f"{path} holds .safetensors files but no config.json, which a Hugging Face directory "
                              "needs; copy it there")
    if step is None:
        raise CheckpointError(f"{path}: no finished checkpoint step in {directory}")
    return step


def read_model_config(path: str, step: int | None = None) -> ModelConfig:
    directory = locate(path)[0]
    step = latest_step(path) if step is None else step
    with ocp.CheckpointManager(directory) as mgr:
        if not os.path.isdir(os.path.join(directory, str(step))):
            held = ", ".join(map(str, mgr.all_steps())) or "none"
            raise CheckpointError(f"{directory} has no step {step} (its steps: {held})")
        if not os.path.isdir(os.path.join(directory, str(step), "model_config")):
            raise CheckpointError(f"{directory}/{step}: not a Kiln checkpoint (no model_config item)")
        try:
            raw = mgr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))["model_config"]
        except Exception as e:  # orbax raises many types for a damaged file
            raise CheckpointError(f"checkpoint {directory}/{step}: its model_config cannot be read ({_one_line(e)}); "
                                  f"name an earlier step directory such as {directory}/<step>") from None
    return ModelConfig.from_dict(raw)


def load_params(path: str, step: int | None = None, mesh: Mesh | None = None,
                rules: Rules | None = None) -> tuple[ModelConfig, Transformer]:
    """Rebuilds the model saved at `path` (the step it names, else the latest), sharded on `mesh` if
    given. A checkpoint of adapters gets its frozen weights from the base it points to."""
    directory = locate(path)[0]
    step = latest_step(path) if step is None else step
    cfg = read_model_config(path, step)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    base = _has_item(directory, step, "base")
    saved = nnx.state(state, trainable(cfg) if base else nnx.Param)

    # Without a mesh, onto this process's first device: never the saving run's devices, which this
    # machine (or this process) may not have.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(var: nnx.Variable) -> nnx.Variable:
        sharding = var_sharding(var, mesh, rules) if mesh is not None else local
        return var.replace(jax.ShapeDtypeStruct(var.get_value().shape, var.get_value().dtype, sharding=sharding))

    target = nnx.to_pure_dict(jax.tree.map(abstract, saved, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    where = f"checkpoint {directory}/{step}"
    items = {"params": ocp.args.StandardRestore(target)}
    for item in ("fingerprint", "base"):
        if _has_item(directory, step, item):
            items[item] = ocp.args.JsonRestore()
    with ocp.CheckpointManager(directory) as mgr:
        try:
            out = mgr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise many types for damaged files
            raise CheckpointError(f"{where} cannot be read ({_one_line(e)}); name an earlier step directory "
                                  f"such as {directory}/<step>") from None
    expected = out.get("fingerprint")
    verify({"params": out["params"]}, None if expected is None else
           {k: v for k, v in expected.items() if k.startswith("params/")}, where)
    if base:
        nnx.replace_by_pure_dict(state, _base_values(out["base"], cfg, mesh, rules, where))
    nnx.replace_by_pure_dict(state, out["params"])
    return cfg, nnx.merge(graphdef, state)


def _base_values(item: dict[str, Any], cfg: ModelConfig, mesh: Mesh | None, rules: Rules | None,
                 where: str) -> dict[str, Any]:
    """The frozen weights (pure dict, without adapters) that the adapters of checkpoint `where` were
    trained on: the `base` item's directory, at the step it names (older checkpoints: its latest)."""
    base = _base_path(item)
    if not os.path.exists(base):
        raise CheckpointError(f"{where} holds adapters trained on {base}, which no longer exists; restore that "
                              "base directory, or merge the adapters while it is there (kiln convert --to-hf)")
    base_model = load_model(base, mesh=mesh, rules=rules, param_dtype=cfg.param_dtype)[1]
    if base_model.cfg.prefix is not None:
        raise CheckpointError(f"{where} points to {base}, itself prompt/prefix-tuned; a base must be a whole model")
    if lora.adapters(base_model):  # adapters trained on adapters: the earlier ones are part of the base
        base_model = lora.merge(base_model)
    return jax.tree.map(lambda x: x.astype(cfg.param_dtype), nnx.to_pure_dict(nnx.state(base_model, nnx.Param)))


def base_of(path: str) -> str:
    """The frozen base a checkpoint of adapters points to, as the step directory it trained on for a Kiln
    base ("" for a checkpoint of a whole model)."""
    directory = locate(path)[0]
    step = latest_step(path)
    if not _has_item(directory, step, "base"):
        return ""
    with ocp.CheckpointManager(directory) as mgr:
        return _base_path(_base_item(mgr, step))


def _base_item(mgr: ocp.CheckpointManager, step: int, item: str = "base") -> dict[str, Any]:
    """The `base` item that step `step` of a checkpoint of adapters was saved with (or another run's `start`)."""
    return mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]


def _base_path(item: dict[str, Any]) -> str:
    """The directory an adapters' `base` item names: for a Kiln run still there, the step they trained on
    (older checkpoints name no step: the run itself)."""
    base, step = item["init_from"], item.get("step")
    return os.path.join(locate(base)[0], str(step)) if step is not None and os.path.exists(base) else base


def load_model(path: str, *, mesh: Mesh | None = None, rules: Rules | None = None,
               param_dtype: DType | None = None) -> tuple[ModelConfig, Transformer]:
    """The model in `path`: a Hugging Face directory (read in `param_dtype`, default float32) or a
    Kiln run, checkpoints or step directory (parameters as saved)."""
    if is_hf_dir(path):
        return hf.load(path, dtype=param_dtype, param_dtype=param_dtype)
    return load_params(path, mesh=mesh, rules=rules)


# -- full training state -----------------------------------------------------------------------------
def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _has_item(directory: str, step: int, item: str) -> bool:
    return os.path.isdir(os.path.join(directory, str(step), item))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _split_value(params: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint items of trainable parameters: `params`, and `value` for a PPO state (policy
    and value model), whose policy is thus saved where every loader reads a model."""
    if set(params) == {"policy", "value"}:
        return {"params": params["policy"], "value": params["value"]}
    return {"params": params}


def _join_value(items: dict[str, Any]) -> dict[str, Any]:
    return {"policy": items["params"], "value": items["value"]} if "value" in items else items["params"]


def _rest(state: Any) -> dict[str, Any]:
    """The train state other than the parameters."""
    return {"opt_state": state.opt_state, "step": state.step, "rng": state.rng,
            "nonfinite_streak": state.nonfinite_streak, "nonfinite_total": state.nonfinite_total}


class Checkpointer:
    """Saves and restores (train state, data-iterator state) under `run_dir/checkpoints`.

    Items per step: `params` (trainable parameters, pure dict; a PPO run's value model in `value`,
    so `params` is always a policy), `train_state` (optimizer, step, RNG,
    counters), `data` (iterator state, JSON), `model_config` (JSON) and `fingerprint` (JSON
    checksums). Orbax writes each step into a temporary directory and renames it when complete, so
    a crash mid-save leaves nothing that `latest_step` would pick up.
    """

    def __init__(self, run_dir: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True, base: str = "",
                 start: str = ""):
        """`base`: the directory of the frozen weights when the state holds only adapters; `start`: the
        model a whole-model run started from when its reference (DPO, RL) is those starting weights."""
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                               enable_async_checkpointing=async_save)
        self.run_dir = os.path.abspath(run_dir)
        self.directory = os.path.join(self.run_dir, "checkpoints")
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.base = os.path.abspath(base) if base else ""
        # The base's step, not just its run: the run may train on, and the adapters belong to these weights.
        self.base_step = None if not base or is_hf_dir(base) else latest_step(base)
        # Likewise the start's step: a resumed run rebuilds its reference from it.
        self.start = os.path.abspath(start) if start else ""
        self.start_step = None if not start or is_hf_dir(start) else latest_step(start)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: Any, data_state: dict[str, Any], model_config: ModelConfig) -> None:
        """Starts writing `state` (asynchronously unless disabled); a failed write raises CheckpointError."""
        step = int(state.step)
        ensure_writable(self.directory)
        params, rest = _split_value(nnx.to_pure_dict(state.params)), checksums.flat(_rest(state))
        sums = checksums.fingerprint(dict(params, train_state=rest))
        # Every process's iterator position (orbax writes a JSON item from process 0 only).
        data_state = pipeline.combine_states(distributed.gather_json(data_state))
        items = dict({k: ocp.args.StandardSave(v) for k, v in params.items()}, train_state=ocp.args.StandardSave(rest),
                     data=ocp.args.JsonSave(data_state), model_config=ocp.args.JsonSave(model_config.to_dict()),
                     fingerprint=ocp.args.JsonSave(sums))
        if self.base:
            items["base"] = ocp.args.JsonSave(self.base_item())
        if self.start_step is not None:
            items["start"] = ocp.args.JsonSave({"init_from": self.start, "step": self.start_step})
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # includes the previous asynchronous save's failure, reported here
            raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed: {_one_line(e)}") from None

    def base_item(self) -> dict[str, Any]:
        """The `base` item saved with adapters: the frozen base's directory and, for a Kiln run, its step."""
        return {"init_from": self.base, **({} if self.base_step is None else {"step": self.base_step})}

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """(state shaped and sharded like `like`, data-iterator state) at `step`, checked against its
        checksums; CheckpointError if it cannot be read or does not match."""
        rest, like_params = _rest(like), _split_value(nnx.to_pure_dict(like.params))
        items = dict({k: ocp.args.StandardRestore(_abstract(v)) for k, v in like_params.items()},
                     train_state=ocp.args.StandardRestore(_abstract(checksums.flat(rest))), data=ocp.args.JsonRestore())
        if _has_item(self.directory, step, "fingerprint"):
            items["fingerprint"] = ocp.args.JsonRestore()
        where = f"checkpoint step {step} in {self.directory}"
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise many types for damaged files
            raise CheckpointError(f"{where} cannot be read: {_one_line(e)}") from None
        verify({k: out[k] for k in (*like_params, "train_state")}, out.get("fingerprint"), where)
        params = jax.tree.map(lambda x: x, like.params)
        nnx.replace_by_pure_dict(params, _join_value({k: out[k] for k in like_params}))
        try:
            data_state = pipeline.process_state(out["data"], jax.process_index(), jax.process_count())
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
        return type(like)(params=params, **checksums.unflat(rest, out["train_state"])), data_state

    def restore_latest(self, like: Any, warn: Callable[[str], None]) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, state, data state) of the latest step that restores and verifies; None if there is
        no step. Unreadable later steps are moved to `run_dir/checkpoints.corrupt/` with a warning.
        If no step is readable, CheckpointError lists why, and nothing is moved."""
        self._check_same_base()
        failures: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data = self.restore(step, like)
                break
            except CheckpointError as e:
                failures.append((step, str(e)))
        else:
            if not failures:
                return None
            raise CheckpointError("no checkpoint can be restored: " + "; ".join(why for _, why in failures) +
                                  f". Move {self.directory} aside to start over")
        for bad, why in failures:
            dest = os.path.join(self.run_dir, CORRUPT_DIR, f"{bad}-{time.strftime('%Y%m%d-%H%M%S')}")
            if jax.process_index() == 0:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.move(os.path.join(self.directory, str(bad)), dest)
            warn(f"warning: {why}; moved it to {dest} and resumed from step {step}")
        if failures:
            self.manager.reload()
        return step, state, data

    def _check_same_base(self) -> None:
        """CheckpointError if the adapters saved here were trained on another step of the base than the one
        this run was given, or the whole model saved here started from another step of its start (that run
        trained on since): resuming would put the adapters on other weights, or change the reference midway."""
        step = self.manager.latest_step()
        for item, now, what in (("base", self.base_step, "the adapters in {} were trained on"),
                                ("start", self.start_step, "the run in {} started (its reference) from")):
            if now is None or step is None or not _has_item(self.directory, step, item):
                continue
            try:
                saved = _base_item(self.manager, step, item)
            except Exception:  # a damaged step: restore_latest's fallback deals with it
                continue
            if saved.get("step") not in (None, now):
                raise CheckpointError(f"{what.format(self.directory)} step {saved['step']} of {saved['init_from']}, "
                                      f"which now gives step {now}; resume on the same weights with "
                                      f"--config.model.init_from={_base_path(saved)}")

    def wait(self) -> None:
        """Blocks until the pending save is written; CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"writing a checkpoint in {self.directory} failed: {_one_line(e)}") from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
