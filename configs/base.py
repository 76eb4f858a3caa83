"""Every config key Kiln knows, with its default. Stage files override only what differs.

A stage file defines `get_config(variant: str = "") -> ConfigDict`, usually as
`base.with_variant(config, VARIANTS, variant)`: variants are plain dicts of dotted keys.
Configs are locked after loading, so a misspelt key is an error that names it.
"""
from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from model.sharding import DEFAULT_RULES


def source(path: str = "", format: str = "synthetic", weight: float = 1.0, **fields: Any) -> ConfigDict:
    """A named data source: where it is, how to read it, and its mixture weight."""
    return ConfigDict(dict(path=path, format=format, weight=weight, **fields))


HH_RLHF = "$KILN_DATA_DIR/hh-rlhf/harmless-base-test.jsonl.gz"  # the shared copy: harmless-base's test split


def preference_pairs(hh: bool) -> tuple[ConfigDict, ConfigDict]:
    """(training, held-out) preference sources: HH-RLHF harmless-base (first 90% / last 10%), or the
    synthetic task's pairs (a worked solution against one with a slip; 95% / 5%)."""
    if hh:
        return source(HH_RLHF, "hh_rlhf", end=0.9), source(HH_RLHF, "hh_rlhf", start=0.9)
    return source(format="synthetic", end=0.95), source(format="synthetic", start=0.95)


def task(eval_source: ConfigDict, shots_source: ConfigDict) -> ConfigDict:
    """A verifiable task for `kiln eval`: the evaluated problems and the split its few-shot examples come from."""
    return ConfigDict(dict(eval=eval_source, shots=shots_source))


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.stage = "pretrain"
    c.run_dir = "runs/default"
    c.seed = 0

    # Model: a preset, optionally with sizes overridden (None: the preset's value).
    c.model = ConfigDict(dict(
        preset="tiny", family=placeholder(str), vocab_size=placeholder(int), d_model=placeholder(int),
        n_layers=placeholder(int), n_heads=placeholder(int), n_kv_heads=placeholder(int),
        head_dim=placeholder(int), d_ff=placeholder(int), max_seq_len=placeholder(int),
        rope_theta=placeholder(float), sliding_window=placeholder(int),
        # RoPE scaling for context extension: type none | linear | llama3 | yarn.
        rope_scaling=ConfigDict(dict(type="none", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=placeholder(int),
                                     beta_fast=placeholder(float), beta_slow=placeholder(float))),
        dtype="float32", param_dtype="float32", remat="none", scan_layers=True,
        # Training attention: auto (cuDNN flash attention on GPU, Pallas splash on TPU, blocked on CPU) |
        # einsum (the reference) | blocked (einsum skipping causal blocks) | xla | cudnn | splash;
        # see model/attention_kernels.py.
        attention="auto",
        # Positions per chunk of the training logits and cross-entropy (0: all at once). With a large
        # vocabulary the float32 [batch, seq, vocab] logits dominate memory; chunks are recomputed backward.
        logits_chunk=0,
        # Residual dropout while training: the rate on each block's attention and MLP outputs (0: off).
        dropout=0.0,
        # A Kiln run/checkpoint directory or a Hugging Face directory: parameters only.
        init_from="",
    ))

    # Parameter-efficient tuning: method none (train every parameter) | lora | prompt_tuning | prefix_tuning.
    # LoRA: adapters of rank lora_rank on lora_targets (any of q k v o gate up down), scaled
    # lora_alpha / lora_rank (lora_rslora: / sqrt(rank)); A initialised lora_init kaiming | gaussian,
    # B zero; dropout on the adapters' inputs. Only the adapters train and are checkpointed (with a
    # pointer to model.init_from, the frozen base). adapter_from: a Hugging Face PEFT adapter
    # directory to continue from (its r, alpha and targets must match these keys).
    # Prompt tuning: num_virtual_tokens learned input embeddings before every sequence, initialised
    # prompt_init random | vocab (embeddings of random vocabulary tokens) | text (of prompt_init_text).
    # Prefix tuning (P-tuning v2): num_virtual_tokens learned keys and values per layer and kv-head,
    # through an MLP of width prefix_hidden while training (0: learned directly).
    c.peft = ConfigDict(dict(method="none", lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
                             lora_targets=("q", "k", "v", "o"), lora_rslora=False, lora_init="kaiming",
                             adapter_from="", num_virtual_tokens=20, prompt_init="random", prompt_init_text="",
                             prefix_hidden=0))

    # Data (data/): named sources (mixture weights) for training and for evaluation. A source is
    # source(path, format, weight, **fields): format synthetic | text | jsonl | array_record | gsm8k |
    # hh_rlhf; fields start/end (fractions of the records, 0 <= start < end <= 1), jsonl/array_record field names
    # (text_field, prompt_field, completion_field, messages_field, chosen_field, rejected_field,
    # answer_field), gsm8k calculator_annotations. Paths may use $KILN_DATA_DIR. Weights are
    # shares of training rows (so of tokens); 0 switches a source off.
    c.data = ConfigDict(dict(
        sources=ConfigDict(dict(train=source())),
        eval_sources=ConfigDict(),
        # "auto" (model.init_from's own tokenizer when starting from a model, else "byte") | "byte" |
        # "train" (sentencepiece on the training sources, kept in run_dir) | a .model, a
        # tokenizer.json or a directory holding one. tokenizer_split_digits: a trained tokenizer keeps
        # every digit its own piece (Llama's choice); false lets " 7" be one piece, which a small model
        # copies from its prompt far sooner than the two pieces " " and "7". tokenizer_newlines: pieces may
        # span line breaks (trained on whole texts, not lines), for text whose layout carries meaning.
        tokenizer="auto", tokenizer_vocab_size=2048, tokenizer_model_type="bpe", tokenizer_split_digits=True,
        tokenizer_newlines=False,
        # batch_size is global. packing: several documents per row (segment ids, no attention
        # across them) by pack_method first_fit (grain first-fit over packing_bins rows) or concat
        # (concatenate-and-split: no padding, documents cut at row ends); false: one per row.
        seq_len=128, batch_size=8, packing=True, pack_method="first_fit", packing_bins=4, shuffle_seed=0,
        # text_separator splits text files into documents ("": the file is one document).
        # shift_windows: a training source that is one document is cut into seq_len windows on a grid
        # shifted by a fresh random offset every epoch (false: the same windows every epoch).
        # truncate: cut over-long SFT/preference examples (keep the start) and prompts (keep the
        # end); false drops them. Both are counted by `kiln data preview`.
        text_separator="", shift_windows=True, truncate=True,
        # chat_template: kiln | llama3 | chatml | gemma. mask_special_tokens: also keep the
        # assistant's end-of-turn token out of the loss (headers never are trained).
        chat_template="kiln", mask_special_tokens=False,
        # skip_bad_records: skip (and count) malformed records instead of stopping at the first.
        # num_workers: grain worker processes making batches (0: the calling thread).
        skip_bad_records=False, num_workers=0,
        # synthetic: the built-in task's problem count, difficulty (operands up to max_digits digits,
        # min_ops..max_ops steps) and family seed;
        # problems_per_document > 1 makes each pre-training document a worksheet of that many problems
        # (blank line between them, as in a few-shot prompt); other kinds stay one problem per record.
        synthetic=ConfigDict(dict(num_examples=20000, max_digits=2, min_ops=1, max_ops=2, seed=0, problems_per_document=1)),
    ))

    c.optim = ConfigDict(dict(lr=3e-4, schedule="cosine", warmup_steps=100, min_lr_ratio=0.1,
                              decay_fraction=0.2, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
                              clip_norm=1.0, grad_accum=1))
    c.train = ConfigDict(dict(steps=1000, log_every=10, eval_every=200, eval_steps=10,
                              max_nonfinite_steps=10, progress=True))
    # resume: auto (continue from the latest readable checkpoint of run_dir) | none (start over; the
    # earlier checkpoints are set aside in run_dir/superseded/). allow_changes: let a resumed run
    # change data settings or the seed (its data stream then restarts); optimizer, schedule, step
    # count, evaluation and mesh may always change; model shape, stage and loss never.
    c.checkpoint = ConfigDict({"every": 500, "keep": 3, "keep_every": 0, "async": True, "resume": "auto",
                               "allow_changes": False})
    # Mesh: data x fsdp x tensor devices (one may be -1: the rest) per slice or node; dcn_data / dcn_fsdp:
    # how many slices (or processes, i.e. hosts) the data / fsdp axis also spans across the data-centre
    # network. rules: logical axis -> mesh axes (model/sharding.py).
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1,
                             rules=tuple((name, target) for name, target in DEFAULT_RULES)))
    # Evaluation (`kiln eval`): bits per byte and perplexity on data.eval_sources, and exact-match
    # accuracy on verifiable tasks, each task {eval: source, shots: source} (the few-shot examples come
    # from their own split). Every pair of `shots` (k) and `chain_of_thought` is scored, greedily, on
    # the first num_problems problems (0: all); shot_seed draws the examples.
    c.eval = ConfigDict(dict(tasks=ConfigDict(), shots=(0, 4), chain_of_thought=(True, False), num_problems=100,
                             max_new_tokens=256, batch_size=32, shot_seed=0))
    # Loss: type (the registry name) and each loss's hyperparameters. next_token / sft: z_loss.
    # reward (Bradley-Terry): margin, center_coef. dpo: preference_type sigmoid | hinge | ipo |
    # robust | simpo | orpo, beta (temperature; ORPO's lambda), label_smoothing (conservative /
    # robust DPO, SimPO), nll_coef (chosen reply's per-token NLL; Llama 3: 0.2), simpo_gamma (the
    # margin, absolute as in TRL; the SimPO paper tunes beta 2-10 with gamma/beta ~0.5, set beta with it),
    # reference: model (a frozen reference beside the policy) | data (log-probs precomputed into the
    # pairs by `kiln data reference`: no reference model in memory).
    # grpo / ppo (train/losses/rl.py): beta (KL coefficient: GRPO's in the loss, PPO's in the reward;
    # 0: no reference model), kl_estimator k1 | k3 (GRPO's loss wants k3: differentiated on the policy's
    # own samples, k1's gradient is zero in expectation), clip_eps_low / clip_eps_high (the ratio's clip
    # range, DAPO's clip-higher when high > low), aggregation grpo | dapo | dr_grpo; ppo also
    # value_coef and value_clip (0: unclipped).
    c.loss = ConfigDict(dict(type="next_token", z_loss=0.0, beta=0.1, label_smoothing=0.0,
                             margin=0.0, center_coef=0.0, preference_type="sigmoid", nll_coef=0.0, simpo_gamma=0.5,
                             reference="model", kl_estimator="k3", clip_eps_low=0.2, clip_eps_high=0.2,
                             aggregation="grpo", value_coef=0.1, value_clip=0.2))
    # Rollouts (rejection sampling): num_samples replies per prompt for the first num_prompts prompts
    # of data.sources (0: all; more than they hold is refused), sampled with temperature / top_p /
    # top_k (0: off) up to max_new_tokens;
    # reward "verifier" (the task's answer check: 1 or 0) or a Kiln reward-model run directory;
    # min_reward: a prompt's best reply is kept for SFT only if it scores at least this (None: always).
    # reward may also be MODULE:FUNCTION (or file.py:FUNCTION), fn(prompts, replies, answers) -> scores.
    # RL (grpo, ppo; train/rollout.py): batch_prompts prompts per rollout, num_samples replies each
    # (GRPO's group size G), epochs (mu: passes over each rollout batch, in mini-batches of
    # data.batch_size rows), format_penalty (subtracted from a reply cut off at max_new_tokens),
    # mask_truncated (such replies leave the loss); grpo: advantage grpo | dr_grpo | rloo; ppo: gamma
    # and lam (GAE), kl_target (> 0: adaptive KL coefficient, Ziegler et al.) over kl_horizon samples,
    # value_from (the value model's start: a reward-model run; "": the policy, with a new head).
    c.rollout = ConfigDict(dict(num_samples=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=128,
                                reward="verifier", num_prompts=0, min_reward=placeholder(float),
                                batch_prompts=8, epochs=1, format_penalty=0.0, mask_truncated=False,
                                advantage="grpo", gamma=1.0, lam=0.95, kl_target=0.0, kl_horizon=10000,
                                value_from=""))
    return c


# The smoke variant of the RL stages: a tiny model from scratch, two prompts' rollouts of 16 tokens.
RL_SMOKE = {"model.init_from": "", "model.preset": "tiny", "data.seq_len": 192, "data.batch_size": 8,
            "data.synthetic.num_examples": 200, "rollout.batch_prompts": 2, "rollout.num_samples": 4,
            "rollout.max_new_tokens": 16, "optim.lr": 1e-3, "optim.warmup_steps": 1, "train.steps": 4,
            "train.log_every": 1, "checkpoint.every": 2}


def rl_config(stage: str, variant: str) -> ConfigDict:
    """What the RL stages (grpo, ppo) share: from the SFT model (`runs/sft`) on the built-in task's
    training prompts (GSM8K's for variant gsm8k), verifier reward, 128-token replies in 256-token
    rows, mini-batches of 16, constant lr 1e-5, 120 steps."""
    c = get_config()
    c.stage, c.loss.type = stage, stage
    c.run_dir = f"runs/{stage}{'_' + variant if variant else ''}"
    c.model.init_from = "runs/sft"
    c.rollout.max_new_tokens, c.rollout.reward = 128, "verifier"
    c.data.seq_len, c.data.batch_size = 256, 16
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.optim.schedule = 1e-5, 4, 0.0, "constant"
    c.train.steps, c.train.log_every, c.train.eval_every, c.checkpoint.every = 120, 4, 0, 40
    c.data.sources.train = (source("$KILN_DATA_DIR/gsm8k/train.jsonl", "gsm8k") if variant == "gsm8k"
                            else source(format="synthetic", end=0.95))
    return c


def stage_file(stage: str, variant: str = "") -> str:
    """A recipe's name for a stage config: "configs/STAGE.py", with ":variant" if one is given."""
    return f"configs/{stage}.py" + (f":{variant}" if variant else "")


def with_variant(config: ConfigDict, variants: dict[str, dict[str, Any]], variant: str) -> ConfigDict:
    """Applies the dotted-key overrides of `variants[variant]` ('' = none) to `config`."""
    if variant and variant not in variants:
        raise ValueError(f"unknown config variant {variant!r}; this file has: {', '.join(sorted(variants))}")
    for key, value in (variants.get(variant, {}) if variant else {}).items():
        set_path(config, key, value)
    return config


def set_path(config: ConfigDict, key: str, value: Any) -> None:
    """config['a.b.c'] = value, creating nothing: every part of the path must exist."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise KeyError(key)
        node = node[part]
    if leaf not in node:
        raise KeyError(key)
    node[leaf] = value
