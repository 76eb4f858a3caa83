"""A careless user's inputs to the entry points the other misuse tests reach least: config arguments on
the command line, `kiln tokenizer`, `kiln data reference`, the cluster launchers and `kiln bench`. Each is
one clear line (what, where, how to fix) before any work is done or any file is written, never a
traceback, a silent wrong result or an output a later run trusts by mistake. All of them are fast."""
import json
import os
import re
import shlex
import sys

import pytest

from data import spm
from data.sources import DataError
from data.tokenizer_base import TokenizerError
from launch import local, main as kiln, multinode, slurm, tokenizer_cli, tpu_pod
from launch.config import ConfigError, load_config
from launch.train import split_args
from test_launchers import DRY, KILN, error, printed
from test_checks_edges import rejection_config
from test_config_overrides import load
from test_data_sources import write_jsonl
from test_misuse import ROOT, one_error_line
from test_misuse_post import saved_run
from test_tokenizer import CORPUS


def test_a_config_key_given_twice_takes_the_last_value(monkeypatch):
    """Overrides apply left to right, as absl and ml_collections flags do: a command repeated with one more
    `--config.KEY=VALUE` appended (a resume with more steps, a sweep script's extra settings) runs with it."""
    monkeypatch.chdir(ROOT)
    config = load_config("configs/pretrain.py:smoke", ["--config.seed=1", "--config.seed=2"])
    assert config.seed == 2
    assert split_args(["--config=c.py", "--config.seed=1", "--config.seed=2"], "kiln x")[1] == [
        "--config.seed=1", "--config.seed=2"]


def test_a_config_file_given_twice_is_refused():
    """`--config=A ... --config=B` ran B alone, A's settings dropped in silence."""
    with pytest.raises(ConfigError, match=r"^--config is given twice \(a.py and b.py:v\); give one config$"):
        split_args(["--config=a.py", "--config.seed=1", "--config", "b.py:v"], "kiln train")
    assert split_args(["--config=a.py", "--config", "a.py"], "kiln train")[0] == "a.py"


@pytest.mark.parametrize("spec, message", [
    ("configs/pretrain.py:",
     "configs/pretrain.py:: no variant after ':'; name one, or drop the ':' for the base config"),
    ("configs/pretrain:smoke", "config file 'configs/pretrain' not found; did you mean 'configs/pretrain.py:smoke'?"),
])
def test_a_config_spec_missing_its_variant_or_suffix_says_so(monkeypatch, spec, message):
    """`--config=configs/pretrain.py:$VARIANT` with the variable unset ran the full-size base config in silence."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        load_config(spec)
    assert str(e.value) == message


@pytest.mark.parametrize("out, message", [
    ("text.txt/tok.model", "--out {tmp}/text.txt/tok.model: {tmp}/text.txt is a file, not a directory; name a file "
                           "in a directory"),
    ("text.txt/new/tok.model", "--out {tmp}/text.txt/new/tok.model: {tmp}/text.txt is a file, not a directory; "
                               "name a file in a directory"),
    ("", "--out is empty; name the file to write, such as tokenizer.model"),
])
def test_tokenizer_checks_where_it_writes_before_training(tmp_path, capsys, monkeypatch, out, message):
    """`--out` under a file trained first, then failed on the errno line "File exists: TEXT"; `--out=` (an unset
    shell variable) trained, then failed renaming '.tmpPID' to '' and left that file in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("\n".join(CORPUS))
    line = one_error_line(capsys, ["tokenizer", f"--input={tmp_path / 'text.txt'}", "--vocab_size=400",
                                   f"--out={tmp_path}/{out}" if out else "--out="])
    assert line == "kiln tokenizer: error: " + message.format(tmp=tmp_path)
    assert os.listdir(tmp_path) == ["text.txt"]


def test_a_tokenizer_write_that_fails_leaves_no_temporary_file(tmp_path):
    """spm.train wrote PATH.tmpPID, then renamed it: a failed rename (PATH a directory, as a run directory's
    tokenizer.model made by hand might be) left the temporary file beside it."""
    (tmp_path / "tok.model").mkdir()
    with pytest.raises(OSError):
        spm.train(CORPUS, str(tmp_path / "tok.model"), vocab_size=400)
    assert os.listdir(tmp_path) == ["tok.model"]


@pytest.mark.parametrize("vocab_size, message", [
    (300, "tokenizer vocab_size 300 is below the 326 pieces the training text needs (the fixed pieces and one per "
          "character it uses): set at least 326"),
    (5000, "tokenizer vocab_size 5000 is more pieces than the training text holds: set at most 810, or train on "
           "more text"),
])
def test_a_vocabulary_the_text_cannot_fill_names_the_sizes_it_can(tmp_path, vocab_size, message):
    """sentencepiece's own line ("... Increase vocab_size or decrease character_coverage with --character_coverage
    option.") named an option kiln tokenizer does not have. The sizes it names are the bounds: both train."""
    out = str(tmp_path / "tok.model")
    with pytest.raises(TokenizerError) as e:
        spm.train(CORPUS, out, vocab_size=vocab_size)
    assert str(e.value) == message and not os.path.exists(out)
    for bound in (326, 810):
        spm.train(CORPUS, out, vocab_size=bound)


@pytest.mark.parametrize("partition", ["gpu\necho hi", "gpu a", "gpu,"])
def test_slurm_refuses_a_partition_that_would_break_its_script(capsys, partition):
    """A line break in --partition ended the #SBATCH lines there: sbatch read no --output, --requeue nor
    --signal after it (no requeue on pre-emption), and the rest of the value ran as a command in the job."""
    assert error(slurm.main, ["--nodes=1", "--gpus_per_node=8", f"--partition={partition}", *DRY], capsys).endswith(
        f"--partition={partition!r}: a partition name (letters, digits, '_', '.', '-'), or several separated by commas")
    assert printed(slurm.main, ["--nodes=1", "--gpus_per_node=8", "--partition=gpu_a.1,debug-2", *DRY], capsys)[5] == (
        "#SBATCH --partition=gpu_a.1,debug-2")


@pytest.mark.parametrize("out, reason", [("", "Is a directory"), ("nodir/job.sbatch", "No such file or directory")])
def test_slurm_names_a_script_path_it_cannot_write(tmp_path, capsys, out, reason):
    """--out a directory, or in a directory that does not exist, ended in an IsADirectoryError traceback."""
    assert error(slurm.main, ["--nodes=1", "--gpus_per_node=8", f"--out={tmp_path}/{out}", "--", *KILN],
                 capsys).endswith(f"--out={tmp_path}/{out}: cannot write the script ({reason}); name a file in an "
                                  "existing directory")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("main, args", [(local.main, ["--num_processes=2"]),
                                        (multinode.main, ["--nodes=1", "--node_rank=0", "--coordinator=h:1",
                                                          "--processes_per_node=2"])])
def test_a_log_dir_that_is_a_file_stops_a_launch_before_any_process(tmp_path, capsys, main, args):
    """--log_dir naming a file ended in a FileExistsError traceback."""
    (tmp_path / "logs").write_text("")
    mark = tmp_path / "started"
    assert main([*args, f"--log_dir={tmp_path / 'logs'}", "--", sys.executable, "-c", f"open({str(mark)!r}, 'w')"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"error: --log_dir={tmp_path / 'logs'}: cannot make the directory (File exists); name a "
                         "directory") and not mark.exists()


@pytest.mark.parametrize("main, args, flag", [
    (local.main, ["--num_processes=2", "--port=70000"], "--port=70000"),
    (local.main, ["--num_processes=2", "--port=-1"], "--port=-1"),
    (multinode.main, ["--nodes=1", "--node_rank=0", "--coordinator=h:65536"], "--coordinator=h:65536"),
    (multinode.main, ["--nodes=1", "--node_rank=0", "--coordinator=h:0"], "--coordinator=h:0"),
])
def test_a_port_that_is_no_tcp_port_is_refused(capsys, main, args, flag):
    """A port outside 1..65535 started every process, each failing to reach the coordinator."""
    port = flag.rpartition(":")[2] if ":" in flag else flag.partition("=")[2]
    assert error(main, [*args, *DRY], capsys).endswith(f"{flag}: the port {port!r} is not a TCP port (1 to 65535)")
    assert printed(multinode.main, ["--nodes=1", "--node_rank=0", "--coordinator=h:65535", *DRY], capsys)


@pytest.mark.parametrize("run_root", ["mnt/bucket", "~/runs"])
def test_tpu_pod_refuses_a_run_root_that_is_not_shared(capsys, run_root):
    """A relative --run_root made the run directory relative to each worker's code directory (a home path, to
    its home): one directory per worker, not the shared one a pod's checkpoints need."""
    assert error(tpu_pod.main, ["--tpu=t", "--zone=z", f"--run_root={run_root}", *DRY], capsys).endswith(
        f"--run_root={run_root!r} is not an absolute path: each worker would write a run directory of its own "
        "under its --repo_dir or home; give the shared mount's path, such as /mnt/bucket")


def test_tpu_pod_takes_the_home_directory_as_repo_dir():
    """--repo_dir='~' was quoted for the worker's shell: the code went to a directory named '~' in the home."""
    run = tpu_pod.commands(KILN, "t", "z", repo_dir="~")[-1][-1]
    assert run == f"--command=cd ~ && . .venv/bin/activate && {shlex.join(KILN)}"


def test_precomputed_log_probs_of_a_stopped_kiln_data_reference_are_refused(tmp_path, monkeypatch):
    """reference.json was written first: a re-run into the same --out (another model) stopped while scoring
    left the new model recorded beside the earlier run's files, which a DPO run from the new model took as its
    reference in silence. Recorded unfinished until every file is written. (Stand-ins for the model and the
    scoring.)"""
    from launch import reference_cli
    from train import reference

    sft = saved_run(tmp_path / "sft", 3)
    for name, value in (("build_model", lambda *args: (None,)), ("model_config", lambda *args: None),
                        ("tokenizer_name", lambda config: "byte")):
        monkeypatch.setattr(reference_cli, name, value)
    monkeypatch.setattr(reference_cli, "_score_source", lambda *args: ([], 0))
    monkeypatch.chdir(ROOT)
    argv = ["--config=configs/dpo.py:smoke", f"--out={tmp_path / 'ref'}", f"--config.model.init_from={sft}"]
    assert reference_cli.main(argv) == 0

    def interrupted(where, *args):  # Ctrl-C while scoring the held-out pairs, the training pairs written
        if where != "data.sources.train":
            raise KeyboardInterrupt
        return [], 0

    monkeypatch.setattr(reference_cli, "_score_source", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reference_cli.main(argv)
    config = load("dpo.py:smoke", "--config.loss.reference=data", "--config.data.tokenizer=byte",
                  f"--config.model.init_from={sft}",
                  f"--config.data.sources.train.path={tmp_path}/ref/train.train.jsonl",
                  "--config.data.sources.train.format=jsonl")
    with pytest.raises(ValueError, match=re.escape(
            f"data.sources.train: {tmp_path}/ref/reference.json says kiln data reference into that directory did not "
            "finish (it was stopped), so its files may hold an earlier run's log-probs; compute them again")):
        reference.check_precomputed(config)
    monkeypatch.setattr(reference_cli, "_score_source", lambda *args: ([], 0))
    assert reference_cli.main(argv) == 0
    reference.check_precomputed(config)


TINY = ["--preset=tiny", "--batch=1"]


@pytest.mark.parametrize("argv, message", [
    (["train_step", *TINY, "--seq=8", "--steps=0"], "argument --steps: '0' is not a positive int"),
    (["train_step", *TINY, "--seq=8", "--rounds=-1"], "argument --rounds: '-1' is not a positive int"),
    (["sampling", *TINY, "--prompt_len=4", "--new_tokens=2", "--repeats=0"],
     "argument --repeats: '0' is not a positive int"),
    (["data", "--batches=0"], "argument --batches: '0' is not a positive int"),
    (["train_step", "--steps=two"], "argument --steps: invalid int value: 'two'"),
])
def test_a_benchmark_count_of_zero_or_less_is_refused(capsys, monkeypatch, argv, message):
    """`kiln bench train_step --steps=0` compiled the step, timed no step, and printed NaN tokens/s and MFU as
    its figures (a median of nothing); sampling's --repeats=0 and data's --batches=0 alike."""
    monkeypatch.delenv("KILN_DATA_DIR", raising=False)  # the data benchmark would stop there, not at its count
    with pytest.raises(SystemExit) as e:
        kiln.main(["bench", *argv])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"kiln bench {argv[0]}: error: {message}"


@pytest.mark.parametrize("value", ["0", "-3"])
def test_data_preview_refuses_statistics_of_no_examples(capsys, monkeypatch, value):
    """--max_stat_examples=-3 printed "source train (synthetic): -3 examples: ok 0, ..." as the statistics."""
    monkeypatch.chdir(ROOT)
    assert one_error_line(capsys, ["data", "preview", "--config=configs/pretrain.py:smoke",
                                   f"--max_stat_examples={value}"]) == (
        f"kiln data: error: --max_stat_examples must be positive, got {value}")


@pytest.mark.parametrize("name", ["sft.jsonl", "pairs.jsonl"])
def test_rejection_sampling_refuses_prompts_read_from_the_files_it_writes(tmp_path, name):
    """Prompts read from run_dir/sft.jsonl were sampled from, then replaced by the run's own sft.jsonl: the
    user's prompts file lost. (Refused before the policy, which does not exist, is loaded.)"""
    from train import rejection

    (tmp_path / "rs").mkdir()
    (tmp_path / "rs" / name).write_text('{"prompt": "1+1?", "completion": "#### 2"}\n')
    config = load("rejection_sampling.py:smoke", f"--config.run_dir={tmp_path / 'rs'}",
                  f"--config.data.sources.train.path={tmp_path}/rs/../rs/{name}",
                  "--config.data.sources.train.format=jsonl", f"--config.model.init_from={tmp_path / 'policy'}")
    with pytest.raises(ValueError, match=re.escape(
            f"data.sources.train.path={tmp_path}/rs/../rs/{name} is the {name} this run writes into "
            f"run_dir={tmp_path / 'rs'}; choose another run_dir")):
        rejection.run(config)
    assert os.listdir(tmp_path) == ["rs"] and os.listdir(tmp_path / "rs") == [name]


@pytest.mark.parametrize("argv", [["train", "--config=configs/sft.py:smoke"],
                                  ["generate", "--config=configs/rejection_sampling.py:smoke"],
                                  ["data", "reference", "--config=configs/dpo.py:smoke", "--out={tmp}/ref"]])
def test_a_model_to_start_from_that_is_a_file_is_named_so(tmp_path, capsys, monkeypatch, argv):
    """model.init_from naming a file (a tokenizer.model, say) said "does not say which tokenizer its model was
    trained with (no run config.json); set data.tokenizer", and with that set, that it is a file; kiln generate
    told the user to pass --tokenizer, which it has not."""
    monkeypatch.chdir(ROOT)
    (tmp_path / "tok.model").write_text("")
    argv = [a.format(tmp=tmp_path) for a in argv] + [f"--config.model.init_from={tmp_path / 'tok.model'}",
                                                     f"--config.run_dir={tmp_path / 'run'}"]
    assert one_error_line(capsys, argv).endswith(
        f"error: model.init_from='{tmp_path / 'tok.model'}': {tmp_path / 'tok.model'} is a file; name a Kiln run "
        "directory, a checkpoint step directory (run/checkpoints/STEP) or a Hugging Face directory")
    assert os.listdir(tmp_path) == ["tok.model"]


@pytest.mark.parametrize("out, message", [
    ("", "--out is empty; name the directory to write the reference log-probs into"),
    ("{tmp}/f/ref", "--out {tmp}/f/ref: {tmp}/f is a file, not a directory; name a directory to write the reference "
                    "log-probs into"),
])
def test_data_reference_checks_where_it_writes_before_loading_a_model(tmp_path, capsys, monkeypatch, out, message):
    """`--out=` (an unset variable) and `--out` under a file loaded the policy and built the model, then failed
    with "[Errno 2] No such file or directory: ''" or "[Errno 20] Not a directory"."""
    monkeypatch.chdir(ROOT)
    (tmp_path / "f").write_text("mine")
    argv = ["data", "reference", "--config=configs/dpo.py:smoke", "--out=" + out.format(tmp=tmp_path),
            f"--config.model.init_from={tmp_path / 'missing'}"]
    line = one_error_line(capsys, argv)
    assert line == "kiln data: error: " + message.format(tmp=tmp_path)


@pytest.mark.parametrize("inputs, message", [
    ("{tmp}/a.txt,{tmp}/a.txt", "--input names {tmp}/a.txt twice; name each file once"),
    ("{tmp}/*.txt,{tmp}/link", "--input names {tmp}/a.txt twice (also as {tmp}/link); name each file once"),
])
def test_tokenizer_refuses_an_input_named_twice(tmp_path, inputs, message):
    """`--input=A,A` (or a pattern and a link to a file it matches) trained on A's text twice, from "2 file(s)":
    its words weighed double in the vocabulary, in silence."""
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("y")
    os.symlink(tmp_path / "a.txt", tmp_path / "link")
    with pytest.raises(DataError) as e:
        tokenizer_cli.input_paths(inputs.format(tmp=tmp_path))
    assert str(e.value) == message.format(tmp=tmp_path)
    assert tokenizer_cli.input_paths(f"{tmp_path}/*.txt") == [f"{tmp_path}/a.txt", f"{tmp_path}/b.txt"]


def test_tokenizer_names_its_own_flag_to_skip_bad_records(tmp_path, capsys):
    """A bad .jsonl record ended with "(set data.skip_bad_records=true to skip such records)", a config key kiln
    tokenizer has not. --skip_bad_records skips it and says how many."""
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [5, *CORPUS]))
    argv = ["tokenizer", f"--input={path}", "--vocab_size=400", f"--out={tmp_path / 'tok.model'}"]
    assert one_error_line(capsys, argv) == (f"kiln tokenizer: error: {path}:1: field 'text' is int; expected str "
                                            "(pass --skip_bad_records to skip such records)")
    assert kiln.main([*argv, "--skip_bad_records"]) == 0
    assert capsys.readouterr().err == f"{path}: 1 bad record(s) skipped\n"


@pytest.mark.parametrize("spec, override", [
    ("pretrain.py:smoke", "optim.lr=inf"), ("pretrain.py:smoke", "optim.weight_decay=1e400"),
    ("pretrain.py:smoke", "optim.b2=nan"), ("pretrain.py:smoke", "model.dropout=nan"),
    ("dpo.py:smoke", "loss.beta=inf"), ("rejection_sampling.py:smoke", "rollout.min_reward=nan"),
])
def test_a_config_number_that_is_not_finite_is_refused(spec, override):
    """inf (or 1e400, which overflows to it) passed every range check, and nan those of the keys without one:
    a learning rate of inf trained to NaN losses; a min_reward of nan kept no reply, in silence."""
    key, _, raw = override.partition("=")
    with pytest.raises(ConfigError) as e:
        load(spec, f"--config.{override}")
    assert str(e.value) == f"bad value {raw!r} for config key {key!r}: expected a finite number"
    load(spec, f"--config.{key}=0.5")


@pytest.mark.parametrize("override, rule, bound", [
    ("model.dropout=1.0", "in [0, 1)", "0.0"), ("model.dropout=-0.1", "in [0, 1)", "0.99"),
    ("optim.b1=1.0", "in [0, 1)", "0.0"), ("optim.b2=-0.5", "in [0, 1)", "0.999"),
    ("optim.eps=0.0", "positive", "1e-12"),
    ("optim.min_lr_ratio=1.5", "in [0, 1] (the final rate over the peak)", "1.0"),
    ("optim.min_lr_ratio=-0.1", "in [0, 1] (the final rate over the peak)", "0.0"),
    ("optim.decay_fraction=1.2", "in [0, 1] (the part of the run that decays)", "1.0"),
    ("model.rope_theta=-5", "positive", "10000"),
])
def test_optimizer_and_model_rates_out_of_range_are_refused(override, rule, bound):
    """optim.b1=1.5 (Adam's moments growing without bound), model.dropout=1.5, min_lr_ratio=3 (a schedule ending
    at three times its peak), a negative RoPE base: each loaded and trained on in silence. Each bound loads."""
    key, _, raw = override.partition("=")
    with pytest.raises(ConfigError) as e:
        load("pretrain.py:smoke", f"--config.{override}")
    assert str(e.value) == f"config key {key!r} must be {rule}, got {float(raw)}"
    load("pretrain.py:smoke", f"--config.{key}={bound}")


@pytest.mark.parametrize("override, message", [
    ("data.packing_bins=0", "config key 'data.packing_bins' must be positive, got 0"),
    ("train.max_nonfinite_steps=0", "config key 'train.max_nonfinite_steps' must be positive, got 0"),
    ("data.num_workers=-1", "config key 'data.num_workers' must be 0 or more, got -1"),
])
def test_data_and_divergence_counts_out_of_range_are_refused(override, message):
    """data.packing_bins=0 failed in grain with "A failing component must be returned if no row is found",
    naming no key; train.max_nonfinite_steps=0 stopped the run at its first step as diverged ("0 consecutive
    non-finite steps"); data.num_workers=-1 ran as 0, in silence."""
    with pytest.raises(ConfigError) as e:
        load("pretrain.py:smoke", f"--config.{override}")
    assert str(e.value) == message
    load("pretrain.py:smoke", f"--config.{override.partition('=')[0]}=1")


def test_rejection_sampling_rerun_after_its_prompts_file_changed_is_refused(tmp_path):
    """The prompts file was recorded by its path alone: after it was edited in place, `kiln generate` (and a
    recipe re-run) returned the earlier prompts' samples as this run's."""
    from train import rejection

    write_jsonl(tmp_path / "web.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    (tmp_path / "rs").mkdir()
    (tmp_path / "rs" / "results.json").write_text(json.dumps({"settings": rejection.settings(
        rejection_config(tmp_path, web="web.jsonl"))}))
    rejection.check_settings(rejection_config(tmp_path, web="web.jsonl"))
    write_jsonl(tmp_path / "web.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'rs'} holds the outputs of rejection sampling with "
                                                   "data.sources.web.sha256=")):
        rejection.check_settings(rejection_config(tmp_path, web="web.jsonl"))


def test_rejection_sampling_rerun_after_its_reward_model_trained_on_is_refused(tmp_path):
    """The reward model was recorded by the path given, unlike the policy: a recipe re-run that trained the reward
    stage further took the old scorer's choices for the new one's."""
    from train import rejection

    reward = saved_run(tmp_path / "rm", 2)
    (tmp_path / "rs").mkdir()
    (tmp_path / "rs" / "results.json").write_text(json.dumps({"settings": rejection.settings(
        rejection_config(tmp_path, f"--config.rollout.reward={reward}"))}))
    assert rejection.check_settings(rejection_config(tmp_path, f"--config.rollout.reward={reward}/"))
    saved_run(tmp_path / "rm", 4)
    with pytest.raises(ValueError, match="with rollout.reward=.*rm/checkpoints step 2', and this run has .* step 4'"):
        rejection.check_settings(rejection_config(tmp_path, f"--config.rollout.reward={reward}"))


def test_slurm_replaces_its_own_script_but_no_other_file(tmp_path, capsys):
    """--out naming the user's own file (a training script, a config) wrote the batch script over it; an
    earlier script of this launcher's is replaced as before."""
    out = tmp_path / "train.py"
    out.write_text("print('my work')\n")
    args = ["--nodes=1", "--gpus_per_node=4", f"--out={out}", "--", "kiln", "train"]
    assert error(slurm.main, args, capsys).endswith(f"--out={out} exists and is no script of this launcher's; "
                                                   "name a new file (or remove it)")
    assert out.read_text() == "print('my work')\n"
    job = tmp_path / "job.sbatch"
    job.write_text(slurm.script(["kiln", "eval"], 2, 8, "node"))
    assert slurm.main(["--nodes=1", "--gpus_per_node=4", f"--out={job}", "--", "kiln", "train"]) == 0
    assert job.read_text() == slurm.script(["kiln", "train"], 1, 4, "gpu")
