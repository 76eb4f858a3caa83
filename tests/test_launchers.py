"""The cluster launchers (launch.tpu_pod, launch.slurm, launch.multinode) print the commands they would
run, exactly, so that they never rot without a cluster; the SLURM script's requeue handler runs
under bash with stand-ins for srun and scontrol; every mesh preset loads as config overrides."""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from configs import meshes
from launch import local, multinode, slurm, tpu_pod
from launch.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILN = ["kiln", "train", "--config=configs/pretrain.py"]
DRY = ["--dry-run", "--", *KILN]
V4_32 = ("--config.mesh.data=1 --config.mesh.fsdp=16 --config.mesh.tensor=1 --config.mesh.dcn_data=1 "
         "--config.mesh.dcn_fsdp=1")


def printed(main, argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


# -- TPU pod ----------------------------------------------------------------------------------------
def test_tpu_pod_copies_installs_and_runs_on_every_worker(capsys):
    lines = printed(tpu_pod.main, ["--tpu=pod", "--zone=us-central2-b", "--project=proj", "--run_root=/mnt/b/",
                                   "--mesh=v4-32", "--dry-run", "--", *KILN], capsys)
    tarball = os.path.join(tempfile.gettempdir(), "kiln-pod.tar.gz")
    where = "--zone=us-central2-b --worker=all --project=proj"
    assert lines == [
        f"git -C {ROOT} archive --format=tar.gz --output={tarball} HEAD",
        f"gcloud compute tpus tpu-vm scp {tarball} pod:kiln.tar.gz {where}",
        f"gcloud compute tpus tpu-vm ssh pod {where} '--command=mkdir -p ~/kiln && tar -xzf kiln.tar.gz -C ~/kiln "
        "&& cd ~/kiln && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e \".[tpu]\"'",
        f"gcloud compute tpus tpu-vm ssh pod {where} '--command=cd ~/kiln && . .venv/bin/activate && "
        f"kiln train --config=configs/pretrain.py {V4_32} --config.run_dir=/mnt/b/runs/pod'"]


def test_tpu_pod_options(capsys):
    lines = printed(tpu_pod.main, ["--tpu=pod", "--zone=z", "--repo_dir=/opt/my kiln", "--run_root=/mnt/b",
                                   "--run_name=r1", "--dry-run", "--", *KILN], capsys)
    assert "--project" not in " ".join(lines)
    assert shlex.split(lines[-1])[-1] == ("--command=cd '/opt/my kiln' && . .venv/bin/activate && "
                                          f"{' '.join(KILN)} --config.run_dir=/mnt/b/runs/r1")
    assert error(tpu_pod.main, ["--tpu=pod", "--zone=z", "--run_root=/mnt/b", "--", *KILN, "--config.run_dir=x"],
                 capsys).endswith("give either --run_root or --config.run_dir, not both")
    assert error(tpu_pod.main, ["--tpu=pod", "--zone=z", "--run_root=gs://b", "--", *KILN], capsys).endswith(
        "is a URL: mount the bucket on every worker (gcsfuse) and give the mount's path")
    assert error(tpu_pod.main, ["--tpu=pod", "--zone=z", "--mesh=2xv5e-256", "--", *KILN], capsys).endswith(
        "--mesh=2xv5e-256 spans 2 slices; this launcher runs on one")
    assert error(tpu_pod.main, ["--tpu=pod", "--zone=z"], capsys).endswith("give the command to run after --, "
                                                                           "e.g. -- kiln train --config=configs/pretrain.py")


def test_tpu_pod_stops_at_the_first_failure(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(tpu_pod.subprocess, "call", lambda step: calls.append(step) or (3 if len(calls) == 2 else 0))
    assert tpu_pod.main(["--tpu=pod", "--zone=z", "--", *KILN]) == 3
    assert [c[:5] for c in calls] == [["git", "-C", ROOT, "archive", "--format=tar.gz"],
                                      ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    assert capsys.readouterr().err.strip() == "launch.tpu_pod: step 2 of 4 exited with status 3"
    calls.clear()  # status 1, the commonest failure, stops it too
    monkeypatch.setattr(tpu_pod.subprocess, "call", lambda step: calls.append(step) or (1 if len(calls) == 3 else 0))
    assert tpu_pod.main(["--tpu=pod", "--zone=z", "--", *KILN]) == 1 and len(calls) == 3


def test_tpu_pod_names_a_missing_program(monkeypatch, capsys):
    def no_gcloud(step):
        if step[0] == "gcloud":
            raise FileNotFoundError(step[0])
        return 0
    monkeypatch.setattr(tpu_pod.subprocess, "call", no_gcloud)
    assert tpu_pod.main(["--tpu=pod", "--zone=z", "--", *KILN]) == 127
    assert capsys.readouterr().err.splitlines() == ["launch.tpu_pod: gcloud not found: install the Google Cloud CLI",
                                                    "launch.tpu_pod: step 2 of 4 exited with status 127"]


# -- SLURM ------------------------------------------------------------------------------------------
def sbatch_lines(lines):
    return [line for line in lines if line.startswith("#SBATCH")]


def test_slurm_one_process_per_gpu(capsys):
    lines = printed(slurm.main, ["--nodes=2", "--gpus_per_node=8", "--partition=a100", "--time=1-02:00:00",
                                 "--dry-run", "--", *KILN, "--config.run_dir=/shared/runs/my run"], capsys)
    assert lines[0] == "#!/bin/bash"
    assert sbatch_lines(lines) == [
        "#SBATCH --job-name=kiln", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-task=1",
        "#SBATCH --partition=a100", "#SBATCH --time=1-02:00:00", "#SBATCH --output=kiln-%j.out",
        "#SBATCH --open-mode=append", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120"]
    assert "export JAX_LOCAL_DEVICE_IDS=0" in lines
    assert ("srun --kill-on-bad-exit=1 kiln train --config=configs/pretrain.py '--config.run_dir=/shared/runs/my run' &"
            in lines)
    assert """  [ "$status" = 0 ] && scontrol requeue "$SLURM_JOB_ID\"""" in lines


def test_slurm_one_process_per_node_with_a_mesh_preset(capsys):
    lines = printed(slurm.main, ["--nodes=4", "--gpus_per_node=8", "--per=node", "--job_name=big", "--mesh=4x8xh100",
                                 "--dry-run", "--", *KILN], capsys)
    assert sbatch_lines(lines)[:4] == ["#SBATCH --job-name=big", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                                       "#SBATCH --gpus-per-node=8"]
    assert "#SBATCH --output=big-%j.out" in lines and not any("--time" in line for line in lines)
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    assert ("srun --kill-on-bad-exit=1 kiln train --config=configs/pretrain.py --config.mesh.data=1 "
            "--config.mesh.fsdp=8 --config.mesh.tensor=1 --config.mesh.dcn_data=4 --config.mesh.dcn_fsdp=1 &") in lines


def test_slurm_writes_the_script_and_prints_sbatch(tmp_path, capsys):
    out = str(tmp_path / "job.sbatch")
    assert printed(slurm.main, ["--nodes=1", "--gpus_per_node=4", f"--out={out}", "--", *KILN], capsys) == [
        f"sbatch {out}"]
    assert open(out).read() == slurm.script(KILN, 1, 4, "gpu")


def test_slurm_bad_input(capsys):
    """Each refusal is a dry run: a launcher that failed to refuse would print, not write a script."""
    assert error(slurm.main, ["--nodes=4", "--gpus_per_node=8", "--mesh=4x8xh100", *DRY], capsys).endswith(
        "--mesh=4x8xh100 spans 4 nodes over the network, one process each, but this starts 32 processes: "
        "use --per=node")
    assert error(slurm.main, ["--nodes=1", "--gpus_per_node=8", "--time=90", *DRY], capsys).endswith(
        "--time='90' is not HH:MM:SS or D-HH:MM:SS")
    assert "invalid choice: 'host'" in error(slurm.main, ["--nodes=1", "--gpus_per_node=8", "--per=host", *DRY], capsys)
    assert error(slurm.main, ["--nodes=1", "--gpus_per_node=8", "--job_name=my run", *DRY], capsys).endswith(
        "--job_name='my run': use letters, digits, '_', '.' and '-'")
    assert error(slurm.main, ["--nodes=1", "--gpus_per_node=0", *DRY], capsys).endswith(
        "--nodes and --gpus_per_node must be at least 1")


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
@pytest.mark.parametrize("signalled", [True, False])
def test_slurm_script_requeues_after_the_save(tmp_path, signalled):
    """USR1 (the time limit near): the tasks get SIGTERM, save and exit 0, then the job is requeued.
    Otherwise the job ends with the run's exit status and is not requeued."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nexec "$@"\n')  # drops --kill-on-bad-exit=1
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/scontrol\n')
    for tool in ("srun", "scontrol"):
        os.chmod(bin_dir / tool, 0o755)
    started = tmp_path / "started"
    run = (f"trap 'kill $!; exit 0' TERM; touch {started}; sleep 30 & wait" if signalled else f"touch {started}; exit 3")
    (tmp_path / "job.sbatch").write_text(slurm.script(["bash", "-c", run], 1, 1, "gpu"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}
    job = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env)
    deadline = time.time() + 10
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    if signalled:
        time.sleep(0.2)  # the script is waiting on srun
        job.send_signal(signal.SIGUSR1)
    assert job.wait(timeout=10) == (0 if signalled else 3)
    requeued = tmp_path / "scontrol"
    assert (requeued.read_text() == "requeue 77\n") if signalled else not requeued.exists()


# -- plain multi-node -------------------------------------------------------------------------------
def test_multinode_sets_each_process_variables(capsys):
    lines = printed(multinode.main, ["--nodes=2", "--node_rank=1", "--coordinator=10.0.0.1:8476",
                                     "--processes_per_node=2", "--log_dir=/logs", "--mesh=8xh100", "--dry-run",
                                     "--", *KILN], capsys)
    mesh = " ".join(meshes.overrides("8xh100"))
    common = "JAX_COORDINATOR_ADDRESS=10.0.0.1:8476 JAX_NUM_PROCESSES=4"
    assert lines == [f"{common} JAX_PROCESS_ID=2 CUDA_VISIBLE_DEVICES=0 {' '.join(KILN)} {mesh}",
                     f"{common} JAX_PROCESS_ID=3 CUDA_VISIBLE_DEVICES=1 {' '.join(KILN)} {mesh} "
                     "> /logs/process_3.log 2>&1"]
    lines = printed(multinode.main, ["--nodes=3", "--node_rank=2", "--coordinator=h:1", "--dry-run", "--", *KILN],
                    capsys)
    assert lines == [f"JAX_COORDINATOR_ADDRESS=h:1 JAX_NUM_PROCESSES=3 JAX_PROCESS_ID=2 {' '.join(KILN)}"]


def test_multinode_bad_input(capsys):
    """Each refusal is a dry run: a launcher that failed to refuse would print, not start kiln train."""
    args = ["--nodes=2", "--coordinator=h:1"]
    assert error(multinode.main, [*args, "--node_rank=2", *DRY], capsys).endswith(
        "--nodes and --processes_per_node must be at least 1, and --node_rank in [0, nodes)")
    assert error(multinode.main, ["--nodes=2", "--node_rank=0", "--coordinator=h", *DRY], capsys).endswith(
        "--coordinator='h' is not HOST:PORT")
    assert error(multinode.main, ["--nodes=2", "--node_rank=0", "--coordinator=h:port", *DRY], capsys).endswith(
        "--coordinator='h:port' is not HOST:PORT")
    assert error(multinode.main, ["--nodes=2", "--node_rank=0", "--coordinator=:8476", *DRY], capsys).endswith(
        "--coordinator=':8476' is not HOST:PORT")
    assert error(multinode.main, [*args, "--node_rank=0", "--processes_per_node=8", "--mesh=4x8xh100", *DRY],
                 capsys).endswith("this starts 16 processes: use --processes_per_node=1")


def test_multinode_runs_and_supervises_its_processes(tmp_path, capsys):
    """Process 1 fails: the exit status is its own and process 0 (sleeping) is stopped at once."""
    code = "import os, sys, time; i = int(os.environ['JAX_PROCESS_ID']); print('process', i); " \
           "time.sleep(30) if i == 0 else sys.exit(3)"
    start = time.time()
    status = multinode.main(["--nodes=1", "--node_rank=0", "--coordinator=h:1", "--processes_per_node=2",
                             f"--log_dir={tmp_path}", "--", sys.executable, "-c", code])
    assert status == 3 and time.time() - start < 10
    assert (tmp_path / "process_1.log").read_text() == "process 1\n"
    assert "a process exited with status 3" in capsys.readouterr().err


def test_supervise_returns_the_first_failure_in_process_order(monkeypatch):
    """Stand-in processes: 0 and 1 fail in the same poll (3, then 4), 2 runs until signalled. The status
    is process 0's, SIGTERM goes to the running process only, and each gets its variables on top of
    this environment."""
    from launch import launcher

    class Process:
        def __init__(self, command, env, stdout, stderr):
            self.id, self.returncode, self.polls, self.signals = int(env["JAX_PROCESS_ID"]), None, 0, []
            assert command == KILN and env["PATH"] == os.environ["PATH"]
            started.append(self)

        def poll(self):
            self.polls += 1
            if self.returncode is None and self.polls == 2 and self.id < 2:
                self.returncode = 3 + self.id
            return self.returncode

        def send_signal(self, signum):
            self.signals.append(signum)
            self.returncode = -signum

    started = []
    monkeypatch.setattr(launcher.subprocess, "Popen", Process)
    monkeypatch.setattr(launcher.time, "sleep", lambda s: None)
    envs = [{"JAX_PROCESS_ID": str(i)} for i in range(3)]
    assert launcher.supervise(KILN, envs, [None] * 3) == 3
    assert [p.signals for p in started] == [[], [], [signal.SIGTERM]]


# -- local ----------------------------------------------------------------------------------------
def test_local_sets_each_process_variables(capsys):
    lines = printed(local.main, ["--num_processes=3", "--devices_per_process=2", "--port=1234", "--log_dir=/logs",
                                 "--dry-run", "--", *KILN], capsys)
    common = ("JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 JAX_NUM_PROCESSES=3 JAX_PROCESS_ID={} JAX_PLATFORMS=cpu "
              f"XLA_FLAGS=--xla_force_host_platform_device_count=2 {' '.join(KILN)}")
    assert lines == [common.format(0), common.format(1) + " > /logs/process_1.log 2>&1",
                     common.format(2) + " > /logs/process_2.log 2>&1"]
    port = int(printed(local.main, ["--num_processes=1", "--dry-run", "--", *KILN], capsys)[0].split()[0].split(":")[1])
    assert 0 < port < 65536  # a free port of its own when none is given


def test_local_returns_the_failed_process_status(tmp_path, capsys):
    """One process that exits 3 between two polls: its status is the launcher's."""
    assert local.main(["--num_processes=1", f"--log_dir={tmp_path}", "--", sys.executable, "-c",
                       "import sys; sys.exit(3)"]) == 3
    assert "launch.local: a process exited with status 3" in capsys.readouterr().err
    assert local.main(["--num_processes=2", f"--log_dir={tmp_path}", "--", sys.executable, "-c", "pass"]) == 0


# -- mesh presets -----------------------------------------------------------------------------------
def test_mesh_presets_cover_their_hardware():
    """A slice's or node's devices (JAX counts one per TPU chip) times the slices or nodes."""
    devices = {"v4-8": 4, "v4-32": 16, "v5e-8": 8, "v5e-256": 256, "v5p-128": 64, "v6e-8": 8, "v6e-256": 256,
               "2xv5e-256": 512, "8xh100": 8, "4x8xh100": 32}
    assert sorted(devices) == sorted(meshes.PRESETS)
    for name, n in devices.items():
        p = {**meshes.DEFAULTS, **meshes.PRESETS[name]}
        assert p["data"] * p["fsdp"] * p["tensor"] * meshes.dcn_size(name) == n, name


@pytest.mark.parametrize("name", sorted(meshes.PRESETS))
def test_every_mesh_preset_loads(name):
    config = load_config(os.path.join(ROOT, "configs/pretrain.py"), meshes.overrides(name))
    assert {k: config.mesh[k] for k in meshes.DEFAULTS} == {**meshes.DEFAULTS, **meshes.PRESETS[name]}


def test_unknown_mesh_preset_is_named():
    with pytest.raises(ValueError, match=r"unknown mesh preset 'v9-8'; known presets: v4-8, v4-32, .*, 4x8xh100$"):
        meshes.overrides("v9-8")


def test_local_names_a_missing_program(tmp_path, capsys):
    """A command that is not installed was Popen's FileNotFoundError traceback (launch.multinode
    already checked); nothing starts."""
    assert error(local.main, ["--num_processes=2", f"--log_dir={tmp_path}", "--", "kiln_no_such_program", "x"],
                 capsys).endswith("'kiln_no_such_program' not found: activate the environment kiln is installed in")
    assert os.listdir(tmp_path) == []
