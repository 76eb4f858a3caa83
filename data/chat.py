"""Chat templates: a conversation renders to token ids plus a loss mask over its assistant turns.

Formats: `kiln` (the byte tokenizer's and Kiln-trained tokenizers' control tokens), `llama3`,
`chatml` (Qwen2) and `gemma`. Special tokens are inserted as ids, never by tokenizing their text,
and each text piece (role header, message content) is encoded on its own, so a token never
straddles the boundary between a trained and an untrained span.

What is trained: the content of assistant turns and the turn's end token. Headers (the
generation prompt) never are; `mask_special_tokens=True` also leaves out the end token, as
Llama 3's DPO recipe does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from data.tokenizer_base import Tokenizer

ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A conversation that does not fit the chat format."""


class Special(str):
    """A special token, inserted by id."""


BOS = Special("")  # the tokenizer's BOS, whatever it is called (nothing if it has none)


@dataclasses.dataclass(frozen=True)
class Format:
    """How a template spells a conversation."""
    start: tuple[str, ...]                     # parts before the first turn
    header: Callable[[str], tuple[str, ...]]   # role -> parts opening its turn
    end: Special                               # the token that ends a turn
    after_end: str = ""                        # text after the end token
    trim: bool = False                         # strip message content (as the template does)
    system_role: bool = True                   # False: a system message joins the first user turn


FORMATS: dict[str, Format] = {
    "kiln": Format(start=(BOS,), header=lambda role: (Special(f"<|{role}|>"),), end=Special("<|end|>")),
    "llama3": Format(start=(Special("<|begin_of_text|>"),), trim=True, end=Special("<|eot_id|>"),
                     header=lambda role: (Special("<|start_header_id|>"), role, Special("<|end_header_id|>"), "\n\n")),
    "chatml": Format(start=(), header=lambda role: (Special("<|im_start|>"), f"{role}\n"),
                     end=Special("<|im_end|>"), after_end="\n"),
    "gemma": Format(start=(BOS,), trim=True, system_role=False, end=Special("<end_of_turn>"), after_end="\n",
                    header=lambda role: (Special("<start_of_turn>"), f"{'model' if role == 'assistant' else role}\n")),
}


def missing_token(template: str, tokenizer: Tokenizer) -> str | None:
    """The first control token of chat template `template` that `tokenizer` lacks (None: it has them all)."""
    fmt = FORMATS[template]
    parts = (*fmt.start, fmt.end, *(part for role in ROLES for part in fmt.header(role)))
    return next((p for p in parts if isinstance(p, Special) and p is not BOS and tokenizer.token_id(p) is None), None)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """`messages` as a list of {role, content} dicts; ChatError saying what is wrong otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatError(f"message {i} must be an object with string fields 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ChatError(f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if m["role"] == "system" and i != 0:
            raise ChatError(f"message {i}: a system message may only come first")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(messages: Sequence[dict[str, str]], tokenizer: Tokenizer, template: str = "kiln", *,
           mask_special_tokens: bool = False, add_generation_prompt: bool = False,
           last_turn_only: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation; mask[i] = 1 where token i is trained.

    `add_generation_prompt` appends the assistant header (for sampling). `last_turn_only` trains
    only the final assistant message (preference pairs: the earlier turns are the shared prompt).
    """
    if template not in FORMATS:
        raise ChatError(f"unknown chat template {template!r}; expected one of {', '.join(FORMATS)}")
    fmt = FORMATS[template]
    messages = check_messages(list(messages))
    if last_turn_only and messages[-1]["role"] != "assistant":
        raise ChatError("the conversation must end with an assistant message")
    merge_system = not fmt.system_role and messages[0]["role"] == "system"
    if merge_system and (len(messages) < 2 or messages[1]["role"] != "user"):
        raise ChatError(f"template {template!r} has no system role: the system message must precede a user turn")
    if fmt.trim:  # each message trimmed on its own, as the HF templates do (a system text to merge is kept as is)
        messages = [m if merge_system and i == 0 else dict(m, content=m["content"].strip()) for i, m in enumerate(messages)]
    if merge_system:  # Gemma 3's rule: the system text, a blank line, then the first user turn
        merged = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
        messages = [merged] + messages[2:]
    ids: list[int] = []
    mask: list[int] = []

    def add(parts: Sequence[str], trained: int) -> None:
        for part in parts:
            if part is BOS:
                new = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
            elif isinstance(part, Special):
                new = [tokenizer.special_id(part)]
            else:
                new = tokenizer.encode_text(part)
            ids.extend(new)
            mask.extend([trained] * len(new))

    add(fmt.start, 0)
    for i, m in enumerate(messages):
        trained = int(m["role"] == "assistant" and (not last_turn_only or i == len(messages) - 1))
        add(fmt.header(m["role"]), 0)
        add([m["content"]], trained)
        add([fmt.end], int(trained and not mask_special_tokens))
        add([fmt.after_end], 0)
    if add_generation_prompt:
        add(fmt.header("assistant"), 0)
    return ids, mask
