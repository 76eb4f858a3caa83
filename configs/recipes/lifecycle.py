"""The whole life of a model in one command (`kiln pipeline --config=configs/recipes/lifecycle.py`), on
the built-in arithmetic task, with no files and no network:

  tokenizer -> pretrain -> context_extension -> anneal -> sft -> reward -> rejection_sampling -> dpo -> grpo

The task: two-step word problems on one-digit numbers (data/synthetic.py), the last 5% held out.
Pre-training, its context extension and its annealing read worksheets of one-step problems only (web
text seldom works a problem through); SFT and everything after it train on the two-step problems'
worked solutions. Every policy stage's model is evaluated on the same held-out two-step problems (the
first `eval_problems`), 0-shot and `shots`-shot, with and without a chain of thought; its row's
`accuracy` is the best setting's. The reward stage reports its held-out pair accuracy.
`rejection_sampling` is the SFT model fine-tuned on its own best samples (of `num_samples` per prompt
for `rs_prompts` training prompts, scored by `scorer`: the verifier, or the reward stage's model); its
sampling statistics join its row as `rs_generate/...`. DPO trains on the best-vs-worst pairs of those
samples; GRPO continues from DPO with the verifier as reward (rollouts at temperature 0.7).

Settings (override with --config.KEY=VALUE): the task (max_digits, min_ops, max_ops, pretrain_ops,
num_examples), the model (d_model, n_layers, n_heads, d_ff, vocab_size, split_digits), each stage's
steps and learning rate, eval_problems, shots, scorer. The default took 12.7 minutes on
a 2-core CPU (README: the table it produced).
Variants:
  smoke  tiny sizes and a few steps per stage, every stage run: about two minutes on a CPU.
"""
from ml_collections import ConfigDict

from configs import base

VARIANTS = {
    # A tiny model's replies are all wrong: the reward model scores them (so pairs differ), all kept.
    "smoke": dict(run_dir="runs/lifecycle_smoke", variant="smoke", scorer="reward_model", min_reward=-1e9,
                  time_scale=0.15, num_examples=2000, min_ops=1, max_ops=1, vocab_size=384, split_digits=True,
                  d_model=64, n_layers=2, n_heads=2, d_ff=128, seq_len=128, long_seq_len=256, pretrain_steps=4,
                  extension_steps=2, anneal_steps=2, sft_steps=4, reward_steps=2, rs_prompts=4, num_samples=4,
                  pretrain_batch=8, rs_steps=2, dpo_steps=4, dpo_lr=1e-3, grpo_steps=2, grpo_batch=8, grpo_prompts=2,
                  eval_problems=4, shots=(0,), chain_of_thought=(True,), max_new_tokens=24),
}


def get_config(variant: str = "") -> ConfigDict:
    c = ConfigDict(dict(
        run_dir="runs/lifecycle", variant="", scorer="verifier", min_reward=1.0,
        time_scale=1.0,  # times each stage's expected minutes (the progress line's ETA)
        # The task (data/synthetic.py): two-step problems on one-digit numbers. Pre-training (and its
        # context extension and annealing) sees problems of pretrain_ops steps only, as web text seldom
        # works a problem through: the few-shot prompt shows a two-step solution, SFT teaches it.
        max_digits=1, min_ops=2, max_ops=2, pretrain_ops=1, num_examples=20000,
        # The model: a small Llama-style decoder on a BPE fitted to the task, numbers kept whole
        # (" 7" one piece: a model this size learns to copy them from the question far sooner).
        vocab_size=512, split_digits=False, d_model=256, n_layers=4, n_heads=4, d_ff=704, seq_len=256,
        long_seq_len=512,
        # Steps per stage (rows of seq_len tokens: pretrain_batch in pre-training, batch_size after).
        pretrain_batch=4, batch_size=8, pretrain_steps=400, extension_steps=12, anneal_steps=24,
        sft_steps=240, sft_lr=1e-3, reward_steps=30, rs_prompts=512, num_samples=4, rs_steps=40, dpo_steps=20,
        dpo_lr=3e-5, grpo_steps=24, grpo_prompts=8, grpo_batch=16, grpo_lr=2e-5, grpo_temperature=0.7,
        # Evaluation: 0-shot and 1-shot (a 2-shot prompt of this task is ~200 tokens, twice the prefill).
        eval_problems=500, shots=(0, 1), chain_of_thought=(True, False), max_new_tokens=48,
        pair_len=128, pair_eval_batches=16))  # preference rows (prompt + one reply) and held-out pair batches
    return base.with_variant(c, VARIANTS, variant)


def stages(c: ConfigDict) -> list[dict]:
    def cfg(stage: str) -> str:
        return base.stage_file(stage, c.variant)

    def steps(n: int, batch: int, lr: float = 0.0) -> list[str]:
        return [f"train.steps={n}", f"checkpoint.every={max(n // 2, 1)}", f"train.eval_every={n}",
                f"data.batch_size={batch}", *((f"optim.lr={lr}",) if lr else ())]

    downstream, early = task(c, (c.min_ops, c.max_ops)), task(c, (1, c.pretrain_ops))
    evaluate = {"config": cfg("eval"), "overrides": [
        *downstream, f"eval.num_problems={c.eval_problems}", f"eval.shots={tuple(c.shots)}",
        f"eval.chain_of_thought={tuple(c.chain_of_thought)}", f"eval.max_new_tokens={c.max_new_tokens}",
        f"data.seq_len={c.long_seq_len}"]}
    model = ["model.preset=small", f"model.d_model={c.d_model}", f"model.n_layers={c.n_layers}",
             f"model.n_heads={c.n_heads}", f"model.n_kv_heads={c.n_heads}", f"model.d_ff={c.d_ff}",
             f"model.max_seq_len={c.long_seq_len}", "model.init_from="]  # evaluated on long prompts from the start
    short = [f"data.seq_len={c.seq_len}"]
    pairs = [f"data.seq_len={c.pair_len}", f"train.eval_steps={c.pair_eval_batches}"]
    minutes = lambda m: m * c.time_scale  # noqa: E731
    scorer = "@reward" if c.scorer == "reward_model" else "verifier"
    # Rejection sampling's files, read whole (the stage files' end=0.95 is the built-in task's training split).
    samples = lambda name: ["data.sources.train.format=jsonl", "data.sources.train.end=1.0",  # noqa: E731
                            f"data.sources.train.path=@rs_generate/{name}"]
    # Pre-training documents: worksheets of 4 problems, about a 256-token row.
    worksheets = ["data.synthetic.problems_per_document=4"]
    return [
        dict(name="tokenizer", command="tokenizer", config=cfg("pretrain"), minutes=minutes(0.1),
             overrides=[*early, *worksheets, f"data.tokenizer_vocab_size={c.vocab_size}",
                        f"data.tokenizer_split_digits={c.split_digits}"]),
        dict(name="pretrain", command="train", config=cfg("pretrain"), evaluate=evaluate, minutes=minutes(3.1),
             overrides=[*early, *model, *short, *worksheets, "data.tokenizer=@tokenizer/tokenizer.model",
                        *steps(c.pretrain_steps, c.pretrain_batch)]),
        dict(name="context_extension", command="train", config=cfg("context_extension"), evaluate=evaluate,
             minutes=minutes(1.0), overrides=[*early, "model.init_from=@pretrain", f"data.seq_len={c.long_seq_len}",
                                              f"model.max_seq_len={c.long_seq_len}",
                                              f"model.rope_scaling.original_max_position_embeddings={c.seq_len}",
                                              f"model.rope_scaling.factor={c.long_seq_len / c.seq_len}",
                                              *steps(c.extension_steps, c.pretrain_batch)]),
        # The learning rate to zero on the pre-training mix (configs/anneal.py's harder source is left out).
        dict(name="anneal", command="train", config=cfg("anneal"), evaluate=evaluate, minutes=minutes(0.8),
             overrides=[*early, "model.init_from=@context_extension", *short, "data.sources.quality.weight=0",
                        *worksheets, *steps(c.anneal_steps, c.pretrain_batch)]),
        dict(name="sft", command="train", config=cfg("sft"), evaluate=evaluate, minutes=minutes(3.4),
             overrides=[*downstream, "model.init_from=@anneal", *short, "optim.warmup_steps=10",
                        *steps(c.sft_steps, c.batch_size, c.sft_lr)]),
        dict(name="reward", command="train", config=cfg("reward"), minutes=minutes(0.4),
             overrides=[*downstream, "model.init_from=@sft", *pairs, *steps(c.reward_steps, c.batch_size)]),
        dict(name="rs_generate", command="generate", config=cfg("rejection_sampling"), part_of="rejection_sampling",
             minutes=minutes(0.5), overrides=[*downstream, "model.init_from=@sft", f"rollout.reward={scorer}",
                                              f"rollout.num_prompts={c.rs_prompts}",
                                              f"rollout.num_samples={c.num_samples}",
                                              f"rollout.max_new_tokens={c.max_new_tokens}",
                                              f"rollout.min_reward={c.min_reward}"]),
        dict(name="rejection_sampling", command="train", config=cfg("sft"), evaluate=evaluate, minutes=minutes(0.9),
             overrides=[*downstream, "model.init_from=@sft", *short, *samples("sft.jsonl"),
                        *steps(c.rs_steps, c.batch_size, c.sft_lr / 2)]),
        dict(name="dpo", command="train", config=cfg("dpo"), evaluate=evaluate, minutes=minutes(1.0),
             overrides=[*downstream, "model.init_from=@rejection_sampling", *pairs, *samples("pairs.jsonl"),
                        *steps(c.dpo_steps, c.batch_size, c.dpo_lr)]),
        dict(name="grpo", command="train", config=cfg("grpo"), evaluate=evaluate, minutes=minutes(1.5),
             overrides=[*downstream, "model.init_from=@dpo", *short, f"rollout.batch_prompts={c.grpo_prompts}",
                        f"rollout.max_new_tokens={c.max_new_tokens}",
                        f"rollout.temperature={c.grpo_temperature}", *steps(c.grpo_steps, c.grpo_batch, c.grpo_lr)]),
    ]


def start_from(stage: str, run_dir: str = "runs/lifecycle") -> tuple[str, ...]:
    """Overrides that start a stage config from the model of `stage` in a finished run of this recipe's
    default (`run_dir`), on its two-step task: the small-scale variants of the sweeps."""
    c = get_config()
    return (f"model.init_from={run_dir}/{stage}", *task(c, (c.min_ops, c.max_ops)))


def task(c: ConfigDict, ops: tuple[int, int]) -> list[str]:
    """The overrides that set a stage's synthetic task: the recipe's numbers, `ops` = (min, max) steps."""
    return [f"data.synthetic.max_digits={c.max_digits}", f"data.synthetic.min_ops={ops[0]}",
            f"data.synthetic.max_ops={ops[1]}", f"data.synthetic.num_examples={c.num_examples}"]
