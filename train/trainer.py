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
from data.sources import expand_path
from model import hf, hf_peft, lora, prefix as prefixes, presets
from model.config import LoraConfig, ModelConfig, PrefixConfig, RopeScaling
from model.sharding import make_mesh, shard_module, use_rules
from model.transformer import Transformer, trainable
from model.actor_critic import ActorCritic
from train import checkpoint, distributed, flops, losses, optim, preflight, records, reference, rollout, rundir
from train.evaluate import evaluate
from train.losses.dpo import needs_reference
from train.step import TrainState, init_state, make_train_step

SHAPE_FIELDS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, bad batch); the last good checkpoint is left intact."""


def model_config(config: ConfigDict, vocab_size: int, reward_head: bool | None = None) -> ModelConfig:
    """The ModelConfig: `init_from`'s (or the preset's), with the run's `model.*` overrides applied;
    with a scalar head for a reward model (or when `reward_head` says so: a PPO value model)."""
    m = config.model
    overrides: dict[str, Any] = {k: m[k] for k in (*SHAPE_FIELDS, "max_seq_len", "rope_theta", "sliding_window")
                                 if m[k] is not None}
    overrides.update(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_layers=m.scan_layers,
                     attention=m.attention, logits_chunk=m.logits_chunk, dropout=m.dropout)
    if m.rope_scaling.type != "none":
        fields = {k: v for k, v in m.rope_scaling.to_dict().items() if v is not None}
        overrides["rope_scaling"] = RopeScaling.from_dict(dict(fields, rope_type=fields.pop("type")))
    overrides.update(peft_configs(config), reward_head=config.stage == "reward" if reward_head is None else reward_head)
    if m.init_from:
        base = source_config(init_source(config))
        changed = [k for k in SHAPE_FIELDS if k in overrides and overrides[k] != getattr(base, k)]
        if changed:
            raise ValueError(f"model.init_from={m.init_from!r}: cannot change {', '.join(changed)} of a loaded model")
        cfg = base.replace(**overrides)
    else:
        cfg = presets.get(m.preset).replace(**overrides)
        if m.vocab_size is None:
            cfg = cfg.replace(vocab_size=-(-vocab_size // 128) * 128)  # padded for even sharding
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"the model's vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size} "
                         f"(data.tokenizer={config.data.tokenizer!r}); use the tokenizer the model was trained with")
    return cfg


def init_source(config: ConfigDict) -> str:
    """`model.init_from` with `$VARS` and `~` expanded ("" when training from scratch)."""
    source = config.model.init_from
    if not source:
        return ""
    path = expand_path(source, "model.init_from")
    if not os.path.exists(path):
        raise ValueError(f"model.init_from={source!r}: {path} does not exist; name a Kiln run directory, "
                         "a checkpoint step directory (run/checkpoints/STEP) or a Hugging Face directory")
    return path


def tokenizer_name(config: ConfigDict) -> str:
    """`data.tokenizer` with "auto" made concrete: the tokenizer `model.init_from` was trained with
    (a run's own, a Hugging Face directory's), or "byte" when training from scratch."""
    name = config.data.tokenizer
    if name != "auto":
        return name
    if not config.model.init_from:
        return "byte"
    found = checkpoint.tokenizer_of(init_source(config))
    if found is None:
        raise ValueError(f"data.tokenizer=auto: model.init_from={config.model.init_from!r} does not say which "
                         "tokenizer its model was trained with (no run config.json); set data.tokenizer")
    return found


def source_config(path: str) -> ModelConfig:
    if checkpoint.is_hf_dir(path):
        with open(os.path.join(path, "config.json")) as f:
            return hf.config_from_hf(json.load(f), where=os.path.join(path, "config.json"))
    return checkpoint.read_model_config(path)


def peft_configs(config: ConfigDict) -> dict[str, LoraConfig | PrefixConfig | None]:
    """The model's `lora` and `prefix` settings that `peft.*` asks for (both None for peft.method=none)."""
    p = config.peft
    lora_cfg = prefix_cfg = None
    if p.method == "lora":
        lora_cfg = LoraConfig(rank=p.lora_rank, alpha=p.lora_alpha, dropout=p.lora_dropout,
                              targets=tuple(p.lora_targets), rslora=p.lora_rslora, init=p.lora_init)
    elif p.method in ("prompt_tuning", "prefix_tuning"):
        prefix_cfg = PrefixConfig(kind=p.method.split("_")[0], num_tokens=p.num_virtual_tokens, hidden=p.prefix_hidden)
    return {"lora": lora_cfg, "prefix": prefix_cfg}


def build_model(config: ConfigDict, cfg: ModelConfig, mesh: jax.sharding.Mesh, tokenizer: Any
                ) -> tuple[Transformer, str]:
    """A sharded model: fresh from `seed`, or with parameters from `model.init_from` (and
    `peft.adapter_from`); and the directory of its frozen base ("" unless it trains only adapters
    or a prompt/prefix).

    A PEFT run started from a checkpoint with the same PEFT settings continues its adapters or
    prefix (on that checkpoint's base); a start from LoRA adapters with other settings merges them
    into the weights first."""
    source, base = init_source(config), ""
    if not source:
        model = Transformer(cfg, rngs=nnx.Rngs(config.seed))
    else:
        loaded = checkpoint.load_model(source, mesh=mesh, rules=config.mesh.rules, param_dtype=cfg.param_dtype)[1]
        tuned = {"lora": loaded.cfg.lora, "prefix": loaded.cfg.prefix}
        continues = any(tuned.values()) and tuned == {"lora": cfg.lora, "prefix": cfg.prefix}
        if loaded.cfg.prefix is not None and not continues:
            raise ValueError(f"model.init_from={config.model.init_from!r} is prompt/prefix-tuned; continue it with "
                             "the same peft.* settings, or start from its base")
        if lora.adapters(loaded) and not continues:
            loaded = lora.merge(loaded)
        model = _with_config(loaded, cfg, config.seed)
        base = checkpoint.base_of(source) if continues else source
        if cfg.prefix is not None and cfg.prefix.kind == "prompt" and not continues:
            text = config.peft.prompt_init_text
            prefixes.init_prompt(model, config.peft.prompt_init, tokenizer.encode(text) if text else [],
                                 jax.random.key(config.seed))
    if config.peft.adapter_from:
        hf_peft.load_adapter(model, expand_path(config.peft.adapter_from, "peft.adapter_from"))
    tuned_only = cfg.lora is not None or cfg.prefix is not None
    return shard_module(model, mesh, config.mesh.rules), (base if tuned_only else "")


def _with_config(model: Transformer, cfg: ModelConfig, seed: int) -> Transformer:
    """The loaded parameters under `cfg` (same shapes; new RoPE scaling, dtypes, remat ...). LoRA
    adapters, a prompt/prefix or a reward head that `cfg` asks for and `model` lacks are initialised
    from `seed`, as a fresh model's would be."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    kind = trainable(cfg)
    if kind is not nnx.Param and not jax.tree.leaves(nnx.state(model, kind)):
        # Only the new parts leave the jitted init, so XLA never computes the discarded base weights.
        fresh = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed)), kind)))
        nnx.replace_by_pure_dict(state, fresh())
    if cfg.reward_head and not model.cfg.reward_head:  # a reward model started from a policy: a new head
        nnx.replace_by_pure_dict(state, {"score": jax.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)).score[...])()})
    loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if not cfg.reward_head:
        loaded.pop("score", None)  # a policy started from a reward model leaves its head behind
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x.astype(cfg.param_dtype), loaded))
    return nnx.merge(graphdef, state)


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
    config.data.tokenizer = tokenizer_name(config)  # recorded concrete in config.json
    tok = tokenizers.resolve(config.data, config.run_dir)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices,
                     dcn_data=config.mesh.dcn_data, dcn_fsdp=config.mesh.dcn_fsdp)
    with jax.set_mesh(mesh), use_rules(config.mesh.rules):
        cfg = model_config(config, tok.vocab_size)
        preflight.check_shapes(config, cfg, mesh)
        model, base = build_model(config, cfg, mesh, tok)
        graphdef, params, frozen = nnx.split(model, trainable(cfg), ...)
        ref = rl_ref = None
        if config.stage == "dpo" and needs_reference(config.loss.preference_type) and config.loss.reference == "model":
            ref = reference.Reference(graphdef, params, frozen, chunks=config.optim.grad_accum)
        if config.stage in rollout.RL_STAGES:
            rl_ref = rollout.reference(config, graphdef, params, frozen)
            if config.stage == "ppo":  # the value model joins the policy in one train state
                model = ActorCritic(model, build_value_model(config, mesh, tok))
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


def build_value_model(config: ConfigDict, mesh: jax.sharding.Mesh, tokenizer: Any) -> Transformer:
    """PPO's value model: the reward model `rollout.value_from` names (its head included), or the
    policy's starting weights ("") with a new scalar head; with the policy's PEFT settings."""
    value_config = config.copy_and_resolve_references()
    if config.rollout.value_from:
        value_config.model.init_from = config.rollout.value_from
        source = init_source(value_config)
        if checkpoint.tokenizer_of(source) != config.data.tokenizer:
            raise ValueError(f"rollout.value_from={config.rollout.value_from!r} was trained with tokenizer "
                             f"{checkpoint.tokenizer_of(source)!r}, the policy with {config.data.tokenizer!r}; the value "
                             "model reads the policy's tokens, so they must match")
    cfg = model_config(value_config, tokenizer.vocab_size, reward_head=True)
    return build_model(value_config, cfg, mesh, tokenizer)[0]


def train(config: ConfigDict, devices: list | None = None) -> dict[str, Any]:
    """Runs one stage to `train.steps` (on `devices`, default all); returns the last train and eval metrics.

    The run directory is locked for the whole run; config.json and env.json are written once the
    run has started (checked, set up and restored), so a run that fails to start changes nothing.
    """
    kind = preflight.stage_kind(config)
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
                                       base=run.base)
        try:
            return _run(run, kind, ckpt)
        finally:
            ckpt.close()
    finally:
        lock.release()


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
            if "preempted_at" in last:
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
        _check_batch(batch, step + 1)
        run.state, metrics = run.step_fn(run.state, run.frozen, run.global_batch(batch))
        if pending is not None:
            last = _finish(run, pending, logger)
        pending = (step + 1, metrics)
        interval_steps += 1
        if (step + 1) % config.train.log_every == 0 or step + 1 == config.train.steps or step == start:
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
        if config.checkpoint.every > 0 and (step + 1) % config.checkpoint.every == 0:
            ckpt.save(run.state, data_iter.get_state(), run.model_cfg)
        if preemption.reached(step + 1) and getattr(data_iter, "at_boundary", True):
            if ckpt.latest_step() != step + 1:
                ckpt.save(run.state, data_iter.get_state(), run.model_cfg)
            _say(f"pre-empted: saved step {step + 1} in {config.run_dir}; the same command resumes from it")
            preempted_at = step + 1
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


def _check_batch(batch: dict[str, np.ndarray], step: int) -> None:
    masks = [v for k, v in batch.items() if k.endswith("loss_mask")]
    if masks and not any(np.any(m) for m in masks):
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
