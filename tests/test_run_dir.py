"""The run directory under careless use: a second process, an unwritable disk, a restart after a kill,
a resume with changed settings, a bad stage or shape, a NaN on a logged step. Each fault stops with one
clear error (or is handled) and loses nothing that was written before."""
import json
import re
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from data import pipeline
from launch.config import ConfigError, load_config
from test_train import poisoned
from model import presets
from train import build, checkpoint, preflight, records, rundir, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--config.train.steps=4", "--config.checkpoint.every=2", "--config.train.eval_every=0",
         "--config.train.log_every=1", "--config.optim.warmup_steps=0"]


def config(run_dir, *overrides, stage="pretrain", progress=False):
    return load_config(os.path.join(ROOT, f"configs/{stage}.py:smoke"),
                       [f"--config.run_dir={run_dir}", f"--config.train.progress={str(progress).lower()}",
                        *SHORT, *overrides])


def steps_logged(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def superseded(run_dir, name):
    """The copies of `name` set aside in run_dir/superseded/*/."""
    root = os.path.join(run_dir, rundir.SUPERSEDED_DIR)
    return sorted(os.path.join(root, d, name) for d in os.listdir(root) if os.path.exists(os.path.join(root, d, name)))


def kill_at(monkeypatch, step):
    """Interrupts the run when it fetches the batch of `step`, as a kill would."""
    real = trainer._check_batch

    def check(batch, s, stage):
        if s == step:
            raise KeyboardInterrupt(f"killed before step {step}")
        real(batch, s, stage)
    monkeypatch.setattr(trainer, "_check_batch", check)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    run_dir = str(tmp_path_factory.mktemp("finished") / "run")
    trainer.train(config(run_dir))
    return run_dir


# -- checked before anything is written --------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["--config.stage=bogus"], "unknown stage 'bogus' .*runnable stages: pretrain"),
    (["--config.stage=ppo"], "loss.type 'next_token' does not train on the 'prompts' batches of stage 'ppo'"),
    (["--config.data.seq_len=4096"], "data.seq_len=4096 is longer than the model's max_seq_len=256"),
    (["--config.data.seq_len=65536", "--config.model.max_seq_len=65536"],  # 512 GiB of attention scores
     r"data.batch_size=8 x data.seq_len=65536 needs at least 5\d\d.\d GiB .* but this host has"),
    (["--config.data.batch_size=12"], r"12 rows per micro-batch do not split over mesh data\*fsdp=8 devices"),
    (["--config.data.batch_size=16", "--config.optim.grad_accum=4"], "4 rows per micro-batch do not split"),
])
def test_bad_stage_or_shape_stops_before_writing(tmp_path, overrides, message):
    run_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        trainer.train(config(run_dir, *overrides))
    # At most the lock and the (empty) checkpoint directory probed for writing.
    files = [os.path.relpath(os.path.join(d, f), run_dir) for d, _, names in os.walk(run_dir) for f in names]
    assert files in ([], [".lock"])


def test_memory_floor_by_hand():
    """Parameters with gradients and two moments (4 copies), one micro-batch's float32 logits, one layer's
    float32 attention scores. The tiny preset has 106,816 parameters (embedding and head 2 x 256 x 64,
    final norm 64, and per layer 2 x 64 norms + 4,096 q + 2 x 2,048 k, v + 4,096 o + 3 x 8,192 MLP)."""
    cfg = config("/nonexistent", "--config.data.batch_size=16", "--config.optim.grad_accum=4", "--config.data.seq_len=32")
    for dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
        floor = preflight.memory_floor(cfg, presets.get("tiny", param_dtype=dtype))
        assert floor == {"parameters and optimizer": 4 * 106_816 * itemsize,
                         "logits": 4 * (16 // 4) * 32 * 256,  # bytes x rows x positions x vocabulary
                         "attention scores of one layer": 4 * (16 // 4) * 4 * 32 * 32}  # x heads x T x T



def test_shape_checks_at_their_boundaries(monkeypatch):
    """A sequence exactly the model's max_seq_len fits; memory exactly the floor fits, a page less does not;
    the batch must split over the processes as well as the devices (8 rows over 3 processes do not)."""
    from model.sharding import make_mesh
    cfg, model = config("/nonexistent", "--config.data.seq_len=256"), presets.get("tiny")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    assert model.max_seq_len == 256
    preflight.check_shapes(cfg, model, mesh)
    need = sum(preflight.memory_floor(cfg, model).values())
    assert need == 4 * 106_816 * 4 + 4 * 8 * 256 * 256 + 4 * 8 * 4 * 256 * 256  # as in test_memory_floor_by_hand
    for have in (need - 1, need):  # the host's memory, as pages of one byte
        monkeypatch.setattr(preflight.os, "sysconf", lambda name: 1 if name == "SC_PAGE_SIZE" else int(have))
        if have < need:
            with pytest.raises(ValueError, match="needs at least .* but this host has"):
                preflight.check_shapes(cfg, model, mesh)
    preflight.check_shapes(cfg, model, mesh)
    monkeypatch.setattr(preflight.jax, "process_count", lambda: 3)
    with pytest.raises(ValueError, match="data.batch_size=8 does not split over 3 processes"):
        preflight.check_shapes(cfg, model, mesh)

@pytest.mark.parametrize("override, message", [
    ("--config.peft.prefix_hidden=16", "'peft.prefix_hidden' is set but peft.method is 'none'; it is read by "
                                       "peft.method=prefix_tuning"),
    ("--config.peft.lora_rank=4", "'peft.lora_rank' is set but peft.method is 'none'"),
    ("--config.loss.label_smoothing=0.1", "'loss.label_smoothing' is set but loss.type is 'next_token'; it is "
                                          "read by loss.type=dpo"),
    ("--config.loss.margin=1.0", "'loss.margin' is set but loss.type is 'next_token'; it is read by loss.type=reward"),
    ("--config.rollout.top_k=5", "'rollout.top_k' is set but stage is 'pretrain'; it is read by "
                                 "stage=rejection_sampling or grpo or ppo"),
    ("--config.model.rope_scaling.factor=4.0", "'model.rope_scaling.factor' is set but model.rope_scaling.type is 'none'"),
])
def test_unconnected_keys_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        config(str(tmp_path), override)


# -- the lock ---------------------------------------------------------------------------------------------
def test_a_run_directory_in_use_is_refused_and_a_stale_lock_is_not(tmp_path):
    run_dir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from train.rundir import RunLock; "
                               f"RunLock({run_dir!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirError, match=f"run directory {run_dir} is in use by process {holder.pid} "):
            trainer.train(config(run_dir))
        assert sorted(os.listdir(run_dir)) == [".lock"]  # nothing written by the refused run
    finally:
        holder.kill()
        holder.wait()
    # The killed holder's lock file is still there, naming it; the kernel dropped its lock.
    assert json.load(open(os.path.join(run_dir, ".lock")))["pid"] == holder.pid
    with rundir.RunLock(run_dir):
        assert json.load(open(os.path.join(run_dir, ".lock")))["pid"] == os.getpid()
    with pytest.raises(rundir.RunDirError, match="'gs://b/run' is a URL; .* mount the bucket"):
        rundir.RunLock("gs://b/run")  # not a local folder named "gs:"



def test_a_longer_stale_lock_record_is_overwritten_whole(tmp_path):
    """The lock file of a dead holder whose record was longer than this process's (a longer pid or host) is
    cut before the new record is written, so the file names this process, and only it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"pid": 1, "host": "h" * 300, "started": "2026-01-01 00:00:00"}))
    with rundir.RunLock(str(run_dir)):
        assert json.load(open(run_dir / ".lock"))["pid"] == os.getpid()


def test_a_lock_is_released_when_its_block_raises(tmp_path):
    """An exception inside `with RunLock` drops the lock: the next run on the directory is not refused; and
    releasing twice is harmless."""
    with pytest.raises(KeyError):
        with rundir.RunLock(str(tmp_path)):
            raise KeyError("the run failed")
    lock = rundir.RunLock(str(tmp_path))
    lock.acquire()  # flock is per open file: a lock still held would refuse this
    lock.release()
    lock.release()  # a second release is harmless (it must not close a descriptor it no longer owns)

# -- the disk ---------------------------------------------------------------------------------------------
def test_unwritable_checkpoints_fail_at_the_start(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints is not writable"):
        trainer.train(config(str(run_dir)))
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.json").exists()


def test_a_save_that_fails_later_stops_the_run_at_once(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    ckpts = os.path.join(run_dir, "checkpoints")
    real = trainer._check_batch

    def lose_the_disk(batch, step, stage):
        if step == 3:  # after the (asynchronous) step-2 save has finished, the directory goes away
            deadline = time.time() + 120
            while not os.path.isdir(os.path.join(ckpts, "2")) and time.time() < deadline:
                time.sleep(0.1)
            os.rename(ckpts, ckpts + ".gone")
            with open(ckpts, "w") as f:
                f.write("not a directory")
        real(batch, step, stage)
    monkeypatch.setattr(trainer, "_check_batch", lose_the_disk)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints is not writable"):
        trainer.train(config(run_dir))
    assert steps_logged(run_dir) == [1, 2, 3, 4]
    assert sorted(os.listdir(ckpts + ".gone")) == ["2"]  # the good checkpoint survives


# -- restarts and resumes ---------------------------------------------------------------------------------
def test_restart_from_step_zero_starts_clean_records(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    kill_at(monkeypatch, 2)  # before the first checkpoint (step 2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config(run_dir))
    assert steps_logged(run_dir) == [1] and not os.path.exists(os.path.join(run_dir, "checkpoints", "2"))
    monkeypatch.undo()
    trainer.train(config(run_dir))
    assert steps_logged(run_dir) == [1, 2, 3, 4]  # step 1 once, not twice
    [old] = superseded(run_dir, "metrics.jsonl")
    assert [json.loads(line)["step"] for line in open(old)] == [1]


def test_resume_notes_free_changes_and_records_them(finished, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished, run_dir)
    before = open(os.path.join(run_dir, "config.json")).read()
    trainer.train(config(run_dir, "--config.train.steps=6", "--config.optim.lr=0.002"))
    err = capsys.readouterr().err
    assert "resuming" in err and "optim.lr: 0.001 -> 0.002" in err and "train.steps: 4 -> 6" in err
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]
    assert json.load(open(os.path.join(run_dir, "config.json")))["optim"]["lr"] == 0.002
    [old] = superseded(run_dir, "config.json")
    assert open(old).read() == before



def test_resume_none_sets_the_earlier_checkpoints_aside(finished, tmp_path, monkeypatch):
    """checkpoint.resume=none starts over: the finished run's steps 2 and 4 move to superseded/ before the
    checkpointer opens the directory, so none of them is resumed from or mixed with the new run's."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished, run_dir)
    monkeypatch.setattr(trainer, "_run", lambda run, kind, ckpt: {"latest": ckpt.latest_step()})  # no training
    assert trainer.train(config(run_dir)) == {"latest": 4}
    assert trainer.train(config(run_dir, "--config.checkpoint.resume=none")) == {"latest": None}
    [moved] = superseded(run_dir, "checkpoints")
    assert sorted(os.listdir(moved)) == ["2", "4"]

def test_resume_refuses_data_changes_unless_allowed(finished, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished, run_dir)
    config_json = os.path.join(run_dir, "config.json")
    before = open(config_json).read()
    for change in ("--config.data.batch_size=16", "--config.data.seq_len=32", "--config.seed=1"):
        with pytest.raises(ValueError, match=f"with {change[9:].replace('=', ': .* -> ')} .*checkpoint.allow_changes"):
            trainer.train(config(run_dir, "--config.train.steps=6", change))
        assert open(config_json).read() == before  # a run that does not start changes nothing
    with pytest.raises(ValueError, match=r"with model.n_layers: None -> 3: that changes the model"):
        trainer.train(config(run_dir, "--config.train.steps=6", "--config.model.n_layers=3",
                             "--config.checkpoint.allow_changes=true"))
    capsys.readouterr()
    trainer.train(config(run_dir, "--config.train.steps=6", "--config.data.batch_size=16",
                         "--config.checkpoint.allow_changes=true"))
    assert "the data stream starts again from its beginning" in capsys.readouterr().err
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]
    assert json.load(open(config_json))["data"]["batch_size"] == 16


def test_set_aside_within_one_second_gets_distinct_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt: "20260101-000000")  # every call in the same second
    assert rundir.set_aside(str(tmp_path), ["metrics.jsonl"]) is None  # nothing to move
    for text in ("first", "second", "third"):
        (tmp_path / "metrics.jsonl").write_text(text)
        (tmp_path / "env.json").write_text(text)
        rundir.set_aside(str(tmp_path), ["metrics.jsonl", "env.json", "missing"])
        assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "env.json").exists()
    root = tmp_path / rundir.SUPERSEDED_DIR
    assert sorted(os.listdir(root)) == ["20260101-000000", "20260101-000000-1", "20260101-000000-2"]
    assert [(root / d / "metrics.jsonl").read_text() for d in sorted(os.listdir(root))] == ["first", "second", "third"]
    assert sorted(os.listdir(root / "20260101-000000-2")) == ["env.json", "metrics.jsonl"]


def test_config_changes_are_sorted_into_free_guarded_and_fixed():
    old = {"run_dir": "a", "seed": 0, "stage": "sft", "model": {"dtype": "float32", "remat": "none", "n_layers": 2,
                                                               "init_from": "x", "rope_theta": 1e4, "d_ff": None},
           "optim": {"lr": 1e-3}, "data": {"seq_len": 64, "eval_sources": {"t": {"path": "p"}}, "num_workers": 0},
           "peft": {"method": "none"}, "loss": {"type": "next_token", "z_loss": 0.0}, "mesh": {"rules": [["a", "b"]]}}
    new = {"run_dir": "b", "seed": 1, "stage": "sft", "model": {"dtype": "bfloat16", "remat": "full", "n_layers": 3,
                                                               "init_from": "y", "rope_theta": 1e5, "d_ff": None},
           "optim": {"lr": 2e-3}, "data": {"seq_len": 32, "eval_sources": {"t": {"path": "q"}}, "num_workers": 2},
           "peft": {"method": "lora"}, "loss": {"type": "next_token", "z_loss": 1e-4}, "mesh": {"rules": (("a", "c"),)},
           "train": {"steps": 5}}
    free, guarded, fixed = rundir.config_changes(old, new)
    key = lambda lines: [line.split(":")[0] for line in lines]  # noqa: E731
    assert key(free) == ["data.eval_sources.t.path", "data.num_workers", "loss.z_loss", "mesh.rules", "model.dtype",
                         "model.init_from", "model.remat", "optim.lr", "run_dir", "train.steps"]
    assert key(guarded) == ["data.seq_len", "seed"]
    assert key(fixed) == ["model.n_layers", "model.rope_theta", "peft.method"]
    assert "train.steps: '(unset)' -> 5" in free and "seed: 0 -> 1" in guarded
    assert rundir.config_changes(old, dict(old)) == ([], [], [])



def test_checkpoint_layout_and_eval_settings_are_free_and_the_stage_and_loss_fixed():
    """Retention, scan_layers and `eval.*` only change how the run is saved, laid out or evaluated; the stage
    and the loss type make it another run. An empty dict that gains a key reports that key."""
    old = {"stage": "sft", "loss": {"type": "next_token"}, "checkpoint": {"keep": 3}, "model": {"scan_layers": True},
           "eval": {"tasks": ["a"]}, "data": {"sources": {}}}
    new = {"stage": "dpo", "loss": {"type": "dpo"}, "checkpoint": {"keep": 5}, "model": {"scan_layers": False},
           "eval": {"tasks": ["a", "b"]}, "data": {"sources": {"s": 1}}}
    free, guarded, fixed = rundir.config_changes(old, new)
    key = lambda lines: [line.split(":")[0] for line in lines]  # noqa: E731
    assert key(free) == ["checkpoint.keep", "eval.tasks", "model.scan_layers"]
    assert guarded == ["data.sources: {} -> '(unset)'", "data.sources.s: '(unset)' -> 1"]
    assert key(fixed) == ["loss.type", "stage"]

def test_init_from_expands_paths_and_takes_a_step_directory(finished, monkeypatch):
    parent, name = os.path.split(finished)
    monkeypatch.setenv("KILN_TEST_RUNS", parent)
    monkeypatch.setenv("HOME", parent)
    at_2 = checkpoint.load_params(os.path.join(finished, "checkpoints", "2"))[1]
    at_4 = checkpoint.load_params(finished)[1]
    for source, expected in ((f"$KILN_TEST_RUNS/{name}/checkpoints/2", at_2), (f"~/{name}", at_4)):
        run = trainer.setup(config("/nonexistent", f"--config.model.init_from={source}"))
        got = np.asarray(run.state.params["embed"]["table"][...])
        np.testing.assert_array_equal(got, np.asarray(expected.embed.table[...]), err_msg=source)
    assert not np.array_equal(np.asarray(at_2.embed.table[...]), np.asarray(at_4.embed.table[...]))
    with pytest.raises(ValueError, match=r"model.init_from='\$KILN_TEST_RUNS/missing': .*/missing does not exist"):
        trainer.setup(config("/nonexistent", "--config.model.init_from=$KILN_TEST_RUNS/missing"))


# -- logging ----------------------------------------------------------------------------------------------
def test_nan_loss_on_a_logged_step_with_the_progress_bar(tmp_path, monkeypatch):
    """The non-finite guard's one line, not a formatting error from the progress bar."""
    monkeypatch.setattr(pipeline, "train_iterator", poisoned(after=2, mask_value=np.nan))
    with pytest.raises(trainer.TrainingError, match="2 consecutive non-finite steps up to step 4"):
        trainer.train(config(str(tmp_path), "--config.train.max_nonfinite_steps=2", progress=True))


def test_logger_survives_any_metric_value(tmp_path, capsys):
    logger = records.MetricsLogger(str(tmp_path), total_steps=4, progress=True)
    logger.log(1, {"loss": float("nan"), "tokens_per_s": None, "mfu": float("inf"), "grad_norm": np.float32(2.5)})
    logger.log(2, {"grad_norm": 1.0})  # no loss at all
    logger.log(3, {"eval/loss": None, "eval/bits_per_byte": float("nan"), "eval/note": "text"})
    logger.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0] == {"step": 1, "loss": None, "tokens_per_s": None, "mfu": None, "grad_norm": 2.5}
    assert rows[2]["eval/loss"] is None and rows[2]["eval/note"] == "text"
    assert "step 3: eval/loss=nan, eval/bits_per_byte=nan" in capsys.readouterr().out



def test_logger_appends_and_sends_only_numbers_to_tensorboard(tmp_path):
    """A resumed run's logger continues metrics.jsonl; booleans stay booleans, numpy numbers become floats;
    TensorBoard gets every finite number but the step, and no text, booleans or missing values."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    logger = records.MetricsLogger(str(tmp_path), total_steps=4, start_step=1, progress=False)
    scalars = []
    logger.tb.close()
    logger.tb = type("Scalars", (), {"add_scalar": lambda self, *a: scalars.append(a), "close": lambda self: None})()
    logger.log(2, {"loss": np.float32(1.5), "clipped": np.bool_(True), "note": "x", "mfu": float("nan"),
                   "n": np.int32(3)})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines == ['{"step": 1, "loss": 2.0}',
                     '{"step": 2, "loss": 1.5, "clipped": true, "note": "x", "mfu": null, "n": 3.0}']
    assert scalars == [("loss", 1.5, 2), ("n", 3.0, 2)]


@pytest.mark.parametrize("head, status, expected", [
    ((0, "abc123\n"), "", "abc123"),
    ((0, "abc123\n"), " M train/trainer.py\n", "abc123+dirty"),
    ((128, ""), "", "unknown"),  # not a git checkout
])
def test_git_revision_says_whether_the_tree_was_edited(monkeypatch, head, status, expected):
    def run(args, **kwargs):
        code, out = head if args[1] == "rev-parse" else (0, status)
        return subprocess.CompletedProcess(args, code, out, "")
    monkeypatch.setattr(records.subprocess, "run", run)
    assert records.git_revision() == expected

@pytest.mark.parametrize("fault, message", [
    ("--config.stage=bogus", "kiln train: error: unknown stage 'bogus'"),
    ("checkpoints is a file", "kiln train: error: checkpoint directory .*/checkpoints is not writable"),
])
def test_cli_reports_faults_in_one_line(tmp_path, fault, message):
    if fault == "checkpoints is a file":
        (tmp_path / "checkpoints").write_text("x")
    p = subprocess.run([sys.executable, "-m", "launch.main", "train", "--config=configs/pretrain.py:smoke",
                        f"--config.run_dir={tmp_path}", *([fault] if fault.startswith("--") else [])],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    [line] = p.stderr.strip().splitlines()
    assert re.match(message, line), line


def test_auto_tokenizer_is_the_one_init_from_was_trained_with(tmp_path):
    """Fine-tuning a model pre-trained with its own BPE must not silently switch to bytes (the model's
    vocabulary is larger than the byte tokenizer's, so nothing else would notice)."""
    def run(name, tokenizer):
        os.makedirs(tmp_path / name / "checkpoints" / "20" / "params")
        (tmp_path / name / "config.json").write_text(json.dumps({"data": {"tokenizer": tokenizer}}))
        return str(tmp_path / name)

    bpe, named = run("bpe", "train"), run("named", "$KILN_DATA_DIR/some.model")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    bare = tmp_path / "bare" / "checkpoints"
    bare.mkdir(parents=True)

    def resolved(init_from, *extra):
        return build.tokenizer_name(config(str(tmp_path / "new"), f"--config.model.init_from={init_from}", *extra,
                                             stage="sft"))

    assert config(str(tmp_path / "new"), stage="sft").data.tokenizer == "auto"
    assert build.tokenizer_name(config(str(tmp_path / "new"), stage="sft")) == "byte"  # from scratch
    assert resolved(bpe) == os.path.join(bpe, "tokenizer.model")
    assert resolved(os.path.join(bpe, "checkpoints", "20")) == os.path.join(bpe, "tokenizer.model")
    assert resolved(named) == "$KILN_DATA_DIR/some.model"
    assert resolved(str(hf_dir)) == str(hf_dir)
    assert resolved(bpe, "--config.data.tokenizer=byte") == "byte"  # an explicit choice stands
    with pytest.raises(ValueError, match="does not say which tokenizer its model was trained with"):
        resolved(str(bare.parent))


@pytest.mark.parametrize("stage, overrides, message", [
    ("dpo", ["--config.loss.preference_type=ipo", "--config.loss.label_smoothing=0.1"],
     "label_smoothing applies to preference_type sigmoid, robust or simpo, not 'ipo'"),
    ("dpo", ["--config.loss.simpo_gamma=1.0"], "simpo_gamma is read by preference_type simpo, not 'sigmoid'"),
    ("dpo", ["--config.loss.preference_type=orpo"], "ORPO's loss is the chosen reply's NLL plus"),
])
def test_preference_settings_a_loss_ignores_are_refused(tmp_path, stage, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(str(tmp_path), *overrides, stage=stage)


def test_a_stage_built_for_one_loss_refuses_another(tmp_path):
    with pytest.raises(ValueError, match="stage 'reward' trains with loss.type='reward', not 'dpo'"):
        trainer.train(config(str(tmp_path / "run"), "--config.loss.type=dpo", stage="reward"))


@pytest.mark.parametrize("text", ['{"stage": "pre', "[]"])
def test_a_damaged_config_json_stops_a_resume_instead_of_skipping_its_checks(tmp_path, text):
    """An unreadable config.json was read as no config at all: the resume went on without comparing
    settings, so a changed model shape reached orbax (a page of 'set strict=False' advice)."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(rundir.RunDirError, match=f"{tmp_path}/config.json .*so a resume cannot be checked|"
                                                 f"{tmp_path}/config.json holds no config object"):
        rundir.read_config(str(tmp_path))
    os.remove(tmp_path / "config.json")
    assert rundir.read_config(str(tmp_path)) is None
