"""`kiln eval --checkpoint=RUN_OR_HF_DIR --config=configs/eval.py[:variant] [--config.KEY=VALUE ...]`

Evaluates one checkpoint (a Kiln run, checkpoints or step directory, or a Hugging Face directory):
bits per byte and perplexity on `data.eval_sources`, and exact-match accuracy on every task of
`eval.tasks` for each number of shots and with and without a chain of thought (with chat prompts the
two 0-shot settings are the same prompt, the question alone: computed once, reported under both). Writes
`results.json` and `results.md` into the config's `run_dir` (each through a temporary file; an earlier
evaluation of another checkpoint there is moved to `superseded/`) and prints the table.

Tokenizer and chat template come from the checkpoint's run (or the Hugging Face directory), as for
`kiln sample`; `--tokenizer`, `--chat_template` and `--chat` / `--no-chat` override them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
from flax import nnx

from data import loader
from launch.config import ConfigError, load_config
from model.sharding import make_mesh, use_rules
from train import distributed, evaluate, generate, records, rundir, tasks


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Kiln run / checkpoints / step directory, or a Hugging Face directory")
    p.add_argument("--config", default="configs/eval.py", help="evaluation config FILE.py[:variant]")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the checkpoint's)")
    p.add_argument("--chat_template", default=None, help="chat template (default: the checkpoint's)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="prompt with the chat template (default: for runs that trained on conversations)")
    return p


def main(argv: list[str]) -> int:
    known = [a for a in argv if not a.startswith("--config.")]
    args = parser().parse_args(known)
    distributed.initialize()  # a no-op unless the environment describes a multi-process run
    config = load_config(args.config, [a for a in argv if a.startswith("--config.")])
    if config.stage != "eval":  # a training config evaluated its run_dir's tasks into that run, in silence
        raise ConfigError(f"--config={args.config} is a config of stage {config.stage!r}; kiln eval reads an "
                          "evaluation config, such as configs/eval.py")
    distributed.check_same("config and arguments", config.to_json(sort_keys=True) + " ".join(known))
    results = run(config, args.checkpoint, tokenizer=args.tokenizer, chat_template=args.chat_template, chat=args.chat)
    print(markdown(results))
    return 0


def run(config: Any, checkpoint_path: str, *, tokenizer: str | None = None, chat_template: str | None = None,
        chat: bool | None = None) -> dict[str, Any]:
    """Evaluates `checkpoint_path` as `config` says; returns (and writes) the results."""
    if jax.process_index() == 0:  # a run_dir that cannot be written fails now, not after the evaluation
        rundir.check_run_dir(config.run_dir)
        earlier = _earlier_checkpoint(config.run_dir)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, dcn_data=config.mesh.dcn_data,
                     dcn_fsdp=config.mesh.dcn_fsdp)
    started = time.perf_counter()
    with jax.set_mesh(mesh), use_rules(config.mesh.rules):
        sampler, use_chat = generate.load_sampler(checkpoint_path, tokenizer=tokenizer, chat_template=chat_template,
                                                  chat=chat, mesh=mesh, rules=config.mesh.rules)
        runs = _task_runs(config, sampler, use_chat)  # every prompt checked before anything is computed
        graphdef, params, rest = nnx.split(sampler.model, nnx.Param, ...)
        step = jax.jit(evaluate.make_eval_step(graphdef))
        text = evaluate.evaluate_sources(config, "pretrain", sampler.tokenizer,
                                         lambda batch: step(params, rest, loader.global_batch(batch, mesh)))
        rows, done = [], {}
        for name, k, cot, evaluated, shots in runs:
            # A 0-shot chat prompt is the question alone, with or without a chain of thought: the two
            # settings are one computation, run once and reported under both.
            key = (name, k, cot or (use_chat and k == 0))
            t0 = time.perf_counter()
            if key not in done:
                done[key] = tasks.accuracy(sampler, evaluated, shots, cot=cot, chat=use_chat,
                                           max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size)
            rows.append(dict(task=name, shots=k, chain_of_thought=cot, seconds=time.perf_counter() - t0, **done[key]))
    results = {"checkpoint": os.path.abspath(checkpoint_path), "chat": use_chat, "metrics": text, "tasks": rows,
               "seconds": time.perf_counter() - started}
    if jax.process_index() == 0:
        rundir.make_run_dir(config.run_dir)
        if earlier not in (None, results["checkpoint"]):
            dest = rundir.set_aside(config.run_dir, ["results.json", "results.md"])
            print(f"note: moved the evaluation of {earlier} to {dest}", file=sys.stderr)
        # The table first: results.json, which pipelines read as the finished evaluation, is written last.
        records.write_text_atomic(os.path.join(config.run_dir, "results.md"), markdown(results) + "\n")
        records.write_text_atomic(os.path.join(config.run_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    return results


def _earlier_checkpoint(run_dir: str) -> str | None:
    """The checkpoint evaluated into `run_dir` before (None if none; its results are set aside when another
    is evaluated there); ValueError when its results.json is another command's, which writing would replace."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            earlier = json.load(f)
    except ValueError:
        earlier = None
    if not isinstance(earlier, dict) or not {"checkpoint", "tasks"} <= set(earlier):
        raise ValueError(f"{path} is not an evaluation's results (rejection sampling's, or damaged): kiln eval would "
                         "replace it; choose another --config.run_dir")
    return earlier["checkpoint"]


def _task_runs(config: Any, sampler: generate.Sampler, chat: bool) -> list[tuple[str, int, bool, list, list]]:
    """(task, shots, chain of thought, problems, examples) for every combination the config asks for;
    ValueError when a prompt and `eval.max_new_tokens` would not fit the model's context."""
    runs, max_len = [], sampler.model.cfg.max_seq_len
    for name, task in config.eval.tasks.items():
        evaluated = tasks.items(f"eval.tasks.{name}.eval", task.eval, config.data, config.eval.num_problems)
        pool = tasks.items(f"eval.tasks.{name}.shots", task.shots, config.data)
        _check_answers(f"eval.tasks.{name}.eval", evaluated)
        if max(config.eval.shots) > 0:
            _check_answers(f"eval.tasks.{name}.shots", pool)
        for k in config.eval.shots:
            shots = tasks.choose_shots(pool, k, evaluated, seed=config.eval.shot_seed)
            for cot in config.eval.chain_of_thought:
                longest = tasks.longest_prompt(sampler, evaluated, shots, cot=cot, chat=chat)
                if longest + config.eval.max_new_tokens > max_len:
                    raise ValueError(
                        f"eval.tasks.{name}: the longest {k}-shot prompt {'with' if cot else 'without'} chain of thought "
                        f"is {longest} tokens, and with eval.max_new_tokens={config.eval.max_new_tokens} it exceeds the "
                        f"model's max_seq_len={max_len}; lower eval.max_new_tokens or eval.shots")
                runs.append((name, k, cot, evaluated, shots))
    return runs


def _check_answers(where: str, problems: list[tasks.Item]) -> None:
    """ValueError naming the first problem whose solution has no final answer: it could never be scored
    correct (nor show a few-shot answer), and its task's accuracy would be 0 in silence."""
    for i, problem in enumerate(problems):
        if not problem.answer:
            raise ValueError(f"{where}: problem {i + 1} has no answer to score: its solution "
                             f"{problem.solution[:60]!r} lacks a final '#### ANSWER' line (a task's records are a "
                             "question and its worked solution: prompt and completion, or one user and one assistant "
                             "message)")


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown: the text metrics, then one row per (task, shots, chain of thought)."""
    lines = [f"Evaluation of `{results['checkpoint']}` ({'chat' if results['chat'] else 'plain-text'} prompts)", ""]
    if results["metrics"]:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in results["metrics"].items()]
        lines.append("")
    if results["tasks"]:
        lines += ["| task | shots | chain of thought | accuracy | correct / n | seconds |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {r['shots']} | {'yes' if r['chain_of_thought'] else 'no'} | {r['accuracy']:.3f} | "
                  f"{r['correct']} / {r['n']} | {r['seconds']:.1f} |" for r in results["tasks"]]
    return "\n".join(lines)
