"""Checks a run's config against the code, the model and the machine before anything is trained.

Each failure is one ValueError line naming the config keys involved and what to change, so a
bogus stage, a sequence longer than the model's, a batch that does not split over the mesh or a
shape that cannot fit in memory stops the run before it writes anything.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from data import pipeline, sources, synthetic
from model import hf_peft
from model.config import ModelConfig
from model.transformer import param_count
from train import build, losses, modeldir, rewards

# The stages this version trains; the data kind of each is `pipeline.STAGE_KINDS` (default pretrain).
STAGES = ("pretrain", "context_extension", "anneal", "continue", "sft", "reward", "dpo", "grpo", "ppo")
ALIASES = {"rloo": "stage grpo with rollout.advantage=rloo", "dr_grpo": "stage grpo with rollout.advantage=dr_grpo "
           "and loss.aggregation=dr_grpo", "dapo": "stage grpo with loss.aggregation=dapo and loss.clip_eps_high=0.28"}
# Configs read by other commands than `kiln train`.
OTHER_COMMANDS = {"eval": "kiln eval --checkpoint=RUN_OR_HF_DIR --config=configs/eval.py",
                  "rejection_sampling": "kiln generate --config=configs/rejection_sampling.py"}
# Stages whose model is built for one loss (a reward head; a frozen reference policy).
STAGE_LOSSES = {"reward": "reward", "dpo": "dpo", "grpo": "grpo", "ppo": "ppo"}
GIB = 2 ** 30


def stage_kind(config: Any) -> str:
    """The data kind `config.stage` trains on; ValueError for an unknown or not yet available stage,
    or a `loss.type` that cannot train on that stage's batches."""
    stage = config.stage
    if stage in OTHER_COMMANDS:
        raise ValueError(f"stage {stage!r} is not trained: use `{OTHER_COMMANDS[stage]}`")
    if stage in ALIASES:
        raise ValueError(f"stage {stage!r}: use {ALIASES[stage]}")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (config key 'stage'); runnable stages: {', '.join(STAGES)}")
    kind = pipeline.STAGE_KINDS.get(stage, "pretrain")
    if kind not in losses.batch_kinds(config.loss.type):
        raise ValueError(f"loss.type {config.loss.type!r} does not train on the {kind!r} batches of stage {stage!r}")
    if stage in STAGE_LOSSES and config.loss.type != STAGE_LOSSES[stage]:
        raise ValueError(f"stage {stage!r} trains with loss.type={STAGE_LOSSES[stage]!r}, not {config.loss.type!r}")
    check_start(config)
    check_adapter(config)
    if stage in ("grpo", "ppo"):
        check_rollout(config)
    return kind


def check_eval_sources(config: Any, kind: str) -> None:
    """Reads every evaluation source a training run will evaluate on, before training: a missing file, or a
    record of it that is not of the stage's kind, was found at the first evaluation, after train.eval_every
    steps had trained."""
    if config.train.eval_every > 0:
        for name in config.data.eval_sources:
            sources.eval_source(config.data, kind, name)


# Larger JSON Lines files are checked on their first records: parsing runs at some 10-20 MB/s a core, and the
# data stream reads the file whole once more.
FULL_CHECK_BYTES, HEAD_RECORDS = 64 * 2 ** 20, 1000


def check_train_sources(config: Any, kind: str) -> None:
    """Reads the training sources before the model is built: a missing file, a record of another kind or a
    malformed line was found only once the model was built (and loaded, in post-training). A JSON Lines file
    over FULL_CHECK_BYTES is checked on its first HEAD_RECORDS records, an array_record source (read lazily)
    on its first record."""
    for name, src in config.data.sources.items():
        if not src.weight:
            continue
        path = src.format in ("jsonl", "gsm8k", "hh_rlhf") and sources.expand_path(src.path, f"source {name}")
        large = bool(path) and os.path.isfile(path) and os.path.getsize(path) > FULL_CHECK_BYTES
        loaded = sources.load(name, src, config.data, kind, head=HEAD_RECORDS if large else 0)
        loaded.records[0]  # an array_record source parses its first record here


def check_start(config: Any) -> None:
    """ValueError for a model that is no reward model started from a reward-model run: reward training
    leaves the language-model head behind, and the policy (or DPO reference) would be the scorer's body
    under it; or for a start that is a file. A start that does not exist is named where it is loaded."""
    path = existing_start(config)
    if config.stage == "reward" or not path:
        return
    started = modeldir.run_config(path)
    if started is not None and started.get("stage") == "reward":
        _refuse_reward_start(config, started.get("model", {}).get("init_from"))


def existing_start(config: Any) -> str:
    """The path model.init_from names if it exists, else "" (a start yet to be made is named where it is
    loaded); ValueError for a file, named before the run directory is made."""
    path = config.model.init_from and sources.expand_path(config.model.init_from, "model.init_from")
    return build.init_source(config) if path and os.path.exists(path) else ""


def _refuse_reward_start(config: Any, scored: str | None) -> None:
    raise ValueError(f"model.init_from={config.model.init_from!r} is a reward model (stage reward): it scores "
                     f"replies and writes none; start stage {config.stage} from the policy it scores"
                     f"{f' ({scored})' if scored else ''}, and use the reward model as rollout.reward")


def check_earlier_runs(config: Any, runs: dict[str, Any]) -> None:
    """A recipe stage's model.init_from or rollout.reward naming the run of an earlier stage (`runs`: its
    directory -> its config), checked when the recipe loads: a reward model to start a policy from, or a
    policy to score with, was refused (by check_start, rewards.check) only when the stage's turn came, after
    the stages before it had trained."""
    def run_of(value: str) -> Any:
        path = os.path.normpath(value) if value else ""
        return next((c for d, c in runs.items() if path == os.path.normpath(d)
                     or path.startswith(os.path.normpath(d) + os.sep)), None)

    start, reward = run_of(config.model.init_from), run_of(config.rollout.reward)
    if start is not None and start.stage == "reward" and config.stage != "reward":
        _refuse_reward_start(config, start.model.init_from)
    if reward is not None and reward.stage != "reward":
        raise ValueError(f"rollout.reward={config.rollout.reward!r} is neither 'verifier', a Kiln reward-model run nor "
                         f"MODULE:FUNCTION: it is the run of stage {reward.stage!r} (a reward model is trained by "
                         "configs/reward.py)")


def check_adapter(config: Any) -> None:
    """`peft.adapter_from` against the run's peft.* settings before any model is built: a PEFT adapter
    directory (a Kiln LoRA run's adapters continue through model.init_from, or `kiln convert
    --adapter-only` exports them as one)."""
    if not config.peft.adapter_from:
        return
    path = sources.expand_path(config.peft.adapter_from, "peft.adapter_from")
    if modeldir.run_config(path) is not None or os.path.isdir(os.path.join(path, "checkpoints")):
        raise ValueError(f"peft.adapter_from={config.peft.adapter_from!r} is a Kiln run, not a PEFT adapter "
                         "directory: start from it with model.init_from (a LoRA run's adapters go on training under "
                         "the same peft.* settings), or export its adapters with kiln convert --adapter-only")
    hf_peft.check_adapter(path, build.peft_configs(config)["lora"])


def check_rollout(config: Any) -> None:
    """An RL run's rollout batch against its mini-batches, steps and checkpoints (a checkpoint must
    fall between rollouts for a resumed run to continue exactly)."""
    ro, rows = config.rollout, config.rollout.batch_prompts * config.rollout.num_samples
    if ro.batch_prompts <= 0 or ro.num_samples <= 0 or ro.epochs <= 0:
        raise ValueError("rollout.batch_prompts, rollout.num_samples and rollout.epochs must be positive")
    if config.stage == "grpo" and ro.num_samples < 2:
        raise ValueError(f"GRPO compares the replies to one prompt: rollout.num_samples={ro.num_samples} must be >= 2")
    if rows % config.data.batch_size:
        raise ValueError(f"a rollout of rollout.batch_prompts x rollout.num_samples = {rows} replies does not split "
                         f"into mini-batches of data.batch_size={config.data.batch_size}")
    per_rollout = rows // config.data.batch_size * ro.epochs
    for key, value in (("train.steps", config.train.steps), ("checkpoint.every", config.checkpoint.every)):
        if value % per_rollout:
            raise ValueError(f"{key}={value} is not a multiple of the {per_rollout} train steps per rollout "
                             "(mini-batches x rollout.epochs): checkpoints must fall between rollouts")
    if config.data.eval_sources:
        raise ValueError("RL stages are evaluated by `kiln eval` (held-out accuracy) on their run directory; "
                         "leave data.eval_sources empty")
    value_from = ro.value_from and sources.expand_path(ro.value_from, "rollout.value_from")
    if config.stage == "ppo" and value_from and not os.path.exists(value_from):  # was named model.init_from
        raise ValueError(f"rollout.value_from={ro.value_from!r} does not exist; name the reward-model run "
                         "(configs/reward.py) to start PPO's value model from, or leave it empty to start it from "
                         "the policy")
    rewards.check(ro.reward)
    check_sampling(config)


def check_sampling(config: Any) -> None:
    """What RL and rejection sampling (`kiln generate`) sample and score: replies that differ (a positive
    temperature), as many prompts as rollout.num_prompts asks for, and, for the verifier, a reference answer
    it can compare with every prompt's reply."""
    ro = config.rollout
    existing_start(config)
    if ro.temperature == 0 and (config.stage != "rejection_sampling" or ro.num_samples > 1):
        learn = ("RL learns from sampled replies" if config.stage != "rejection_sampling" else
                 f"the rollout.num_samples={ro.num_samples} replies to each prompt would be one reply {ro.num_samples} "
                 "times")
        raise ValueError(f"rollout.temperature=0 samples greedily, and {learn}: set a positive rollout.temperature"
                         f"{' (or rollout.num_samples=1)' if config.stage == 'rejection_sampling' else ''}")
    if ro.reward == "verifier":
        check_answers(config)
    if config.stage == "rejection_sampling" and ro.num_prompts:  # fewer were sampled, said only in results.json
        held = len(rewards.prompts(config))
        if ro.num_prompts > held:
            raise ValueError(f"rollout.num_prompts={ro.num_prompts}, but data.sources hold {held} prompts; lower "
                             f"rollout.num_prompts to {held} (or 0: all of them), or add prompts")


def check_answers(config: Any) -> None:
    """ValueError naming the first prompt whose reference answer the verifier could never match: empty
    (HH-RLHF's prompts have none), or text that a reply's final `#### ANSWER` line cannot equal (a worked solution)."""
    for name, src in config.data.sources.items():
        if not src.weight or src.format in ("synthetic", "gsm8k"):  # answers: the final '#### N' value
            continue
        loaded = sources.load(f"data.sources.{name}", src, config.data, "prompts")
        for i in range(len(loaded.records)):
            record = loaded.records[i]
            if record is not None and not synthetic.verify(f"#### {record['answer']}", record["answer"]):
                raise ValueError(
                    f"data.sources.{name} ({loaded.where}), prompt {i + 1}: rollout.reward=verifier compares a reply's "
                    f"final '#### ANSWER' line with the reference answer, and {record['answer']!r} can never match "
                    "one; give each prompt its final answer alone, or score with a reward model or MODULE:FUNCTION")


def check_shapes(config: Any, cfg: ModelConfig, mesh: Mesh) -> None:
    """Sequence length against the model, the batch against the mesh and processes, memory against the devices."""
    data = config.data
    if data.seq_len > cfg.max_seq_len:
        raise ValueError(f"data.seq_len={data.seq_len} is longer than the model's max_seq_len={cfg.max_seq_len}; "
                         "lower data.seq_len, or raise model.max_seq_len (with model.rope_scaling to extend a "
                         "trained model's context)")
    check_peft(config, cfg)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = data.batch_size // config.optim.grad_accum
    if micro % split:
        raise ValueError(f"data.batch_size={data.batch_size} / optim.grad_accum={config.optim.grad_accum} = {micro} "
                         f"rows per micro-batch do not split over mesh data*fsdp={split} devices; make the rows a "
                         "multiple of it")
    if data.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size={data.batch_size} does not split over {jax.process_count()} processes")
    check_memory(config, cfg, mesh)


def check_peft(config: Any, cfg: ModelConfig) -> None:
    """PEFT sizes against the model: a LoRA rank above d_model (every target matrix has d_model on one side,
    so an update's rank cannot exceed it), and prompt tuning's virtual tokens beyond the RoPE table (they
    sit at positions -N..-1, and distances of max_seq_len or more are clamped to max_seq_len - 1)."""
    peft = config.peft
    if peft.method == "lora" and peft.lora_rank > cfg.d_model:
        raise ValueError(f"peft.lora_rank={peft.lora_rank} is above the model's d_model={cfg.d_model}, the most rank "
                         f"an update of its matrices can have: the rest adds parameters and nothing else; use at most "
                         f"{cfg.d_model}")
    if peft.method == "prompt_tuning" and peft.num_virtual_tokens >= cfg.max_seq_len:
        raise ValueError(f"peft.num_virtual_tokens={peft.num_virtual_tokens}: the virtual tokens sit at positions "
                         f"-N..-1, and the model's RoPE table reaches max_seq_len={cfg.max_seq_len}; use fewer than "
                         f"{cfg.max_seq_len}")


def memory_floor(config: Any, cfg: ModelConfig) -> dict[str, float]:
    """Bytes (summed over devices) that one step needs at the very least: parameters with their
    gradients and two AdamW moments, one micro-batch's float32 logits, and one layer's float32
    attention scores. The real peak is higher; this is a bound that never refuses a run that fits."""
    rows = config.data.batch_size // config.optim.grad_accum
    T = config.data.seq_len
    return {"parameters and optimizer": 4.0 * param_count(cfg) * jnp.dtype(cfg.param_dtype).itemsize,
            "logits": 4.0 * rows * T * cfg.vocab_size,
            "attention scores of one layer": 4.0 * rows * cfg.n_heads * T * T}


def check_memory(config: Any, cfg: ModelConfig, mesh: Mesh) -> None:
    """ValueError when `memory_floor` exceeds what the mesh's devices hold."""
    floor = memory_floor(config, cfg)
    need = sum(floor.values())
    devices = list(mesh.devices.flat)
    if devices[0].platform == "cpu":  # fake CPU devices share the host's memory
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host"
    else:
        stats = devices[0].memory_stats() or {}
        if "bytes_limit" not in stats:
            return
        have, where = stats["bytes_limit"] * len(devices), f"{len(devices)} x {devices[0].device_kind}"
    if need > have:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in floor.items())
        raise ValueError(f"data.batch_size={config.data.batch_size} x data.seq_len={config.data.seq_len} needs at "
                         f"least {need / GIB:.1f} GiB ({parts}) but {where} has {have / GIB:.1f} GiB; lower "
                         "data.batch_size or data.seq_len, or raise optim.grad_accum")
