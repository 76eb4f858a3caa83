"""Tokenizers: one interface over three backends.

- `byte`: built in, needs no files: pad/bos/eos/unk, the Kiln chat control tokens, then 256 bytes.
- sentencepiece `.model` files (Gemma, Llama 2, Mistral, and the tokenizers Kiln trains): data/spm.py.
- Hugging Face `tokenizer.json` through the `tokenizers` package (Llama 3, Qwen2): data/hf_tokenizer.py.

`load(path_or_"byte")` picks the backend (a directory may hold either file, as a Hugging Face model
directory does); `resolve(data_cfg, run_dir)` also handles `tokenizer="train"`.

Special tokens are never produced by `encode`: chat templates insert them as ids (`special_id`).
"""
from __future__ import annotations

import abc
import os
from typing import Any, Sequence

import numpy as np

from data import sources

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# The Kiln chat template's control tokens (byte tokenizer and tokenizers Kiln trains).
CONTROL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Every chat template's special strings. A sentencepiece model that declares one of them as a
# user-defined symbol would produce it from raw text; loading turns such symbols into controls.
CHAT_SPECIALS = CONTROL_TOKENS + ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                  "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or lacks a token that is needed."""


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses set `name`, `vocab_size`, `bos_id` (None: the tokenizer has
    no BOS, as Qwen2's), `eos_id` and `pad_id`."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    @abc.abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens are never produced, whatever the text says."""

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

    def encode_text(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) - self.offset for i in ids if int(i) >= self.offset).decode("utf-8", errors="replace")

    def token_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    def piece(self, token: int) -> str:
        return self.SPECIALS[token] if token < self.offset else f"<0x{token - self.offset:02X}>"

    def is_special(self, token: int) -> bool:
        return token < self.offset

    def _token_bytes(self) -> np.ndarray:
        return np.array([0] * self.offset + [1] * 256)


def load(path: str) -> Tokenizer:
    """"byte", a sentencepiece `.model`, a Hugging Face `tokenizer.json`, or a directory holding one
    (`tokenizer.json` is preferred when both are there, as transformers does)."""
    if path == "byte":
        return ByteTokenizer()
    from data import hf_tokenizer, spm  # here, not at the top: the backends subclass Tokenizer
    if os.path.isdir(path):
        for name, backend in (("tokenizer.json", hf_tokenizer.HFTokenizer), ("tokenizer.model", spm.SentencePieceTokenizer)):
            if os.path.isfile(os.path.join(path, name)):
                return backend(os.path.join(path, name))
        raise TokenizerError(f"tokenizer directory {path!r} holds neither tokenizer.json nor tokenizer.model")
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path!r} not found (data.tokenizer is 'byte', 'train', "
                             "a sentencepiece .model, a tokenizer.json, or a directory holding one)")
    if path.endswith(".json"):
        return hf_tokenizer.HFTokenizer(path)
    return spm.SentencePieceTokenizer(path)


def resolve(data_cfg: Any, run_dir: str) -> Tokenizer:
    """The tokenizer that `data_cfg.tokenizer` names. "train" trains a sentencepiece model on the
    text of the training sources into `{run_dir}/tokenizer.model` (reused when it is already there)."""
    from data import spm  # here, not at the top: the backend subclasses Tokenizer
    if data_cfg.tokenizer != "train":
        return load(data_cfg.tokenizer if data_cfg.tokenizer == "byte" else
                    sources.expand_path(data_cfg.tokenizer, "data.tokenizer"))
    path = os.path.join(run_dir, "tokenizer.model")
    if not os.path.isfile(path):
        spm.train(sources.tokenizer_texts(data_cfg), path, vocab_size=data_cfg.tokenizer_vocab_size,
                  model_type=data_cfg.tokenizer_model_type)
    return load(path)
