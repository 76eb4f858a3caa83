"""Rejection sampling (Llama 2 / 3 post-training): K samples per prompt from the current policy, each
scored by a verifier or a reward model; the best of each prompt becomes an SFT example.

`run(config)` reads the prompts of `data.sources` (kind "prompts": a chat and a reference answer),
samples `rollout.num_samples` replies per prompt from `model.init_from` with the rollout's
temperature / top-k / top-p, scores them (`rollout.reward`: "verifier" checks the final `#### N`
answer against the reference, 1 or 0; a Kiln reward-model run scores prompt and reply together),
and writes into `run_dir`, each file whole or not at all:
  sft.jsonl      the best reply of every prompt whose best score reaches `rollout.min_reward`, as
                 {"messages": [..., {"role": "assistant", ...}], "score", "provenance"}: what
                 configs/sft.py trains on (a jsonl source);
  pairs.jsonl    best against worst reply where their scores differ: {"prompt", "chosen", "rejected",
                 "chosen_score", "rejected_score", "provenance"}, preference pairs for DPO;
  results.json   mean and best-of-K reward, the fraction of prompts kept, with a verifier pass@1
                 (the chance one sample is right) and pass@K (a prompt has a right sample), and the
                 settings that produced them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import numpy as np

from data.sources import expand_path
from train import distributed, generate, records, rewards
from train.build import init_source
from train.reference import model_at, reference_model

OUTPUTS = ("sft.jsonl", "pairs.jsonl", "results.json")


def run(config: Any) -> dict[str, Any]:
    """Samples, scores and writes as the module docstring says; returns the results. A run directory
    that already holds all the outputs of these settings is left as it is (its results are returned)."""
    outputs = {os.path.realpath(os.path.join(config.run_dir, name)): name for name in OUTPUTS}
    for name, src in config.data.sources.items():
        read = src.path and os.path.realpath(expand_path(src.path, f"data.sources.{name}.path"))
        if read in outputs:  # replaced by this run's outputs once sampled (or taken for them)
            raise ValueError(f"data.sources.{name}.path={src.path} is the {outputs[read]} this run writes into "
                             f"run_dir={config.run_dir}; choose another run_dir")
    done = os.path.join(config.run_dir, "results.json")
    if all(os.path.isfile(os.path.join(config.run_dir, name)) for name in OUTPUTS):
        return check_settings(config)
    ro = config.rollout
    if not config.model.init_from:
        raise ValueError("rejection sampling needs a policy to sample from: set model.init_from (a run or HF directory)")
    policy = init_source(config)
    prompts = rewards.prompts(config, config.rollout.num_prompts)
    # "auto": the policy's own tokenizer, which load_sampler reads from the run it belongs to.
    tokenizer = None if config.data.tokenizer == "auto" else config.data.tokenizer
    sampler, _ = generate.load_sampler(policy, tokenizer=tokenizer, chat=True)
    score = rewards.scorer(ro.reward)
    started = time.perf_counter()
    scores = np.zeros((len(prompts), ro.num_samples), np.float32)
    replies: list[list[str]] = [[] for _ in prompts]
    step = max(1, config.data.batch_size)
    # Several processes: each holds the whole policy on its own device, samples its share of the chunks,
    # then every process gets them all.
    mine = []
    for lo in range(0, len(prompts), step)[jax.process_index()::jax.process_count()]:
        chunk = prompts[lo:lo + step]
        outs = sampler.complete([p["prompt"] for p in chunk], max_new_tokens=ro.max_new_tokens,
                                temperature=ro.temperature, top_k=ro.top_k, top_p=ro.top_p,
                                seed=jax.random.fold_in(jax.random.key(config.seed), lo), num_samples=ro.num_samples)
        texts = [o["text"] for o in outs]
        chats = [chunk[o["prompt_index"]]["prompt"] for o in outs]
        answers = [chunk[o["prompt_index"]]["answer"] for o in outs]
        mine.append([lo, texts, score(chats, texts, answers).tolist()])
    for lo, texts, chunk_scores in (part for parts in distributed.gather_json(mine) for part in parts):
        n = len(texts) // ro.num_samples
        scores[lo:lo + n] = np.asarray(chunk_scores, np.float32).reshape(n, ro.num_samples)
        replies[lo:lo + n] = [texts[i * ro.num_samples:(i + 1) * ro.num_samples] for i in range(n)]
    sft, pairs = _select(prompts, replies, scores, ro.min_reward, policy)
    results = dict(_metrics(scores, len(sft), ro.reward == "verifier"), policy=policy, prompts=len(prompts),
                   num_samples=int(ro.num_samples), reward=ro.reward, temperature=float(ro.temperature),
                   seconds=time.perf_counter() - started, sft_examples=len(sft), pairs=len(pairs),
                   settings=settings(config))
    if jax.process_index() > 0:
        return results
    os.makedirs(config.run_dir, exist_ok=True)
    for name, rows in (("sft.jsonl", sft), ("pairs.jsonl", pairs)):
        records.write_text_atomic(os.path.join(config.run_dir, name), "".join(json.dumps(r) + "\n" for r in rows))
    records.write_json_atomic(done, results)  # last: its presence says the run finished
    return results


def settings(config: Any) -> dict[str, Any]:
    """The settings that choose a run's outputs, by config key (values as JSON holds them): the policy (a
    Kiln run as its checkpoint directory and step: a policy that trained on since samples otherwise), the
    prompts (a file's path and the SHA-256 of its bytes: one edited in place holds other prompts), how
    replies are sampled (each chunk of data.batch_size prompts from its own key) and scored, and which are
    kept."""
    path = expand_path(config.model.init_from, "model.init_from")
    chosen = {"model.init_from": reference_model(config) if os.path.exists(path) else path, "seed": config.seed,
              "data.batch_size": config.data.batch_size}
    for name, src in config.data.sources.items():
        chosen.update({f"data.sources.{name}.{k}": v for k, v in src.items()})
        path = src.path and expand_path(src.path, f"data.sources.{name}.path")
        if path and os.path.isfile(path):  # a prompts file edited in place: the same path, other prompts
            with open(path, "rb") as f:
                chosen[f"data.sources.{name}.sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    chosen.update({f"data.synthetic.{k}": v for k, v in config.data.synthetic.items()})
    chosen.update({f"rollout.{k}": config.rollout[k] for k in ("num_prompts", "num_samples", "max_new_tokens",
                                                                "temperature", "top_k", "top_p", "reward", "min_reward")})
    # A reward-model run with its step, as the policy: trained on since, it scores otherwise.
    reward = expand_path(config.rollout.reward, "rollout.reward")
    if config.rollout.reward != "verifier" and os.path.isdir(reward):
        chosen["rollout.reward"] = model_at(reward)
    return json.loads(json.dumps(chosen))


def check_settings(config: Any) -> dict[str, Any]:
    """The results in `config.run_dir` of an earlier run; ValueError when they were made with other
    settings, which a re-run would otherwise take for its own."""
    with open(os.path.join(config.run_dir, "results.json")) as f:
        results = json.load(f)
    if "settings" not in results:  # written before results.json recorded them: no telling what made them
        raise ValueError(f"{config.run_dir} holds rejection sampling's outputs, but its results.json records no "
                         f"settings, so they cannot be checked against this run's; delete {config.run_dir} (or move "
                         "it aside) to sample again, or choose another run_dir")
    then, now = results["settings"], settings(config)
    for key in sorted(set(then) | set(now)):
        if then.get(key) != now.get(key):
            raise ValueError(f"{config.run_dir} holds the outputs of rejection sampling with {key}="
                             f"{then.get(key, '(unset)')!r}, and this run has {now.get(key, '(unset)')!r}; move "
                             f"{config.run_dir} aside to sample again, or undo the change")
    return results


def _select(prompts: list[dict[str, Any]], replies: list[list[str]], scores: np.ndarray, min_reward: float | None,
            policy: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(SFT records of the kept best replies, best-vs-worst preference pairs). Ties go to the earlier sample. An
    empty best reply is no SFT example (the data layer refuses one: it trains the end-of-turn token alone)."""
    sft, pairs = [], []
    for i, (p, texts, s) in enumerate(zip(prompts, replies, scores)):
        best, worst = int(np.argmax(s)), int(np.argmin(s))
        where = {"policy": policy, "prompt_index": i}
        if texts[best].strip() and (min_reward is None or s[best] >= min_reward):  # no text: no SFT example
            sft.append({"messages": list(p["prompt"]) + [{"role": "assistant", "content": texts[best]}],
                        "score": float(s[best]), "provenance": dict(where, sample_index=best)})
        if s[best] > s[worst]:
            pairs.append({"prompt": list(p["prompt"]), "chosen": texts[best], "rejected": texts[worst],
                          "chosen_score": float(s[best]), "rejected_score": float(s[worst]),
                          "provenance": dict(where, chosen_sample=best, rejected_sample=worst)})
    return sft, pairs


def _metrics(scores: np.ndarray, kept: int, verifier: bool) -> dict[str, float]:
    """Mean and best-of-K score, the fraction kept; with a verifier (scores 0 / 1) also pass@1 and pass@K."""
    out = {"reward_mean": float(scores.mean()), "best_of_k": float(scores.max(axis=1).mean()),
           "kept_fraction": kept / len(scores)}
    if verifier:
        out.update({"pass@1": out["reward_mean"], f"pass@{scores.shape[1]}": float((scores.max(axis=1) >= 1).mean())})
    return out
