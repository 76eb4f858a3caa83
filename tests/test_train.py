"""The trainer end to end: every stage's smoke run, exact resume, mesh changes, divergence and bad batches."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from data import pipeline
from launch.config import load_config
from train import checkpoint, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(stage, run_dir, *overrides):
    return load_config(os.path.join(ROOT, f"configs/{stage}.py:smoke"),
                       [f"--config.run_dir={run_dir}", "--config.train.progress=false", *overrides])


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("pretrain"))
    last = trainer.train(config("pretrain", run_dir, "--config.train.log_every=1"))
    return run_dir, last


def test_pretrain_smoke(pretrained):
    run_dir, last = pretrained
    for name in ("config.json", "env.json", "metrics.jsonl"):
        assert os.path.isfile(os.path.join(run_dir, name))
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    train_rows = [r for r in rows(run_dir) if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    assert all({"step", "loss", "lr", "tokens_per_s", "mfu"} <= set(r) for r in train_rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    evals = [r for r in rows(run_dir) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    assert 0 < evals[1]["eval/bits_per_byte"] < 8
    assert checkpoint.latest_step(run_dir) == 20
    assert json.load(open(os.path.join(run_dir, "env.json")))["device_count"] == 8


@pytest.mark.parametrize("stage", ["context_extension", "anneal", "continue"])
def test_stage_smoke_from_pretrained(stage, pretrained, tmp_path):
    source, _ = pretrained
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]  # not the saving mesh
    cfg = config(stage, str(tmp_path), f"--config.model.init_from={source}", *mesh)
    trainer.train(cfg)
    evals = [r for r in rows(str(tmp_path)) if any(k.startswith("eval/") for k in r)]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == cfg.train.steps  # before and after
    first_loss = next(r["loss"] for r in rows(str(tmp_path)) if "loss" in r)
    assert first_loss < 5.0, "starts from the pre-trained model, not from scratch (~5.9)"
    if stage == "continue":
        assert {"eval/old/loss", "eval/new/loss"} <= set(evals[-1])
    if stage == "context_extension":
        restored = checkpoint.read_model_config(str(tmp_path))
        assert restored.rope_scaling.type == "yarn" and cfg.data.seq_len == 128


def test_resume_is_bit_identical(pretrained, tmp_path, monkeypatch):
    reference, _ = pretrained
    cfg = config("pretrain", str(tmp_path), "--config.train.log_every=1")
    real_check = trainer._check_batch

    def crash(batch, step):
        if step == 14:
            raise KeyboardInterrupt("simulated kill after the step-10 checkpoint")
        real_check(batch, step)

    monkeypatch.setattr(trainer, "_check_batch", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg)
    assert checkpoint.latest_step(str(tmp_path)) == 10
    # A save killed half-way leaves only orbax's temporary directory, which resume must ignore.
    partial = os.path.join(str(tmp_path), "checkpoints", "12.orbax-checkpoint-tmp-1700000000")
    os.makedirs(os.path.join(partial, "params"))
    assert checkpoint.latest_step(str(tmp_path)) == 10
    monkeypatch.setattr(trainer, "_check_batch", real_check)
    trainer.train(cfg)
    resumed, uninterrupted = train_losses(str(tmp_path)), train_losses(reference)
    assert list(resumed) == list(range(1, 21))  # rows after the checkpoint were replaced, not repeated
    assert resumed == uninterrupted
    # The final states, every array of them (parameters, moments, counts, RNG) and the data stream's
    # position, are bit-identical too.
    like = trainer.setup(cfg).state
    (a, data_a), (b, data_b) = (checkpoint.Checkpointer(d).restore(20, like) for d in (str(tmp_path), reference))
    assert data_a == data_b
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_checkpoint_retention(tmp_path):
    trainer.train(config("pretrain", str(tmp_path), "--config.checkpoint.every=5", "--config.checkpoint.keep=2",
                         "--config.checkpoint.keep_every=10", "--config.train.eval_every=0"))
    steps = sorted(int(d) for d in os.listdir(os.path.join(str(tmp_path), "checkpoints")) if d.isdigit())
    assert steps == [10, 15, 20]  # the latest two, plus every 10th kept for good


def poisoned(after, mask_value):
    real = pipeline.train_iterator

    def make(*args, **kwargs):
        it = real(*args, **kwargs)

        class Poisoned:
            n = 0

            def __next__(self):
                batch = next(it)
                self.n += 1
                if self.n > after:
                    batch = dict(batch, loss_mask=batch["loss_mask"] * mask_value)
                return batch

            def get_state(self):
                return it.get_state()

            def set_state(self, state):
                it.set_state(state)
        return Poisoned()
    return make


def test_divergence_stops_with_checkpoint_intact(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "train_iterator", poisoned(after=12, mask_value=np.nan))
    cfg = config("pretrain", str(tmp_path), "--config.train.max_nonfinite_steps=3")
    with pytest.raises(trainer.TrainingError, match="3 consecutive non-finite steps up to step 15"):
        trainer.train(cfg)
    assert checkpoint.latest_step(str(tmp_path)) == 10
    _, model = checkpoint.load_params(str(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(model)))


def test_all_masked_batch_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "train_iterator", poisoned(after=2, mask_value=0.0))
    with pytest.raises(trainer.TrainingError, match="step 3: the batch has no loss tokens"):
        trainer.train(config("pretrain", str(tmp_path)))


def test_cli_unknown_key_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "launch.main", "train", "--config=configs/pretrain.py:smoke",
                        f"--config.run_dir={tmp_path}", "--config.optim.no_such_key=1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "unknown config key 'optim.no_such_key'" in p.stderr
