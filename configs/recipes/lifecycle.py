"""The whole life of a model in one command (`kiln pipeline --config=configs/recipes/lifecycle.py`), on
the built-in arithmetic task, with no files and no network:

  tokenizer -> pretrain -> context_extension -> anneal -> sft -> reward -> rejection_sampling -> dpo -> grpo

Every policy stage's model is evaluated on the same held-out problems (the task's last 5%, first
`eval_problems`), 0-shot and `shots`-shot, with and without a chain of thought; its row's `accuracy`
is the best setting's. The reward stage reports its held-out pair accuracy. `rejection_sampling` is
the SFT model fine-tuned on its own best samples (of `num_samples` per prompt, scored by `scorer`:
the verifier, or the reward stage's model); its sampling statistics join its row as `rs_generate/...`.
DPO trains on the best-vs-worst pairs of those samples; GRPO continues from DPO with the verifier.

Settings (override with --config.KEY=VALUE): the task (max_digits, max_ops, num_examples), the model
(d_model, n_layers, n_heads, d_ff, vocab_size), each stage's steps, eval_problems, shots, scorer.
Variants:
  smoke  tiny sizes and a few steps per stage, every stage run: about two minutes on a CPU.
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    # A tiny model's replies are all wrong: the reward model scores them (so pairs differ), all kept.
    "smoke": dict(run_dir="runs/lifecycle_smoke", variant="smoke", scorer="reward_model", min_reward=-1e9,
                  time_scale=0.15, num_examples=2000, vocab_size=384, d_model=64,
                  n_layers=2, n_heads=2, d_ff=128, seq_len=128, long_seq_len=256, pretrain_steps=4, extension_steps=2,
                  anneal_steps=2, sft_steps=4, reward_steps=2, rs_prompts=4, num_samples=4, rs_steps=2, dpo_steps=4,
                  grpo_steps=2, grpo_prompts=2, eval_problems=4, shots=(0,), chain_of_thought=(True,),
                  max_new_tokens=24),
}


def get_config(variant: str = "") -> ConfigDict:
    c = ConfigDict(dict(
        run_dir="runs/lifecycle", variant="", scorer="verifier", min_reward=1.0,
        time_scale=1.0,  # times each stage's expected minutes (the progress line's ETA)
        # The task: one- or two-operation problems on small numbers (data/synthetic.py).
        max_digits=1, max_ops=2, num_examples=20000,
        # The model: a small Llama-style decoder on a BPE fitted to the task.
        vocab_size=512, d_model=256, n_layers=4, n_heads=4, d_ff=704, seq_len=256, long_seq_len=512,
        pretrain_steps=300, extension_steps=20, anneal_steps=40, sft_steps=60, reward_steps=40,
        rs_prompts=128, num_samples=8, rs_steps=30, dpo_steps=30, grpo_steps=40, grpo_prompts=8,
        eval_problems=500, shots=(0, 4), chain_of_thought=(True, False), max_new_tokens=96))
    return base.with_variant(c, VARIANTS, variant)


def stages(c: ConfigDict) -> list[dict]:
    def cfg(stage: str) -> str:
        return base.stage_file(stage, c.variant)

    task = [f"data.synthetic.max_digits={c.max_digits}", f"data.synthetic.max_ops={c.max_ops}",
            f"data.synthetic.num_examples={c.num_examples}"]

    def steps(n: int, every: int = 0, **extra) -> list[str]:
        return [f"train.steps={n}", f"checkpoint.every={max(n // 2, 1)}", f"train.eval_every={every or n}",
                *(f"{k.replace('__', '.')}={v}" for k, v in extra.items())]

    evaluate = {"config": cfg("eval"), "overrides": [
        *task[:3], f"eval.num_problems={c.eval_problems}", f"eval.shots={tuple(c.shots)}",
        f"eval.chain_of_thought={tuple(c.chain_of_thought)}", f"eval.max_new_tokens={c.max_new_tokens}",
        f"data.seq_len={c.long_seq_len}"]}
    model = ["model.preset=small", f"model.d_model={c.d_model}", f"model.n_layers={c.n_layers}",
             f"model.n_heads={c.n_heads}", f"model.n_kv_heads={c.n_heads}", f"model.d_ff={c.d_ff}",
             f"model.max_seq_len={c.long_seq_len}", "model.init_from="]  # evaluated on long prompts from the start
    short = [f"data.seq_len={c.seq_len}"]
    scorer = "@reward" if c.scorer == "reward_model" else "verifier"
    return [
        dict(name="tokenizer", command="tokenizer", config=cfg("pretrain"),
             overrides=[*task, f"data.tokenizer_vocab_size={c.vocab_size}"], minutes=0.2 * c.time_scale),
        dict(name="pretrain", command="train", config=cfg("pretrain"), evaluate=evaluate, minutes=5 * c.time_scale,
             overrides=[*task, *model, *short, "data.tokenizer=@tokenizer/tokenizer.model",
                        *steps(c.pretrain_steps)]),
        dict(name="context_extension", command="train", config=cfg("context_extension"), evaluate=evaluate,
             minutes=1 * c.time_scale, overrides=[*task, "model.init_from=@pretrain", f"data.seq_len={c.long_seq_len}",
                                   f"model.max_seq_len={c.long_seq_len}",
                                   f"model.rope_scaling.original_max_position_embeddings={c.seq_len}",
                                   f"model.rope_scaling.factor={c.long_seq_len / c.seq_len}",
                                   *steps(c.extension_steps)]),
        dict(name="anneal", command="train", config=cfg("anneal"), evaluate=evaluate, minutes=1 * c.time_scale,
             overrides=[*task, "model.init_from=@context_extension", *short, *steps(c.anneal_steps)]),
        dict(name="sft", command="train", config=cfg("sft"), evaluate=evaluate, minutes=2 * c.time_scale,
             overrides=[*task, "model.init_from=@anneal", *short, *steps(c.sft_steps)]),
        dict(name="reward", command="train", config=cfg("reward"), minutes=1 * c.time_scale,
             overrides=[*task, "model.init_from=@sft", *short, *steps(c.reward_steps)]),
        dict(name="rs_generate", command="generate", config=cfg("rejection_sampling"), part_of="rejection_sampling",
             minutes=1 * c.time_scale, overrides=[*task[:3], "model.init_from=@sft", f"rollout.reward={scorer}",
                                   f"rollout.num_prompts={c.rs_prompts}", f"rollout.num_samples={c.num_samples}",
                                   f"rollout.max_new_tokens={c.max_new_tokens}", f"rollout.min_reward={c.min_reward}"]),
        dict(name="rejection_sampling", command="train", config=cfg("sft"), evaluate=evaluate, minutes=1 * c.time_scale,
             overrides=[*task, "model.init_from=@sft", *short, "data.sources.train.format=jsonl",
                        "data.sources.train.path=@rs_generate/sft.jsonl", *steps(c.rs_steps)]),
        dict(name="dpo", command="train", config=cfg("dpo"), evaluate=evaluate, minutes=1 * c.time_scale,
             overrides=[*task, "model.init_from=@rejection_sampling", *short, "data.sources.train.format=jsonl",
                        "data.sources.train.path=@rs_generate/pairs.jsonl", *steps(c.dpo_steps)]),
        dict(name="grpo", command="train", config=cfg("grpo"), evaluate=evaluate, minutes=2 * c.time_scale,
             overrides=[*task, "model.init_from=@dpo", f"data.seq_len={c.long_seq_len}",
                        f"rollout.batch_prompts={c.grpo_prompts}",
                        f"rollout.max_new_tokens={c.max_new_tokens}", *steps(c.grpo_steps)]),
    ]
