"""What rejection sampling and RL score replies with, and the prompts they sample for.

`rollout.reward` names the scorer:
  verifier             the task's answer check: 1 if the reply's final `#### N` matches the
                       reference answer, else 0 (the built-in arithmetic task, GSM8K);
  a run directory      a Kiln reward model (configs/reward.py) scores prompt and reply together;
  MODULE:FUNCTION      a Python function (a dotted module, or a path to a .py file) called as
                       `fn(prompts, replies, answers) -> scores`, one score per reply.
A scorer takes (chat prompts, reply texts, reference answers) and returns float32 scores [N].
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data import sources, synthetic, tokenizer as tokenizers
from data.chat import render
from train import checkpoint, modeldir

Scorer = Callable[[Sequence[list[dict[str, str]]], Sequence[str], Sequence[str]], np.ndarray]


def prompts(config: Any, limit: int = 0) -> list[dict[str, Any]]:
    """The prompt records ({"prompt": chat, "answer": str}) of the training sources, in order (the
    first `limit`; 0: all)."""
    out = []
    for name, src in config.data.sources.items():
        if not src.weight:
            continue
        recs = sources.load(f"data.sources.{name}", src, config.data, "prompts").records
        out += [recs[i] for i in range(len(recs)) if recs[i] is not None]
    out = out[:limit] if limit else out
    if not out:
        raise ValueError("data.sources: no prompts to sample from")
    return out


def scorer(reward: str) -> Scorer:
    """The scorer `rollout.reward` names (see the module docstring)."""
    if reward == "verifier":
        return lambda chats, replies, answers: np.array([float(synthetic.verify(r, a)) for r, a in zip(replies, answers)],
                                                        np.float32)
    if _is_function(reward):
        return _python_scorer(reward)
    return _reward_model(reward)


def _python_scorer(reward: str) -> Scorer:
    where, _, name = reward.rpartition(":")
    try:
        if where.endswith(".py"):
            spec = importlib.util.spec_from_file_location("_kiln_reward", sources.expand_path(where, "rollout.reward"))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        fn = getattr(module, name)
    except (ImportError, AttributeError, FileNotFoundError) as e:
        raise ValueError(f"rollout.reward={reward!r}: cannot load reward function {name!r} from {where!r} ({e}); "
                         "name MODULE:FUNCTION or path/to/file.py:FUNCTION") from None

    def score(chats, replies, answers):
        try:
            scores = fn(list(chats), list(replies), list(answers))
        except Exception as e:  # the user's code: named, its traceback under `kiln --debug`
            raise ValueError(f"rollout.reward={reward!r} failed on {len(replies)} replies ({type(e).__name__}: {e}); "
                             "run with --debug for its traceback") from e
        try:
            out = np.asarray(scores, np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"rollout.reward={reward!r} returned scores that are not numbers ({e}); it must "
                             "return one number per reply") from None
        if out.shape != (len(replies),):
            raise ValueError(f"rollout.reward={reward!r} returned scores of shape {out.shape} for {len(replies)} "
                             "replies; it must return one number per reply")
        if not np.all(np.isfinite(out)):
            bad = int(np.flatnonzero(~np.isfinite(out))[0])
            raise ValueError(f"rollout.reward={reward!r} returned {out[bad]} for reply {bad} of {len(replies)}; "
                             "scores must be finite (they become advantages)")
        return out

    return score


def check(reward: str) -> None:
    """ValueError for a `rollout.reward` naming a directory that is no Kiln reward-model run (a policy's
    run, a misspelt path), found before any model is loaded; a reward function is checked when loaded."""
    if reward != "verifier" and not _is_function(reward):
        _reward_run(reward)


def _is_function(reward: str) -> bool:
    return ":" in reward and not os.path.isdir(sources.expand_path(reward, "rollout.reward"))


def _reward_run(reward: str) -> tuple[str, dict[str, Any]]:
    """(the directory, the run config) of the reward-model run `reward` names."""
    path = sources.expand_path(reward, "rollout.reward")
    config = modeldir.run_config(path)
    if config is None or config.get("stage") != "reward":
        what = f"a run of stage {config.get('stage')!r}" if config else "no Kiln run"
        raise ValueError(f"rollout.reward={reward!r} is neither 'verifier', a Kiln reward-model run nor "
                         f"MODULE:FUNCTION: it is {what} (a reward model is trained by configs/reward.py)")
    return path, config


def _reward_model(reward: str) -> Scorer:
    path, config = _reward_run(reward)
    model = checkpoint.load_model(path)[1]
    tok = tokenizers.load(sources.expand_path(modeldir.tokenizer_of(path), "the reward model's tokenizer"))
    template = config["data"]["chat_template"]

    @jax.jit
    def rewards(tokens, segments):
        positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
        return model.rewards(tokens, positions, segments)

    def score(chats, replies, answers):
        seqs = [render(list(c) + [{"role": "assistant", "content": r}], tok, template)[0] for c, r in zip(chats, replies)]
        longest = max(map(len, seqs))
        if longest > model.cfg.max_seq_len:
            raise ValueError(f"a prompt and reply of {longest} tokens exceed the reward model's "
                             f"max_seq_len={model.cfg.max_seq_len}; lower rollout.max_new_tokens")
        width = min(-(-longest // 64) * 64, model.cfg.max_seq_len)  # a few widths: a few compiled programs
        tokens = np.full((len(seqs), width), tok.pad_id, np.int32)
        segments = np.zeros((len(seqs), width), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)], segments[i, :len(s)] = s, 1
        return np.asarray(rewards(tokens, segments), np.float32)

    return score  # replies are re-tokenized: the reward model's tokenizer may differ from the policy's
