"""A built-in task that needs no files: arithmetic word problems with worked solutions and a verifier.

`problem(index, seed=...)` is a pure function of (seed, index): the same problem on every machine
and every run. Difficulty knobs: `max_digits` (operand size) and `min_ops` .. `max_ops` (number of steps).
Solutions end GSM8K-style in a `#### N` line, so `extract_answer` and `verify` serve GSM8K too.
Each problem also carries a wrong solution (one arithmetic slip, carried through) for preference pairs.
"""
from __future__ import annotations

import dataclasses
import random
import re

NAMES = ("Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena",
         "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq")
ITEMS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "cookies", "stamps", "shells", "cards")
# A number at the start of an answer (GSM8K's own "#### (-?[0-9.,]+)"), `$` allowed before it.
_NUMBER = re.compile(r"\$?\s*(-?\$?(?:[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+))")


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    solution: str        # worked steps, then "#### N"
    answer: str          # N
    wrong_solution: str  # the same steps with one slip; its final answer differs from N


@dataclasses.dataclass(frozen=True)
class _Op:
    kind: str     # add | sub | mul | div
    operand: int
    other: str    # the friend in a "sub" step


def problem(index: int, *, seed: int = 0, max_digits: int = 2, max_ops: int = 2, min_ops: int = 1) -> Problem:
    """Problem number `index` of the family `seed`: a start value and min_ops..max_ops operations."""
    if max_digits < 1 or not 1 <= min_ops <= max_ops:
        raise ValueError(f"synthetic task needs max_digits >= 1 and 1 <= min_ops <= max_ops, got max_digits={max_digits}, "
                         f"min_ops={min_ops}, max_ops={max_ops}")
    # A string seed goes through SHA-512: stable across Python versions and platforms.
    rng = random.Random(f"kiln-arithmetic:{seed}:{index}")
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    hi = 10 ** max_digits - 1
    start = rng.randint(2, hi)
    ops, value = [], start
    for _ in range(rng.randint(min_ops, max_ops)):
        divisors = [d for d in range(2, 10) if value % d == 0]
        kinds = ["add", "mul"] + (["sub"] if value > 1 else []) + (["div"] if divisors else [])
        kind = rng.choice(kinds)
        operand = {"add": lambda: rng.randint(1, hi), "sub": lambda: rng.randint(1, min(value - 1, hi)),
                   "mul": lambda: rng.randint(2, 9), "div": lambda: rng.choice(divisors)}[kind]()
        ops.append(_Op(kind, operand, rng.choice([n for n in NAMES if n != name])))
        value = _apply(kind, value, operand)
    question = " ".join([f"{name} has {start} {item}."] + [_sentence(op, name, item) for op in ops]
                        + [f"How many {item} does {name} have now?"])
    solution, answer = _solve(name, item, start, ops)
    # The slip goes at or after the last division, so every later step stays exact and the
    # error reaches the final answer.
    last_div = max((i for i, op in enumerate(ops) if op.kind == "div"), default=0)
    slip_at = rng.randint(last_div, len(ops) - 1)
    slip = rng.choice([d for d in range(-9, 10) if d != 0])
    wrong, _ = _solve(name, item, start, ops, slip_at=slip_at, slip=slip)
    return Problem(question=question, solution=solution, answer=str(answer), wrong_solution=wrong)


def _apply(kind: str, value: int, operand: int) -> int:
    return {"add": value + operand, "sub": value - operand, "mul": value * operand, "div": value // operand}[kind]


def _sentence(op: _Op, name: str, item: str) -> str:
    return {"add": f"{name} finds {op.operand} more {item}.",
            "sub": f"{name} gives {op.operand} {item} to {op.other}.",
            "mul": f"Then {name} collects until there are {op.operand} times as many {item}.",
            "div": f"Then {name} splits the {item} into {op.operand} equal groups and keeps one group."}[op.kind]


def _solve(name: str, item: str, start: int, ops: list[_Op], slip_at: int = -1, slip: int = 0) -> tuple[str, int]:
    lines, value = [f"{name} starts with {start} {item}."], start
    for i, op in enumerate(ops):
        result = _apply(op.kind, value, op.operand) + (slip if i == slip_at else 0)
        lines.append({"add": f"Finding {op.operand} more gives {value} + {op.operand} = {result}.",
                      "sub": f"Giving {op.operand} away leaves {value} - {op.operand} = {result}.",
                      "mul": f"{op.operand} times as many is {value} * {op.operand} = {result}.",
                      "div": f"One of {op.operand} equal groups is {value} / {op.operand} = {result}."}[op.kind])
        value = result
    lines.append(f"#### {value}")
    return "\n".join(lines), value


def _normalize(answer: str) -> str:
    return answer.strip().replace(",", "").replace("$", "").rstrip(".").strip()


def extract_answer(text: str) -> str | None:
    """The final answer after the last `####` (commas, `$` and a final period removed), or None: the
    number the line starts with, as GSM8K's answers are read ("#### 12 apples" is 12), else the line."""
    if "####" not in text:
        return None
    line = text.rsplit("####", 1)[1].split("\n", 1)[0]
    number = _NUMBER.match(line.strip())
    answer = _normalize(number.group(1) if number else line)
    return answer or None


def verify(completion_text: str, reference_answer: str) -> bool:
    """Whether the completion's `#### N` answer equals the reference (numerically when both are numbers)."""
    got, want = extract_answer(completion_text), _normalize(reference_answer)
    if got is None or not want:
        return False
    try:
        return float(got) == float(want)
    except ValueError:
        return got == want
