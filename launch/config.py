"""Loading a config: `FILE.py[:variant]`, then `--config.KEY=VALUE` overrides, then validation and lock."""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import sys
from typing import Any

from ml_collections import ConfigDict

from configs import base
from configs.base import set_path
from data.chat import FORMATS as CHAT_TEMPLATES
from model.config import LORA_TARGETS


class ConfigError(ValueError):
    """A config that cannot be used, with the key and the reason."""


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "minimal", "save_dots", "save_qkv_proj", "save_out_proj"),
    "model.rope_scaling.type": ("none", "linear", "llama3", "yarn"),
    "data.chat_template": tuple(CHAT_TEMPLATES),
    "peft.method": ("none", "lora", "prompt_tuning", "prefix_tuning"),
    "peft.lora_init": ("kaiming", "gaussian"),
    "peft.prompt_init": ("random", "vocab", "text"),
    "optim.schedule": ("constant", "cosine", "wsd", "linear"),
    "checkpoint.resume": ("auto", "none"),
    "loss.preference_type": ("sigmoid", "hinge", "ipo", "robust", "simpo", "orpo"),
    "loss.reference": ("model", "data"),
    "loss.kl_estimator": ("k1", "k3"),
    "loss.aggregation": ("grpo", "dapo", "dr_grpo"),
    "rollout.advantage": ("grpo", "dr_grpo", "rloo"),
}


def load_module(path: str, what: str, needs: tuple[str, ...]) -> Any:
    """The Python file `path` (a config, a recipe) as a module; ConfigError if it is missing or lacks
    one of the functions `needs`."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location(f"kiln_{what}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"{path} line {e.lineno}: {what} file has a syntax error ({e.msg}); fix the file") from e
    except Exception as e:  # the file's own code failed (a bad import, ...): its message, without the traceback
        raise ConfigError(f"{path}: the {what} file failed to load ({type(e).__name__}: {e}); fix the file, "
                          "or add --debug for the traceback") from e
    missing = [name for name in needs if not hasattr(module, name)]
    if missing:
        raise ConfigError(f"{path}: a {what} defines {' and '.join(f'{n}(...)' for n in needs)}; {missing[0]} is missing")
    return module


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ConfigDict:
    """Loads `path/to/file.py[:variant]`, applies `--config.a.b=value` strings, validates, locks."""
    path, colon, variant = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(path + ".py"):
        raise ConfigError(f"config file {path!r} not found; did you mean {path + '.py' + colon + variant!r}?")
    module = load_module(path, "config", ("get_config",))
    if colon and not variant:  # an unset shell variable after the colon: the base config would run in silence
        raise ConfigError(f"{spec}: no variant after ':'; name one, or drop the ':' for the base config")
    try:
        config = module.get_config(variant) if variant else module.get_config()
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{spec}: {e.args[0] if e.args else e}") from None
    except Exception as e:  # a bug in the file, or a variant given to a get_config() that takes none
        raise ConfigError(f"{spec}: get_config failed ({type(e).__name__}: {e}); fix the file, or add --debug for "
                          "the traceback") from e
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not an ml_collections ConfigDict "
                          "(start from configs.base.get_config())")
    keys = {apply_override(config, item) for item in overrides}
    read_moved_files_whole(config, keys)
    validate(config)
    config.lock()
    return config


def source_entries(config: ConfigDict) -> list[tuple[str, ConfigDict]]:
    """(key, entry) of every data source of `config`: training and evaluation sources, and eval tasks' splits."""
    groups = [("data.sources", config.data.sources), ("data.eval_sources", config.data.eval_sources)]
    groups += [(f"eval.tasks.{name}", task) for name, task in config.eval.tasks.items()]
    return [(f"{group}.{name}", src) for group, entries in groups for name, src in entries.items()]


def read_moved_files_whole(config: ConfigDict, keys: set[str]) -> None:
    """A data source (or eval task split) pointed at another file, by overriding its path or format, reads all
    of it unless the overrides give its slice too: the config file's slice split that file's own data
    (configs/sft.py's end=0.95 is the built-in task's training split), and on the user's file, or on
    rejection sampling's sft.jsonl, it left the last 5% out in silence. Says so on stderr. A source without
    the `start` / `end` keys reads [0, 1) already."""
    for where, src in source_entries(config):
        moved = sorted({f"{where}.path", f"{where}.format"} & keys)
        if not moved or src.format == "synthetic":  # the built-in task reads no file
            continue
        reset = {k: whole for k, whole in (("start", 0.0), ("end", 1.0))
                 if src.get(k, whole) != whole and f"{where}.{k}" not in keys}
        if reset:
            old = f"[start={src.get('start', 0.0)}, end={src.get('end', 1.0)}]"
            for k, whole in reset.items():
                src[k] = whole
            print(f"note: {moved[0]} is set, so {where} reads the whole new file, not the config file's slice "
                  f"{old} of its own data (give the slice with the path to keep one)", file=sys.stderr)


def check_slices(config: ConfigDict) -> None:
    """ConfigError for a source whose `start` / `end` are not fractions with 0 <= start < end <= 1 (refused
    only when the source was read, after the model was built)."""
    for where, src in source_entries(config):
        start, end = src.get("start", 0.0), src.get("end", 1.0)
        if all(isinstance(v, (int, float)) for v in (start, end)) and 0 <= start < end <= 1:
            continue
        bad = next((k for k, v in (("start", start), ("end", end))
                    if not isinstance(v, (int, float)) or not 0 <= v <= 1), None)
        what = (f"config key '{where}.{bad}' = {src[bad]!r}: a source's start and end are fractions of its records"
                if bad else f"config keys '{where}.start' = {start!r} and '{where}.end' = {end!r}: the slice is empty")
        raise ConfigError(f"{what}; need 0 <= start < end <= 1 (such as start=0.0, end=0.95)")


def apply_override(config: ConfigDict, item: str, keys_in: str = "configs/base.py") -> str:
    """Applies one `--config.a.b=value` (or `a.b=value`), parsing the value by the field's type, and returns
    the key; `keys_in` is the file that lists the keys (a recipe's or sweep's own), named when one is unknown."""
    text = item[2:] if item.startswith("--") else item
    if not text.startswith("config.") or "=" not in text:
        raise ConfigError(f"cannot read argument {item!r}; expected --config.KEY=VALUE")
    key, _, raw = text[len("config."):].partition("=")
    try:
        current = _get(config, key)
    except KeyError:
        raise ConfigError(f"unknown config key {key!r} (from {item!r}); every key is listed in {keys_in}") from None
    if isinstance(current, ConfigDict):
        raise ConfigError(f"config key {key!r} is a group; set one of its fields: {', '.join(current.keys())}")
    parent_key, _, leaf = key.rpartition(".")
    parent = _get(config, parent_key) if parent_key else config
    try:  # the field's declared type: a placeholder's (a str, int or float awaiting a value) too
        set_path(config, key, parse_value(raw, parent.get_type(leaf)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad value {raw!r} for config key {key!r}: {e}") from None
    return key


def _get(config: ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def parse_value(raw: str, kind: type) -> Any:
    """Parses `raw` as a value of type `kind` (bool, int, float, str, tuple; NoneType: a Python literal)."""
    if kind is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if kind is int:
        return int(raw)
    if kind is float:  # inf (or 1e400) passed every range check, nan those of optim.b1, model.dropout, ...
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    if kind is str:
        return raw
    if kind in (tuple, list):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ValueError(f"expected a Python {kind.__name__} literal such as \"('q', 'v')\" "
                             "(strings quoted, the whole argument quoted for the shell)") from None
        return kind(value if isinstance(value, (tuple, list)) else (value,))
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


# The rollout.* keys each stage reads; setting one in another stage is an error.
_SAMPLING = ("num_samples", "temperature", "top_p", "top_k", "max_new_tokens", "reward")
_RL = (*_SAMPLING, "batch_prompts", "epochs", "format_penalty", "mask_truncated")
ROLLOUT_KEYS = {"rejection_sampling": (*_SAMPLING, "num_prompts", "min_reward"), "grpo": (*_RL, "advantage"),
                "ppo": (*_RL, "gamma", "lam", "kl_target", "kl_horizon", "value_from")}


def check_connected(config: ConfigDict) -> None:
    """ConfigError for a rollout.* key set in a stage that does not read it, or a rope_scaling key set
    while scaling is off."""
    defaults = base.get_config()
    _check_readers(config, "rollout", "stage", ROLLOUT_KEYS)
    scaling = config.model.rope_scaling
    if scaling.type == "none":
        for key, value in scaling.items():
            if key != "type" and value != defaults.model.rope_scaling[key]:
                raise ConfigError(f"config key 'model.rope_scaling.{key}' is set but model.rope_scaling.type is "
                                  "'none'; set the type (linear, llama3, yarn) or drop the key")


# The peft.* keys each method reads; setting another method's key is an error.
PEFT_KEYS = {"lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_rslora", "lora_init",
                      "adapter_from"),
             "prompt_tuning": ("num_virtual_tokens", "prompt_init", "prompt_init_text"),
             "prefix_tuning": ("num_virtual_tokens", "prefix_hidden")}


# The loss.* keys each loss.type reads; setting one that the chosen loss ignores is an error.
_RL_LOSS = ("beta", "kl_estimator", "clip_eps_low", "clip_eps_high", "aggregation")
LOSS_KEYS = {"next_token": ("z_loss",), "sft": ("z_loss",), "reward": ("margin", "center_coef"),
             "dpo": ("beta", "label_smoothing", "preference_type", "nll_coef", "simpo_gamma", "reference"),
             "grpo": _RL_LOSS, "ppo": (*_RL_LOSS, "value_coef", "value_clip")}


def _check_readers(config: ConfigDict, group: str, choice: str, readers_of: dict[str, tuple[str, ...]]) -> None:
    """ConfigError for a `group.*` key set away from its default that the chosen `choice` (a key of
    the group, or a top-level key such as `stage`) does not read."""
    values, defaults = config[group], base.get_config()[group]
    name = choice if choice in config and choice not in values else f"{group}.{choice}"
    chosen = _get(config, name)
    used = readers_of.get(chosen, ())
    for key in sorted({k for keys in readers_of.values() for k in keys} - set(used)):
        if values[key] != defaults[key]:
            readers = [r for r, keys in readers_of.items() if key in keys]
            raise ConfigError(f"config key '{group}.{key}' is set but {name} is {chosen!r}; it is read by "
                              f"{name}={' or '.join(readers)}")


def check_loss(config: ConfigDict) -> None:
    """ConfigError for a loss.* key that the chosen loss.type (or DPO's preference_type) does not read."""
    _check_readers(config, "loss", "type", LOSS_KEYS)
    loss, defaults = config.loss, base.get_config().loss
    if loss.type != "dpo":
        return
    kind = loss.preference_type
    if loss.label_smoothing and kind not in ("sigmoid", "robust", "simpo"):
        raise ConfigError(f"loss.label_smoothing applies to preference_type sigmoid, robust or simpo, not {kind!r}")
    if loss.simpo_gamma != defaults.simpo_gamma and kind != "simpo":
        raise ConfigError(f"loss.simpo_gamma is read by preference_type simpo, not {kind!r}")
    if loss.reference != defaults.reference and kind in ("simpo", "orpo"):
        raise ConfigError(f"loss.reference={loss.reference!r} is read by preference types with a reference model "
                          f"(sigmoid, hinge, ipo, robust), not {kind!r}, which compares the policy with no reference")
    if kind == "orpo" and not loss.nll_coef:
        raise ConfigError("ORPO's loss is the chosen reply's NLL plus its odds-ratio term: set loss.nll_coef "
                          "(1.0 in the paper; loss.beta is its lambda)")


def check_peft(config: ConfigDict) -> None:
    """ConfigError for a peft.* key that the chosen peft.method does not read."""
    _check_readers(config, "peft", "method", PEFT_KEYS)
    peft = config.peft
    unknown = [t for t in peft.lora_targets if t not in LORA_TARGETS]
    if peft.method == "lora" and (unknown or not peft.lora_targets):
        # Hugging Face PEFT names the projections q_proj, gate_proj, ...: Kiln's names are their stems.
        stem = unknown[0].removesuffix("_proj") if unknown else ""
        hint = f" ({unknown[0]!r} is {stem!r} here)" if stem in LORA_TARGETS else ""
        raise ConfigError(f"config key 'peft.lora_targets' = {tuple(peft.lora_targets)}: choose among "
                          f"{', '.join(LORA_TARGETS)}{hint}")
    if peft.method == "prompt_tuning" and (peft.prompt_init == "text") != bool(peft.prompt_init_text):
        raise ConfigError("peft.prompt_init=text and peft.prompt_init_text go together: set both or neither")


def check_post_training(config: ConfigDict) -> None:
    """ConfigError for a post-training or evaluation setting out of its range, before any model is built
    (the loss, the LoRA or prefix module and the sampler refused them only once the model was loaded, naming
    no config key; a negative GRPO beta, rollout.num_prompts or eval.num_problems, a coefficient of the wrong
    sign, LoRA's alpha 0 and GAE's gamma or lambda above 1 ran on in silence, and rollout.kl_horizon=0 divided
    by zero after the first rollout)."""
    loss, peft, ro, ev = config.loss, config.peft, config.rollout, config.eval
    dpo = loss.type == "dpo"  # beta is DPO's temperature; RL's KL coefficient may be 0 (no reference)
    rules = (("loss.beta", loss.beta > 0 if dpo else loss.beta >= 0, "positive" if dpo else "0 or more"),
             ("loss.label_smoothing", 0 <= loss.label_smoothing < 0.5, "in [0, 0.5) (the fraction of flipped labels)"),
             ("loss.nll_coef", loss.nll_coef >= 0, "0 or more"),
             ("loss.simpo_gamma", loss.simpo_gamma >= 0, "0 or more"),
             ("loss.margin", loss.margin >= 0, "0 or more"),
             ("loss.center_coef", loss.center_coef >= 0, "0 or more"),
             ("loss.clip_eps_low", 0 < loss.clip_eps_low < 1, "in (0, 1)"),
             ("loss.clip_eps_high", loss.clip_eps_high > 0, "positive"),
             ("loss.value_coef", loss.value_coef >= 0, "0 or more"),
             ("loss.value_clip", loss.value_clip >= 0, "0 (unclipped) or more"),
             ("peft.lora_rank", peft.lora_rank >= 1, "positive"),
             ("peft.lora_alpha", peft.lora_alpha > 0, "positive"),
             ("peft.lora_dropout", 0 <= peft.lora_dropout < 1, "in [0, 1)"),
             ("peft.num_virtual_tokens", peft.num_virtual_tokens >= 1, "positive"),
             ("peft.prefix_hidden", peft.prefix_hidden >= 0, "0 (learned directly) or more"),
             ("rollout.num_samples", ro.num_samples >= 1, "positive"),
             ("rollout.max_new_tokens", ro.max_new_tokens >= 1, "positive"),
             ("rollout.num_prompts", ro.num_prompts >= 0, "0 (all) or more"),
             ("rollout.temperature", ro.temperature >= 0, "0 or more"),
             ("rollout.top_p", 0 < ro.top_p <= 1, "in (0, 1]"),
             ("rollout.top_k", ro.top_k >= 0, "0 (off) or more"),
             ("rollout.format_penalty", ro.format_penalty >= 0, "0 or more (it is subtracted from a cut-off reply)"),
             ("rollout.gamma", 0 <= ro.gamma <= 1, "in [0, 1]"),
             ("rollout.lam", 0 <= ro.lam <= 1, "in [0, 1]"),
             ("rollout.kl_target", ro.kl_target >= 0, "0 (a fixed KL coefficient) or more"),
             ("rollout.kl_horizon", ro.kl_horizon >= 1, "positive"),
             ("eval.num_problems", ev.num_problems >= 0, "0 (all) or more"),
             ("eval.max_new_tokens", ev.max_new_tokens >= 1, "positive"),
             ("eval.batch_size", ev.batch_size >= 1, "positive"))
    for key, ok, rule in rules:
        if not ok:
            raise ConfigError(f"config key {key!r} must be {rule}, got {_get(config, key)}")
    if not ev.tasks:
        return
    hints = {"eval.shots": "the numbers of few-shot examples, such as (0, 4)",
             "eval.chain_of_thought": "(True, False), (True,) or (False,)"}
    for key, hint in hints.items():
        if not tuple(_get(config, key)):  # every setting of every task is a (shots, chain of thought) pair
            raise ConfigError(f"config key {key!r} is empty, so no setting of eval.tasks would be scored; list {hint}")
    if any(k < 0 for k in ev.shots):
        raise ConfigError(f"config key 'eval.shots' = {tuple(ev.shots)}: each is a number of few-shot examples, "
                          "0 or more")


def validate(config: ConfigDict) -> None:
    """Checks choices, ranges and unconnected keys; raises ConfigError naming the key."""
    if not str(config.run_dir).strip():  # "" would make the current directory the run directory
        raise ConfigError("config key 'run_dir' is empty; name the run's directory")
    check_connected(config)
    check_loss(config)
    check_peft(config)
    check_post_training(config)
    check_slices(config)
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} = {value!r}; expected one of {', '.join(allowed)}")
    # data.packing_bins=0 failed in grain naming no key; train.max_nonfinite_steps=0 stopped at the first step.
    positive = ("data.seq_len", "data.batch_size", "train.steps", "train.log_every", "optim.grad_accum",
                "checkpoint.keep", "data.packing_bins", "train.max_nonfinite_steps")
    for key in positive:
        if _get(config, key) <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {_get(config, key)}")
    # 0 turns these off (or means none); a negative value, or NaN, would train on in silence.
    non_negative = ("optim.lr", "optim.warmup_steps", "optim.weight_decay", "optim.clip_norm", "train.eval_every",
                    "train.eval_steps", "checkpoint.every", "checkpoint.keep_every", "data.num_workers")
    for key in non_negative:
        if not _get(config, key) >= 0:
            raise ConfigError(f"config key {key!r} must be 0 or more, got {_get(config, key)}")
    # Each trained on in silence: AdamW's moments grew without bound (b1 or b2 of 1 or more), dropout of 1 or
    # more dropped every output, a schedule ended above (or below 0 of) its peak, a negative RoPE base.
    model, optim = config.model, config.optim
    rules = (("model.dropout", 0 <= model.dropout < 1, "in [0, 1)"), ("optim.b1", 0 <= optim.b1 < 1, "in [0, 1)"),
             ("optim.b2", 0 <= optim.b2 < 1, "in [0, 1)"), ("optim.eps", optim.eps > 0, "positive"),
             ("optim.min_lr_ratio", 0 <= optim.min_lr_ratio <= 1, "in [0, 1] (the final rate over the peak)"),
             ("optim.decay_fraction", 0 <= optim.decay_fraction <= 1, "in [0, 1] (the part of the run that decays)"),
             ("model.rope_theta", model.rope_theta is None or model.rope_theta > 0, "positive"))
    for key, ok, rule in rules:
        if not ok:
            raise ConfigError(f"config key {key!r} must be {rule}, got {_get(config, key)}")
    for axis in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp"):
        size = config.mesh[axis]
        if size < 1 and not (size == -1 and axis in ("data", "fsdp", "tensor")):
            raise ConfigError(f"config key 'mesh.{axis}' must be a device count of 1 or more"
                              f"{' (or -1: the rest)' if not axis.startswith('dcn') else ''}, got {size}")
    if config.data.batch_size % config.optim.grad_accum:
        raise ConfigError(f"data.batch_size={config.data.batch_size} is not divisible by "
                          f"optim.grad_accum={config.optim.grad_accum}")
    for group in ("sources", "eval_sources"):
        for name, src in config.data[group].items():
            for field in ("path", "format", "weight"):
                if field not in src:
                    raise ConfigError(f"data.{group}.{name} lacks {field!r}")
            if src.weight < 0:
                raise ConfigError(f"data.{group}.{name}.weight must be >= 0, got {src.weight}")
    if not config.data.sources:
        raise ConfigError("data.sources is empty; name at least one training source")
    if sum(s.weight for s in config.data.sources.values()) <= 0:
        raise ConfigError("data.sources weights sum to zero")
