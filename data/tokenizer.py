"""Tokenizers: one interface (data/tokenizer_base.py) over three backends, and the factory.

- `byte`: built in, needs no files: pad/bos/eos/unk, the Kiln chat control tokens, then 256 bytes.
- sentencepiece `.model` files (Gemma, Llama 2, Mistral, and the tokenizers Kiln trains): data/spm.py.
- Hugging Face `tokenizer.json` through the `tokenizers` package (Llama 3, Qwen2): data/hf_tokenizer.py.

`load(path_or_"byte")` picks the backend (a directory may hold either file, as a Hugging Face model
directory does); `resolve(data_cfg, run_dir)` also handles `tokenizer="train"`.

Control tokens are never produced by `encode`: chat templates insert them as ids (`special_id`).
The interface's names are re-exported here, so `data.tokenizer` is the one module callers import.
"""
from __future__ import annotations

import os
from typing import Any

from data import sources, spm
from data.hf_tokenizer import HFTokenizer
from data.spm import SentencePieceTokenizer
from data.tokenizer_base import (BOS, CHAT_SPECIALS, CONTROL_TOKENS, EOS, PAD, UNK, ByteTokenizer, Tokenizer,
                                 TokenizerError)

__all__ = ["BOS", "CHAT_SPECIALS", "CONTROL_TOKENS", "EOS", "PAD", "UNK", "ByteTokenizer", "HFTokenizer",
           "SentencePieceTokenizer", "Tokenizer", "TokenizerError", "load", "resolve"]


def load(path: str) -> Tokenizer:
    """"byte", a sentencepiece `.model`, a Hugging Face `tokenizer.json`, or a directory holding one
    (`tokenizer.json` is preferred when both are there, as transformers does)."""
    if path == "byte":
        return ByteTokenizer()
    if os.path.isdir(path):
        for name, backend in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if os.path.isfile(os.path.join(path, name)):
                return backend(os.path.join(path, name))
        raise TokenizerError(f"tokenizer directory {path!r} holds neither tokenizer.json nor tokenizer.model")
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path!r} not found (data.tokenizer is 'byte', 'train', "
                             "a sentencepiece .model, a tokenizer.json, or a directory holding one)")
    if path.endswith(".json"):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def resolve(data_cfg: Any, run_dir: str) -> Tokenizer:
    """The tokenizer that `data_cfg.tokenizer` names. "train" trains a sentencepiece model on the
    text of the training sources into `{run_dir}/tokenizer.model` (reused when it is already there).
    "auto" depends on the model a run starts from: `train.build.tokenizer_name` makes it concrete first."""
    if data_cfg.tokenizer == "auto":
        raise TokenizerError('data.tokenizer="auto" names no tokenizer by itself (it means model.init_from\'s, '
                             'else "byte"); resolve it with train.build.tokenizer_name(config)')
    if data_cfg.tokenizer != "train":
        return load(data_cfg.tokenizer if data_cfg.tokenizer == "byte" else
                    sources.expand_path(data_cfg.tokenizer, "data.tokenizer"))
    path = os.path.join(run_dir, "tokenizer.model")
    if not os.path.isfile(path):
        spm.train(sources.tokenizer_texts(data_cfg), path, vocab_size=data_cfg.tokenizer_vocab_size,
                  model_type=data_cfg.tokenizer_model_type, split_digits=data_cfg.tokenizer_split_digits,
                  newlines=data_cfg.tokenizer_newlines)
    return load(path)
