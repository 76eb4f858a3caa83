"""Hugging Face PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

`save_adapter` writes Kiln's LoRA adapters, prompt-tuning virtual tokens or prefix-tuning prefixes
so that `peft.PeftModel.from_pretrained(base, path)` loads them onto the transformers base model;
`load_adapter` reads a LoRA directory into a Kiln model whose LoRA settings match it. PEFT stores
per layer lora_A [r, in] and lora_B [out, r] over the flattened input / output features of the
projection, the same flattening as the base weights.

Prompt and prefix tuning are one tensor, `prompt_embeddings`: the virtual tokens' embeddings
[N, d_model], or every layer's prefix keys and values [N, layers * 2 * kv_heads * head_dim]
(key then value per layer). PEFT places a prefix in the cache and the real tokens after it, at
positions N.., where Kiln puts them at 0..; prefix keys are stored rotated, so the exported keys
are turned on by N positions to keep every query-key angle. Virtual tokens are ordinary inputs at
positions 0..N-1 in PEFT and -N..-1 in Kiln: the same distances, nothing to convert.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from model import lora, prefix as prefixes, rope
from model.atomic import atomic_dir
from model.config import LoraConfig

MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_TARGET_OF = {name.split(".")[1]: target for target, name in MODULES.items()}
PREFIX = "base_model.model.model.layers.{i}."


class AdapterError(ValueError):
    """A PEFT adapter directory Kiln cannot use, with the reason."""


def tensor_name(target: str, layer: int, which: str) -> str:
    """PEFT's name of lora_A / lora_B (`which` "A" or "B") of `target` in layer `layer`."""
    return f"{PREFIX.format(i=layer)}{MODULES[target]}.lora_{which}.weight"


def save_adapter(model: nnx.Module, path: str, base_model_name_or_path: str = "") -> None:
    """Writes the model's LoRA adapters, or its prompt / prefix, as a PEFT adapter directory at `path`
    (atomically)."""
    if model.cfg.prefix is not None:
        tensors, config = _prompt_learning(prefixes.fold(model))
    elif lora.adapters(model):
        tensors, config = _lora(model)
    else:
        raise AdapterError("the model has no adapters to export (it was not trained with peft.method=lora, "
                           "prompt_tuning or prefix_tuning)")
    config.update({"task_type": "CAUSAL_LM", "inference_mode": True, "modules_to_save": None,
                   "base_model_name_or_path": base_model_name_or_path})
    with atomic_dir(path) as tmp:
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)


def _lora(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    cfg: LoraConfig = model.cfg.lora
    tensors: dict[str, np.ndarray] = {}
    for target, adapter in lora.adapters(model).items():
        a, b = (np.asarray(jax.device_get(p[...]), np.float32) for p in (adapter.a, adapter.b))
        r = cfg.rank
        for i in range(a.shape[0]):
            tensors[tensor_name(target, i, "A")] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[tensor_name(target, i, "B")] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return tensors, {"peft_type": "LORA", "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
                     "use_rslora": cfg.rslora, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
                     "target_modules": sorted(MODULES[t].split(".")[1] for t in cfg.targets)}


def _prompt_learning(model: nnx.Module) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """PEFT's PROMPT_TUNING / PREFIX_TUNING tensor and settings of a (folded) prompt- or prefix-tuned model."""
    cfg = model.cfg
    N, L = cfg.prefix.num_tokens, cfg.n_layers
    config = {"num_virtual_tokens": N, "num_layers": L, "num_transformer_submodules": 1}
    if cfg.prefix.kind == "prompt":
        embeddings = np.asarray(jax.device_get(model.prefix.embeddings[...]), np.float32)
        return {"prompt_embeddings": embeddings}, dict(config, peft_type="PROMPT_TUNING", token_dim=cfg.d_model,
                                                        num_attention_heads=cfg.n_heads, prompt_tuning_init="RANDOM")
    k_LNKD, v_LNKD = model.prefix()
    cos, sin = rope.rotary_tables(jnp.full((1, 1), N), cfg)
    factor = rope.inv_frequencies(cfg)[1]  # a pure rotation by N positions: YaRN's attention factor out
    k_LNKD = rope.apply_rotary(k_LNKD.astype(jnp.float32), cos / factor, sin / factor)
    kv_L2NKD = np.stack([np.asarray(jax.device_get(x), np.float32) for x in (k_LNKD, v_LNKD)], axis=1)
    kv_NL2KD = kv_L2NKD.transpose(2, 0, 1, 3, 4)
    token_dim = cfg.n_kv_heads * cfg.dim_head
    return {"prompt_embeddings": np.ascontiguousarray(kv_NL2KD.reshape(N, -1))}, dict(
        config, peft_type="PREFIX_TUNING", token_dim=token_dim, num_attention_heads=cfg.n_kv_heads,
        encoder_hidden_size=token_dim, prefix_projection=False)


def read_config(path: str) -> LoraConfig:
    """The LoRA settings of the PEFT adapter directory `path`."""
    where = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(where):
        raise AdapterError(f"{path}: no adapter_config.json (is this a PEFT adapter directory?)")
    with open(where) as f:
        raw: dict[str, Any] = json.load(f)
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{where}: peft_type {raw.get('peft_type')!r}; Kiln reads LORA adapters")
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                               "rank_pattern", "alpha_pattern") if raw.get(k)]
    if raw.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise AdapterError(f"{where}: Kiln does not support {', '.join(unsupported)} in LoRA adapters")
    modules = raw.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    unknown = [m for m in modules if m not in _TARGET_OF]
    if unknown:
        raise AdapterError(f"{where}: target_modules {unknown} are not projections Kiln adapts "
                           f"({', '.join(_TARGET_OF)})")
    order = list(MODULES)
    return LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
                      targets=tuple(sorted((_TARGET_OF[m] for m in modules), key=order.index)),
                      rslora=bool(raw.get("use_rslora", False)))


def check_adapter(path: str, ours: LoraConfig | None) -> None:
    """AdapterError unless `path` is a PEFT adapter directory whose rank, alpha, scaling and targets are
    the `peft.*` settings `ours` (read before any model is built)."""
    theirs = read_config(path)
    if ours is None:
        raise AdapterError(f"peft.adapter_from={path}: set peft.method=lora to load a LoRA adapter")
    for key, mine, their in (("lora_rank", ours.rank, theirs.rank), ("lora_alpha", ours.alpha, theirs.alpha),
                             ("lora_rslora", ours.rslora, theirs.rslora),
                             ("lora_targets", sorted(ours.targets), sorted(theirs.targets))):
        if mine != their:
            raise AdapterError(f"peft.adapter_from={path}: the adapter has {key}={their!r} but peft.{key}={mine!r}; "
                               "make them equal")


def load_adapter(model: nnx.Module, path: str) -> None:
    """Sets the model's adapters (in place) from the PEFT adapter directory `path`; AdapterError when
    its rank, alpha, scaling or targets differ from the model's `peft.*` settings."""
    check_adapter(path, model.cfg.lora)
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise AdapterError(f"{path}: no adapter_model.safetensors")
    with safe_open(weights, "np") as f:
        names = set(f.keys())
        for target, adapter in lora.adapters(model).items():
            layers = adapter.a.shape[0]
            per_layer = {"A": adapter.a.shape[1:], "B": adapter.b.shape[1:]}  # Kiln [*in, r] and [r, *out]
            values: dict[str, list[np.ndarray]] = {"A": [], "B": []}
            for i in range(layers):
                for which, shape in per_layer.items():
                    name = tensor_name(target, i, which)
                    expected = (shape[-1], int(np.prod(shape[:-1]))) if which == "A" else (int(np.prod(shape[1:])), shape[0])
                    if name not in names:
                        raise AdapterError(f"{weights}: tensor {name!r} is missing")
                    tensor = f.get_tensor(name)
                    if tensor.shape != expected:
                        raise AdapterError(f"{weights}: tensor {name!r} has shape {tensor.shape}; the model needs {expected}")
                    values[which].append(tensor.T.reshape(shape))
            adapter.a.set_value(jnp.asarray(np.stack(values["A"]), jnp.float32))
            adapter.b.set_value(jnp.asarray(np.stack(values["B"]), jnp.float32))
