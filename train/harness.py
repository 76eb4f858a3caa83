"""Kiln models inside EleutherAI's lm-evaluation-harness (`pip install 'kiln-lm[eval]'`).

`KilnLM` implements the harness's `LM` interface on any checkpoint `kiln sample` reads:
- `loglikelihood`: log P(continuation | context) summed over the continuation's tokens, and
  whether greedy decoding would have produced exactly those tokens. The pair is split as the
  harness's own models split it: the context's trailing whitespace moves to the continuation, and
  the continuation's tokens are those of context + continuation (BOS first) after the context's;
  an empty context is the prefix token (BOS, or EOS for a tokenizer without one);
- `loglikelihood_rolling`: the log-likelihood of a whole text (the prefix token first), in disjoint
  windows of `max_length` predicted tokens; as the harness's rolling windows, a full window is
  conditioned on the token before it, and the last, shorter one on as many earlier tokens as fit
  `max_length` inputs (the text itself is encoded without a BOS of its own);
- `generate_until`: greedy (or sampled, if the request asks) generation through Kiln's sampler,
  cut at the request's stop strings, `batch_size` prompts per sampler call.
Registered as the harness model "kiln": `lm_eval --model kiln --model_args checkpoint=RUN_DIR --tasks ...`.
Scoring runs a jitted forward over batches of rows padded to a multiple of 64 tokens.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from train import generate

_BUCKET = 64


@register_model("kiln")
class KilnLM(LM):
    """A Kiln checkpoint (or a ready `train.generate.Sampler`) as an lm-eval language model."""

    def __init__(self, checkpoint: str | None = None, sampler: generate.Sampler | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, chat: bool = False, **_: Any):
        super().__init__()
        if (checkpoint is None) == (sampler is None):
            raise ValueError("KilnLM needs a checkpoint path or a sampler (one of them)")
        self.sampler = sampler if sampler is not None else generate.load_sampler(checkpoint, chat=bool(chat))[0]
        self.tok = self.sampler.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_length = int(max_length or self.sampler.model.cfg.max_seq_len)
        graphdef, state = nnx.split(self.sampler.model)
        self._state = state
        self._logprobs = jax.jit(lambda state, tokens, targets, segments: _target_logprobs(
            graphdef, state, tokens, targets, segments))

    # -- scoring --------------------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log P(continuation tokens), greedy?) for (context ids, continuation ids) pairs."""
        out: list[tuple[float, bool]] = []
        longest = max((len(cont) for _, cont in pairs), default=0)
        if longest > self.max_length:
            raise ValueError(f"a continuation of {longest} tokens does not fit max_length={self.max_length} "
                             "predicted tokens (loglikelihood_rolling scores long texts in windows)")
        for lo in range(0, len(pairs), self.batch_size):
            chunk = pairs[lo:lo + self.batch_size]
            rows = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in chunk]
            width = -(-max(len(r) - 1 for r in rows) // _BUCKET) * _BUCKET
            tokens = np.full((len(rows), width), self.tok.pad_id, np.int32)
            targets = np.full((len(rows), width), self.tok.pad_id, np.int32)
            segments = np.zeros((len(rows), width), np.int32)
            for i, r in enumerate(rows):
                tokens[i, :len(r) - 1], targets[i, :len(r) - 1], segments[i, :len(r) - 1] = r[:-1], r[1:], 1
            logp, greedy = (np.asarray(x) for x in jax.device_get(self._logprobs(self._state, tokens, targets, segments)))
            for i, ((_, cont), r) in enumerate(zip(chunk, rows)):
                n, end = len(cont), len(r) - 1
                out.append((float(logp[i, end - n:end].sum()), bool(greedy[i, end - n:end].all())))
        return out

    @property
    def prefix_id(self) -> int:
        """The token an empty context (and a rolling text) starts from: BOS, else EOS (the harness's choice)."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) split as the harness does (see the module docstring)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_id], self.tok.encode_text(continuation)
        ctx = self.tok.encode(context, add_bos=True)
        return ctx, self.tok.encode(context + continuation, add_bos=True)[len(ctx):]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            pairs.append(self.encode_pair(context, continuation))
            if not pairs[-1][1]:
                raise ValueError(f"empty continuation {continuation!r} for context {context[-40:]!r}")
        return self._score(pairs)

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        results = []
        for request in requests:
            ids = [self.prefix_id] + self.tok.encode_text(request.args[0])
            ends = [min(start + self.max_length, len(ids)) for start in range(1, len(ids), self.max_length)]
            windows = [(ids[max(end - 1 - self.max_length, 0):start], ids[start:end])
                       for start, end in zip(range(1, len(ids), self.max_length), ends)]
            results.append(sum(score for score, _ in self._score(windows)))
        return results

    # -- generation -----------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any]) -> list[str]:
        """Continuations in request order; requests with the same generation settings share batches of
        `batch_size` prompts (one sampler call each)."""
        outputs = [""] * len(requests)
        groups: dict[tuple[tuple[str, ...], float, float, int], list[tuple[int, list[int]]]] = {}
        for i, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = (until,) if isinstance(until, str) else tuple(u for u in until if u)
            temperature = float(kwargs.pop("temperature", 1.0)) if kwargs.pop("do_sample", False) else 0.0
            max_new = int(kwargs.pop("max_gen_toks", 256))
            if not 0 < max_new < self.sampler.model.cfg.max_seq_len:
                raise ValueError(f"request {i}: max_gen_toks={max_new} must be positive and leave room for the context "
                                 f"within the model's max_seq_len={self.sampler.model.cfg.max_seq_len}")
            # The context loses tokens from its start when it and the generation would not fit.
            ids = self.tok.encode(context, add_bos=True)[-(self.sampler.model.cfg.max_seq_len - max_new):]
            groups.setdefault((until, temperature, float(kwargs.pop("top_p", 1.0)), max_new), []).append((i, ids))
        for (until, temperature, top_p, max_new), items in groups.items():
            stops = [self.tok.encode_text(u) for u in until]
            for lo in range(0, len(items), self.batch_size):
                chunk = items[lo:lo + self.batch_size]
                batch = self.sampler.generate([ids for _, ids in chunk], max_new_tokens=max_new,
                                              temperature=temperature, top_p=top_p, stop_sequences=stops)
                for row, (i, _) in enumerate(chunk):
                    text = self.tok.decode(batch.row(row)[0])
                    cuts = [j for j in (text.find(u) for u in until) if j >= 0]
                    outputs[i] = text[:min(cuts)] if cuts else text
        return outputs


def _target_logprobs(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, targets: jax.Array,
                     segments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log P(target) [B, T], whether the target is the argmax [B, T]) for right-padded rows."""
    logits = nnx.merge(graphdef, state)(tokens, segment_ids_BT=segments)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets
