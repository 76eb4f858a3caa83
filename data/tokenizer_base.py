"""The tokenizer interface, the names of the special tokens, and the built-in byte tokenizer.

Backends (data/spm.py, data/hf_tokenizer.py) subclass `Tokenizer`; data/tokenizer.py picks one.
This module imports nothing else from the data layer, so everything may import it.

Control tokens (every chat template's, and BOS, EOS and padding) are inserted as ids by chat
templates and pipelines and must never come out of user text, whatever a tokenizer file says:
`Tokenizer.encode_text` checks every encoding and breaks up the control strings a text spells.
"""
from __future__ import annotations

import abc
import functools
import re
from typing import Sequence

import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# The Kiln chat template's control tokens (byte tokenizer and tokenizers Kiln trains).
CONTROL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Every chat template's special strings: no tokenizer may produce their tokens from text.
CHAT_SPECIALS = CONTROL_TOKENS + ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                  "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded, lacks a token that is needed, or cannot encode text safely."""


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses set `name`, `vocab_size`, `bos_id` (None: the tokenizer has
    no BOS, as Qwen2's), `eos_id` and `pad_id`, and encode in `_encode`."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Token ids of `text` as the backend makes them; `encode_text` checks them."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; special tokens contribute nothing."""

    @abc.abstractmethod
    def token_id(self, piece: str) -> int | None:
        """The id of the token spelled `piece`, or None."""

    @abc.abstractmethod
    def piece(self, token: int) -> str:
        """How token `token` is spelled in the vocabulary (for previews)."""

    @abc.abstractmethod
    def is_special(self, token: int) -> bool:
        """Whether `token` is a special token (no text of its own)."""

    @abc.abstractmethod
    def _token_bytes(self) -> np.ndarray:
        """See `token_bytes`."""

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`; control tokens are never produced, whatever the text says."""
        ids = self._encode(text)
        reserved, spelled = self._control
        if reserved.isdisjoint(ids):
            return ids
        # The backend made a control token of typed text (e.g. a tokenizer.json that adds <|im_end|>
        # without the special flag, or has it in its vocabulary). Encode again with every control
        # string the text spells cut after its first character: no token can span the cut.
        cuts = [m.start() + 1 for m in spelled.finditer(text)]
        bounds = [0, *cuts, len(text)]
        ids = [i for lo, hi in zip(bounds, bounds[1:]) for i in self._encode(text[lo:hi])]
        leaked = sorted(reserved.intersection(ids))
        if leaked:
            raise TokenizerError(f"tokenizer {self.name} encodes the text {text[:80]!r} to its control token(s) "
                                 f"{', '.join(map(repr, map(self.piece, leaked)))}, so user text could forge them")
        return ids

    @functools.cached_property
    def _control(self) -> tuple[frozenset[int], re.Pattern[str]]:
        """(ids that text must never produce, a pattern matching how they are spelled)."""
        roles = {self.bos_id, self.eos_id, self.pad_id} - {None}
        ids = roles | {t for t in map(self.token_id, CHAT_SPECIALS) if t is not None}
        strings = set(CHAT_SPECIALS) | {self.piece(t) for t in roles}
        # Longest first, so that a control string is never matched by a shorter one inside it.
        return frozenset(ids), re.compile("|".join(map(re.escape, sorted(strings, key=len, reverse=True))))

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally with BOS (when the tokenizer has one) and EOS around it."""
        ids = self.encode_text(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos:
            ids = ids + [self.eos_id]
        return ids

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: the UTF-8 bytes each token adds to decoded text (0 for specials);
        summed over trained targets it is the denominator of bits-per-byte."""
        if not hasattr(self, "_bytes_cache"):
            self._bytes_cache = self._token_bytes().astype(np.int32)
        return self._bytes_cache

    def special_id(self, piece: str) -> int:
        """The id of special token `piece`; a clear error if this tokenizer has none."""
        token = self.token_id(piece)
        if token is None:
            raise TokenizerError(f"tokenizer {self.name} has no token {piece!r}; pick a chat template "
                                 f"(data.chat_template) that matches the tokenizer")
        return token


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens, after 8 specials: pad, bos, eos, unk, <|system|>, <|user|>, <|assistant|>, <|end|>."""

    SPECIALS = (PAD, BOS, EOS, UNK) + CONTROL_TOKENS

    def __init__(self):
        self.name = "byte"
        self.offset = len(self.SPECIALS)
        self.vocab_size = self.offset + 256
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._ids = {p: i for i, p in enumerate(self.SPECIALS)}

    def _encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """The text of the byte tokens; control tokens and ids past the vocabulary (a model's padded
        embedding rows) have none."""
        end = self.offset + 256
        return bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < end).decode("utf-8", errors="replace")

    def token_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def piece(self, token: int) -> str:
        return self.SPECIALS[token] if token < self.offset else f"<0x{token - self.offset:02X}>"

    def is_special(self, token: int) -> bool:
        return token < self.offset

    def _token_bytes(self) -> np.ndarray:
        return np.array([0] * self.offset + [1] * 256)
