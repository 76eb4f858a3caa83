"""Sampling from the decoder: one compiled program prefills a batch of prompts and decodes until
every row has stopped.

Prompts are left-padded to a common length P (rounded up to a multiple of `PROMPT_BUCKET`, so
prompts of similar length share one compiled program). Padding slots carry segment 0 and are never
attended, and each row's positions start at 0 at its first real token, so a row decodes exactly as
it would alone, while every row writes its next token into the same cache slot. Decoding is one
`lax.while_loop` per phase of `decode_phases`, the cache grown between phases, and it leaves as soon
as every row has stopped (a stop id, a stop sequence, or `max_new_tokens`). The model is used only
through `model.decode` and `model.cfg`, so adapters and virtual tokens inside the model need nothing
here.

Log-probs are those of the model's own distribution (before temperature, top-k and top-p), which
does not change with the sampling settings. The RL losses do not read them: they score the tokens
again with the policy's forward at the rollout's temperature (`train.losses.rl.token_logps`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from model.sharding import DEFAULT_RULES, Rules, constrain, logical_to_spec, replicated, to_host, use_rules
from model.transformer import KVCache

PROMPT_BUCKET = 64  # prompt lengths are rounded up to a multiple of this: fewer compiled programs
# The decode loop runs in up to this many phases, the cache growing at each to the slots the phase needs,
# so early steps do not attend over empty slots; phases are whole multiples of PHASE_STEPS steps.
DECODE_PHASES, PHASE_STEPS = 4, 32
STOP, LENGTH = "stop", "length"  # finish reasons: a stop id or stop sequence ended the row / max_new_tokens
_NO_TOKEN = -1  # pads the stop-id and stop-sequence tables; never equals a token
_CACHE_KV = ("batch", "act_kv_heads", "cache_seq", "head_dim")  # one layer's buffer


@dataclasses.dataclass
class SampleBatch:
    """Samples, one row per (prompt, sample), prompt-major: row r samples prompt `prompt_index[r]`."""

    tokens: np.ndarray  # [R, max_new_tokens] int32; pad id after each row's end
    logprobs: np.ndarray  # [R, max_new_tokens] float32; 0 after each row's end
    lengths: np.ndarray  # [R] int32: tokens generated, the stop id or stop sequence included
    finish_reasons: list[str]  # STOP or LENGTH per row
    prompt_index: np.ndarray  # [R] int32

    def row(self, r: int) -> tuple[list[int], list[float]]:
        """(token ids, their log-probs) of row r, without the padding."""
        n = int(self.lengths[r])
        return self.tokens[r, :n].tolist(), self.logprobs[r, :n].tolist()


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What shapes the compiled program beyond its arguments' shapes (the jit cache key)."""

    max_new_tokens: int
    phase_ends: tuple[int, ...]  # decode_phases(max_new_tokens)
    greedy: bool
    top_k: int  # 0: off
    use_top_p: bool  # top-p filtering on (its value is an argument)
    pad_id: int
    rules: Rules


def generate(model: nnx.Module, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = 0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
             stop_sequences: Sequence[Sequence[int]] = (), seed: int | jax.Array = 0, num_samples: int = 1,
             pad_id: int | None = None, mesh: Mesh | None = None, rules: Rules | None = None) -> SampleBatch:
    """Samples `num_samples` continuations of each prompt (token ids, at least one each).

    temperature 0 is greedy decoding (top-k and top-p are then moot); top_k 0 or None is off. A row
    stops after a token in `stop_ids` or after the tokens of one of `stop_sequences`, which are kept
    in its output. `seed` is an int or a `jax.random.key`; row r draws from fold_in(key, r), so a
    row's samples depend on the seed and its place in the batch only. With `mesh`, the batch is split
    over the mesh axes that `rules` (default `DEFAULT_RULES`) map "batch" to, and heads over those of
    "act_kv_heads"; the model's parameters should already be placed on the mesh
    (`model.sharding.shard_module`).
    """
    cfg = model.cfg
    top_k = top_k or 0  # None: off, as in transformers
    _check(cfg, prompt_ids, max_new_tokens, temperature, top_k, top_p, num_samples)
    # Hashable (the rule table keys the compiled program): config files give lists.
    rules = tuple((name, target if target is None or isinstance(target, str) else tuple(target))
                  for name, target in (rules or DEFAULT_RULES))
    rows = [list(p) for p in prompt_ids for _ in range(num_samples)]
    batch = _round_up(len(rows), _batch_shards(mesh, rules))
    width = _round_up(max(map(len, rows)), PROMPT_BUCKET)
    pad = (cfg.pad_token_id or 0) if pad_id is None else pad_id
    tokens_BP = np.full((batch, width), pad, np.int32)
    lens_B = np.zeros((batch,), np.int32)  # rows past the prompts (batch padding) start finished
    for r, ids in enumerate(rows):
        tokens_BP[r, width - len(ids):] = ids
        lens_B[r] = len(ids)
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    plan = _Plan(max_new_tokens, tuple(decode_phases(max_new_tokens)), temperature == 0, top_k, top_p < 1.0, pad,
                 rules)
    graphdef, state = nnx.split(model)
    args = (state, tokens_BP, lens_B, np.float32(max(temperature, 1e-6)), np.float32(top_p),  # greedy: unused
            _stop_id_table(stop_ids), _stop_sequence_table(stop_sequences), key)
    if mesh is not None:
        with jax.set_mesh(mesh):
            # Several processes: each passes the same prompts and gets every row back.
            out = to_host(_sample(graphdef, plan, state, *replicated(args[1:], mesh)))
    else:
        out = jax.device_get(_sample(graphdef, plan, *args))
    tokens, logprobs, lengths, stopped = (np.asarray(x)[:len(rows)] for x in out)
    return SampleBatch(tokens=tokens, logprobs=logprobs, lengths=lengths,
                       finish_reasons=[STOP if s else LENGTH for s in stopped],
                       prompt_index=np.repeat(np.arange(len(prompt_ids), dtype=np.int32), num_samples))


def _check(cfg, prompt_ids, max_new_tokens, temperature, top_k, top_p, num_samples) -> None:
    """ValueError naming the first bad argument."""
    if not prompt_ids:
        raise ValueError("no prompts to sample from")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. BOS)")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} holds token ids outside the vocabulary [0, {cfg.vocab_size})")
    longest = max(map(len, prompt_ids))
    checks = [(max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {max_new_tokens}"),
              (longest + max_new_tokens <= cfg.max_seq_len,
               f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's "
               f"max_seq_len={cfg.max_seq_len}"),
              (temperature >= 0, f"temperature must be >= 0, got {temperature}"),
              (0 <= top_k <= cfg.vocab_size, f"top_k must be in [0, {cfg.vocab_size}] (0: off), got {top_k}"),
              (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
              (num_samples >= 1, f"num_samples must be at least 1, got {num_samples}")]
    for ok, why in checks:
        if not ok:
            raise ValueError(why)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _batch_shards(mesh: Mesh | None, rules: Rules) -> int:
    """How many ways the mesh splits the batch: padding the batch to a multiple keeps it split."""
    if mesh is None:
        return 1
    targets = dict(rules).get("batch") or ()
    targets = (targets,) if isinstance(targets, str) else targets
    return math.prod(mesh.shape[a] for a in targets if a in mesh.shape)


def _stop_id_table(stop_ids: Sequence[int]) -> np.ndarray:
    """[8k] int32, padded with _NO_TOKEN: a multiple of 8 so that most id sets share a program."""
    ids = sorted(set(int(i) for i in stop_ids))
    table = np.full((_round_up(max(len(ids), 1), 8),), _NO_TOKEN, np.int32)
    table[:len(ids)] = ids
    return table


def _stop_sequence_table(sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """[N, L] int32, each sequence right-aligned (its last token in column L-1) after _NO_TOKEN,
    which matches anything; N and L rounded up (to 4 and 8) so that most sets share a program."""
    sequences = [list(s) for s in sequences if len(s)]
    if not sequences:
        return np.zeros((0, 0), np.int32)
    table = np.full((_round_up(len(sequences), 4), _round_up(max(map(len, sequences)), 8)), _NO_TOKEN, np.int32)
    for i, s in enumerate(sequences):
        table[i, table.shape[1] - len(s):] = s
    return table


def decode_phases(max_new_tokens: int) -> list[int]:
    """The last decode step (exclusive) of each phase: steps 1 .. max_new_tokens - 1 feed back a sampled
    token, and a phase ending before step e needs e - 1 cache slots after the prompt."""
    steps = max_new_tokens - 1
    per_phase = _round_up(max(-(-steps // DECODE_PHASES), 1), PHASE_STEPS)
    return [min(1 + end, max_new_tokens) for end in range(per_phase, steps + per_phase, per_phase)] or [1]


def _filter(logits_BV: jax.Array, top_k: int, top_p: jax.Array | None) -> jax.Array:
    """Logits outside the top k and outside the top-p nucleus set to -inf (ties with the last kept value
    are kept). The nucleus is the smallest set of most likely tokens whose probability reaches top_p,
    under the distribution that top-k left (as transformers' TopKLogitsWarper then TopPLogitsWarper)."""
    if top_k:
        vals_BK = jax.lax.top_k(logits_BV, top_k)[0]  # sorted, largest first
    else:
        vals_BK = jnp.flip(jnp.sort(logits_BV, axis=-1), axis=-1)
    threshold_B1 = vals_BK[:, -1:]
    if top_p is not None:
        # Normalised over every token top-k kept: tokens tied with the k-th value hold mass that the k
        # sorted values alone would miss.
        log_z_B1 = jax.nn.logsumexp(jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV), axis=-1, keepdims=True)
        probs_BK = jnp.exp(vals_BK - log_z_B1)
        # A token is in the nucleus when the mass of the tokens before it is still below top_p.
        keep_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK < top_p
        threshold_B1 = jnp.min(jnp.where(keep_BK, vals_BK, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)


def sample_logits(logits_BV: jax.Array, keys_B: jax.Array, temperature: jax.Array | float = 1.0,
                  top_p: jax.Array | float = 1.0, *, greedy: bool = False, top_k: int = 0,
                  use_top_p: bool = False) -> tuple[jax.Array, jax.Array]:
    """(a token per row [B], its log-prob under the untempered logits [B]).

    Greedy takes the argmax; otherwise row b draws with key `keys_B[b]` from softmax(logits /
    temperature) restricted to the top `top_k` (0: all) and then, with `use_top_p`, to the top-p nucleus.
    """
    if greedy:
        return greedy_pick(logits_BV)
    logits_BV = logits_BV.astype(jnp.float32)
    scaled_BV = logits_BV / temperature
    if top_k or use_top_p:
        scaled_BV = _filter(scaled_BV, top_k, top_p if use_top_p else None)
    tok_B = jax.vmap(jax.random.categorical)(keys_B, scaled_BV).astype(jnp.int32)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
    return tok_B, logp_B


def greedy_pick(logits_BV: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the argmax token [B], its log-prob [B]); ties go to the lowest token id, as `jnp.argmax`.

    With the vocabulary split over mesh axes (the LM head under tensor parallelism), each shard reduces
    its own columns to (max, log of its softmax sum, first argmax) and one all-gather of those [B, 3]
    statistics combines them, where the compiler would otherwise run an all-reduce or an all-gather each
    for the max, the argmax, the softmax's sum and the chosen token's logit: five collectives a decode
    step (docs/performance.md).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    mesh = jax.sharding.get_abstract_mesh()
    spec = PartitionSpec() if mesh.empty else logical_to_spec(("batch", "act_vocab"), logits_BV.shape,
                                                              dict(mesh.shape))
    vocab_axes = () if len(spec) < 2 or spec[1] is None else spec[1]
    if not vocab_axes:
        _, tok_B, log_sum_B = _row_stats(logits_BV)
        return tok_B, -log_sum_B

    def local(logits_bv: jax.Array) -> tuple[jax.Array, jax.Array]:
        max_b, tok_b, log_sum_b = _row_stats(logits_bv)
        tok_b += jax.lax.axis_index(vocab_axes) * logits_bv.shape[-1]
        stats_b3 = jnp.stack([max_b, log_sum_b, jax.lax.bitcast_convert_type(tok_b, jnp.float32)], axis=-1)
        stats_Sb3 = jax.lax.all_gather(stats_b3, vocab_axes)  # S shards, in vocabulary order
        max_Sb, log_sum_Sb = stats_Sb3[..., 0], stats_Sb3[..., 1]
        best_b = jnp.argmax(max_Sb, axis=0)  # the first shard holding the overall max
        top_b = jnp.max(max_Sb, axis=0)
        tok_b = jax.lax.bitcast_convert_type(jnp.take_along_axis(stats_Sb3[..., 2], best_b[None], axis=0)[0],
                                             jnp.int32)
        # log-prob of the max = -log sum_v exp(logit_v - max), summed shard by shard.
        return tok_b, -jax.nn.logsumexp(max_Sb - top_b[None] + log_sum_Sb, axis=0)

    batch_spec = PartitionSpec(spec[0])
    # Every shard computes the same combined result, which the replication check cannot see through all_gather.
    return jax.shard_map(local, in_specs=spec, out_specs=(batch_spec, batch_spec), check_vma=False)(logits_BV)


def _row_stats(logits_BV: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(max [B], the first index holding it [B] int32, log sum exp(logits - max) [B]) of float32 rows.
    The index is a min over a mask rather than `jnp.argmax`, whose value-and-index reduction XLA's CPU
    backend does not vectorise (~150 against ~20 us for [16, 4096])."""
    V = logits_BV.shape[-1]
    max_B = jnp.max(logits_BV, axis=-1)
    first_B = jnp.min(jnp.where(logits_BV == max_B[:, None], jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    tok_B = jnp.minimum(first_B, V - 1)  # a NaN max equals nothing: stay inside the vocabulary
    return max_B, tok_B, jnp.log(jnp.sum(jnp.exp(logits_BV - max_B[:, None]), axis=-1))


def _constrain_cache(cache: KVCache) -> KVCache:
    return cache._replace(k=tuple(constrain(k, _CACHE_KV) for k in cache.k),
                          v=tuple(constrain(v, _CACHE_KV) for v in cache.v),
                          pos=constrain(cache.pos, ("batch", "cache_seq")),
                          seg=constrain(cache.seg, ("batch", "cache_seq")))


@jax.jit(static_argnums=(0, 1))
def _sample(graphdef: nnx.GraphDef, plan: _Plan, state: nnx.State, tokens_BP: jax.Array, lens_B: jax.Array,
            temperature: jax.Array, top_p: jax.Array, stop_ids_S: jax.Array, stop_seqs_NL: jax.Array,
            key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Prefill and decode loop: (tokens [B,N], log-probs [B,N], lengths [B], stopped [B])."""
    with use_rules(plan.rules):
        model = nnx.merge(graphdef, state)
        B, P = tokens_BP.shape
        N = plan.max_new_tokens
        # Left padding: row b's prompt fills the last lens_B[b] slots and starts at position 0.
        slot_1P = jnp.arange(P, dtype=jnp.int32)[None, :]
        first_B1 = (P - lens_B)[:, None]
        seg_BP = (slot_1P >= first_B1).astype(jnp.int32)
        pos_BP = jnp.maximum(slot_1P - first_B1, 0)
        tokens_BP = constrain(tokens_BP, ("batch", None))
        # The last sampled token is never fed back, so N - 1 slots follow the prompt in all; each phase
        # of the loop grows the cache to the slots it writes.
        ends = plan.phase_ends
        cache = _constrain_cache(model.init_cache(B, P + ends[0] - 1))
        layers = model.decode_layers()  # sliced from the stacked weights once, not every step
        logits_BTV, cache = model.decode(tokens_BP, cache, pos_BP, seg_BP, layers=layers, last_only=True)
        row_keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(B, dtype=jnp.int32))
        stop_active_N = jnp.any(stop_seqs_NL != _NO_TOKEN, axis=-1)

        def choose(logits_BV, step):
            keys_B = jax.vmap(jax.random.fold_in, (0, None))(row_keys_B, step)
            return sample_logits(logits_BV, keys_B, temperature, top_p, greedy=plan.greedy, top_k=plan.top_k,
                                 use_top_p=plan.use_top_p)

        def record(carry, tok_B, logp_B, step):
            """Writes the step's token for rows still running and updates which rows are done."""
            out_BN, logp_BN, length_B, done_B, stopped_B, recent_BL = carry
            live_B = ~done_B
            out_BN = jax.lax.dynamic_update_slice_in_dim(
                out_BN, jnp.where(live_B, tok_B, plan.pad_id)[:, None], step, axis=1)
            logp_BN = jax.lax.dynamic_update_slice_in_dim(
                logp_BN, jnp.where(live_B, logp_B, 0.0)[:, None], step, axis=1)
            stop_B = jnp.any(tok_B[:, None] == stop_ids_S[None, :], axis=-1)
            if recent_BL.shape[1]:
                # The last L tokens of each row, matched against every stop sequence.
                recent_BL = jnp.concatenate([recent_BL[:, 1:], tok_B[:, None]], axis=1)
                match_BN = jnp.all((recent_BL[:, None, :] == stop_seqs_NL[None]) | (stop_seqs_NL[None] == _NO_TOKEN),
                                   axis=-1)
                stop_B |= jnp.any(match_BN & stop_active_N[None], axis=-1)
            stop_B &= live_B
            return (out_BN, logp_BN, length_B + live_B.astype(jnp.int32), done_B | stop_B, stopped_B | stop_B,
                    recent_BL)

        tok_B, logp_B = choose(logits_BTV[:, -1], 0)
        # Slots no step writes (every row stopped before max_new_tokens) must read as padding too.
        pads_BN = jnp.full((B, N), plan.pad_id, jnp.int32)
        # `recent` starts with a value that is neither a token nor the wildcard: nothing matches the prompt.
        carry = (pads_BN, jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), jnp.int32), lens_B == 0,
                 jnp.zeros((B,), bool), jnp.full((B, stop_seqs_NL.shape[1]), _NO_TOKEN - 1, jnp.int32))
        carry = record(carry, tok_B, logp_B, 0)

        def body(loop):
            step, tok_B, cache, rec = loop
            # The token sampled at step-1 is generated token number step-1: position len + step - 1.
            logits_BTV, cache = model.decode(tok_B[:, None], cache, (lens_B + step - 1)[:, None],
                                             jnp.ones((B, 1), jnp.int32), layers=layers)
            tok_B, logp_B = choose(logits_BTV[:, 0], step)
            return step + 1, tok_B, _constrain_cache(cache), record(rec, tok_B, logp_B, step)

        def running(end):
            def cond(loop):  # before the phase's end, and some row has not stopped
                step, _, _, (_, _, _, done_B, _, _) = loop
                return (step < end) & ~jnp.all(done_B)
            return cond

        loop = (jnp.int32(1), tok_B, cache, carry)
        for phase, end in enumerate(ends):
            if phase:
                step, tok_B, cache, carry = loop
                loop = step, tok_B, _constrain_cache(cache.grow(end - ends[phase - 1])), carry
            loop = jax.lax.while_loop(running(end), body, loop)
        out_BN, logp_BN, length_B, _, stopped_B, _ = loop[3]
        return (constrain(out_BN, ("batch", None)), constrain(logp_BN, ("batch", None)), length_B, stopped_B)
