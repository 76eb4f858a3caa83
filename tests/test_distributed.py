"""Multi-process runs on one machine (`launch.local`): the same losses as one process, checkpoints that
any process count resumes with each process's data position, pre-emption (SIGTERM) saved and resumed,
and the environment's mistakes named in one line."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from data import pipeline
from train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["kiln", "train", "--config=configs/pretrain.py:smoke"]


def losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def local(n, *command, options=()):
    return subprocess.Popen([sys.executable, "-m", "launch.local", f"--num_processes={n}", *options, "--", *command],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-2000:]
    return out


def wait_for_step(run_dir, proc, timeout=300):
    """Returns once the run has logged a train step (so a signal arrives mid-run)."""
    path, deadline = os.path.join(run_dir, "metrics.jsonl"), time.time() + timeout
    while not (os.path.exists(path) and losses(run_dir)):
        assert proc.poll() is None and time.time() < deadline, "the run ended or never started"
        time.sleep(0.2)


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, dict(cluster_detection_method="slurm")),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # a one-task job is one process
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
])
def test_the_environment_says_how_to_join(env, want):
    assert distributed.describe(env) == want


@pytest.mark.parametrize("env, message", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"not in \[0, JAX_NUM_PROC"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "-1"}, r"-1 is not in \[0, JAX"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
])
def test_a_half_described_run_is_named(env, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.describe(env)



def test_sigterm_is_noted_inside_the_block_and_the_previous_handler_restored():
    """One process: SIGTERM inside `with Preemption()` only marks the step to stop at (the process lives on),
    and leaving the block puts back the handler that was there before."""
    before = signal.getsignal(signal.SIGTERM)
    with distributed.Preemption() as preemption:
        assert not preemption.reached(3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert preemption.reached(4)
    assert signal.getsignal(signal.SIGTERM) is before

def test_dry_run_prints_one_command_per_process(tmp_path):
    out = finish(local(3, *SMOKE, options=("--dry-run", "--port=2345", f"--log_dir={tmp_path}")))
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(f"JAX_COORDINATOR_ADDRESS=127.0.0.1:2345 JAX_NUM_PROCESSES=3 JAX_PROCESS_ID={i} ")
        assert "kiln train --config=configs/pretrain.py:smoke" in line
        assert (f"> {tmp_path}/process_{i}.log" in line) == (i > 0)  # process 0 writes to the terminal


def test_an_unreachable_coordinator_is_one_line(tmp_path):
    # A port bound here but never listened on refuses connections, and no other test can take it meanwhile.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{held.getsockname()[1]}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID="1", KILN_DISTRIBUTED_TIMEOUT_S="2")
        out = subprocess.run([*SMOKE, f"--config.run_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"kiln train: error: process 1 of 2 found no coordinator at {env['JAX_COORDINATOR_ADDRESS']} within 2s "
        "(Connection refused): start process 0 with the same JAX_COORDINATOR_ADDRESS, and check that its host and "
        "port are reachable"]



def test_a_coordinator_that_starts_late_is_waited_for():
    """Process 1 may start before process 0 listens: it retries until the address answers, within the timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))  # bound now (refusing until it listens), so no other test takes the port
    port = server.getsockname()[1]

    def listen_late():
        time.sleep(0.2)
        server.listen()
    threading.Thread(target=listen_late).start()
    try:
        start = time.monotonic()
        distributed._wait_for(f"127.0.0.1:{port}", 1, 2, timeout_s=30)
        assert 0.2 <= time.monotonic() - start < 10
    finally:
        server.close()


def test_data_positions_are_redivided_over_a_new_process_count():
    # Each process holds its batch slots' states in order; 2 processes x 4 slots -> 1 x 8 or 4 x 2.
    two = [{"parents": [{"slot": i} for i in range(p * 4, p * 4 + 4)]} for p in range(2)]
    saved = pipeline.combine_states(two)
    assert pipeline.process_state(saved, 1, 2) == two[1]
    assert pipeline.process_state(saved, 0, 1) == {"parents": [{"slot": i} for i in range(8)]}
    assert pipeline.process_state(saved, 3, 4) == {"parents": [{"slot": 6}, {"slot": 7}]}
    assert pipeline.combine_states([two[0]]) == two[0]  # a single process's checkpoint is as before
    with pytest.raises(ValueError, match="saved by 2 processes and this run has 3"):
        pipeline.process_state({"processes": [{"workers": 1}, {"workers": 2}]}, 0, 3)


@pytest.mark.slow  # ~30 s: two runs
def test_sigterm_saves_the_step_and_the_same_command_resumes(tmp_path):
    run_dir = str(tmp_path / "run")
    command = [*SMOKE, f"--config.run_dir={run_dir}", "--config.train.steps=2000", "--config.checkpoint.every=5000",
               "--config.train.eval_every=0", "--config.train.log_every=1"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-2000:]
    from train import checkpoint
    stopped = checkpoint.latest_step(run_dir)
    assert 0 < stopped < 2000 and f"stopped pretrain at step {stopped} of 2000 (pre-empted)" in out
    resumed = subprocess.run([*command, "--config.train.steps=" + str(stopped + 3)], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert f"resumed from step {stopped}" in resumed.stdout + resumed.stderr
    assert max(losses(run_dir)) == stopped + 3


@pytest.mark.slow  # ~1 min: three multi-process runs
def test_two_processes_match_one_and_either_count_resumes(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    finish(subprocess.Popen([*SMOKE, f"--config.run_dir={one}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True))
    finish(local(2, *SMOKE, f"--config.run_dir={two}", options=(f"--log_dir={tmp_path}",)))
    reference, got = losses(one), losses(two)
    assert list(got) == list(reference)
    for step in reference:  # measured: 1.7e-7 relative at most (the sum over two processes' rows)
        assert got[step] == pytest.approx(reference[step], rel=1e-5)
    # Resume from the 2-process step-10 checkpoint, with 1 and with 2 processes: each process must
    # continue its own rows of the stream, so both finish like the uninterrupted run.
    for n in (1, 2):
        resumed = str(tmp_path / f"resumed_{n}")
        shutil.copytree(two, resumed)
        shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))
        # Two processes resume on a hybrid mesh: each process a granule, the data axis across them.
        mesh = ("--config.mesh.dcn_data=2",) if n == 2 else ()
        finish(local(n, *SMOKE, f"--config.run_dir={resumed}", *mesh, options=(f"--log_dir={tmp_path}",)))
        after = losses(resumed)
        for step in (15, 20):
            assert after[step] == pytest.approx(reference[step], rel=1e-5), (n, step)


@pytest.mark.slow  # ~1 min
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    run_dir = str(tmp_path / "run")
    command = [*SMOKE, f"--config.run_dir={run_dir}", "--config.train.steps=3000", "--config.checkpoint.every=5000",
               "--config.train.eval_every=0", "--config.train.log_every=1"]
    proc = local(2, *command, options=(f"--log_dir={tmp_path}",))
    wait_for_step(run_dir, proc)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(children[-1]), signal.SIGTERM)  # process 1 only
    out = finish(proc)
    from train import checkpoint
    stopped = checkpoint.latest_step(run_dir)
    assert 0 < stopped < 3000 and f"stopped pretrain at step {stopped} of 3000 (pre-empted)" in out
    other = open(tmp_path / "process_1.log").read()
    assert f"stopped pretrain at step {stopped} of 3000 (pre-empted)" in other  # the same step on both
    finish(local(2, *command[:-4], "--config.train.steps=" + str(stopped + 2), "--config.checkpoint.every=5000",
                 "--config.train.eval_every=0", "--config.train.log_every=1", options=(f"--log_dir={tmp_path}",)))
    assert max(losses(run_dir)) == stopped + 2


@pytest.mark.slow  # ~2 min: six stages compiled for a sharded mesh
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo", "grpo", "ppo"])
def test_every_stage_trains_on_eight_devices_with_fsdp_and_tensor_sharding(stage, tmp_path):
    import math

    import jax

    from launch.config import load_config
    from train import trainer
    overrides = [f"--config.run_dir={tmp_path}", "--config.train.progress=false", "--config.mesh.data=1",
                 "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]
    config = load_config(os.path.join(ROOT, f"configs/{stage}.py:smoke"), overrides)
    last = trainer.train(config)
    assert math.isfinite(last["loss"])
    run = trainer.setup(config)
    assert dict(run.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    axes = {a for x in jax.tree.leaves(run.state.params) for spec in [x.sharding.spec] for part in spec
            for a in ((part,) if isinstance(part, str) else part or ())}
    assert {"fsdp", "tensor"} <= axes  # the weights really are split both ways


@pytest.mark.slow  # ~40 s
def test_grpo_on_two_processes_matches_one(tmp_path):
    """Rollouts sampled on the mesh that spans both processes, gathered to each, each process training
    on its rows: the same replies, rewards and losses as one process."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    command = ["kiln", "train", "--config=configs/grpo.py:smoke", "--config.train.progress=false"]
    finish(subprocess.Popen([*command, f"--config.run_dir={one}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True))
    finish(local(2, *command, f"--config.run_dir={two}", options=(f"--log_dir={tmp_path}",)))
    rows = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 4
    for a, b in zip(*rows):
        assert a["completion_length"] == b["completion_length"] and a["reward/mean"] == b["reward/mean"]
        # measured: 1.2e-7 relative at most (log-probs summed over two processes' devices)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-8)


@pytest.mark.slow  # ~1.5 min
def test_generate_and_eval_on_two_processes_match_one(tmp_path):
    """kiln generate splits the prompts' chunks over the processes and process 0 writes everything;
    kiln eval runs on the mesh that spans both: the same files and figures as one process."""
    policy = str(tmp_path / "policy")
    finish(subprocess.Popen([*SMOKE, f"--config.run_dir={policy}", "--config.train.progress=false"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    generate = ["kiln", "generate", "--config=configs/rejection_sampling.py:smoke", f"--config.model.init_from={policy}",
                "--config.data.batch_size=2"]  # three chunks of two prompts: process 0 samples two, process 1 one
    evaluate = ["kiln", "eval", f"--checkpoint={policy}", "--config=configs/eval.py:smoke"]
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        finish(local(n, *generate, f"--config.run_dir={out}/rs", options=(f"--log_dir={tmp_path}",)))
        finish(local(n, *evaluate, f"--config.run_dir={out}/eval", options=(f"--log_dir={tmp_path}",)))
    for name in ("sft.jsonl", "pairs.jsonl"):
        assert (tmp_path / "n1/rs" / name).read_text() == (tmp_path / "n2/rs" / name).read_text()
    one, two = (json.loads((tmp_path / f"n{n}/eval/results.json").read_text()) for n in (1, 2))
    assert [t["accuracy"] for t in one["tasks"]] == [t["accuracy"] for t in two["tasks"]]
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-5), key
