"""The Hugging Face backend: a `tokenizer.json` (Llama 3, Qwen2, ...) through the `tokenizers` package.

A tokenizer.json does not say which tokens are BOS, EOS and padding; `tokenizer_config.json` beside
it does, and is read when present (otherwise the usual names are looked up).

Tokens spelled like a chat control token, BOS, EOS or padding are made special tokens when the file
is loaded, even where it adds them without the special flag (then `tokenizers` would match them in
raw text) or has them in the model's vocabulary: special tokens are never matched in text here.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np
import tokenizers

from data.tokenizer_base import CHAT_SPECIALS, Tokenizer, TokenizerError

_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
_PAD_NAMES = ("<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>")
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`. Special tokens written in text are encoded as plain text."""

    def __init__(self, path: str):
        try:
            self.tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises bare Exceptions on malformed files
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        # Without this, "<|eot_id|>" typed by a user would become the real control token.
        self.tok.encode_special_tokens = True
        self.name = path
        spec = json.loads(self.tok.to_str())
        config = _read_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
        bos = self._role_id(config, "bos_token", _BOS_NAMES)
        eos = self._role_id(config, "eos_token", _EOS_NAMES)
        if eos is None:
            raise TokenizerError(f"{path}: no EOS token (set eos_token in tokenizer_config.json beside it)")
        pad = self._role_id(config, "pad_token", _PAD_NAMES)
        self.bos_id, self.eos_id = bos, eos
        # Padding is never attended to nor trained on; tokenizers without a pad token pad with EOS, and
        # so do those that pad with the unknown token, which text produces.
        self.pad_id = eos if pad is None or pad == _unk_id(self.tok, spec["model"]) else pad
        controls = [*CHAT_SPECIALS, *(self.piece(t) for t in (self.bos_id, self.eos_id, self.pad_id) if t is not None)]
        # Marks existing tokens special (an unknown spelling would be added: hence the filter).
        self.tok.add_special_tokens([tokenizers.AddedToken(p, special=True, normalized=False)
                                     for p in controls if self.tok.token_to_id(p) is not None])
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self._special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A pickled `tokenizers.Tokenizer` (grain's worker processes get one) loses encode_special_tokens.
        self.__dict__.update(state)
        self.tok.encode_special_tokens = True

    def _role_id(self, config: dict[str, Any], key: str, names: Sequence[str]) -> int | None:
        if key in config:  # tokenizer_config.json decides, null included (Qwen2 has no BOS)
            value = config[key]
            if isinstance(value, dict):  # a serialised AddedToken
                value = value.get("content")
            return None if value is None else self.special_id(value)
        return next((self.token_id(n) for n in names if self.token_id(n) is not None), None)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def piece(self, token: int) -> str:
        return self.tok.id_to_token(int(token))

    def is_special(self, token: int) -> bool:
        return int(token) in self._special

    def _token_bytes(self) -> np.ndarray:
        added = self.tok.get_added_tokens_decoder()
        out = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            piece = self.tok.id_to_token(i)
            if piece is None or i in self._special:
                continue
            if i in added:
                out[i] = len(added[i].content.encode("utf-8"))
            elif self._byte_level:
                out[i] = len(piece)  # GPT-2 byte-level: every character stands for exactly one byte
            elif _BYTE_PIECE.match(piece):
                out[i] = 1
            else:
                out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return out


def _unk_id(tok: tokenizers.Tokenizer, model: dict[str, Any]) -> int | None:
    """The id of the model's unknown token (BPE, WordLevel and WordPiece name it, Unigram gives its id)."""
    if model.get("unk_token") is not None:
        return tok.token_to_id(model["unk_token"])
    return model.get("unk_id")


def _read_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
