"""From records to token examples, per pipeline kind, with the over-length policy.

A next-token example is {"tokens", "targets", "loss_mask"}: arrays of one length where targets[i]
is the token after tokens[i] and loss_mask[i] says whether that target is trained. Each document
is shifted on its own before packing, so no target ever crosses a document boundary.

Every call returns (example or None, status); None means dropped, and the status says why, so
that the drops can be counted (`data preview`) rather than vanish.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from data import chat
from data.tokenizer_base import Tokenizer

OK, TRUNCATED, TOO_LONG, EMPTY_MASK, BAD_RECORD = "ok", "truncated", "too_long", "empty_mask", "bad_record"
SAME_REPLIES = "same_replies"  # a preference pair whose sides are one token sequence (cut before they differ)
STATUSES = (OK, TRUNCATED, TOO_LONG, EMPTY_MASK, SAME_REPLIES, BAD_RECORD)
Example = dict[str, Any]


def shift(ids: list[int] | np.ndarray, mask: list[int] | np.ndarray) -> Example:
    """The next-token example of a token sequence; mask[i] = 1 where token i is trained."""
    ids = np.asarray(ids, np.int32)
    return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": np.asarray(mask, np.float32)[1:]}


def windows(example: Example, length: int) -> list[Example]:
    """`example` cut into consecutive pieces of at most `length` positions (every target kept)."""
    n = len(example["tokens"])
    return [{k: v[i:i + length] for k, v in example.items()} for i in range(0, n, length)]


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Tokenizes records of one kind for sequences of `seq_len` positions."""
    tokenizer: Tokenizer
    seq_len: int
    template: str = "kiln"
    mask_special_tokens: bool = False
    truncate: bool = True

    @classmethod
    def from_config(cls, data_cfg: Any, tokenizer: Tokenizer) -> Encoder:
        return cls(tokenizer, data_cfg.seq_len, data_cfg.chat_template, data_cfg.mask_special_tokens,
                   data_cfg.truncate)

    def __call__(self, kind: str, record: dict[str, Any] | None) -> tuple[Example | None, str]:
        if record is None:  # a bad record skipped by a lazily read source
            return None, BAD_RECORD
        return {"pretrain": self.document, "sft": self.sft, "preference": self.preference,
                "prompts": self.prompt}[kind](record)

    def document(self, record: dict[str, Any]) -> tuple[Example, str]:
        """A pre-training document, BOS + text + EOS, whole: pipelines cut long ones into pieces."""
        ids = self.tokenizer.encode(record["text"], add_bos=True, add_eos=True)
        return shift(ids, np.ones(len(ids))), OK

    def _render(self, messages: list[dict[str, str]], **kw: Any) -> Example:
        ids, mask = chat.render(messages, self.tokenizer, self.template,
                                mask_special_tokens=self.mask_special_tokens, **kw)
        return shift(ids, mask)

    def _fit(self, example: Example) -> tuple[Example | None, str]:
        status = OK
        if len(example["tokens"]) > self.seq_len:
            if not self.truncate:
                return None, TOO_LONG
            example, status = {k: v[:self.seq_len] for k, v in example.items()}, TRUNCATED
        return (example, status) if example["loss_mask"].any() else (None, EMPTY_MASK)

    def sft(self, record: dict[str, Any]) -> tuple[Example | None, str]:
        """A conversation; trained on its assistant turns."""
        return self._fit(self._render(record["messages"]))

    def preference(self, record: dict[str, Any]) -> tuple[Example | None, str]:
        """Chosen and rejected replies after one shared prompt; each trained on its reply only. A pair that
        truncation leaves as one token sequence twice (replies that differ only past seq_len) is dropped."""
        pair, statuses = {}, []
        for side in ("chosen", "rejected"):
            messages = record["prompt"] + [{"role": "assistant", "content": record[side]}]
            example, status = self._fit(self._render(messages, last_turn_only=True))
            if example is None:
                return None, status
            pair.update({f"{side}_{k}": v for k, v in example.items()})
            statuses.append(status)
        if all(np.array_equal(pair[f"chosen_{k}"], pair[f"rejected_{k}"]) for k in ("targets", "loss_mask")):
            return None, SAME_REPLIES  # cut before the replies differ: its loss has no gradient, its accuracy is 0
        # Precomputed reference log-probs (computed on these same encodings) and margins ride along.
        pair.update({k: np.float32(record[k]) for k in ("ref_chosen_logps", "ref_rejected_logps", "margin") if k in record})
        return pair, TRUNCATED if TRUNCATED in statuses else OK

    def prompt(self, record: dict[str, Any]) -> tuple[Example | None, str]:
        """A prompt ending in the assistant header, for sampling; over-long ones keep their end."""
        ids, _ = chat.render(record["prompt"], self.tokenizer, self.template, add_generation_prompt=True)
        status = OK
        if len(ids) > self.seq_len:
            if not self.truncate:
                return None, TOO_LONG
            ids, status = ids[-self.seq_len:], TRUNCATED
        return {"prompt": np.asarray(ids, np.int32), "answer": record["answer"]}, status
