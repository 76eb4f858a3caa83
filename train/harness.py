"""Kiln models inside EleutherAI's lm-evaluation-harness (`pip install 'kiln-lm[eval]'`).

`KilnLM` implements the harness's `LM` interface on any checkpoint `kiln sample` reads:
- `loglikelihood`: log P(continuation | context) summed over the continuation's tokens, and
  whether greedy decoding would have produced exactly those tokens;
- `loglikelihood_rolling`: the log-likelihood of a whole text (BOS first), in disjoint windows of
  `max_length` predicted tokens, each conditioned on the token before it (as the harness's own
  models do, so that every forward fits the context);
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

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            # The harness puts a separating space at the start of the continuation; keep it there.
            pairs.append((self.tok.encode(context, add_bos=True), self.tok.encode_text(continuation)))
            if not pairs[-1][1]:
                raise ValueError(f"empty continuation for context {context[-40:]!r}")
        return self._score(pairs)

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        results = []
        for request in requests:
            ids = self.tok.encode(request.args[0], add_bos=True)
            windows = [(ids[start - 1:start], ids[start:start + self.max_length])
                       for start in range(1, len(ids), self.max_length)]
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
