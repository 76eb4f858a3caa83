"""Exact-match accuracy on verifiable tasks: zero- or k-shot, with or without a chain of thought.

A task is two data sources of question / worked-solution records ending in `#### N` (the built-in
arithmetic problems, GSM8K): one holds the evaluated problems, the other (a separate split) the
few-shot examples, so no evaluated problem is ever shown as an example. The answer is read after
the last `####` and compared numerically (`data.synthetic.verify`).

Prompts follow the form a model was trained on:
- plain text (pre-trained models): each example is "question\\nreply\\n\\n", then "question\\n";
- chat (fine-tuned models): each example is a user turn and an assistant turn, then a user turn.
With a chain of thought the examples' replies are the worked solutions and the model writes its
own; without, they are only "#### N", and a plain-text prompt ends in "#### " so the answer comes
at once.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Sequence

from data import sources, synthetic

DIRECT = "#### "  # what a reply without a chain of thought consists of, before the number


@dataclasses.dataclass(frozen=True)
class Item:
    question: str
    solution: str  # worked steps, then "#### N"
    answer: str  # N


def items(name: str, src: Any, data_cfg: Any, limit: int = 0) -> list[Item]:
    """The problems of source `src` (the first `limit`; 0: all)."""
    out = []
    for i, record in enumerate(sources.load(name, src, data_cfg, "sft").records):
        if record is None:
            continue
        # The question is the first user turn and the solution the last assistant turn (a system
        # message or a longer conversation shifts neither).
        users = [m["content"] for m in record["messages"] if m["role"] == "user"]
        replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        if not users or not replies:
            raise ValueError(f"{name}: record {i} of {src.get('path') or src.format} has no "
                             f"{'user' if not users else 'assistant'} turn; a task record is a question and its "
                             "worked solution")
        out.append(Item(users[0], replies[-1], synthetic.extract_answer(replies[-1]) or ""))
        if limit and len(out) == limit:
            break
    return out


def choose_shots(pool: Sequence[Item], k: int, evaluated: Sequence[Item], seed: int = 0) -> list[Item]:
    """k examples drawn from `pool` with `seed`; ValueError if one of them is an evaluated problem."""
    if k > len(pool):
        raise ValueError(f"eval.shots asks for {k}-shot prompts, which need {k} examples, but the shots source has "
                         f"{len(pool)}")
    shots = random.Random(seed).sample(list(pool), k)
    leaked = {s.question for s in shots} & {e.question for e in evaluated}
    if leaked:
        raise ValueError(f"a few-shot example is also an evaluated problem ({next(iter(leaked))[:60]}...); "
                         "take the shots from another split")
    return shots


def reply(item: Item, cot: bool) -> str:
    return item.solution if cot else f"{DIRECT}{item.answer}"


def prompt(item: Item, shots: Sequence[Item], *, cot: bool, chat: bool) -> str | list[dict[str, str]]:
    """The prompt for `item` after `shots` (text, or chat messages ending in a user turn)."""
    if chat:
        messages: list[dict[str, str]] = []
        for s in shots:
            messages += [{"role": "user", "content": s.question}, {"role": "assistant", "content": reply(s, cot)}]
        return messages + [{"role": "user", "content": item.question}]
    examples = "".join(f"{s.question}\n{reply(s, cot)}\n\n" for s in shots)
    return f"{examples}{item.question}\n{'' if cot else DIRECT}"


def score(completion: str, item: Item, *, cot: bool, chat: bool) -> bool:
    """Whether the completion's final answer is right (a direct plain-text answer follows the prompt's '#### ')."""
    return synthetic.verify(completion if cot or chat else DIRECT + completion, item.answer)


def longest_prompt(sampler: Any, evaluated: Sequence[Item], shots: Sequence[Item], *, cot: bool, chat: bool) -> int:
    """Tokens in the longest prompt that `accuracy` gives the sampler for these problems and shots."""
    return max((len(sampler.encode(prompt(it, shots, cot=cot, chat=chat), chat)) for it in evaluated), default=0)


def accuracy(sampler: Any, evaluated: Sequence[Item], shots: Sequence[Item], *, cot: bool, chat: bool,
             max_new_tokens: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Greedy exact-match accuracy of `sampler` (a `train.generate.Sampler`) on `evaluated`, and a few
    examples of what it wrote."""
    # Plain text: an example ends at a blank line (a direct answer at its line's end).
    stop = () if chat else (("\n\n",) if cot else ("\n",))
    correct, examples = 0, []
    for lo in range(0, len(evaluated), batch_size):
        chunk = evaluated[lo:lo + batch_size]
        outs = sampler.complete([prompt(it, shots, cot=cot, chat=chat) for it in chunk], stop=stop,
                                max_new_tokens=max_new_tokens, temperature=0.0, seed=seed, chat=chat)
        for it, out in zip(chunk, outs):
            ok = score(out["text"], it, cot=cot, chat=chat)
            correct += ok
            if len(examples) < 3:
                examples.append({"question": it.question, "completion": out["text"], "answer": it.answer, "correct": ok})
    return {"accuracy": correct / max(len(evaluated), 1), "correct": correct, "n": len(evaluated), "examples": examples}
