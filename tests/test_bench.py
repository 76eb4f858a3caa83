"""`kiln bench`: the dispatcher and the benchmarks' JSON figures at toy sizes."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from launch import main as kiln


@pytest.mark.slow
def test_train_step_benchmark_prints_its_figures_as_json(capsys):
    assert kiln.main(["bench", "train_step", "--preset=tiny", "--batch=8", "--seq=32", "--steps=2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["preset"] == "tiny" and row["batch"] == 8 and row["seq"] == 32
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 1 and row["compile_s"] > 0


@pytest.mark.slow  # the default run stays under 15 minutes; .ci/run runs it with the slow tests; the JSON fields are pinned with stand-ins
def test_train_step_reference_runs_the_same_model_in_torch(capsys):
    """The torch side is the same model on the same batch: before any update both give the same loss."""
    assert kiln.main(["bench", "train_step", "--preset=tiny", "--batch=8", "--seq=32", "--steps=1", "--rounds=2",
                      "--reference=torch"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    row = json.loads(out[-1])
    assert any(line.startswith("kiln / torch:") for line in out)
    assert row["reference_tokens_per_s"] > 0 and row["ratio"] == pytest.approx(
        row["reference_step_s"] / row["step_s"])
    assert row["first_loss"] == pytest.approx(row["reference_first_loss"], rel=1e-5)
    assert row["peak_memory_mb"] > 0 and row["versions"]["torch"]


def test_unknown_benchmark_is_one_clear_error(capsys):
    assert kiln.main(["bench", "nope"]) == 1
    assert "unknown benchmark 'nope'; expected one of train_step, sampling" in capsys.readouterr().err


def test_memory_benchmark_divides_parameters_and_optimizer_state_over_fsdp(capsys):
    """FSDP over 8 holds an eighth of the parameters and of the AdamW moments on each device (the
    moments were once left replicated until the first step)."""
    rows = []
    for fsdp in (1, 8):
        assert kiln.main(["bench", "memory", "--preset=tiny", "--batch=8", "--seq=64", "--dtype=float32",
                          f"--fsdp={fsdp}", "--remat=none", "--logits_chunk=0"]) == 0
        rows.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    one, eight = rows
    state_bytes = 3 * one["params"] * 4  # parameters, mu, nu in float32
    assert one["argument_gib"] * 2 ** 30 >= state_bytes
    assert eight["argument_gib"] < one["argument_gib"] / 6  # not exactly 8: norms and the batch stay whole
    assert eight["fits"] and eight["devices"] == 8


def test_memory_benchmark_default_runs_from_the_command_line_on_fake_devices():
    """`kiln bench memory` alone: Llama 3 8B on 8 x H100 (FSDP 8, remat full), re-run on 8 fake CPU
    devices. The child once got the launcher's own arguments and refused them."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run(["kiln", "bench", "memory"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-500:]
    row = json.loads(p.stdout.strip().splitlines()[-1])
    # Measured 42.0 GiB: 11.2 of parameters and moments, 30.8 of temporaries.
    assert row["devices"] == 8 and row["fits"] and 30 < row["per_device_gib"] < 60


@pytest.mark.skipif(not os.environ.get("KILN_DATA_DIR"), reason="needs KILN_DATA_DIR")
@pytest.mark.slow  # the default run stays under 15 minutes; .ci/run runs it with the slow tests
def test_shakespeare_benchmark_reports_eval_bits_per_byte_within_its_budget(capsys):
    assert kiln.main(["bench", "shakespeare", "--budget_s=600", "--config.model.d_model=64", "--config.model.n_layers=1",
                      "--config.model.n_heads=1", "--config.model.n_kv_heads=1", "--config.model.d_ff=128",
                      "--config.train.steps=4", "--config.train.eval_every=2", "--config.data.seq_len=64",
                      "--config.checkpoint.every=4"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [e["step"] for e in row["evals"]] == [2, 4] and row["steps"] == 4
    assert row["bits_per_byte"] == row["evals"][-1]["bits_per_byte"] == row["bits_per_byte_within_budget"]
    # Measured 3.768 -> 3.757: just under a uniform guess over 4096 pieces (12 bits / ~3.2 bytes a piece).
    assert 3.0 < row["evals"][1]["bits_per_byte"] < row["evals"][0]["bits_per_byte"] < 12 / 3.1
    assert row["evals"][0]["wall_s"] < row["evals"][1]["wall_s"] <= row["wall_s"] < 600


@pytest.mark.parametrize("name", ["train_step", "sampling", "data", "shakespeare", "memory", "gpu_check"])
def test_every_benchmark_has_help(name, capsys):
    try:
        code = kiln.main(["bench", name, "--help"])
    except SystemExit as stop:  # argparse's help
        code = stop.code
    assert code == 0 and "kiln bench" in capsys.readouterr().out


class FakeClock:
    """perf_counter and sleep of a benchmark module: time moves only when a stand-in says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_train_step_figures_are_medians_of_interleaved_rounds(monkeypatch):
    """Stand-in steps with known durations: after one untimed torch step, the sides alternate round by
    round; step time is the median over every timed step of a side (not the mean, not one round's),
    tokens/s = batch x seq / step, MFU = tokens/s x FLOPs per token / peak, and ratio = torch step /
    kiln step (kiln's speed-up)."""
    from benchmarks import train_step as ts
    from train import flops

    clock, calls = FakeClock(), []
    kiln_steps = [0.25, 0.25, 0.25, 0.25, 0.5, 2.0]  # median 0.25, mean 0.58, last round's median 0.5
    torch_steps = [8.0, 0.5, 0.5, 0.5, 0.5, 1.0, 4.0]  # the first is untimed

    class Kiln:
        def __init__(self, cfg, host, grad_accum):
            assert host["tokens"].shape == (2, 8) and grad_accum == 1
            assert (host["targets"][:, :-1] == host["tokens"][:, 1:]).all()  # next-token targets
            self.model, self.mesh, self.loss, self.first_loss = "weights", ts.make_mesh(1, -1, 1), 2.0, 3.0

        def compile_seconds(self):
            return 4.0

        def memory_mb(self):
            return 12.0

        def run(self):
            calls.append("kiln")
            clock.now += kiln_steps.pop(0)

    class Torch:
        torch = types.SimpleNamespace(get_num_threads=lambda: 2)
        loss, first_loss = 2.5, 3.0

        def __init__(self, model, cfg, host, dtype):
            assert model == "weights" and dtype == "float32"

        def run(self):
            calls.append("torch")
            clock.now += torch_steps.pop(0)

    monkeypatch.setattr(ts, "KilnStep", Kiln)
    monkeypatch.setattr(ts, "TorchStep", Torch)
    monkeypatch.setattr(ts, "time", clock)
    monkeypatch.setattr(ts.flops, "total_peak_flops", lambda dtype, devices: 1e9)
    monkeypatch.setattr(ts, "versions", dict)
    row = ts.measure("tiny", 2, 8, "float32", steps=3, remat="none", untied=True, reference="torch", rounds=2)
    assert calls == ["torch"] + ["kiln"] * 3 + ["torch"] * 3 + ["kiln"] * 3 + ["torch"] * 3
    assert row["step_s"] == 0.25 and row["reference_step_s"] == 0.5 and row["ratio"] == 2.0
    assert row["tokens_per_s"] == row["kiln_tokens_per_s"] == 64.0 and row["reference_tokens_per_s"] == 32.0
    per_token = flops.flops_per_token(ts.model_config("tiny", 8, "float32", "none", True), 8)
    assert row["tflops_per_s"] == pytest.approx(64 * per_token / 1e12)
    assert row["mfu"] == pytest.approx(64 * per_token / 1e9) and row["peak_tflops"] == 1e-3
    assert (row["compile_s"], row["peak_memory_mb"], row["loss"], row["first_loss"]) == (4.0, 12.0, 2.0, 3.0)
    assert (row["reference_loss"], row["torch_threads"], row["tied"], row["scan_layers"]) == (2.5, 2, False, False)


def test_train_step_compile_time_and_memory(monkeypatch):
    """Compile time is the first call less the second (never below 0); memory is arguments + outputs +
    temporaries less the donated bytes the outputs reuse, in MiB."""
    from benchmarks import train_step as ts

    clock = FakeClock()
    kiln = object.__new__(ts.KilnStep)
    durations = [5.0, 1.5, 1.0, 2.0]
    monkeypatch.setattr(kiln, "run", lambda: clock.sleep(durations.pop(0)), raising=False)
    monkeypatch.setattr(ts, "time", clock)
    assert kiln.compile_seconds() == 3.5
    assert kiln.compile_seconds() == 0.0  # a second call slower than the first
    analysis = types.SimpleNamespace(argument_size_in_bytes=3 * 2 ** 20, output_size_in_bytes=2 ** 20,
                                     temp_size_in_bytes=5 * 2 ** 20, alias_size_in_bytes=2 * 2 ** 20)
    compiled = types.SimpleNamespace(memory_analysis=lambda: analysis)
    kiln.mesh, kiln.state, kiln.frozen, kiln.data = ts.make_mesh(1, -1, 1), None, None, None
    kiln.step = types.SimpleNamespace(lower=lambda *args: types.SimpleNamespace(compile=lambda: compiled))
    assert kiln.memory_mb() == 7.0


def test_train_step_keeps_the_first_steps_loss():
    """`first_loss` is the loss of the first step run (the two sides' losses before any update
    agree), `loss` the latest."""
    from benchmarks import train_step as ts

    kiln, losses = object.__new__(ts.KilnStep), iter([2.0, 1.5, 1.25])
    kiln.mesh, kiln.state, kiln.frozen, kiln.data = ts.make_mesh(1, -1, 1), None, None, None
    kiln.loss = kiln.first_loss = float("nan")
    kiln.step = lambda state, frozen, data: (state, {"loss": next(losses)})
    for _ in range(3):
        kiln.run()
    assert (kiln.first_loss, kiln.loss) == (2.0, 1.25)


def test_sampling_best_time_and_ratio(monkeypatch):
    """best_time: the first run untimed, then the fastest of the repeats and the last output; measure
    runs Kiln once per tensor count and takes the fastest: the ratio is hf seconds / its seconds,
    tokens/s are batch x new tokens / seconds, and agreement is the share of equal greedy tokens (with HF,
    and the least between Kiln's runs)."""
    from benchmarks import sampling

    clock = FakeClock()
    monkeypatch.setattr(sampling, "time", clock)
    durations, outputs = [5.0, 3.0, 1.0, 2.0], iter("abcd")
    assert sampling.best_time(lambda: (clock.sleep(durations.pop(0)), next(outputs))[1], 3) == (5.0, 1.0, "d")
    timings = [(9.0, 0.5, np.array([[1, 2], [3, 4]])), (8.0, 0.25, np.array([[1, 2], [3, 5]])),
               (7.0, 2.0, np.array([[1, 2], [4, 4]]))]  # Kiln on 1 device, on 2, then HF
    monkeypatch.setattr(sampling, "best_time", lambda run, repeats: timings.pop(0))
    monkeypatch.setattr(sampling, "Transformer", lambda cfg, rngs: "weights")
    meshes = []
    monkeypatch.setattr(sampling, "shard_module", lambda model, mesh: meshes.append(dict(mesh.shape)))
    monkeypatch.setattr(sampling.hf, "save", lambda model, cfg, d: None)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(  # what measure uses of torch, transformers
        float32="float32", bfloat16="bfloat16", from_numpy=lambda a: a, get_num_threads=lambda: 3))
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoModelForCausalLM=types.SimpleNamespace(
        from_pretrained=lambda d, dtype: types.SimpleNamespace(eval=lambda: None))))
    row = sampling.measure("tiny", batch=2, prompt_len=3, new_tokens=2, dtype="float32", repeats=1, tensors=(1, 2))
    assert meshes == [{"data": 1, "fsdp": 1, "tensor": 2}]  # the 1-device run is not placed on a mesh
    assert (row["kiln_tokens_per_s"], row["hf_tokens_per_s"], row["ratio"], row["tensor"]) == (16.0, 2.0, 8.0, 2)
    assert row["kiln_tokens_per_s_by_tensor"] == {"1": 8.0, "2": 16.0}
    assert (row["kiln_s"], row["hf_s"], row["kiln_first_s"], row["hf_first_s"]) == (0.25, 2.0, 8.0, 7.0)
    assert row["greedy_agreement"] == 0.5 and row["tensor_agreement"] == 0.75 and row["torch_threads"] == 3


def test_use_cpu_devices_before_jax_starts_and_not_after():
    """A fresh process gets the CPU devices it asks for (`kiln sample --tensor=N`, the sampling benchmark);
    once JAX has run an operation, the call changes nothing instead of failing."""
    code = ("from model.sharding import use_cpu_devices; use_cpu_devices(3); import jax; n = len(jax.devices()); "
            "use_cpu_devices(5); print(n, len(jax.devices()))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
    assert out.stdout.split() == ["3", "3"]


def test_data_throughput_counts_non_padding_tokens_after_the_first_batch(monkeypatch):
    """The first batch is setup; tokens/s counts the segment ids above 0 of the later batches over their
    time, padding is the rest's share."""
    from benchmarks import data_throughput

    clock = FakeClock()

    def batches(data_cfg, kind, tok, seed):
        while True:
            clock.sleep(1.0)
            yield {"segment_ids": np.array([[1, 1, 0, 0], [1, 2, 2, 0]])}

    monkeypatch.setattr(data_throughput.pipeline, "train_iterator", batches)
    monkeypatch.setattr(data_throughput, "time", clock)
    assert data_throughput.measure(None, "pretrain", None, batches=2) == {
        "tokens_per_s": 5.0, "setup_s": 1.0, "padding": 0.375}


@pytest.mark.filterwarnings("error")  # env.json was read through a file left open (a ResourceWarning)
def test_shakespeare_stamps_evals_and_keeps_the_last_within_budget(monkeypatch, tmp_path):
    """A stand-in `kiln train` writing metrics.jsonl in three bursts 100 s apart (one row torn across
    two): each eval is stamped when read, the result is the last eval, the verdict the last at or before the budget,
    tokens/s and MFU are the medians of the train rows, and the overrides come last (they win)."""
    from benchmarks import shakespeare

    clock, run_dir = FakeClock(), str(tmp_path)
    with open(tmp_path / "env.json", "w") as f:
        json.dump({"device_kind": "cpu", "packages": {"jax": "0"}}, f)
    bursts = ['{"step": 1, "tokens_per_s": 100, "mfu": 0.1}\n{"step": 2, "eval/bits_per_byte": 3.0}\n',
              '{"step": 3, "tokens_per_s": 400, "mfu": 0.4}\n{"step": 4, "eval/bits_per_byte": 2.5}\n{"step": 5, ',
              '"tokens_per_s": 300, "mfu": 0.3}\n{"step": 12, "eval/bits_per_byte": 2.75}\n']

    class Train:
        returncode = 0

        def __init__(self, cmd, cwd):
            assert cmd[-2:] == ["--config.train.progress=false", "--config.train.steps=6"]
            assert f"--config.run_dir={run_dir}" in cmd

        def poll(self):
            with open(tmp_path / "metrics.jsonl", "a") as f:
                f.write(bursts.pop(0))
            return None if bursts else 0

    monkeypatch.setattr(shakespeare.subprocess, "Popen", Train)
    monkeypatch.setattr(shakespeare, "time", clock)
    row = shakespeare.measure(100.0, ["--config.train.steps=6"], run_dir, poll_s=100.0)
    assert row["evals"] == [dict(step=2, wall_s=0.0, bits_per_byte=3.0), dict(step=4, wall_s=100.0, bits_per_byte=2.5),
                            dict(step=12, wall_s=200.0, bits_per_byte=2.75)]
    assert (row["bits_per_byte"], row["bits_per_byte_within_budget"], row["wall_s"]) == (2.75, 2.5, 200.0)
    assert row["steps"] == 12  # the last row's step, not the count of rows (6)
    assert (row["kiln_tokens_per_s"], row["mfu"], row["device"]) == (300.0, 0.3, "cpu")


def test_memory_figures_from_the_compilers_analysis(monkeypatch, capsys):
    """A stand-in compiled step's analysis: per device = arguments + outputs + temporaries - donated
    bytes (the outputs reuse those), in GiB and MiB; a figure exactly at --limit_gib fits."""
    import jax

    from benchmarks import memory

    gib = 2 ** 30
    analysis = types.SimpleNamespace(argument_size_in_bytes=3 * gib, output_size_in_bytes=2 * gib,
                                     temp_size_in_bytes=6 * gib, alias_size_in_bytes=1 * gib)
    compiled = types.SimpleNamespace(memory_analysis=lambda: analysis)
    step = types.SimpleNamespace(lower=lambda *args: types.SimpleNamespace(compile=lambda: compiled))
    monkeypatch.setattr(jax, "jit", lambda f, **kw: step)
    row = memory.measure("tiny", batch=8, seq=64, fsdp=1, tensor=1, dtype="float32", remat="none", logits_chunk=0,
                         attention="einsum")
    assert (row["argument_gib"], row["output_gib"], row["temp_gib"], row["alias_gib"]) == (3.0, 2.0, 6.0, 1.0)
    assert row["per_device_gib"] == 10.0 and row["peak_memory_mb"] == 10 * 1024 and row["devices"] == 1
    monkeypatch.setattr(memory, "measure", lambda *a: dict(row))
    assert memory.main(["--fsdp=1", "--limit_gib=10"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["fits"] and out["limit_gib"] == 10.0
    assert memory.main(["--fsdp=1", "--limit_gib=9.5"]) == 0
    assert not json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fits"]


def test_gpu_check_reports_a_failed_size_and_goes_on(monkeypatch, capsys):
    """Each train-step size runs (10 steps, the preset's tied embeddings); one that fails is a row
    with its error, and the sizes after it still run."""
    from benchmarks import gpu_check

    calls = []

    def measure(preset, batch, seq, dtype, *, steps, remat, untied):
        calls.append((preset, batch, seq, dtype, steps, remat, untied))
        if preset == "small" and dtype == "float32":
            raise RuntimeError("out of memory")
        return dict(preset=preset, tokens_per_s=1000.0, tflops_per_s=1.0, mfu=0.5, compile_s=2.0)

    monkeypatch.setattr(gpu_check, "precision_check", lambda: {"bf16_rel_err": 0.01,
                                                                "bf16_decode_vs_forward_rel_err": 0.02})
    monkeypatch.setattr(gpu_check, "measure", measure)
    assert gpu_check.main([]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls == [("small", 32, 1024, "bfloat16", 10, "none", False), ("small", 8, 256, "float32", 10, "none", False),
                     ("llama3.2_1b", 8, 2048, "bfloat16", 10, "full", False)]
    assert figures["bf16_rel_err"] == 0.01 and [r["preset"] for r in figures["train_step"]] == [
        "small", "small", "llama3.2_1b"]
    assert figures["train_step"][1] == {"preset": "small", "batch": 8, "seq": 256, "dtype": "float32",
                                        "error": "RuntimeError('out of memory')"}
    assert gpu_check.main(["--help"]) == 0 and gpu_check.main(["--steps=3"]) == 2


def test_data_throughput_rows_and_their_json_keys(monkeypatch, capsys):
    """Six rows, each pipeline with the byte tokenizer and a BPE trained on its source: the config
    each row measures and the JSON key its rounded tokens/s goes under."""
    from benchmarks import data_throughput

    seen = []

    def measure(data_cfg, kind, tok, batches):
        seen.append((kind, data_cfg.sources.train.path.rsplit("/", 1)[1], data_cfg.seq_len, data_cfg.batch_size,
                     data_cfg.text_separator, data_cfg.tokenizer, tok, batches))
        return {"tokens_per_s": 1000.4 * len(seen), "setup_s": 0.5, "padding": 0.25}

    monkeypatch.setenv("KILN_DATA_DIR", "/data")
    monkeypatch.setattr(data_throughput, "measure", measure)
    monkeypatch.setattr(data_throughput.tokenizers, "load", lambda name: name)
    monkeypatch.setattr(data_throughput.tokenizers, "resolve", lambda data_cfg, scratch: "bpe")
    assert data_throughput.main(["--batches=3"]) == 0
    assert seen == [(kind, path, seq, 16, sep, tokenizer, tok, 3)
                    for kind, path, seq, sep in (("pretrain", "tinyshakespeare.txt", 256, ""),
                                                 ("pretrain", "tinyshakespeare.txt", 256, "\n\n"),
                                                 ("sft", "train.jsonl", 1024, ""))
                    for tokenizer, tok in (("auto", "byte"), ("train", "bpe"))]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "pretrain_tinyshakespeare_byte_tokens_per_s": 1000, "pretrain_tinyshakespeare_bpe2048_tokens_per_s": 2001,
        "pretrain_tinyshakespeare_paragraphs_byte_tokens_per_s": 3001,
        "pretrain_tinyshakespeare_paragraphs_bpe2048_tokens_per_s": 4002,
        "sft_gsm8k_byte_tokens_per_s": 5002, "sft_gsm8k_bpe2048_tokens_per_s": 6002}
