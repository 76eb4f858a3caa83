"""The model a stage trains: its ModelConfig, its tokenizer name and its parameters.

Fresh from a preset, or loaded from `model.init_from` (a Kiln run or checkpoint, or a Hugging Face
directory) with the run's `model.*` overrides and `peft.*` settings applied; PPO's value model too.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
from flax import nnx
from ml_collections import ConfigDict

from data.sources import expand_path
from model import hf, hf_peft, lora, prefix as prefixes, presets
from model.config import LoraConfig, ModelConfig, PrefixConfig, RopeScaling
from model.sharding import shard_module
from model.transformer import Transformer, trainable
from train import checkpoint, modeldir

SHAPE_FIELDS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")


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
    if not os.path.isdir(path):  # a file was taken for a model without a tokenizer: "set data.tokenizer"
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise ValueError(f"model.init_from={source!r}: {path} {what}; name a Kiln run directory, a checkpoint step "
                         "directory (run/checkpoints/STEP) or a Hugging Face directory")
    return path


def tokenizer_name(config: ConfigDict) -> str:
    """`data.tokenizer` with "auto" made concrete: the tokenizer `model.init_from` was trained with
    (a run's own, a Hugging Face directory's), or "byte" when training from scratch."""
    name = config.data.tokenizer
    if name != "auto":
        return name
    if not config.model.init_from:
        return "byte"
    found = modeldir.tokenizer_of(init_source(config))
    if found is None:
        raise ValueError(f"data.tokenizer=auto: model.init_from={config.model.init_from!r} does not say which "
                         "tokenizer its model was trained with (no run config.json); set data.tokenizer")
    return found


def source_config(path: str) -> ModelConfig:
    """The ModelConfig saved with a Kiln run or checkpoint, or read from a Hugging Face config.json."""
    if modeldir.is_hf_dir(path):
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
        model = with_config(loaded, cfg, config.seed)
        base = checkpoint.base_of(source) if continues else source
        if cfg.prefix is not None and cfg.prefix.kind == "prompt" and not continues:
            text = config.peft.prompt_init_text
            prefixes.init_prompt(model, config.peft.prompt_init, tokenizer.encode(text) if text else [],
                                 jax.random.key(config.seed))
    if config.peft.adapter_from:
        hf_peft.load_adapter(model, expand_path(config.peft.adapter_from, "peft.adapter_from"))
    tuned_only = cfg.lora is not None or cfg.prefix is not None
    return shard_module(model, mesh, config.mesh.rules), (base if tuned_only else "")


def with_config(model: Transformer, cfg: ModelConfig, seed: int) -> Transformer:
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


def build_value_model(config: ConfigDict, mesh: jax.sharding.Mesh, tokenizer: Any) -> Transformer:
    """PPO's value model: the reward model `rollout.value_from` names (its head included), or the
    policy's starting weights ("") with a new scalar head; with the policy's PEFT settings."""
    value_config = config.copy_and_resolve_references()
    if config.rollout.value_from:
        value_config.model.init_from = config.rollout.value_from
        source = init_source(value_config)
        if modeldir.tokenizer_of(source) != config.data.tokenizer:
            raise ValueError(f"rollout.value_from={config.rollout.value_from!r} was trained with tokenizer "
                             f"{modeldir.tokenizer_of(source)!r}, the policy with {config.data.tokenizer!r}; the value "
                             "model reads the policy's tokens, so they must match")
    cfg = model_config(value_config, tokenizer.vocab_size, reward_head=True)
    return build_model(value_config, cfg, mesh, tokenizer)[0]


