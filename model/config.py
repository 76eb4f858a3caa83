"""The decoder's shape and semantics: one frozen dataclass covers Llama, Mistral, Qwen2 and Gemma2."""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so np.dtype(jnp.bfloat16) has a name)
import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "gemma2")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "minimal", "save_dots", "save_qkv_proj", "save_out_proj")
DTYPES = ("float32", "bfloat16", "float16")
DType = Any  # a dtype name ("bfloat16"), a JAX/NumPy dtype (jnp.bfloat16, np.float32) or a numpy dtype object


def dtype_name(dtype: DType) -> str:
    """The name of `dtype` ("bfloat16" for jnp.bfloat16, np.dtype("bfloat16") or "bfloat16");
    ValueError unless it is one of DTYPES."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {DTYPES}")
    return name


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling for context extension, with Hugging Face's parameter names and defaults."""

    type: str = "default"
    factor: float | None = None  # yarn without a factor: max_seq_len / original_max_position_embeddings
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.type in ("linear", "llama3") and not self.factor:
            raise ValueError(f"RoPE scaling {self.type!r} needs a positive `factor`")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RopeScaling | None":
        if not d:
            return None
        d = dict(d)
        kind = d.pop("rope_type", d.pop("type", "default"))
        d.pop("rope_theta", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown rope_scaling keys {unknown}; known: {sorted(names - {'type'})}")
        if kind not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
        return None if kind == "default" else cls(type=kind, **d)

    def to_dict(self) -> dict[str, Any]:
        """The non-empty fields, with Hugging Face's `rope_type` key."""
        keep = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                         "mscale_all_dim", "attention_factor", "truncate")}[self.type]
        out = {"rope_type": self.type}
        out.update({k: getattr(self, k) for k in keep if getattr(self, k) is not None})
        return out


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (Hu et al., 2021): which projections get them, and their rank and scaling."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")
    rslora: bool = False  # scale alpha / sqrt(rank) (Kalajdzievski, 2023) instead of alpha / rank
    init: str = "kaiming"  # A's initialiser: kaiming (uniform, bound 1/sqrt(fan_in), as PEFT) | gaussian (std 1/rank)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: choose among {', '.join(LORA_TARGETS)}")
        if self.rank <= 0 or not 0.0 <= self.dropout < 1.0 or self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoRA needs rank > 0, 0 <= dropout < 1 and init kaiming | gaussian; got rank="
                             f"{self.rank}, dropout={self.dropout}, init={self.init!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Prompt tuning (kind "prompt": N virtual tokens) or prefix tuning (kind "prefix": N learned keys
    and values per layer, through an MLP of width `hidden` while training when hidden > 0)."""

    kind: str = "prompt"
    num_tokens: int = 20
    hidden: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("prompt", "prefix") or self.num_tokens <= 0 or self.hidden < 0:
            raise ValueError(f"prefix kind must be prompt or prefix with num_tokens > 0 and hidden >= 0; got "
                             f"{self.kind!r}, {self.num_tokens}, {self.hidden}")
        if self.kind == "prompt" and self.hidden:
            raise ValueError("prompt tuning has no MLP reparameterisation (hidden applies to prefix tuning)")


ATTENTION_KERNELS = ("auto", "einsum", "blocked", "xla", "cudnn", "splash")  # see model.attention_kernels


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every size and switch of the decoder. Family presets live in `model.presets`."""

    family: str = "llama"
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int = 1408
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    act: str = "silu"
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Gemma-style switches.
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), computed in fp32
    sandwich_norm: bool = False  # extra norms after attention and after the MLP
    embed_scale: bool = False  # embeddings times sqrt(d_model), in the activation dtype
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (default head_dim)
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Sliding-window attention: `window_layers` lists the layers that use it (None: all of them).
    sliding_window: int | None = None
    window_layers: tuple[int, ...] | None = None
    # Token ids carried for the Hugging Face round trip and the sampler.
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # A scalar head (a reward model's): `Transformer.rewards` scores each sequence at its last token.
    reward_head: bool = False
    # Parameter-efficient tuning inside the model (None: a plain decoder).
    lora: LoraConfig | None = None
    prefix: PrefixConfig | None = None
    # Numerics and compilation.
    dtype: str = "float32"  # any DType is accepted and stored by name
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    logits_chunk: int = 0  # positions per chunk of the training logits (0: whole); see Transformer.logit_stats
    attention: str = "auto"  # training attention: auto | einsum | xla | cudnn | splash (model.attention_kernels)
    init_std: float = 0.02
    # Residual dropout while training (a dropout key given): each block's attention and MLP outputs.
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for field in ("dtype", "param_dtype"):
            object.__setattr__(self, field, dtype_name(getattr(self, field)))
        checks = [
            (self.family in FAMILIES, f"family {self.family!r} is not one of {FAMILIES}"),
            (self.act in ACTIVATIONS, f"act {self.act!r} is not one of {ACTIVATIONS}"),
            (self.remat in REMAT_POLICIES, f"remat {self.remat!r} is not one of {REMAT_POLICIES}"),
            (self.n_heads % self.n_kv_heads == 0,
             f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"),
            (self.head_dim is not None or self.d_model % self.n_heads == 0,
             f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim"),
            (self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive"),
            (self.logits_chunk >= 0, "logits_chunk must be 0 (whole) or a positive number of positions"),
            (self.attention in ATTENTION_KERNELS, f"attention {self.attention!r} is not one of {ATTENTION_KERNELS}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
        ]
        for ok, why in checks:
            if not ok:
                raise ValueError(why)
        if self.lora is not None and self.prefix is not None:
            raise ValueError("a model takes one parameter-efficient method: LoRA or a prompt/prefix, not both")
        if self.window_layers is not None:
            object.__setattr__(self, "window_layers", tuple(int(i) for i in self.window_layers))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def layer_windows(self) -> tuple[int, ...]:
        """The attention window of each layer; 0 means global (full causal) attention."""
        if self.sliding_window is None:
            return (0,) * self.n_layers
        sliding = range(self.n_layers) if self.window_layers is None else set(self.window_layers)
        return tuple(self.sliding_window if i in sliding else 0 for i in range(self.n_layers))

    def replace(self, **changes: Any) -> "ModelConfig":
        if isinstance(changes.get("rope_scaling"), dict):
            changes["rope_scaling"] = RopeScaling.from_dict(changes["rope_scaling"])
        if isinstance(changes.get("lora"), dict):
            changes["lora"] = LoraConfig(**changes["lora"])
        if isinstance(changes.get("prefix"), dict):
            changes["prefix"] = PrefixConfig(**changes["prefix"])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}")
        d["rope_scaling"] = RopeScaling.from_dict(d.get("rope_scaling"))
        d["lora"] = LoraConfig(**d["lora"]) if d.get("lora") else None
        d["prefix"] = PrefixConfig(**d["prefix"]) if d.get("prefix") else None
        if d.get("window_layers") is not None:
            d["window_layers"] = tuple(d["window_layers"])
        return cls(**d)
