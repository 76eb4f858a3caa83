"""What one JSON object of a record format becomes, by pipeline kind (`data/sources.py` lists the kinds'
records): the views of `jsonl` (and `array_record`), `gsm8k` and `hh_rlhf` objects, and the checks
each record passes. A bad record raises RecordError, to which the reader adds its file and line."""
from __future__ import annotations

import math
import os
import re
from typing import Any, Callable, Iterator

from data import chat, synthetic

REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")  # precomputed for DPO (train/reference.py)
PAIR_FIELDS = REFERENCE_FIELDS + ("margin",)  # optional numbers a JSON Lines pair may carry
FIELDS = dict(text_field="text", prompt_field="prompt", completion_field="completion", messages_field="messages",
              chosen_field="chosen", rejected_field="rejected", answer_field="answer")
_CALCULATOR = re.compile(r"<<[^>]*>>")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_REPLY = "\n\nAssistant:"


class RecordError(Exception):
    """What is wrong with one record; the reader adds where it is."""


def _field(record: dict[str, Any], key: str, types: tuple[type, ...] = (str,)) -> Any:
    if key not in record:
        raise RecordError(f"missing field {key!r} (the record has: {', '.join(map(repr, record)) or 'no fields'})")
    value = record[key]
    if not isinstance(value, types):
        raise RecordError(f"field {key!r} is {type(value).__name__}; expected {' or '.join(t.__name__ for t in types)}")
    return value


def _number(record: dict[str, Any], key: str) -> float:
    value = float(_field(record, key, (int, float)))
    if not math.isfinite(value):  # JSON as Python writes it may hold NaN and Infinity
        raise RecordError(f"field {key!r} is {value}; expected a finite number")
    return value


def _chat(value: Any, key: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    try:
        return chat.check_messages(value)
    except chat.ChatError as e:
        raise RecordError(f"field {key!r}: {e}") from None


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def jsonl(src: Any, kind: str) -> Callable[[dict], dict]:
    """The view of a JSON Lines (or ArrayRecord) object as a `kind` record, under source `src`'s field names."""
    f = {key: src.get(key, default) for key, default in FIELDS.items()}

    def view(r: dict[str, Any]) -> dict[str, Any]:
        if kind == "pretrain":
            return {"text": _field(r, f["text_field"])}
        if kind == "tokenizer":
            return {"text": "\n".join(_strings(r))}
        if kind == "sft":
            if f["messages_field"] in r:
                messages = _chat(r[f["messages_field"]], f["messages_field"])
                if not any(m["role"] == "assistant" for m in messages):
                    raise RecordError(f"field {f['messages_field']!r} has no assistant message: nothing to train on")
                empty = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()]
                if empty:
                    raise RecordError(f"field {f['messages_field']!r}: message {empty[0]} is an empty assistant "
                                      f"reply{_EMPTY}")
                return {"messages": messages}
            prompt = _chat(_field(r, f["prompt_field"], (str, list)), f["prompt_field"])
            return {"messages": prompt + [{"role": "assistant", "content": _reply(r, f["completion_field"])}]}
        prompt = _chat(_field(r, f["prompt_field"], (str, list)), f["prompt_field"])
        if kind == "preference":
            pair = _pair(prompt, _field(r, f["chosen_field"]), _field(r, f["rejected_field"]))
            given = [k for k in REFERENCE_FIELDS if k in r]
            if given and len(given) < len(REFERENCE_FIELDS):
                raise RecordError(f"field {given[0]!r} without {[k for k in REFERENCE_FIELDS if k not in r][0]!r}: "
                                  "precomputed reference log-probs come in pairs")
            return dict(pair, **{k: _number(r, k) for k in PAIR_FIELDS if k in r})
        if not any(m["content"].strip() for m in prompt):
            raise RecordError(f"field {f['prompt_field']!r} is empty: there is nothing to reply to")
        return {"prompt": prompt, "answer": _field(r, f["answer_field"]) if f["answer_field"] else ""}
    return view


# An SFT reply of no text trains the end-of-turn token alone: a model taught to say nothing. A preference pair
# may hold one: saying nothing is a reply to rank (4 of HH-RLHF harmless-base's pairs prefer it to a harmful
# one, and rejection sampling's pairs reject a policy's reply that ends at once).
_EMPTY = ": it would train only the end-of-turn token; give it a reply"


def _reply(record: dict[str, Any], key: str) -> str:
    value = _field(record, key)
    if not value.strip():
        raise RecordError(f"field {key!r} is empty{_EMPTY}")
    return value


def _pair(prompt: list[dict[str, str]], chosen: str, rejected: str) -> dict[str, Any]:
    """A preference record; RecordError for a pair whose replies are the same text (its loss has no gradient)."""
    if chosen == rejected:
        raise RecordError("chosen and rejected are the same reply: the pair prefers nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def gsm8k(src: Any, kind: str) -> Callable[[dict], dict]:
    """The view of a GSM8K {question, answer} object as a `kind` record (calculator calls dropped unless
    `src.calculator_annotations`)."""
    keep_calculator = bool(src.get("calculator_annotations", False))

    def view(r: dict[str, Any]) -> dict[str, Any]:
        question, answer = _field(r, "question"), _field(r, "answer")
        final = synthetic.extract_answer(answer)
        if final is None:
            raise RecordError("the answer has no final '#### N' line")
        # <<48/2=24>> are calculator calls; the model is not given a calculator.
        steps = answer if keep_calculator else _CALCULATOR.sub("", answer)
        user = [{"role": "user", "content": question}]
        return {"pretrain": lambda: {"text": f"{question}\n{steps}"},
                "tokenizer": lambda: {"text": f"{question}\n{steps}"},
                "sft": lambda: {"messages": user + [{"role": "assistant", "content": steps}]},
                "prompts": lambda: {"prompt": user, "answer": final}}[kind]()
    return view


def split_hh(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """An HH-RLHF pair -> (the shared dialogue as chat messages, the chosen reply, the rejected reply).

    The shared prompt ends at the last "\\n\\nAssistant:" that both dialogues have in common (a few
    pairs differ before their last turn marker, so the marker alone is not enough).
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(_HH_REPLY)
    if cut < 0:
        raise RecordError("chosen and rejected share no dialogue before an 'Assistant:' reply")
    parts = _HH_TURN.split(chosen[:cut])
    if parts[0].strip():
        raise RecordError("the dialogue does not start with '\\n\\nHuman:'")
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]
    if not messages:
        raise RecordError("the dialogue has no turn before the final reply")
    start = cut + len(_HH_REPLY)
    return messages, chosen[start:].strip(), rejected[start:].strip()


def hh_rlhf(kind: str) -> Callable[[dict], dict]:
    """The view of an HH-RLHF {chosen, rejected} object as a `kind` record."""
    def view(r: dict[str, Any]) -> dict[str, Any]:
        chosen, rejected = _field(r, "chosen"), _field(r, "rejected")
        if kind in ("pretrain", "tokenizer"):
            return {"text": chosen.strip() if kind == "pretrain" else f"{chosen}\n{rejected}"}
        prompt, good, bad = split_hh(chosen, rejected)
        return {"sft": lambda: {"messages": prompt + [{"role": "assistant", "content": good}]},
                "preference": lambda: _pair(prompt, good, bad),
                "prompts": lambda: {"prompt": prompt, "answer": ""}}[kind]()
    return view
