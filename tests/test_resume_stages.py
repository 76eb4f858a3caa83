"""A killed run resumes bit for bit in every stage and training mode, not only pre-training
(test_train.test_resume_is_bit_identical) and GRPO (test_rl): the metrics rows and the final
checkpointed state (parameters, optimizer moments, step, RNG, non-finite counters, data-iterator
state) equal those of the same run never interrupted."""
import inspect
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from data import pipeline
from model import presets
from model.transformer import Transformer
from train import checkpoint, trainer
from test_rl import REWARD
from test_train import config, rows

# Figures that measure the machine, not the run.
TIMING = {"tokens_per_s", "mfu", "step_time_s", "rollout/tokens_per_s", "rollout/seconds"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A fresh tiny model saved as a Kiln checkpoint (the smoke pre-training's shapes): a base to start from."""
    path = str(tmp_path_factory.mktemp("base"))
    cfg = presets.get("tiny", vocab_size=384)
    checkpoint.save_params(path, 0, Transformer(cfg, rngs=nnx.Rngs(7)), cfg)
    return path


def kill(monkeypatch, name, at):
    """Makes trainer.NAME (a function of a `step`) raise KeyboardInterrupt, as a kill would, when called
    for step `at`; returns the real function."""
    real = getattr(trainer, name)

    def crash(*args):
        if inspect.signature(real).bind(*args).arguments["step"] == at:
            raise KeyboardInterrupt(f"simulated kill in {name} at step {at}")
        return real(*args)

    monkeypatch.setattr(trainer, name, crash)
    return real


def killed_and_resumed(tmp_path, monkeypatch, stage, overrides, killed_in):
    """Trains `stage` uninterrupted, then again killed in trainer.KILLED_IN at step 4 and resumed with the
    same command; returns both run directories and the config."""
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    trainer.train(config(stage, whole, *overrides))
    real = kill(monkeypatch, killed_in, 4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config(stage, split, *overrides))
    monkeypatch.setattr(trainer, killed_in, real)
    cfg = config(stage, split, *overrides)
    assert checkpoint.latest_step(split) >= 2  # the resumed run starts from a checkpoint
    trainer.train(cfg)
    return whole, split, cfg


def logged(run_dir):
    """The metrics rows without the timings."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows(run_dir)]


def assert_same_run(whole, split, cfg):
    """Equal metrics rows (NaN equals NaN) and equal final states, every array of them."""
    np.testing.assert_equal(logged(split), logged(whole))
    steps = cfg.train.steps
    assert checkpoint.latest_step(split) == checkpoint.latest_step(whole) == steps
    like = trainer.setup(cfg).state
    (a, data_a), (b, data_b) = (checkpoint.Checkpointer(d).restore(steps, like) for d in (split, whole))
    assert data_a == data_b
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)),
                            strict=True):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


SHORT = ["--config.train.steps=4", "--config.checkpoint.every=2", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.data.seq_len=128"]
PAIRS = [*SHORT, "--config.data.seq_len=256"]  # at 128 tokens most pairs are cut before their replies differ
LORA = ["--config.peft.method=lora", "--config.optim.lr=1e-2"]
BASE = "@base"  # starts from the `base` fixture


def case(name, stage, *overrides, killed_in="_check_batch", slow=True):
    """A run of `stage` killed in trainer.KILLED_IN at step 4 (after the step-2 checkpoint). The default
    run stays under 15 minutes: most cases are slow (.ci/run runs them too)."""
    return pytest.param(stage, list(overrides), killed_in, id=name, marks=[pytest.mark.slow] if slow else [])


CASES = [
    # DPO on LoRA adapters, dropout on them and in the model, killed in its final evaluation: the
    # reference is the base with the adapters off, not the restored adapters, in the loss and the
    # evaluation; and the resumed run evaluates the final model too (it found the last step's
    # checkpoint, written before the evaluation, and did nothing: one row short).
    case("dpo_lora_dropout_final_eval", "dpo", *PAIRS, BASE, *LORA, "--config.peft.lora_dropout=0.1",
         "--config.model.dropout=0.1", "--config.train.eval_every=4", "--config.train.eval_steps=1",
         killed_in="_eval", slow=False),
    case("sft_lora_dropout", "sft", *SHORT, BASE, *LORA, "--config.peft.lora_dropout=0.1",
         "--config.model.dropout=0.1"),
    # Policy and value model in one state, rollouts sampled from the restored policy, the adaptive KL
    # coefficient in the data state: test_rl's smoke run (2 train steps per rollout, a checkpoint every 2).
    # Slow (~25 s): test_rl's GRPO run resumes through the same rollout source in the default run.
    case("ppo", "ppo", REWARD, "--config.rollout.kl_target=0.01"),
    case("sft_packed", "sft", *SHORT),
    case("sft_dropout_accum", "sft", *SHORT, "--config.model.dropout=0.1", "--config.optim.grad_accum=2",
         "--config.mesh.fsdp=4", "--config.mesh.tensor=2"),
    case("prompt_tuning", "sft", *SHORT, BASE, "--config.peft.method=prompt_tuning", "--config.peft.prompt_init=vocab",
         "--config.optim.lr=1e-2"),
    case("prefix_tuning", "sft", *SHORT, BASE, "--config.peft.method=prefix_tuning", "--config.peft.prefix_hidden=16",
         "--config.optim.lr=3e-2"),
    case("reward", "reward", *PAIRS),
    # The reference is the start, not the restored weights: in the loss and in the evaluations.
    case("dpo", "dpo", *PAIRS, BASE, "--config.optim.lr=1e-2", "--config.train.eval_every=2"),
    case("dpo_lora_dropout_accum", "dpo", *PAIRS, BASE, *LORA, "--config.peft.lora_dropout=0.1",
         "--config.optim.grad_accum=2", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"),
    case("ppo_lora", "ppo", REWARD, BASE, *LORA, "--config.peft.lora_dropout=0.1", "--config.rollout.kl_target=0.01",
         "--config.rollout.epochs=1", "--config.train.steps=6"),
    case("grpo_lora", "grpo", REWARD, BASE, *LORA, "--config.peft.lora_dropout=0.1"),
]


@pytest.mark.parametrize("stage, overrides, killed_in", CASES)
def test_killed_run_resumes_bit_for_bit(stage, overrides, killed_in, base, tmp_path, monkeypatch):
    if BASE in overrides:
        overrides = [f"--config.model.init_from={base}", "--config.data.tokenizer=byte",
                     *(o for o in overrides if o != BASE)]
    whole, split, cfg = killed_and_resumed(tmp_path, monkeypatch, stage, overrides, killed_in)
    assert_same_run(whole, split, cfg)


def nan_batches(monkeypatch, positions):
    """Makes the training stream's batches at `positions` (counted from 1 in the stream's own state, so a
    resumed stream knows where it is) carry a NaN loss mask: their steps are non-finite and skipped."""
    real = pipeline.train_iterator

    class Poisoned:
        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            batch, self.n = next(self.it), self.n + 1
            return dict(batch, loss_mask=batch["loss_mask"] * np.nan) if self.n in positions else batch

        def get_state(self):
            return {"stream": self.it.get_state(), "batches": self.n}

        def set_state(self, state):
            self.it.set_state(state["stream"])
            self.n = state["batches"]

    monkeypatch.setattr(pipeline, "train_iterator", lambda *args, **kwargs: Poisoned(real(*args, **kwargs)))


def test_a_nonfinite_streak_counts_on_across_a_resume(tmp_path, monkeypatch):
    """Steps 9, 10 and 11 are non-finite: with train.max_nonfinite_steps=3 the run stops at step 11. Killed
    before step 11 and resumed from the step-10 checkpoint (which holds a streak of 2), it must stop there
    too, with the same rows: a streak restarted at 0 would train on. (The smoke pre-training's programs.)"""
    nan_batches(monkeypatch, {9, 10, 11})
    overrides = ["--config.train.max_nonfinite_steps=3", "--config.train.log_every=1"]
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    stopped = "3 consecutive non-finite steps up to step 11"
    with pytest.raises(trainer.TrainingError, match=stopped):
        trainer.train(config("pretrain", whole, *overrides))
    real = kill(monkeypatch, "_check_batch", 11)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config("pretrain", split, *overrides))
    monkeypatch.setattr(trainer, "_check_batch", real)
    with pytest.raises(trainer.TrainingError, match=stopped):
        trainer.train(config("pretrain", split, *overrides))
    np.testing.assert_equal(logged(split), logged(whole))
    assert [r["skipped"] for r in logged(split) if "loss" in r] == [0.0] * 8 + [1.0, 1.0]


def test_a_notice_during_the_last_step_still_evaluates_and_saves_it(tmp_path, monkeypatch):
    """A pre-emption notice (SIGTERM) that arrives during the last step: the run is finished, so it evaluates
    and saves as without one, and still says it was pre-empted (a pipeline stops there). Saving the last step
    and stopping left a run that the same command found finished, its final evaluation never made."""
    real = trainer._check_batch

    def notice(batch, step, stage):
        if step == 20:
            os.kill(os.getpid(), signal.SIGTERM)
        real(batch, step, stage)

    monkeypatch.setattr(trainer, "_check_batch", notice)
    out = trainer.train(config("pretrain", str(tmp_path)))  # the smoke pre-training: 20 steps, evaluated every 10
    assert out["preempted_at"] == 20 and "eval/loss" in out
    assert [r["step"] for r in rows(str(tmp_path)) if "eval/loss" in r] == [10, 20]
    assert checkpoint.latest_step(str(tmp_path)) == 20
