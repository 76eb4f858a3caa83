"""Hugging Face interop: read and write `config.json` + safetensors directories.

`load(path)` gives `(ModelConfig, Transformer)`; `save(model, config, path)` writes a directory
that `transformers.AutoModelForCausalLM.from_pretrained` loads. Llama, Mistral, Qwen2 and Gemma2
share Hugging Face's tensor names, so one table maps them; only the config keys differ by family.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from model import lora
from model.atomic import atomic_dir
from model.config import DType, ModelConfig, RopeScaling, dtype_name
from model.transformer import Transformer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma2": "Gemma2ForCausalLM"}
_ACTS_IN = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
_ACTS_OUT = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_IGNORED_TENSORS = ("rotary_emb.inv_freq",)
MAX_SHARD_BYTES = 5 * 2**30


# transformers' defaults, per family, of the config.json keys below that a file may leave out (hand-written
# or minimal files): read without them, such a file would mean another model to Kiln than to transformers.
_FAMILY_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048),
    "mistral": dict(max_position_embeddings=4096 * 32, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, sliding_window=4096),  # used with use_sliding_window only
    "gemma2": dict(max_position_embeddings=8192, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


class HFFormatError(ValueError):
    """A Hugging Face directory that Kiln cannot read, with the reason."""


# -- config.json <-> ModelConfig -------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face config dict (transformers 4.x or 5.x key styles)."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise HFFormatError(f"{where}: unsupported model_type {family!r}; Kiln reads {', '.join(ARCHITECTURES)}")
    hf = dict(_FAMILY_DEFAULTS[family], **hf)  # a key present (null included) keeps its value
    try:
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim == hf["hidden_size"] // n_heads:
            head_dim = None  # the default, kept implicit so configs compare equal
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if any(isinstance(v, dict) for v in rope.values()):
            raise HFFormatError(f"{where}: per-layer-type rope_parameters are not supported")
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
        act_name = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if act_name not in _ACTS_IN:
            raise HFFormatError(f"{where}: unsupported activation {act_name!r}; supported: {', '.join(_ACTS_IN)}")
        fields: dict[str, Any] = dict(
            family=family, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-6), act=_ACTS_IN[act_name],
            tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma2")),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
            fields["rope_scaling"] = RopeScaling.from_dict(
                {k: v for k, v in rope.items() if k not in ("partial_rotary_factor",)})
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise HFFormatError(f"{where}: partial_rotary_factor != 1 is not supported")
        if family == "llama":
            fields.update(qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")),
                          mlp_bias=bool(hf.get("mlp_bias")))
        elif family == "mistral":
            fields.update(sliding_window=hf.get("sliding_window"))
        elif family == "qwen2":
            fields.update(qkv_bias=True)
            window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
            layer_types = hf.get("layer_types") or [
                "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28)
                else "full_attention" for i in range(hf["num_hidden_layers"])]
            fields.update(_windows(window, layer_types))
        else:  # gemma2
            if hf.get("use_bidirectional_attention"):
                raise HFFormatError(f"{where}: bidirectional Gemma2 attention is not supported")
            bias = bool(hf.get("attention_bias"))
            layer_types = hf.get("layer_types") or [
                "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(hf["num_hidden_layers"])]
            fields.update(qkv_bias=bias, o_bias=bias, norm_plus_one=True, sandwich_norm=True, embed_scale=True,
                          query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                          attn_softcap=hf.get("attn_logit_softcapping"),
                          final_softcap=hf.get("final_logit_softcapping"),
                          **_windows(hf.get("sliding_window"), layer_types))
        return ModelConfig(**fields)
    except KeyError as e:
        raise HFFormatError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, HFFormatError):
            raise
        raise HFFormatError(f"{where}: {e}") from None


def _windows(window: int | None, layer_types: list[str]) -> dict[str, Any]:
    if window is None:
        return {}
    return dict(sliding_window=window,
                window_layers=tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention"))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Hugging Face config dict for `cfg` (rope written in both the 4.x and the 5.x styles)."""
    hf: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[cfg.family]], model_type=cfg.family, vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.dim_head,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, torch_dtype=cfg.param_dtype, initializer_range=cfg.init_std,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        attention_dropout=0.0, use_cache=True,
    )
    scaling = cfg.rope_scaling.to_dict() if cfg.rope_scaling else None
    hf["rope_scaling"] = scaling
    hf["rope_parameters"] = dict(scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta)
    windows = cfg.layer_windows()
    layer_types = ["sliding_attention" if w else "full_attention" for w in windows]
    act = _ACTS_OUT[cfg.act]
    if cfg.family == "llama":
        hf.update(hidden_act=act, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.family == "mistral":
        hf.update(hidden_act=act, sliding_window=cfg.sliding_window)
    elif cfg.family == "qwen2":
        first = next((i for i, w in enumerate(windows) if w), cfg.n_layers)
        hf.update(hidden_act=act, use_sliding_window=any(windows), sliding_window=cfg.sliding_window,
                  max_window_layers=first, layer_types=layer_types)
    else:
        hf.update(hidden_activation=act, hidden_act=act, attention_bias=cfg.qkv_bias,
                  query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.dim_head,
                  attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
                  sliding_window=cfg.sliding_window, layer_types=layer_types)
    # A family's config.json cannot say everything a ModelConfig can (Llama has no window, Mistral no
    # biases, ...): what it cannot say would be lost without a word, and the export would be another model.
    read_back = _function(config_from_hf(hf))
    lost = [f"{name}={value!r} (read back as {read_back[name]!r})" for name, value in _function(cfg).items()
            if read_back[name] != value]
    if lost:
        raise HFFormatError(f"a Hugging Face {cfg.family} config cannot express {', '.join(lost)}; export a model "
                            "of a family that has these settings")
    return hf


def _function(cfg: ModelConfig) -> dict[str, Any]:
    """The settings of `cfg` that decide the function the network computes, defaults made explicit."""
    names = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "dim_head", "d_ff", "rope_theta",
             "rope_scaling", "norm_eps", "act", "tie_embeddings", "qkv_bias", "o_bias", "mlp_bias", "norm_plus_one",
             "sandwich_norm", "embed_scale", "attn_softcap", "final_softcap")
    out = {name: getattr(cfg, name) for name in names}
    out.update(query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.dim_head, layer_windows=cfg.layer_windows())
    return out


# -- tensor name table ------------------------------------------------------------------------------
# (Kiln state path, HF name with {i} for the layer, Kiln->HF transform, HF->Kiln transform given Kiln shape)
Entry = tuple[tuple[str, ...], str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, tuple], np.ndarray]]


def _linear_in(a: np.ndarray) -> np.ndarray:  # Kiln [in, *out] -> HF [out, in]
    return a.reshape(a.shape[0], -1).T


def _linear_out(a: np.ndarray) -> np.ndarray:  # Kiln [*in, out] -> HF [out, in]
    return a.reshape(-1, a.shape[-1]).T


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)


def _from_in(a: np.ndarray, shape: tuple) -> np.ndarray:
    return a.T.reshape(shape)


def _from_out(a: np.ndarray, shape: tuple) -> np.ndarray:
    return a.T.reshape(shape)


def _reshape(a: np.ndarray, shape: tuple) -> np.ndarray:
    return a.reshape(shape)


def tensor_table(cfg: ModelConfig) -> list[Entry]:
    """The mapping between Kiln parameters and Hugging Face tensor names for `cfg`."""
    L = "model.layers.{i}."
    t: list[Entry] = [(("embed", "table"), "model.embed_tokens.weight", lambda a: a, _reshape)]
    for name in ("q", "k", "v"):
        t.append((("layers", "attn", name), L + f"self_attn.{name}_proj.weight", _linear_in, _from_in))
        if cfg.qkv_bias:
            t.append((("layers", "attn", f"{name}_bias"), L + f"self_attn.{name}_proj.bias", _flat, _reshape))
    t.append((("layers", "attn", "o"), L + "self_attn.o_proj.weight", _linear_out, _from_out))
    if cfg.o_bias:
        t.append((("layers", "attn", "o_bias"), L + "self_attn.o_proj.bias", _flat, _reshape))
    for name in ("gate", "up", "down"):
        t.append((("layers", "mlp", name), L + f"mlp.{name}_proj.weight", _linear_in, _from_in))
        if cfg.mlp_bias:
            t.append((("layers", "mlp", f"{name}_bias"), L + f"mlp.{name}_proj.bias", _flat, _reshape))
    norms = {"attn_norm": "input_layernorm"}
    if cfg.sandwich_norm:
        norms.update(attn_post_norm="post_attention_layernorm", mlp_norm="pre_feedforward_layernorm",
                     mlp_post_norm="post_feedforward_layernorm")
    else:
        norms.update(mlp_norm="post_attention_layernorm")
    for ours, theirs in norms.items():
        t.append((("layers", ours, "scale"), L + f"{theirs}.weight", lambda a: a, _reshape))
    t.append((("final_norm", "scale"), "model.norm.weight", lambda a: a, _reshape))
    if not cfg.tie_embeddings:
        t.append((("lm_head",), "lm_head.weight", lambda a: a.T, lambda a, s: a.T.reshape(s)))
    return t


# -- safetensors reading ----------------------------------------------------------------------------
class _Reader:
    """Tensors by name across a single file or an index of shards."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFFormatError(f"{index}: no weight_map; the file is damaged or incomplete, copy or export it again")
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise HFFormatError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self.files: dict[str, Any] = {}
        if weight_map is None:
            self.where = {k: single for k in self._open(single).keys()}
        else:
            self.where = {k: os.path.join(path, v) for k, v in weight_map.items()}
            for shard in sorted(set(self.where.values())):
                if not os.path.isfile(shard):
                    raise HFFormatError(f"{path}: shard {os.path.basename(shard)} listed in "
                                        "model.safetensors.index.json is missing")

    def _open(self, file: str):
        if file not in self.files:
            self.files[file] = _safetensors(file, lambda: safe_open(file, framework="numpy"))
        return self.files[file]

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise HFFormatError(f"tensor {name!r} is missing from the checkpoint")
        file = self.where[name]
        return _safetensors(file, lambda: self._open(file).get_tensor(name))


def _safetensors(file: str, read: Callable[[], Any]) -> Any:
    """`read()`, with a damaged safetensors file reported as an HFFormatError naming it."""
    try:
        return read()
    except SafetensorError as e:
        raise HFFormatError(f"{file} cannot be read ({str(e).splitlines()[0]}); it is damaged or incomplete, copy "
                            "or export it again") from None


def _read_json(file: str) -> dict[str, Any]:
    """The JSON object in `file`; HFFormatError naming the file if it does not parse or is not an object."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise HFFormatError(f"{file}: not valid JSON ({e}); the file is damaged or incomplete, copy or export it "
                            "again") from None
    if not isinstance(data, dict):
        raise HFFormatError(f"{file}: holds a JSON {type(data).__name__}, not an object; the file is damaged or "
                            "not a Hugging Face file, copy or export it again")
    return data


def load(path: str, dtype: DType | None = None, param_dtype: DType | None = None,
         **overrides: Any) -> tuple[ModelConfig, Transformer]:
    """Reads a Hugging Face directory: returns (config, model) with parameters in `param_dtype`.

    `dtype` sets the compute dtype (default float32); `param_dtype` defaults to `dtype`. Both take a
    JAX/NumPy dtype (`jnp.bfloat16`) or its name.
    `overrides` replace ModelConfig fields (e.g. remat, scan_layers).
    """
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise HFFormatError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    cfg = config_from_hf(_read_json(cfg_file), where=cfg_file)
    dtype = dtype_name(dtype or "float32")
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype_name(param_dtype or dtype), **overrides)
    reader = _Reader(path)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    flat = dict(nnx.to_flat_state(state))
    np_dtype = _NP_DTYPES[cfg.param_dtype]
    used: set[str] = set()
    for kiln_path, hf_name, to_hf, to_kiln in tensor_table(cfg):
        var = flat[kiln_path]
        stacked = kiln_path[0] == "layers"
        layer_shape = tuple(var.get_value().shape)[1:] if stacked else tuple(var.get_value().shape)
        expected = to_hf(np.zeros(layer_shape, np.int8)).shape
        parts = []
        for name in [hf_name.format(i=i) for i in range(cfg.n_layers)] if stacked else [hf_name]:
            raw = reader.get(name)
            if tuple(raw.shape) != expected:
                raise HFFormatError(f"tensor {name!r} has shape {tuple(raw.shape)}; config.json implies {expected}")
            parts.append(to_kiln(raw, layer_shape).astype(np_dtype))
            used.add(name)
        value = np.stack(parts) if stacked else parts[0]
        flat[kiln_path] = var.replace(jnp.asarray(value))
    unexpected = sorted(n for n in reader.where if n not in used and not n.endswith(_IGNORED_TENSORS)
                        and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if unexpected:
        raise HFFormatError(f"{path}: tensors Kiln does not map for model_type {cfg.family!r}: "
                            f"{', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
    return cfg, nnx.merge(graphdef, nnx.from_flat_state(flat))


# -- writing -----------------------------------------------------------------------------------------
def hf_tensors(model: Transformer, cfg: ModelConfig, dtype: DType | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs in Hugging Face layout, gathered to host memory one parameter at a time."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    np_dtype = _NP_DTYPES[dtype_name(dtype or cfg.param_dtype)]
    for kiln_path, hf_name, to_hf, _ in tensor_table(cfg):
        value = np.asarray(jax.device_get(flat[kiln_path].get_value())).astype(np_dtype)
        if kiln_path[0] == "layers":
            for i in range(cfg.n_layers):
                yield hf_name.format(i=i), np.ascontiguousarray(to_hf(value[i]))
        else:
            yield hf_name, np.ascontiguousarray(to_hf(value))


def save(model: Transformer, config: ModelConfig, path: str, dtype: DType | None = None,
         max_shard_bytes: int = MAX_SHARD_BYTES, files: dict[str, str] | None = None) -> None:
    """Writes `model` as a Hugging Face directory at `path` (atomically: all or nothing); LoRA
    adapters are merged into the weights they adapt. `files` are copied in beside the weights (name in
    the directory -> source file), e.g. the tokenizer's."""
    dtype = dtype_name(dtype or config.param_dtype)
    if config.prefix is not None:
        raise HFFormatError("a prompt- or prefix-tuned model has no merged Hugging Face weight layout; export it as a "
                            "PEFT adapter (kiln convert --adapter-only) or sample and evaluate its Kiln checkpoint")
    if config.reward_head:  # written as a causal LM, its score head was left out: a policy no one trained
        raise HFFormatError("a reward model's score head has no place in a Hugging Face causal LM, which would be "
                            "written without it; score replies with its Kiln run (rollout.reward)")
    if lora.adapters(model):  # Hugging Face weights hold the adapters merged in, in the written dtype
        model = lora.merge(model, dtype)
        config = model.cfg
    with atomic_dir(path) as tmp:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, arr in hf_tensors(model, config, dtype):
            if shards[-1] and size + arr.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = arr
            size += arr.nbytes
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata=meta)
        else:
            weight_map, total = {}, 0
            for k, shard in enumerate(shards):
                fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata=meta)
                weight_map.update({n: fname for n in shard})
                total += sum(a.nbytes for a in shard.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        hf_cfg = config_to_hf(config)
        hf_cfg["torch_dtype"] = dtype
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        for name, source in (files or {}).items():
            shutil.copyfile(source, os.path.join(tmp, name))
