"""The sentencepiece backend: load `.model` files, and train the ones Kiln uses.

Kiln-trained models keep text exactly (identity normalisation, no dummy prefix, whitespace kept),
fall back to bytes for anything unseen, split digits, and hold the chat control tokens as
*control* symbols, which sentencepiece never produces from text. Any model's pieces spelled like
a chat control token or like its BOS / EOS / padding become control symbols when it is loaded.
"""
from __future__ import annotations

import io
import os
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from data.tokenizer_base import BOS, CHAT_SPECIALS, CONTROL_TOKENS, EOS, PAD, UNK, Tokenizer, TokenizerError

MODEL_TYPES = ("bpe", "unigram")
_PIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
# The trainer skips sentences longer than this many bytes, so longer lines are cut into pieces.
_MAX_SENTENCE_BYTES = 1 << 16
# Enough sentences to learn a vocabulary; sampled with a fixed seed when there are more.
_MAX_SENTENCES = 2_000_000


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file. Pieces spelled like a chat control token, BOS, EOS or padding
    are made control symbols, so user text cannot produce them: a user-defined symbol is matched
    inside raw text, and a normal piece can be the best segmentation of it."""

    def __init__(self, path: str):
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            with open(path, "rb") as f:
                proto.ParseFromString(f.read())
        except Exception as e:  # protobuf raises its own DecodeError, or others on garbage
            raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
        if not proto.pieces:
            raise TokenizerError(f"{path}: not a sentencepiece model (no pieces)")
        spec = proto.trainer_spec
        controls = set(CHAT_SPECIALS) | {spec.bos_piece, spec.eos_piece, spec.pad_piece}
        for p in proto.pieces:
            if p.type in (_PIECE.NORMAL, _PIECE.USER_DEFINED) and p.piece in controls:
                p.type = _PIECE.CONTROL
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.name = path
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"{path}: the sentencepiece model has no EOS token")
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        # Padding is never attended to nor trained on; models without a pad token pad with EOS.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_id(self, piece: str) -> int | None:
        token = self.sp.piece_to_id(piece)
        # piece_to_id answers unk for unknown pieces.
        return None if token == self.sp.unk_id() and piece != self.sp.id_to_piece(token) else token

    def piece(self, token: int) -> str:
        return self.sp.id_to_piece(int(token))

    def is_special(self, token: int) -> bool:
        return self.sp.is_control(int(token)) or self.sp.is_unknown(int(token))

    def _token_bytes(self) -> np.ndarray:
        # "▁" is a space. Models with a dummy prefix (Llama 2) decode a text's first word
        # without it, so there each text counts one byte more than it decodes to.
        out = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                out[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i)):
                out[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


def train(texts: Iterable[str], out_path: str, *, vocab_size: int, model_type: str = "bpe", seed: int = 0,
          split_digits: bool = True, newlines: bool = False) -> int:
    """Trains a sentencepiece model on `texts` and writes it to `out_path`; deterministic given
    the same texts. `split_digits`: every digit its own piece (Llama's choice), else numbers may
    merge with the space before them into one piece. Ids: 0 pad, 1 bos, 2 eos, 3 unk, 4-7 chat
    control tokens, then bytes and pieces. `newlines`: the trainer reads whole texts (in pieces of at
    most 64 KB) instead of lines, so pieces may hold line breaks: a play's "NAME:\n" and blank lines
    merge into pieces rather than costing a byte token per newline (Tiny Shakespeare at 2048 pieces:
    2.77 bytes a token instead of 2.53).
    Returns how many lines were over the trainer's 64 KB sentence limit and were cut into pieces."""
    if model_type not in MODEL_TYPES:
        raise TokenizerError(f"tokenizer model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    minimum = 4 + len(CONTROL_TOKENS) + 256 + 1
    if vocab_size < minimum:
        raise TokenizerError(f"tokenizer vocab_size {vocab_size} is below {minimum}: specials, control "
                             "tokens and 256 byte-fallback tokens come first")
    # The trainer reads sentences. Fed lines, it never sees a newline, which then stays a byte token.
    units = (t for t in texts if t.strip()) if newlines else (
        line for text in texts for line in text.split("\n") if line.strip())
    cut = [cut_line(unit, _MAX_SENTENCE_BYTES) for unit in units]
    lines = [piece for pieces in cut for piece in pieces]
    if not lines:
        raise TokenizerError("no text to train a tokenizer on: the training sources are empty")
    sentencepiece.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, split_digits=split_digits, add_dummy_prefix=False, remove_extra_whitespaces=False,
            normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=0.9995,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece=PAD, bos_piece=BOS, eos_piece=EOS, unk_piece=UNK,
            control_symbols=list(CONTROL_TOKENS), max_sentence_length=_MAX_SENTENCE_BYTES,
            input_sentence_size=_MAX_SENTENCES, shuffle_input_sentence=True, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        # Its advice names its own options ("decrease character_coverage with --character_coverage option"):
        # the vocabulary sizes the text allows are said here instead.
        high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
        low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if high:
            raise TokenizerError(f"tokenizer vocab_size {high[1]} is more pieces than the training text holds: "
                                 f"set at most {high[2]}, or train on more text") from None
        if low:
            raise TokenizerError(f"tokenizer vocab_size {low[1]} is below the {low[2]} pieces the training text "
                                 "needs (the fixed pieces and one per character it uses): set at least "
                                 f"{low[2]}") from None
        raise TokenizerError(f"sentencepiece training failed: {e}") from None
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, out_path)  # atomic: a concurrent reader sees no half-written model
    finally:
        if os.path.isfile(tmp):  # a failed write (or an interrupt) leaves no temporary file behind
            os.remove(tmp)
    return sum(len(pieces) > 1 for pieces in cut)


def cut_line(line: str, limit: int) -> list[str]:
    """`line` in pieces of at most `limit` UTF-8 bytes, never cut inside a character. A cut goes
    before the last space or tab of the piece's second half where there is one, so that words
    stay whole (a sentencepiece word starts with its space)."""
    data = line.encode("utf-8")
    pieces, start = [], 0
    while len(data) - start > limit:
        end = start + limit
        while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: `end` is inside a character
            end -= 1
        space = max(data.rfind(b" ", start + limit // 2, end), data.rfind(b"\t", start + limit // 2, end))
        end = space if space >= 0 else end
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    return pieces + [data[start:].decode("utf-8")]
