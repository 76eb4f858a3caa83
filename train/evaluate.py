"""Held-out evaluation on each named `data.eval_sources` entry: loss, perplexity and bits per byte
for language-modelling kinds (pretrain, sft); for other kinds (preference pairs), the stage's own
loss and metrics (a reward model's pair accuracy, ...), averaged over the source like training's.

Bits per byte divide the summed negative log-likelihood (in bits) by the UTF-8 bytes of the
evaluated targets, so runs with different tokenizers compare. The first eval source is also
reported under the plain keys `eval/loss`, `eval/perplexity`, `eval/bits_per_byte` (a source named
`eval` only under those).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from data import pipeline
from train import losses
from train.losses.next_token import forward_nll

EVAL_KINDS = ("pretrain", "sft")


def make_eval_step(graphdef: nnx.GraphDef):
    """`eval_step(params, frozen, batch) -> [nll_sum, tokens, bytes]` (float32), ready for jit."""
    def eval_step(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        nll, _, mask = forward_nll(nnx.merge(graphdef, params, frozen), batch)
        return jnp.stack([jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(batch["target_bytes"] * mask)])
    return eval_step


def eval_metrics(nll_sum: float, tokens: float, nbytes: float) -> dict[str, float]:
    """Loss (nats per token), perplexity and bits per byte from the summed NLL (nats) of `tokens`
    targets that decode to `nbytes` UTF-8 bytes. Perplexity past float range is inf; bits per byte
    of targets without bytes (only special tokens) are NaN rather than a made-up number."""
    loss = nll_sum / tokens
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    bits_per_byte = nll_sum / math.log(2) / nbytes if nbytes > 0 else math.nan
    return {"loss": loss, "perplexity": perplexity, "bits_per_byte": bits_per_byte, "tokens": tokens}


def make_loss_eval_step(graphdef: nnx.GraphDef, loss_fn: losses.LossFn):
    """`eval_step(params, frozen, batch) -> {loss, weight, metrics...}` sums (no dropout), ready for jit."""
    def eval_step(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        loss_sum, metrics = loss_fn(nnx.merge(graphdef, params, frozen), batch, None)
        return dict(metrics, loss=loss_sum)
    return eval_step


def evaluate(run: Any, kind: str) -> dict[str, float]:
    """Eval metrics of a training run's current state on every eval source (`evaluate_sources`, or
    the stage's loss for kinds without a language-modelling loss)."""
    if not run.config.data.eval_sources:
        return {}
    if getattr(run, "_eval_step", None) is None:
        run._eval_step = jax.jit(make_eval_step(run.graphdef) if kind in EVAL_KINDS else
                                 make_loss_eval_step(run.graphdef, losses.get(run.config.loss.type, run.config.loss)))
    step = lambda batch: run._eval_step(run.state.params, run.frozen, run.global_batch(batch))  # noqa: E731
    if kind in EVAL_KINDS:
        return evaluate_sources(run.config, kind, run.tokenizer, step)
    return _loss_metrics(run.config, kind, run.tokenizer, step)


def _loss_metrics(cfg: Any, kind: str, tokenizer: Any, eval_step: Callable[[dict[str, Any]], dict[str, jax.Array]]
                  ) -> dict[str, float]:
    """The stage loss's metrics, summed over each eval source and divided by its total weight."""
    def summarize(name: str, total: dict[str, Any] | None) -> dict[str, float]:
        sums = {k: float(v) for k, v in (total or {}).items()}
        weight = sums.pop("weight", 0.0)
        if not weight:
            raise ValueError(f"data.eval_sources.{name}: nothing to evaluate (no {kind} examples)")
        return {k: v / weight for k, v in sums.items()}
    return _each_source(cfg, kind, tokenizer, eval_step, summarize)


def _each_source(cfg: Any, kind: str, tokenizer: Any, eval_step: Callable[[dict[str, Any]], Any],
                 summarize: Callable[[str, Any], dict[str, float]]) -> dict[str, float]:
    """`summarize(name, summed eval_step outputs or None)` for each eval source (at most
    `train.eval_steps` batches each), as `eval/NAME/...` rows; the first source (or the one named
    `eval`) also under plain `eval/...`."""
    rows: dict[str, float] = {}
    for i, name in enumerate(cfg.data.eval_sources.keys()):
        batches = pipeline.eval_iterator(cfg.data, kind, tokenizer, name, process_index=jax.process_index(),
                                         process_count=jax.process_count())
        total = None
        for n, batch in enumerate(batches):
            if 0 < cfg.train.eval_steps <= n:
                break
            out = eval_step(batch)
            total = out if total is None else jax.tree.map(jnp.add, total, out)
        metrics = summarize(name, None if total is None else jax.device_get(total))
        if name != "eval":
            rows.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
        if name == "eval" or (i == 0 and "eval" not in cfg.data.eval_sources):
            rows.update({f"eval/{k}": v for k, v in metrics.items()})
    return rows


def evaluate_sources(cfg: Any, kind: str, tokenizer: Any, eval_step: Callable[[dict[str, Any]], jax.Array]
                     ) -> dict[str, float]:
    """Eval metrics for every eval source of `cfg` (at most `train.eval_steps` batches each);
    `eval_step(numpy batch) -> [nll_sum, tokens, bytes]`."""
    if not cfg.data.eval_sources:
        return {}
    if kind not in EVAL_KINDS:
        raise ValueError(f"data.eval_sources: evaluation of {kind!r} data is not supported; "
                         f"supported kinds: {', '.join(EVAL_KINDS)}")
    def summarize(name: str, total: Any) -> dict[str, float]:
        nll, tokens, nbytes = (0.0, 0.0, 0.0) if total is None else (float(x) for x in total)
        if tokens == 0:
            raise ValueError(f"data.eval_sources.{name}: no loss tokens to evaluate")
        return eval_metrics(nll, tokens, nbytes)
    return _each_source(cfg, kind, tokenizer, eval_step, summarize)
