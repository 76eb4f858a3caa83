"""`kiln eval`: text metrics and task accuracy for every (shots, chain of thought), written as results.json / .md."""
import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from launch.config import load_config
from launch import eval as kiln_eval
from model import presets
from model.transformer import Transformer
from train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # the default run stays under 15 minutes; .ci/run runs it with the slow tests; a stand-in eval test covers the combinations
def test_eval_writes_every_combination(tmp_path):
    cfg = presets.get("tiny", vocab_size=384, max_seq_len=2048)  # room for 2-shot prompts of bytes
    checkpoint.save_params(str(tmp_path / "ckpt"), 0, Transformer(cfg, rngs=nnx.Rngs(0)), cfg)
    config = load_config(os.path.join(ROOT, "configs/eval.py:smoke"), [
        f"--config.run_dir={tmp_path / 'eval'}", "--config.eval.shots=(0, 2)", "--config.eval.max_new_tokens=8",
        "--config.eval.num_problems=3", "--config.eval.batch_size=2"])
    results = kiln_eval.run(config, str(tmp_path / "ckpt"), tokenizer="byte", chat=False)
    combos = [(r["task"], r["shots"], r["chain_of_thought"], r["n"]) for r in results["tasks"]]
    assert combos == [("arithmetic", k, cot, 3) for k in (0, 2) for cot in (True, False)]
    assert all(r["accuracy"] == 0.0 and len(r["examples"]) == 3 for r in results["tasks"])  # a random model
    assert 7 < results["metrics"]["eval/arithmetic/bits_per_byte"] < 10  # about log2(384) bits per byte: random
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["tasks"] == json.loads(json.dumps(results["tasks"]))
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| arithmetic | 2 | no | 0.000 | 0 / 3 |" in table


@pytest.mark.slow  # the default run stays under 15 minutes; .ci/run runs it with the slow tests
def test_eval_computes_identical_chat_settings_once(tmp_path, monkeypatch):
    cfg = presets.get("tiny", vocab_size=384, max_seq_len=2048)
    checkpoint.save_params(str(tmp_path / "ckpt"), 0, Transformer(cfg, rngs=nnx.Rngs(0)), cfg)
    calls = []
    accuracy = kiln_eval.tasks.accuracy
    monkeypatch.setattr(kiln_eval.tasks, "accuracy", lambda *a, **kw: calls.append((len(a[2]), kw["cot"])) or accuracy(*a, **kw))
    config = load_config(os.path.join(ROOT, "configs/eval.py:smoke"), [
        f"--config.run_dir={tmp_path / 'eval'}", "--config.eval.shots=(0, 1)", "--config.eval.max_new_tokens=4",
        "--config.eval.num_problems=2"])
    results = kiln_eval.run(config, str(tmp_path / "ckpt"), tokenizer="byte", chat_template="kiln", chat=True)
    # 0-shot chat: one computation for both settings; 1-shot: the examples' replies differ, so two.
    assert calls == [(0, True), (1, True), (1, False)]
    rows = {(r["shots"], r["chain_of_thought"]): r for r in results["tasks"]}
    assert len(rows) == 4 and rows[0, True]["examples"] == rows[0, False]["examples"]
    plain = kiln_eval.run(config, str(tmp_path / "ckpt"), tokenizer="byte", chat=False)  # plain text: "#### " differs
    assert len(calls) == 7 and len(plain["tasks"]) == 4


def test_eval_cli_bad_checkpoint_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "launch.main", "eval", f"--checkpoint={tmp_path / 'nope'}",
                           "--config=configs/eval.py:smoke"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "no such directory" in done.stderr


def test_eval_checks_every_prompt_fits_before_computing_anything(tmp_path):
    cfg = presets.get("tiny", vocab_size=384, max_seq_len=512)
    checkpoint.save_params(str(tmp_path / "ckpt"), 0, Transformer(cfg, rngs=nnx.Rngs(0)), cfg)
    # 0-shot prompts fit; 2-shot prompts of bytes with 200 new tokens do not: refused before any metric.
    config = load_config(os.path.join(ROOT, "configs/eval.py:smoke"), [
        f"--config.run_dir={tmp_path / 'eval'}", "--config.eval.shots=(0, 2)", "--config.eval.max_new_tokens=200"])
    with pytest.raises(ValueError, match=r"eval.tasks.arithmetic: the longest 2-shot prompt with chain of thought is "
                                         r"\d+ tokens, .*max_new_tokens=200.*max_seq_len=512; lower"):
        kiln_eval.run(config, str(tmp_path / "ckpt"), tokenizer="byte", chat=False)
    assert not (tmp_path / "eval").exists()


def test_eval_runs_each_distinct_setting_once_and_tabulates_it(tmp_path, monkeypatch):
    """Stand-ins for the sampler, the text metrics and the task accuracy, on a clock the accuracy
    advances: with chat prompts the two 0-shot settings are one computation reported under both,
    1-shot runs with and without a chain of thought, plain text runs all four; results.md holds
    each row's accuracy, correct / n and seconds as computed here."""
    import types

    now, calls = [0.0], []

    def accuracy(sampler, evaluated, shots, *, cot, chat, max_new_tokens, batch_size):
        calls.append((len(shots), cot))
        now[0] += 1.5
        return {"accuracy": len(shots) / 4 + cot / 8, "correct": 2 * len(shots) + cot, "n": 8, "examples": []}

    problems, shot = ["q"] * 8, ["example"]
    runs = [("arithmetic", k, cot, problems, shot * k) for k in (0, 1) for cot in (True, False)]
    sampler = types.SimpleNamespace(model=None, tokenizer=None)
    monkeypatch.setattr(kiln_eval.generate, "load_sampler", lambda path, **kw: (sampler, kw["chat"]))
    monkeypatch.setattr(kiln_eval, "_task_runs", lambda config, s, chat: runs)
    monkeypatch.setattr(kiln_eval.nnx, "split", lambda model, *filters: (None, None, None))
    monkeypatch.setattr(kiln_eval.evaluate, "make_eval_step", lambda graphdef: lambda *a: None)
    monkeypatch.setattr(kiln_eval.evaluate, "evaluate_sources", lambda *a: {"eval/arithmetic/bits_per_byte": 2.5})
    monkeypatch.setattr(kiln_eval.tasks, "accuracy", accuracy)
    monkeypatch.setattr(kiln_eval.time, "perf_counter", lambda: now[0])
    config = load_config(os.path.join(ROOT, "configs/eval.py:smoke"), [f"--config.run_dir={tmp_path / 'eval'}"])
    results = kiln_eval.run(config, str(tmp_path / "ckpt"), chat=True)
    assert calls == [(0, True), (1, True), (1, False)]
    assert [(r["shots"], r["chain_of_thought"], r["accuracy"], r["seconds"]) for r in results["tasks"]] == [
        (0, True, 0.125, 1.5), (0, False, 0.125, 0.0), (1, True, 0.375, 1.5), (1, False, 0.25, 1.5)]
    assert results["seconds"] == 4.5 and results["checkpoint"] == str(tmp_path / "ckpt")
    assert (tmp_path / "eval" / "results.md").read_text() == "\n".join([
        f"Evaluation of `{tmp_path / 'ckpt'}` (chat prompts)", "",
        "| metric | value |", "|---|---|", "| eval/arithmetic/bits_per_byte | 2.5000 |", "",
        "| task | shots | chain of thought | accuracy | correct / n | seconds |", "|---|---|---|---|---|---|",
        "| arithmetic | 0 | yes | 0.125 | 1 / 8 | 1.5 |", "| arithmetic | 0 | no | 0.125 | 1 / 8 | 0.0 |",
        "| arithmetic | 1 | yes | 0.375 | 3 / 8 | 1.5 |", "| arithmetic | 1 | no | 0.250 | 2 / 8 | 1.5 |"]) + "\n"
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"] == results["tasks"]
    calls.clear()
    monkeypatch.chdir(tmp_path)
    plain = kiln_eval.run(config, "ckpt", chat=False)
    assert calls == [(0, True), (0, False), (1, True), (1, False)]  # plain text: the 0-shot prompts differ
    assert not plain["chat"] and plain["checkpoint"] == str(tmp_path / "ckpt")  # a relative path made absolute
    assert (tmp_path / "eval" / "results.md").read_text().startswith(f"Evaluation of `{tmp_path / 'ckpt'}` (plain-text")


def test_a_prompt_that_exactly_fills_the_context_fits(tmp_path, monkeypatch):
    """The longest prompt (100 tokens, a stand-in) plus eval.max_new_tokens may reach max_seq_len
    (132) exactly; one token more is refused. The shots are drawn with eval.shot_seed."""
    import types

    problem = kiln_eval.tasks.Item("1+1?", "#### 2", "2")
    monkeypatch.setattr(kiln_eval.tasks, "items", lambda where, spec, data, n=None: [problem])
    monkeypatch.setattr(kiln_eval.tasks, "choose_shots", lambda pool, k, evaluated, seed: pool[:k] * (seed == 7))
    monkeypatch.setattr(kiln_eval.tasks, "longest_prompt", lambda sampler, evaluated, shots, cot, chat: 100)
    sampler = types.SimpleNamespace(model=types.SimpleNamespace(cfg=types.SimpleNamespace(max_seq_len=132)))
    for new_tokens, fits in ((32, True), (33, False)):
        config = load_config(os.path.join(ROOT, "configs/eval.py:smoke"), [
            f"--config.run_dir={tmp_path}", "--config.eval.shots=(0, 1)", f"--config.eval.max_new_tokens={new_tokens}",
            "--config.eval.shot_seed=7"])
        if fits:
            assert [(*run[:3], run[4]) for run in kiln_eval._task_runs(config, sampler, False)] == [
                ("arithmetic", k, cot, [problem] * k) for k in (0, 1) for cot in config.eval.chain_of_thought]
        else:
            with pytest.raises(ValueError, match="is 100 tokens, and with eval.max_new_tokens=33 it exceeds"):
                kiln_eval._task_runs(config, sampler, False)


def test_the_shots_pool_needs_answers_only_where_shots_are_shown(tmp_path, monkeypatch):
    """A few-shot example shows its solution's final '#### N': a shots pool without one is refused, naming
    eval.tasks.NAME.shots, as soon as eval.shots asks for any (0 and 1); at 0 shots alone the pool is never
    shown, and the task runs (stand-ins for the sources and the prompt lengths)."""
    import types

    solved, unsolved = kiln_eval.tasks.Item("1+1?", "#### 2", "2"), kiln_eval.tasks.Item("2+2?", "Four.", "")
    monkeypatch.setattr(kiln_eval.tasks, "items",
                        lambda where, spec, data, n=None: [unsolved if where.endswith(".shots") else solved])
    monkeypatch.setattr(kiln_eval.tasks, "longest_prompt", lambda sampler, evaluated, shots, cot, chat: 10)
    sampler = types.SimpleNamespace(model=types.SimpleNamespace(cfg=types.SimpleNamespace(max_seq_len=132)))
    config = load_config(os.path.join(ROOT, "configs/eval.py:smoke"), [f"--config.run_dir={tmp_path}",
                                                                       "--config.eval.shots=(0,)"])
    assert [run[:4] for run in kiln_eval._task_runs(config, sampler, False)] == [
        ("arithmetic", 0, cot, [solved]) for cot in config.eval.chain_of_thought]
    config = load_config(os.path.join(ROOT, "configs/eval.py:smoke"), [f"--config.run_dir={tmp_path}",
                                                                       "--config.eval.shots=(0, 1)"])
    with pytest.raises(ValueError, match="eval.tasks.arithmetic.shots: problem 1 has no answer to score: its solution "
                                         "'Four.' lacks a final '#### ANSWER' line"):
        kiln_eval._task_runs(config, sampler, False)
