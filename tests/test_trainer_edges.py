"""The trainer's loop and resume logic on stand-ins: a fake step, data stream, checkpointer, logger and
clock, so each rule (which steps are logged, evaluated, saved; when pre-emption stops; what a resume
restores; which metrics rows survive it) is checked by exact step numbers in milliseconds, under the
non-default conditions a smoke run does not reach (a resumed start, preference rows, a notice that
arrives between rollouts)."""
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from test_train import config
from train import build, rundir, trainer


class Stream:
    """A data stream of numbered batches whose position is its state; `boundaries` are the batch
    counts after which it sits between rollouts (None: always, as a plain data iterator)."""

    def __init__(self, boundaries=None):
        self.n, self.restored, self.boundaries = 0, None, boundaries

    def __next__(self):
        self.n += 1
        return {"tokens": np.full((2, 3), self.n), "loss_mask": np.ones((2, 3), np.float32)}

    def get_state(self):
        return {"position": self.n}

    def set_state(self, state):
        self.restored = state

    @property
    def at_boundary(self):
        return self.boundaries is None or self.n in self.boundaries


class Saves:
    """A checkpointer that records the steps saved."""

    def __init__(self):
        self.steps = []

    def save(self, state, data_state, model_cfg):
        self.steps.append(int(state))

    def latest_step(self):
        return self.steps[-1] if self.steps else None


class Logger:
    def __init__(self):
        self.rows, self.advanced = [], 0

    def log(self, step, row):
        self.rows.append((step, row))

    def advance(self):
        self.advanced += 1


class Notice:
    """Pre-emption requested once step `at` is done."""

    def __init__(self, at):
        self.at = at

    def reached(self, step):
        return step >= self.at


def fake_run(monkeypatch, *overrides, streaks=()):
    """A Run whose state is the step count, whose loss is the step's number and whose step costs 10 s of a
    fake clock; evaluations are recorded. `streaks`: the non-finite streak each step reports (0 after the list ends)."""
    clock, evals = [0.0], []

    def step_fn(state, frozen, batch):
        clock[0] += 10.0
        streak = streaks[state] if state < len(streaks) else 0
        return state + 1, {"loss": jnp.float32(state + 1), "nonfinite_streak": jnp.int32(streak)}

    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(trainer, "_eval", lambda run, kind, step, logger: evals.append(step) or {"eval/loss": 1.0})
    cfg = config("pretrain", "/nonexistent", "--config.data.batch_size=4", "--config.data.seq_len=16", *overrides)
    run = types.SimpleNamespace(config=cfg, step_fn=step_fn, state=0, frozen=None, global_batch=lambda b: b,
                                flops_per_token=3.0, model_cfg=None)
    return run, evals


def loop(run, start=0, kind="pretrain", stream=None, notice=None):
    """Runs `trainer._loop` from `start`; returns (result, logger, saves, stream)."""
    run.state, stream, logger, saves = start, stream or Stream(), Logger(), Saves()
    out = trainer._loop(run, kind, stream, saves, logger, start, 100.0, notice or Notice(at=10 ** 9))
    return out, logger, saves, stream


class MaskedAt(Stream):
    """A stream whose batch `at` has no loss tokens."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def __next__(self):
        batch = super().__next__()
        return dict(batch, loss_mask=batch["loss_mask"] * (self.n != self.at))


def test_a_batch_without_loss_tokens_stops_a_data_stage_but_not_an_rl_one(monkeypatch):
    """A data source whose masks leave nothing to learn from is an error; a rollout mini-batch of replies that
    rollout.mask_truncated dropped is not (the step skips it), or one such mini-batch ended an RL run."""
    run, _ = fake_run(monkeypatch, "--config.train.steps=4")
    with pytest.raises(trainer.TrainingError, match="step 2: the batch has no loss tokens"):
        loop(run, stream=MaskedAt(2))
    for stage in ("grpo", "ppo"):
        run, _ = fake_run(monkeypatch, "--config.train.steps=4")
        run.config.unlock().stage = stage
        assert loop(run, stream=MaskedAt(2))[3].n == 4


def test_a_resumed_run_logs_its_first_step_then_every_log_every_and_the_last(monkeypatch):
    """A run resumed at step 3 logs step 4 (its first), 5 and 10 (every 5th) and 11 (the last): the first
    step is the resumed one, not step 1, which this run never takes."""
    run, _ = fake_run(monkeypatch, "--config.train.steps=11", "--config.train.log_every=5",
                      "--config.train.eval_every=0")
    _, logger, _, _ = loop(run, start=3)
    assert [step for step, _ in logger.rows] == [4, 5, 10, 11]
    assert logger.advanced == 8


def test_a_preference_step_counts_two_sequences_per_row(monkeypatch):
    """Tokens per second over an interval: rows x seq_len token slots per step, twice that for preference
    rows (chosen and rejected), over the interval's time; MFU is that times flops per token over the peak."""
    for kind, sequences in (("pretrain", 1), ("preference", 2)):
        run, _ = fake_run(monkeypatch, "--config.train.steps=4", "--config.train.log_every=2",
                          "--config.train.eval_every=0")
        _, logger, _, _ = loop(run, kind=kind)
        assert [step for step, _ in logger.rows] == [1, 2, 4]
        for step, row in logger.rows:
            assert row["step_time_s"] == 10.0
            assert row["tokens_per_s"] == 4 * 16 * sequences / 10.0
            assert row["mfu"] == pytest.approx(row["tokens_per_s"] * 3.0 / 100.0, rel=1e-12)


def test_evaluations_and_saves_fall_on_their_multiples(monkeypatch):
    """eval_every=2 over 7 steps evaluates after steps 2, 4 and 6 (the final evaluation is _run's, after the
    loop, so not at step 7 here); checkpoint.every=3 saves steps 3 and 6 (the final save is _run's too)."""
    run, evals = fake_run(monkeypatch, "--config.train.steps=7", "--config.train.eval_every=2",
                          "--config.checkpoint.every=3")
    out, _, saves, _ = loop(run)
    assert evals == [2, 4, 6] and saves.steps == [3, 6]
    assert "preempted_at" not in out
    run, evals = fake_run(monkeypatch, "--config.train.steps=6", "--config.train.eval_every=2")
    loop(run)
    assert evals == [2, 4]  # not 6: the last step's evaluation is _run's


def test_preemption_stops_at_the_next_rollout_boundary_and_saves_once(monkeypatch):
    """A notice after step 2 of a stream that is between rollouts only after batches 4 and 8 stops the loop
    at step 4 with one save of step 4, even when checkpoint.every saved step 4 already; the metrics it
    returns are step 4's, which no log_every (the default 5) had read yet."""
    for every, expected in ((0, [4]), (4, [4]), (3, [3, 4])):
        run, _ = fake_run(monkeypatch, "--config.train.steps=12", "--config.train.eval_every=0",
                          f"--config.checkpoint.every={every}")
        out, _, saves, stream = loop(run, stream=Stream(boundaries={4, 8}), notice=Notice(at=2))
        assert out["preempted_at"] == 4 and stream.n == 4 and saves.steps == expected, every
        assert out["loss"] == 4.0
    # A notice that stops the last step leaves its checkpoint to _run, after the final evaluation, as without one.
    run, _ = fake_run(monkeypatch, "--config.train.steps=8", "--config.train.eval_every=0",
                      "--config.checkpoint.every=4")
    out, _, saves, stream = loop(run, stream=Stream(boundaries={4, 8}), notice=Notice(at=7))
    assert out["preempted_at"] == 8 and stream.n == 8 and saves.steps == [4]


def test_divergence_stops_at_exactly_max_nonfinite_steps(monkeypatch):
    """A streak one short of train.max_nonfinite_steps=3 trains on; a streak of 3 stops the run at the step
    that reached it (the streak a step reports is read one step late, or at a logged step)."""
    run, _ = fake_run(monkeypatch, "--config.train.steps=6", "--config.train.max_nonfinite_steps=3",
                      "--config.train.eval_every=0", streaks=(0, 1, 2, 0, 1, 2))
    loop(run)
    run, _ = fake_run(monkeypatch, "--config.train.steps=6", "--config.train.max_nonfinite_steps=3",
                      "--config.train.eval_every=0", streaks=(0, 1, 2, 3, 0, 0))
    with pytest.raises(trainer.TrainingError, match="3 consecutive non-finite steps up to step 4"):
        loop(run)


def test_a_batch_needs_loss_tokens_in_some_mask_not_in_every_mask():
    """A preference batch whose rejected masks are all zero still trains (the chosen ones have tokens);
    one whose chosen and rejected masks are all zero is refused, as a plain batch without loss tokens is."""
    ones, zeros = np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32)
    trainer._check_batch({"chosen_loss_mask": ones, "rejected_loss_mask": zeros, "tokens": zeros}, 5, "dpo")
    for batch in ({"chosen_loss_mask": zeros, "rejected_loss_mask": zeros, "tokens": ones}, {"loss_mask": zeros}):
        with pytest.raises(trainer.TrainingError, match="step 5: the batch has no loss tokens"):
            trainer._check_batch(batch, 5, "dpo")


# -- resume -----------------------------------------------------------------------------------------------
class Restorer:
    """A checkpointer holding step 4, whose data stream stood at position 9."""

    manager = types.SimpleNamespace(all_steps=lambda: [4])

    def restore_latest(self, like, warn):
        return 4, "state at 4", {"position": 9}


def resume(tmp_path, *overrides):
    """Resumes a run started with the smoke config in `tmp_path` with `overrides`; (step, state, stream)."""
    started = config("pretrain", str(tmp_path))
    with open(os.path.join(str(tmp_path), "config.json"), "w") as f:
        json.dump(started.to_dict(), f)
    run, stream = types.SimpleNamespace(config=config("pretrain", str(tmp_path), *overrides), state=None), Stream()
    step = trainer._resume(run, Restorer(), stream)
    return step, run.state, stream


def test_resume_restores_the_data_position_unless_the_data_or_seed_changed(tmp_path, capsys):
    """Noted changes (LR, steps, evaluation) keep the stream where the checkpoint left it; a changed seed or
    data setting, allowed by checkpoint.allow_changes, restarts the stream from its beginning."""
    for overrides in ([], ["--config.optim.lr=0.5", "--config.train.steps=30", "--config.train.eval_every=3"]):
        step, state, stream = resume(tmp_path, *overrides)
        assert (step, state, stream.restored) == (4, "state at 4", {"position": 9})
    for change in ("--config.seed=7", "--config.data.batch_size=16"):
        step, state, stream = resume(tmp_path, change, "--config.checkpoint.allow_changes=true")
        assert (step, state, stream.restored) == (4, "state at 4", None)
        assert "the data stream starts again from its beginning" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ("--config.seed=7", "with seed: 0 -> 7 would change the data stream; set --config.checkpoint.allow_changes"),
    ("--config.data.seq_len=32", "with data.seq_len: 64 -> 32 would change the data stream"),
    ("--config.model.n_layers=3", r"with model.n_layers: None -> 3: that changes the model"),
])
def test_resume_refuses_data_changes_unless_allowed_and_model_changes_always(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        resume(tmp_path, change)
    if change.startswith("--config.model"):
        with pytest.raises(ValueError, match=message):
            resume(tmp_path, change, "--config.checkpoint.allow_changes=true")


def test_resume_none_or_no_checkpoint_starts_at_zero(tmp_path):
    stream = Stream()
    run = types.SimpleNamespace(config=config("pretrain", str(tmp_path), "--config.checkpoint.resume=none"))
    assert trainer._resume(run, Restorer(), stream) == 0 and stream.restored is None
    empty = types.SimpleNamespace(manager=types.SimpleNamespace(all_steps=lambda: []))
    assert trainer._resume(types.SimpleNamespace(config=config("pretrain", str(tmp_path))), empty, stream) == 0


# -- metrics rows on resume -------------------------------------------------------------------------------
def test_metrics_after_the_restored_step_and_torn_lines_are_dropped(tmp_path):
    """Rows of steps 1-6 and a line torn by the kill, resumed from step 4: rows 1-4 stay (step 4's included),
    the rest go, and the file as it was is set aside whole."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)]
    path.write_text("".join(lines[:4]) + '{"step": 3, "lo' + "\n" + "".join(lines[4:]))
    before = path.read_text()
    trainer._truncate_metrics(str(tmp_path), 4)
    assert path.read_text() == "".join(lines[:4])
    [old] = [os.path.join(d, f) for d, _, names in os.walk(tmp_path / rundir.SUPERSEDED_DIR) for f in names]
    assert open(old).read() == before
    trainer._truncate_metrics(str(tmp_path), 4)  # nothing to drop: nothing moves
    assert len(os.listdir(tmp_path / rundir.SUPERSEDED_DIR)) == 1 and path.read_text() == "".join(lines[:4])
    path.unlink()
    trainer._truncate_metrics(str(tmp_path), 4)  # a run killed before it logged: no file, nothing to do
    assert not path.exists()


def test_an_evaluation_is_logged_only_when_it_has_rows(monkeypatch):
    """An evaluation with nothing to report (no eval sources) writes no row of a bare step number."""
    logger = Logger()
    for rows in ({}, {"eval/loss": 1.5}):
        monkeypatch.setattr(trainer, "evaluate", lambda run, kind: rows)
        assert trainer._eval(None, "pretrain", 8, logger) == rows
    assert logger.rows == [(8, {"eval/loss": 1.5})]


# -- around the loop --------------------------------------------------------------------------------------
@pytest.mark.parametrize("start, init_from, stop, evals, saves", [
    (0, "", None, [10], [10]),  # from scratch: no evaluation at step 0; the final evaluation and save
    (0, "/some/run", None, [0, 10], [10]),  # a loaded model is evaluated before it trains
    (4, "/some/run", None, [10], [10]),  # a resumed run is not evaluated at its start again
    (10, "/some/run", None, [], []),  # resumed when finished: nothing left to do, the last step saved already
    (0, "", 6, [], []),  # pre-empted: the loop saved its step; no final evaluation or save
    (0, "", 10, [10], [10]),  # pre-empted in the last step: finished, so evaluated and saved as without a notice
])
def test_run_evaluates_and_saves_around_the_loop(monkeypatch, start, init_from, stop, evals, saves):
    from model.sharding import make_mesh
    cfg = config("pretrain", "/nonexistent", "--config.train.steps=10", "--config.train.eval_every=5")
    cfg.model.init_from = init_from  # never read: setup is not run here
    state = types.SimpleNamespace(params={"w": np.zeros(3)}, step=start)
    run = types.SimpleNamespace(config=cfg, state=state, frozen={"f": np.zeros(1)}, mesh=make_mesh(1, -1, 1),
                                tokenizer=None, model_cfg=types.SimpleNamespace(dtype="float32"))
    done = []

    def fake_loop(run, kind, data_iter, ckpt, logger, start, peak, preemption):
        run.state = types.SimpleNamespace(params=run.state.params, step=stop or 10)
        return {"loss": 1.0, **({"preempted_at": stop} if stop else {})}

    class Ckpt(Saves):
        directory = "/nonexistent/checkpoints"

        def save(self, state, data_state, model_cfg):
            self.steps.append(int(state.step))

        def wait(self):
            done.append("waited")

    monkeypatch.setattr(trainer.pipeline, "train_iterator", lambda *a, **k: Stream())
    monkeypatch.setattr(trainer, "_resume", lambda run, ckpt, data_iter: start)
    monkeypatch.setattr(trainer, "_start_records", lambda config, start: None)
    messages = []
    monkeypatch.setattr(trainer.records, "MetricsLogger", lambda *a: types.SimpleNamespace(
        message=messages.append, close=lambda: done.append("closed")))
    monkeypatch.setattr(trainer, "_loop", fake_loop)
    evaluated = []
    monkeypatch.setattr(trainer, "_eval", lambda run, kind, step, logger: evaluated.append(step) or {})
    ckpt = Ckpt()
    ckpt.steps = [start] if start else []  # the checkpoint a resumed run restored
    out = trainer._run(run, "pretrain", ckpt)
    assert evaluated == evals and ckpt.steps == ([start] if start else []) + saves
    assert done == ["waited", "closed"] and out.get("preempted_at") == stop
    assert messages == [f"resumed from step {start} in {ckpt.directory}"] * bool(start) + [
        "training 3 of 4 parameters (75%)"]


def test_a_fresh_models_vocabulary_is_the_tokenizers_rounded_up_to_128():
    """Rounded up for even sharding, never down, and not past a multiple it already is; a model.vocab_size
    smaller than the tokenizer's is refused."""
    cfg = config("pretrain", "/nonexistent")
    assert [build.model_config(cfg, n).vocab_size for n in (1, 256, 257, 384)] == [128, 256, 384, 384]
    cfg.model.vocab_size = 256
    assert build.model_config(cfg, 200).vocab_size == 256
    with pytest.raises(ValueError, match="the model's vocab_size=256 is smaller than the tokenizer's 300"):
        build.model_config(cfg, 300)


@pytest.mark.parametrize("stage, overrides, passes", [
    ("pretrain", [], "train"),
    ("dpo", [], "train + reference"),
    ("dpo", ["--config.loss.preference_type=simpo"], "train"),  # reference-free: no reference pass
    ("ppo", [], "2 x train"),
])
def test_flops_per_token_count_every_pass_a_step_makes(stage, overrides, passes, tmp_path):
    """MFU's flops per token: the policy's forward and backward pass; plus the frozen reference's forward
    pass for DPO with a reference; twice the policy's for PPO, whose value model (the policy's shape with a
    scalar head, run at the same length) trains beside it."""
    from train import flops
    run = trainer.setup(config(stage, str(tmp_path), *overrides))
    T, cfg = run.config.data.seq_len, run.model_cfg
    train, reference = flops.flops_per_token(cfg, T), flops.forward_flops_per_token(cfg, T)
    expected = {"train": train, "train + reference": train + reference, "2 x train": 2 * train}[passes]
    assert run.flops_per_token == expected
