"""A careless user's inputs to the `kiln` command: each is one clear line on stderr (what, where, how
to fix), never a traceback, and nothing already on disk is lost. Each test calls the command or the
function it reaches before any model or data is built, so all of them are fast."""
import os

import pytest

from launch import main as kiln, sweep
from launch.config import ConfigError
from train import records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_error_line(capsys, argv):
    """Runs `kiln ARGV`, which must fail; returns its single stderr line."""
    assert kiln.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    return line


@pytest.mark.parametrize("text, variant, message", [
    ("def get_config(:\n", "", "bad.py line 1: config file has a syntax error"),
    ("import no_such_module_kiln\n", "", "the config file failed to load (ModuleNotFoundError: No module named"),
    ("def get_config(variant=''):\n    return 3\n", "", "get_config returned int, not an ml_collections ConfigDict"),
    ("from configs import base\ndef get_config():\n    return base.get_config()\n", ":smoke",
     "bad.py:smoke: get_config failed (TypeError: get_config() takes 0 positional arguments"),
])
def test_a_broken_config_file_is_one_line_naming_it(tmp_path, capsys, text, variant, message):
    """A config (or recipe, or sweep) file that does not parse, import or return a ConfigDict was a
    Python traceback."""
    (tmp_path / "bad.py").write_text(text)
    line = one_error_line(capsys, ["train", f"--config={tmp_path / 'bad.py'}{variant}"])
    assert line.startswith("kiln train: error: ") and message in line, line


def write_sweep(tmp_path, **fields):
    path = tmp_path / "sweep_file.py"
    settings = dict(run_dir=str(tmp_path / "out"), base="configs/pretrain.py:smoke", overrides=(),
                    metrics=("eval/loss",), **{"seeds": (0,), **fields})
    path.write_text("from ml_collections import ConfigDict\n"
                    f"def get_config(variant=''):\n    return ConfigDict({settings!r})\n")
    return str(path)


@pytest.mark.parametrize("fields, message", [
    (dict(points=()), "the sweep's points are empty"),
    (dict(grid=()), "the sweep's grid is empty"),
    (dict(grid=(("optim.lr", (0.1, 0.2)), ("seed", ()))), "the sweep's grid is empty"),
    (dict(points=({"optim.lr": 0.1},), seeds=(0, 1, 0)), r"the sweep's seeds repeat \(0, 1, 0\); list each once"),
    (dict(points=({"optim.lr": 0.1}, {"optim.lr": 0.2}), labels=("lr 1", "lr/1")),
     r"labels name each of its 2 points once \(as directory names: lr-1, lr-1\)"),
])
def test_an_empty_or_self_colliding_sweep_is_refused(tmp_path, fields, message):
    """Empty points crashed after the last run with an UnboundLocalError; an empty grid ran the base
    config alone under the sweep's name, and a key without values planned no run and said nothing.
    Repeated seeds, or labels that differ only in characters a directory name cannot hold, shared one
    run directory: the second run was skipped as finished and the first counted twice."""
    with pytest.raises(ConfigError, match=message):
        sweep.plan(sweep.load_sweep(write_sweep(tmp_path, **fields), []))


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    """`records.write_text_atomic` onto a directory left `PATH.tmp-PID` beside it."""
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        records.write_text_atomic(str(tmp_path / "out"), "x\n")
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("output, message", [
    ("{tmp}", "--output {tmp} is a directory; name a file such as {tmp}/samples.jsonl"),
    ("{tmp}/nodir/s.jsonl", "--output {tmp}/nodir/s.jsonl: directory {tmp}/nodir does not exist"),
    ("{tmp}/p.jsonl", "--output {tmp}/p.jsonl is the --prompts file: writing it would replace the prompts; name "
                      "another file"),
])
def test_sample_checks_its_output_before_sampling(tmp_path, capsys, output, message):
    """`kiln sample --output=DIR` sampled everything first, then failed on the rename with an errno
    line and left a temporary file behind; `--output` naming the --prompts file replaced the prompts.
    The checkpoint here does not exist, so the output must be the first thing checked."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    output, message = output.format(tmp=tmp_path), message.format(tmp=tmp_path)
    line = one_error_line(capsys, ["sample", f"--checkpoint={tmp_path / 'missing'}",
                                   f"--prompts={tmp_path / 'p.jsonl'}", f"--output={output}"])
    assert line == f"kiln sample: error: {message}"
    assert os.listdir(tmp_path) == ["p.jsonl"] and (tmp_path / "p.jsonl").read_text() == '{"prompt": "hi"}\n'


@pytest.mark.parametrize("flag", ["--num_samples=0", "--max_new_tokens=0", "--tensor=0"])
def test_sample_counts_are_checked_before_loading(tmp_path, capsys, flag):
    line = one_error_line(capsys, ["sample", f"--checkpoint={tmp_path / 'missing'}", "--prompt=hi", flag])
    assert line == f"kiln sample: error: {flag.split('=')[0]} must be positive, got 0"


def fake_run(path):
    """A directory laid out as a Kiln run (config.json, checkpoints/, metrics.jsonl): the things that
    writing over it would destroy."""
    (path / "checkpoints" / "4").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl"):
        (path / name).write_text("{}\n")
    return sorted(os.listdir(path))


@pytest.mark.parametrize("target, message", [
    ("run", "--to-hf {tmp}/run is, or holds, the input {tmp}/run: writing it would replace the input"),
    ("", "--to-hf {tmp}/ is, or holds, the input {tmp}/run"),
    ("run/config.json", "--to-hf {tmp}/run/config.json is a file, not a directory"),
    ("other", "--to-hf {tmp}/other is a directory holding other files, which writing it would replace"),
])
def test_convert_never_writes_over_its_input_or_other_files(tmp_path, capsys, target, message):
    """`kiln convert --from-kiln RUN --to-hf RUN` replaced the whole run (checkpoints, metrics) by the
    exported weights; a directory holding unrelated files was replaced as silently."""
    run = fake_run(tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    line = one_error_line(capsys, ["convert", "--from-kiln", str(tmp_path / "run"), "--to-hf", f"{tmp_path}/{target}"])
    assert line.startswith("kiln convert: error: " + message.format(tmp=tmp_path)), line
    assert sorted(os.listdir(tmp_path / "run")) == run and os.listdir(tmp_path / "other") == ["notes.txt"]


def test_convert_from_hf_refuses_a_training_run(tmp_path, capsys):
    """`--from-hf HF --to RUN` added a parameters-only step to a training run's checkpoints (or, below
    its latest step, nothing at all while printing "wrote")."""
    run = fake_run(tmp_path / "run")
    (tmp_path / "hf").mkdir()
    line = one_error_line(capsys, ["convert", "--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "run")])
    assert line == f"kiln convert: error: --to {tmp_path / 'run'} is a training run's directory; write the converted " \
                   "checkpoint into a new directory"
    assert sorted(os.listdir(tmp_path / "run")) == run


def test_save_params_refuses_a_step_orbax_would_skip(tmp_path):
    """Orbax's save returns False, and writes nothing, for a step at or below the directory's latest:
    `kiln convert --from-hf` twice into one directory printed "wrote" and kept the old weights. (The
    check comes before the model is read, so none is built here.)"""
    import orbax.checkpoint as ocp

    from train import checkpoint

    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
        mgr.save(3, args=ocp.args.Composite(model_config=ocp.args.JsonSave({})))
    for step in (3, 1):
        with pytest.raises(checkpoint.CheckpointError, match=r"ckpt already holds checkpoint step 3; write into a new"):
            checkpoint.save_params(str(tmp_path / "ckpt"), step, None, None)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["3"]


LLAMA = ('{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64, '
         '"num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 64, '
         '"max_position_embeddings": 32, "rms_norm_eps": 1e-5}')


@pytest.mark.parametrize("config, weights, message", [
    ('{"model_type": "lla', b"", r"hf/config.json: not valid JSON \(Unterminated string"),
    (LLAMA, b"\x08\x00\x00\x00\x00\x00\x00\x00{",
     r"hf/model.safetensors cannot be read \(Error while deserializing"),
    (LLAMA.replace("}", ', "tie_word_embeddings": true}'), None, r"hf/model.safetensors.index.json: not valid JSON"),
    ('["llama"]', b"", r"hf/config.json: holds a JSON list, not an object"),
    (LLAMA, "[]", r"hf/model.safetensors.index.json: holds a JSON list, not an object"),
])
def test_a_damaged_hugging_face_directory_is_one_line_naming_it(tmp_path, config, weights, message):
    """A truncated model.safetensors was a SafetensorError traceback; a damaged config.json or shard index
    a bare JSON message naming no file (kiln convert --from-hf, kiln sample, model.init_from and
    model.hf.load all read them there)."""
    from model import hf
    from train import checkpoint

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(config)
    if weights is None or isinstance(weights, str):
        (tmp_path / "hf" / "model.safetensors.index.json").write_text(weights or '{"weight_map": {')
    else:
        (tmp_path / "hf" / "model.safetensors").write_bytes(weights)
    for load in (hf.load, checkpoint.load_model):
        with pytest.raises(hf.HFFormatError, match=message):
            load(str(tmp_path / "hf"))


def test_a_checkpoint_path_that_is_a_file_or_lacks_config_json_says_so(tmp_path):
    """A file was "no such checkpoint directory", and a Hugging Face directory without its config.json
    "no finished checkpoint step"."""
    from train import checkpoint

    (tmp_path / "env.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="env.json is a file; name a Kiln run, checkpoints or step"):
        checkpoint.latest_step(str(tmp_path / "env.json"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="hf holds .safetensors files but no config.json"):
        checkpoint.latest_step(str(tmp_path / "hf"))


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"checkpoint .*ckpt/2: its model_config cannot be read \(.*\); name an earlier step directory"),
    ("remove", r"ckpt/2: not a Kiln checkpoint \(no model_config item\)"),
])
def test_a_damaged_model_config_item_names_the_step(tmp_path, damage, message):
    """A step whose model_config JSON was cut short reported a bare JSON message naming nothing; one
    without the item, orbax's KeyError text."""
    import shutil

    import orbax.checkpoint as ocp

    from train import checkpoint

    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
        mgr.save(2, args=ocp.args.Composite(model_config=ocp.args.JsonSave({"family": "llama"}),
                                            other=ocp.args.JsonSave({})))
    item = tmp_path / "ckpt" / "2" / "model_config"
    if damage == "truncate":
        (item / "metadata").write_text('{"fam')
    else:
        shutil.rmtree(item)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.read_model_config(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("argv", [["pipeline", "--config=configs/recipes/lifecycle.py:smoke"],
                                  ["sweep", "--config=configs/sweeps/dpo_beta.py:smoke"],
                                  ["generate", "--config=configs/rejection_sampling.py:smoke"]])
def test_a_second_runner_on_one_directory_is_one_line(tmp_path, capsys, monkeypatch, argv):
    """`kiln pipeline`, `sweep` and `generate` on a directory another run holds printed RunDirError's
    traceback (only `kiln train` caught it)."""
    from train import rundir

    monkeypatch.chdir(ROOT)
    with rundir.RunLock(str(tmp_path)):
        line = one_error_line(capsys, [*argv, f"--config.run_dir={tmp_path}"])
    assert line.startswith(f"kiln {argv[0]}: error: run directory {tmp_path} is in use by process {os.getpid()} on ")
    assert line.endswith("; wait for that run to end or choose another --config.run_dir")


def test_a_stage_that_cannot_go_on_is_one_line_in_a_pipeline(capsys, monkeypatch):
    """A TrainingError (non-finite losses, a run that cannot resume) raised inside a pipeline's stage
    was a traceback; `--debug` still shows it."""
    from launch import pipeline
    from train.trainer import TrainingError

    def stop(*args):
        raise TrainingError("3 non-finite losses in a row at step 7")

    monkeypatch.setattr(pipeline, "run", stop)
    monkeypatch.chdir(ROOT)
    argv = ["pipeline", "--config=configs/recipes/lifecycle.py:smoke", "--config.run_dir=/nonexistent/x"]
    assert one_error_line(capsys, argv) == "kiln pipeline: error: 3 non-finite losses in a row at step 7"
    with pytest.raises(TrainingError):
        kiln.main(["--debug", *argv])


@pytest.mark.parametrize("argv", [["eval", "--checkpoint=x", "--config=configs/eval.py:smoke"],
                                  ["train", "--config=configs/pretrain.py:smoke"],
                                  ["pipeline", "--config=configs/recipes/lifecycle.py:smoke"],
                                  ["sweep", "--config=configs/sweeps/dpo_beta.py:smoke"]])
def test_a_run_dir_that_is_a_file_is_named_before_any_work(tmp_path, capsys, monkeypatch, argv):
    """`kiln eval` evaluated everything, then failed to write with "[Errno 17] File exists"; `kiln train`
    said "cannot be created or written (File exists)", pipeline and sweep gave the errno line. The
    checkpoint `x` does not exist: the run_dir must be checked first."""
    monkeypatch.chdir(ROOT)
    (tmp_path / "f").write_text("mine")
    line = one_error_line(capsys, [*argv, f"--config.run_dir={tmp_path / 'f'}"])
    assert line == f"kiln {argv[0]}: error: run directory {tmp_path / 'f'} is a file; choose another --config.run_dir"
    line = one_error_line(capsys, [*argv, f"--config.run_dir={tmp_path / 'f' / 'sub'}"])
    assert line == f"kiln {argv[0]}: error: run directory {tmp_path / 'f' / 'sub'} cannot be created: {tmp_path / 'f'} " \
                   "is a file; choose another --config.run_dir"
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("out, message", [
    ("text.txt", "--out {tmp}/text.txt is one of the --input files: writing it would replace the text; "
                 "name another file"),
    ("", "--out {tmp}/ is a directory; name the file to write, such as {tmp}/tokenizer.model"),
])
def test_tokenizer_never_writes_over_its_input(tmp_path, capsys, out, message):
    """`kiln tokenizer --input=T --out=T` replaced the training text by the model; `--out=DIR` trained,
    then failed on the rename with an errno line and left a temporary file beside DIR."""
    (tmp_path / "text.txt").write_text("to be or not to be\n" * 50)
    line = one_error_line(capsys, ["tokenizer", f"--input={tmp_path / 'text.txt'}", "--vocab_size=300",
                                   f"--out={tmp_path}/{out}"])
    assert line == "kiln tokenizer: error: " + message.format(tmp=tmp_path)
    assert os.listdir(tmp_path) == ["text.txt"] and (tmp_path / "text.txt").read_text().startswith("to be")


def test_sample_names_the_line_of_a_prompts_file_that_is_not_utf8(tmp_path, capsys):
    """Bytes that are not UTF-8 gave the codec's message alone, naming neither the file nor the line."""
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    line = one_error_line(capsys, ["sample", f"--checkpoint={tmp_path}", f"--prompts={tmp_path / 'p.jsonl'}"])
    assert line == f"kiln sample: error: {tmp_path / 'p.jsonl'} line 2: not UTF-8 text (invalid start byte at byte 12)"


def test_a_preempted_run_stops_the_sweep(tmp_path, capsys, monkeypatch):
    """A pre-empted run saves and returns; the sweep went on to the next run on a machine being taken
    away, and tabulated the stopped run's metrics as if it had finished."""
    monkeypatch.chdir(ROOT)
    calls = []
    monkeypatch.setattr(sweep.trainer, "train", lambda config: calls.append(config.run_dir) or {"preempted_at": 2})
    spec = write_sweep(tmp_path, points=({"optim.lr": 0.1}, {"optim.lr": 0.2}))
    assert kiln.main(["sweep", f"--config={spec}"]) == 0
    assert calls == [f"{tmp_path}/out/lr=0.1/seed_0"]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"stopped the sweep in {calls[0]} at step 2 (pre-empted); run the same command to resume")
    assert not os.path.exists(tmp_path / "out" / "results.json")


def test_a_step_a_checkpoint_directory_lacks_is_named_with_the_steps_it_has(tmp_path):
    """`kiln convert --step 7` of a run without step 7 said "not a Kiln checkpoint (no model_config item)"."""
    import orbax.checkpoint as ocp

    from train import checkpoint

    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
        for step in (2, 4):
            mgr.save(step, args=ocp.args.Composite(model_config=ocp.args.JsonSave({})))
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt has no step 7 \(its steps: 2, 4\)"):
        checkpoint.read_model_config(str(tmp_path / "ckpt"), 7)


def test_data_reference_checks_its_out_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """`kiln data reference --out=FILE` loaded the policy first, then failed with "[Errno 17] File exists"."""
    monkeypatch.chdir(ROOT)
    (tmp_path / "f").write_text("mine")
    line = one_error_line(capsys, ["data", "reference", "--config=configs/dpo.py:smoke", f"--out={tmp_path / 'f'}",
                                   f"--config.model.init_from={tmp_path / 'missing'}"])
    assert line == f"kiln data: error: --out {tmp_path / 'f'} is a file; name the directory to write the reference " \
                   "log-probs into"


def test_an_unknown_recipe_key_points_to_the_recipe(tmp_path, capsys, monkeypatch):
    """A recipe's or sweep's keys are its own: the error sent the user to configs/base.py."""
    monkeypatch.chdir(ROOT)
    spec = write_sweep(tmp_path, points=({"optim.lr": 0.1},))
    for argv, listed in ((["pipeline", "--config=configs/recipes/lifecycle.py:smoke"], "configs/recipes/lifecycle.py"),
                         (["sweep", f"--config={spec}"], spec)):
        line = one_error_line(capsys, [*argv, "--config.run_dri=x"])
        assert line.endswith(f"unknown config key 'run_dri' (from '--config.run_dri=x'); every key is listed in "
                             f"{listed}'s get_config"), line
