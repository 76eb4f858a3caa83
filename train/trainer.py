"""The trainer: one loop for every stage. A stage contributes its loss (`loss.type`), its data kind and its config.

`train(config)` builds the mesh, the model (fresh, or parameters from `model.init_from`), the
optimizer and the data stream; resumes from the run directory's latest checkpoint when asked;
then steps, logs, evaluates and checkpoints until `train.steps`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from data import loader, pipeline, tokenizer as tokenizers
from model.config import ModelConfig
from model.sharding import make_mesh, use_rules
from model.transformer import trainable
from model.actor_critic import ActorCritic
from train import build, checkpoint, distributed, flops, losses, optim, preflight, records, reference, rollout, rundir
from train.evaluate import evaluate
from train.losses.dpo import needs_reference
from train.step import TrainState, init_state, make_train_step


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, bad batch); the last good checkpoint is left intact."""


@dataclasses.dataclass
class Run:
    """What `setup` builds before the loop: everything a step or an evaluation needs."""

    config: ConfigDict
    model_cfg: ModelConfig
    mesh: jax.sharding.Mesh
    tokenizer: Any
    graphdef: nnx.GraphDef
    frozen: nnx.State
    state: TrainState
    step_fn: Any
    flops_per_token: float
    base: str = ""  # the frozen base's directory when only adapters train
    reference: reference.Reference | None = None  # a preference stage's frozen reference policy
    rollout_reference: reference.Reference | None = None  # an RL stage's (applied once per rollout)
    _eval_step: Any = None  # jitted lazily by train.evaluate

    def global_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows as global device arrays (with the reference's log-probs if the stage has one)."""
        out = loader.global_batch(batch, self.mesh)
        return out if self.reference is None else self.reference(out)


def setup(config: ConfigDict, devices: list | None = None) -> Run:
    """Tokenizer, mesh, model, optimizer and the jitted step for `config` (no data, no checkpoint).
    The sequence length, batch and memory are checked against the model and mesh first."""
    config.data.tokenizer = build.tokenizer_name(config)  # recorded concrete in config.json
    if config.stage == "dpo" and config.loss.reference == "data":
        reference.check_precomputed(config)
    tok = tokenizers.resolve(config.data, config.run_dir)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices,
                     dcn_data=config.mesh.dcn_data, dcn_fsdp=config.mesh.dcn_fsdp)
    with jax.set_mesh(mesh), use_rules(config.mesh.rules):
        cfg = build.model_config(config, tok.vocab_size)
        preflight.check_shapes(config, cfg, mesh)
        model, base = build.build_model(config, cfg, mesh, tok)
        graphdef, params, frozen = nnx.split(model, trainable(cfg), ...)
        ref = rl_ref = None
        if config.stage == "dpo" and needs_reference(config.loss.preference_type) and config.loss.reference == "model":
            ref = reference.Reference(graphdef, params, frozen, chunks=config.optim.grad_accum)
        if config.stage in rollout.RL_STAGES:
            rl_ref = rollout.reference(config, graphdef, params, frozen)
            if config.stage == "ppo":  # the value model joins the policy in one train state
                model = ActorCritic(model, build.build_value_model(config, mesh, tok))
                graphdef, params, frozen = nnx.split(model, trainable(cfg), ...)
        tx = optim.optimizer(config.optim, config.train.steps, params)
        state = init_state(params, tx, config.seed)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        loss_fn = losses.get(config.loss.type, rollout.loss_config(config) if config.stage in rollout.RL_STAGES
                             else config.loss)
        step_fn = jax.jit(make_train_step(graphdef, loss_fn, tx, config.optim.grad_accum),
                          out_shardings=(shardings, None), donate_argnums=(0,))
    per_token = flops.flops_per_token(cfg, config.data.seq_len)
    if ref is not None:
        per_token += flops.forward_flops_per_token(cfg, config.data.seq_len)
    if config.stage == "ppo":  # the value model's forward and backward pass
        per_token *= 2
    return Run(config, cfg, mesh, tok, graphdef, frozen, state, step_fn, per_token, base, ref, rl_ref)


def train(config: ConfigDict, devices: list | None = None) -> dict[str, Any]:
    """Runs one stage to `train.steps` (on `devices`, default all); returns the last train and eval metrics.

    The run directory is locked for the whole run; config.json and env.json are written once the
    run has started (checked, set up and restored), so a run that fails to start changes nothing.
    """
    kind = preflight.stage_kind(config)
    preflight.check_train_sources(config, kind)
    preflight.check_eval_sources(config, kind)
    lock = rundir.RunLock(config.run_dir)
    if jax.process_index() == 0:
        lock.acquire()
    try:
        checkpoint.ensure_writable(os.path.join(config.run_dir, "checkpoints"))
        run = setup(config, devices)
        if config.checkpoint.resume == "none":
            _say(_set_aside(config.run_dir, ["checkpoints"], "checkpoint.resume=none: the earlier checkpoints"))
        ckpt = checkpoint.Checkpointer(config.run_dir, keep=config.checkpoint.keep,
                                       keep_every=config.checkpoint.keep_every, async_save=config.checkpoint["async"],
                                       base=run.base, start=_reference_start(run))
        try:
            return _run(run, kind, ckpt)
        finally:
            ckpt.close()
    finally:
        lock.release()


def _reference_start(run: Run) -> str:
    """The model a whole-model run with a reference (DPO, RL) started from: its reference is rebuilt from it
    on resume, so the checkpoint records its step ("" when only adapters train: their base is recorded)."""
    has_reference = run.reference is not None or run.rollout_reference is not None
    return build.init_source(run.config) if has_reference and not run.base else ""


def _run(run: Run, kind: str, ckpt: checkpoint.Checkpointer) -> dict[str, Any]:
    config = run.config
    if config.stage in rollout.RL_STAGES:
        data_iter = rollout.RolloutSource(run)
    else:
        data_iter = pipeline.train_iterator(config.data, kind, run.tokenizer, seed=config.seed,
                                            process_index=jax.process_index(), process_count=jax.process_count())
    start = _resume(run, ckpt, data_iter)
    if jax.process_index() == 0:
        _start_records(config, start)
    logger = records.MetricsLogger(config.run_dir, config.train.steps, start, config.train.progress)
    if start:
        logger.message(f"resumed from step {start} in {ckpt.directory}")
    trained = sum(x.size for x in jax.tree.leaves(run.state.params))
    total = trained + sum(x.size for x in jax.tree.leaves(run.frozen))
    logger.message(f"training {trained:,} of {total:,} parameters ({100 * trained / total:.3g}%)")
    peak = flops.total_peak_flops(run.model_cfg.dtype, list(run.mesh.devices.flat))
    last: dict[str, Any] = {}
    try:
        with jax.set_mesh(run.mesh), use_rules(config.mesh.rules):
            if start == 0 and config.model.init_from and config.train.eval_every > 0:
                last.update(_eval(run, kind, 0, logger))
            with distributed.Preemption() as preemption:
                last.update(_loop(run, kind, data_iter, ckpt, logger, start, peak, preemption))
            if last.get("preempted_at", config.train.steps) < config.train.steps:
                ckpt.wait()
                return last
            if config.train.eval_every > 0 and config.data.eval_sources and start < config.train.steps:
                last.update(_eval(run, kind, config.train.steps, logger))
        if ckpt.latest_step() != int(run.state.step):
            ckpt.save(run.state, data_iter.get_state(), run.model_cfg)
        ckpt.wait()
    finally:
        logger.close()
    return last


def _resume(run: Run, ckpt: checkpoint.Checkpointer, data_iter: pipeline.DataIterator) -> int:
    """Restores the latest good checkpoint into `run.state` and `data_iter`; returns its step (0: none).

    A resumed run may change only what does not reshape its state or reorder its batches; what
    changed is printed, and data-stream changes need `checkpoint.allow_changes` (the stream then
    restarts from its beginning)."""
    config = run.config
    if config.checkpoint.resume != "auto" or not ckpt.manager.all_steps():
        return 0
    data_changed = False
    started_with = rundir.read_config(config.run_dir)
    if started_with is not None:
        free, guarded, fixed = rundir.config_changes(started_with, config.to_dict())
        if fixed:
            raise ValueError(f"cannot resume {config.run_dir} with {fixed[0]}: that changes the model or the stage; "
                             "start a new run_dir (model.init_from can start it from this run's weights)")
        if guarded and not config.checkpoint.allow_changes:
            raise ValueError(f"resuming {config.run_dir} with {guarded[0]} would change the data stream; set "
                             "--config.checkpoint.allow_changes=true to resume anyway (the stream then restarts), "
                             "or use a new run_dir")
        if free or guarded:
            _say(f"resuming {config.run_dir} with changed settings: {'; '.join(free + guarded)}")
        data_changed = any(line.startswith(("data.", "seed")) for line in guarded)
    restored = ckpt.restore_latest(run.state, warn=_say)
    if restored is None:
        return 0
    step, run.state, data_state = restored
    if data_changed:
        _say("the data settings changed: the data stream starts again from its beginning")
    else:
        data_iter.set_state(data_state)
    return step


def _start_records(config: ConfigDict, start: int) -> None:
    """Writes config.json and env.json; a fresh start sets the earlier attempt's records aside, a
    resumed run keeps its metrics up to the restored step (the full earlier file is set aside)."""
    run_dir = config.run_dir
    if start == 0:
        _say(_set_aside(run_dir, ["metrics.jsonl", "tensorboard", "config.json", "env.json"],
                        "an earlier attempt's records"))
    else:
        _truncate_metrics(run_dir, start)
        started_with = rundir.read_config(run_dir)
        if started_with is not None and rundir.config_changes(started_with, config.to_dict()) != ([], [], []):
            rundir.set_aside(run_dir, ["config.json"])
    records.write_run_files(run_dir, config)


def _set_aside(run_dir: str, names: list[str], what: str) -> str:
    dest = rundir.set_aside(run_dir, names) if jax.process_index() == 0 else None
    return f"{what} moved to {dest}" if dest else ""


def _say(text: str) -> None:
    """A message from process 0 on stderr (before the progress bar exists)."""
    if text and jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)


def _loop(run: Run, kind: str, data_iter: Iterator, ckpt: checkpoint.Checkpointer, logger: records.MetricsLogger,
          start: int, peak: float, preemption: distributed.Preemption) -> dict[str, Any]:
    config = run.config
    # Token slots per step (padding included): a preference row holds two sequences.
    tokens_per_step = config.data.batch_size * config.data.seq_len * (2 if kind == "preference" else 1)
    pending = None  # the previous step's metrics: read one step late so the device never idles
    preempted_at = 0
    interval_start, interval_steps, last = time.perf_counter(), 0, {}
    for step in range(start, config.train.steps):
        batch = next(data_iter)
        _check_batch(batch, step + 1, config.stage)
        run.state, metrics = run.step_fn(run.state, run.frozen, run.global_batch(batch))
        if pending is not None:
            last = _finish(run, pending, logger)
        pending = (step + 1, metrics)
        interval_steps += 1
        last_step = step + 1 == config.train.steps
        if (step + 1) % config.train.log_every == 0 or last_step or step == start:
            jax.block_until_ready(metrics)
            elapsed = time.perf_counter() - interval_start
            tps = tokens_per_step * interval_steps / elapsed
            pending[1].update(tokens_per_s=tps, mfu=tps * run.flops_per_token / peak, step_time_s=elapsed / interval_steps)
            pending[1].update(getattr(data_iter, "metrics", {}))  # an RL rollout's reward, lengths, ...
            last = _finish(run, pending, logger)
            pending = None
            interval_start, interval_steps = time.perf_counter(), 0
        logger.advance()
        if config.train.eval_every > 0 and (step + 1) % config.train.eval_every == 0 and step + 1 < config.train.steps:
            eval_start = time.perf_counter()
            last.update(_eval(run, kind, step + 1, logger))
            # The interval's throughput leaves the evaluation out but keeps the steps before it.
            interval_start += time.perf_counter() - eval_start
        # The last step's checkpoint is _run's, after the final evaluation: a checkpoint at train.steps says
        # the run is finished, so a run killed while it evaluates must resume (and evaluate) from an earlier one.
        if config.checkpoint.every > 0 and (step + 1) % config.checkpoint.every == 0 and not last_step:
            ckpt.save(run.state, data_iter.get_state(), run.model_cfg)
        if preemption.reached(step + 1) and getattr(data_iter, "at_boundary", True):
            preempted_at = step + 1
            if last_step:  # finished: the final evaluation and checkpoint are _run's, as without a notice
                break
            if ckpt.latest_step() != step + 1:
                ckpt.save(run.state, data_iter.get_state(), run.model_cfg)
            _say(f"pre-empted: saved step {step + 1} in {config.run_dir}; the same command resumes from it")
            break
    if pending is not None:
        last = _finish(run, pending, logger)
    return {**last, "preempted_at": preempted_at} if preempted_at else last


def _finish(run: Run, pending: tuple[int, dict], logger: records.MetricsLogger) -> dict[str, Any]:
    """Checks one finished step (divergence) and logs it if it carries throughput figures."""
    step, metrics = pending
    metrics = jax.device_get(metrics)
    streak = int(metrics.pop("nonfinite_streak"))
    if streak >= run.config.train.max_nonfinite_steps:
        raise TrainingError(f"{streak} consecutive non-finite steps up to step {step} (loss={metrics['loss']}); "
                            "stopped. The latest checkpoint in run_dir/checkpoints is the last good state")
    row = {k: float(v) for k, v in metrics.items()}
    if "tokens_per_s" in row:
        logger.log(step, row)
    return row


def _check_batch(batch: dict[str, np.ndarray], step: int, stage: str) -> None:
    """TrainingError for a data source's batch without loss tokens. A rollout's mini-batch may hold only
    replies that rollout.mask_truncated drops: the step skips it (counted with the non-finite ones), and
    a rollout without a reply to learn from is named by the rollout source."""
    masks = [v for k, v in batch.items() if k.endswith("loss_mask")]
    if stage not in rollout.RL_STAGES and masks and not any(np.any(m) for m in masks):
        raise TrainingError(f"step {step}: the batch has no loss tokens (every loss_mask is 0); "
                            "check the data source's masks and lengths")


def _eval(run: Run, kind: str, step: int, logger: records.MetricsLogger) -> dict[str, float]:
    rows = evaluate(run, kind)
    if rows:
        logger.log(step, rows)
    return rows


def _truncate_metrics(run_dir: str, step: int) -> None:
    """Drops rows logged after the checkpoint a resumed run restarts from, so steps never repeat;
    the file as it was is set aside first."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if _row_step(line) <= step]
    if len(keep) == len(lines):
        return
    old = os.path.join(rundir.set_aside(run_dir, ["metrics.jsonl"]), "metrics.jsonl")
    _say(f"metrics logged after step {step} were dropped; the earlier file is kept at {old}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _row_step(line: str) -> float:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return float("inf")  # a line torn by a kill: dropped
