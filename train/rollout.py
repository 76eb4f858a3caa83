"""The batch source of the RL stages (grpo, ppo): rollouts of the current policy, scored, turned into
mini-batches for the shared train step. The trainer reads it as it reads a data iterator.

A rollout: `rollout.batch_prompts` prompts (in a shuffled order, a new permutation each pass over the
prompts), `rollout.num_samples` replies each from the policy as it is now (the Step 4 sampler at
rollout.temperature / top_k / top_p, seeded by the run's seed and the rollout's number, so a resumed
run samples the same), scored by `rollout.reward` (train/rewards.py) minus `rollout.format_penalty`
for a reply cut off at max_new_tokens (`rollout.mask_truncated` drops such replies from the loss).
Then, per token and aligned with the targets (train/losses/rl.py): the sampling policy's log-probs
(when the loss needs them), the reference's (loss.beta > 0), PPO's values, and advantages:
  grpo  the group advantage of each reply's score (`rollout.advantage`: grpo | dr_grpo | rloo) on
        every one of its tokens;
  ppo   GAE (rollout.gamma, rollout.lam) over per-token rewards −kl_coef·KL(π_old ‖ ref) with the
        score added on the last token, returns taken before the advantages are whitened; with
        rollout.kl_target > 0 the coefficient adapts (Ziegler et al., 2019) towards that KL per reply.
The rollout batch is cut into mini-batches of data.batch_size rows, reshuffled for each of
`rollout.epochs` passes (μ): that many train steps per rollout.

Sampling is one function (`sample`) and scoring another (`score_rollout`), so a faster generation
engine can replace the first without touching the second or the losses. State (checkpointed with
the run) is the number of rollouts done and the KL coefficient; a checkpoint always falls between
rollouts (preflight checks the step counts), so a resumed run continues exactly.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from ml_collections import ConfigDict

from data import loader
from model.actor_critic import policy_of
from model.sharding import to_host
from train import generate, reference as references, rewards
from train.losses import rl

RL_STAGES = ("grpo", "ppo")


def loss_config(config: Any) -> ConfigDict:
    """`loss.*` with what the RL losses also read from the rollout: the sampling temperature (the
    log-probs' temperature) and max_new_tokens (Dr. GRPO's normaliser, as `max_len`)."""
    return ConfigDict(dict(config.loss.to_dict(), temperature=config.rollout.temperature,
                           max_len=config.rollout.max_new_tokens))


def reference(config: Any, graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State
              ) -> references.Reference | None:
    """The starting policy, adding per-token `ref_logps` to rollouts (None without a KL term: loss.beta 0)."""
    if not config.loss.beta:
        return None
    temperature = float(config.rollout.temperature)

    def fields(model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {"ref_logps": rl.token_logps(model, batch, temperature)[0]}

    rows = config.rollout.batch_prompts * config.rollout.num_samples
    return references.Reference(graphdef, params, frozen, chunks=rows // config.data.batch_size, fields=fields)


def needs_old_logps(config: Any) -> bool:
    """Whether the loss reads the sampling policy's log-probs: when a rollout feeds several train steps
    (several mini-batches or epochs: every step after the first sees a policy that has moved since
    the rollout, and PPO's ratio is against the policy that sampled), or for PPO's KL reward. With one
    train step per rollout the policy is still the sampling one and the loss takes them from its own
    forward pass."""
    ro = config.rollout
    steps = ro.batch_prompts * ro.num_samples // config.data.batch_size * ro.epochs
    return steps > 1 or (config.stage == "ppo" and config.loss.beta > 0)


def sample(sampler: generate.Sampler, chats: list[list[dict[str, str]]], ro: Any, key: jax.Array
           ) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """(prompt token ids per prompt, one reply dict per (prompt, sample), prompt-major: `text`,
    `token_ids`, `finish_reason`) from the policy behind `sampler`."""
    prompt_ids = [sampler.encode(c, chat=True) for c in chats]
    replies = sampler.complete(chats, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_k=ro.top_k,
                               top_p=ro.top_p, seed=key, num_samples=ro.num_samples, chat=True)
    return prompt_ids, replies


def token_rows(prompt_ids: list[list[int]], replies: list[dict[str, Any]], num_samples: int, seq_len: int,
               pad_id: int, mask_truncated: bool) -> dict[str, np.ndarray]:
    """Prompt + reply rows [N, seq_len] (tokens, targets, positions, segment_ids, loss_mask on the
    reply's targets), right-padded."""
    n = len(replies)
    rows = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
    rows["tokens"][:], rows["targets"][:] = pad_id, pad_id
    for r, reply in enumerate(replies):
        prompt = prompt_ids[r // num_samples]
        seq = prompt + list(reply["token_ids"])
        if len(seq) - 1 > seq_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens and a reply of up to rollout.max_new_tokens tokens do "
                             f"not fit data.seq_len={seq_len}; raise data.seq_len or lower rollout.max_new_tokens")
        length = len(seq) - 1
        rows["tokens"][r, :length], rows["targets"][r, :length] = seq[:-1], seq[1:]
        rows["positions"][r, :length], rows["segment_ids"][r, :length] = np.arange(length), 1
        if not (mask_truncated and reply["finish_reason"] == "length"):
            rows["loss_mask"][r, len(prompt) - 1:length] = 1
    return rows


def check_truncation(truncated: np.ndarray, ro: Any, k: int) -> None:
    """ValueError when `rollout.mask_truncated` drops every reply of rollout k from the loss (each ran to
    max_new_tokens), which left the train step nothing to learn from."""
    if ro.mask_truncated and truncated.all():
        raise ValueError(f"rollout {k}: all {truncated.size} replies ran to rollout.max_new_tokens={ro.max_new_tokens} "
                         "and rollout.mask_truncated=true drops them all from the loss; raise rollout.max_new_tokens "
                         "(or set rollout.mask_truncated=false)")


class RolloutSource:
    """Mini-batches of rollouts of `run`'s current policy (see the module docstring); `metrics` holds
    the latest rollout's figures (reward/mean, reward/std, completion_length, ...)."""

    def __init__(self, run: Any):
        self.run, self.config = run, run.config
        self.records = rewards.prompts(run.config)
        self.score = rewards.scorer(run.config.rollout.reward)
        self.state = {"rollouts": 0, "kl_coef": float(run.config.loss.beta)}
        self.queue: list[dict[str, np.ndarray]] = []
        self.metrics: dict[str, float] = {}
        config = run.config
        chunks = config.rollout.batch_prompts * config.rollout.num_samples // config.data.batch_size
        ppo, old, temperature = config.stage == "ppo", needs_old_logps(config), float(config.rollout.temperature)

        def stats(params: nnx.State, frozen: nnx.State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
            model = nnx.merge(run.graphdef, params, frozen)

            def one(piece):
                out = {}
                if old:
                    out["old_logps"] = rl.token_logps(model, piece, temperature)[0]
                if ppo:
                    out["old_values"] = model.value.values(piece["tokens"], piece["positions"], piece["segment_ids"])
                return out

            pieces = {k: v.reshape(chunks, v.shape[0] // chunks, *v.shape[1:]) for k, v in batch.items()}
            return {k: v.reshape(-1, *v.shape[2:]) for k, v in jax.lax.map(one, pieces).items()}

        self._stats = jax.jit(stats) if (old or ppo) else None

    def __iter__(self) -> "RolloutSource":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """This process's rows of the next mini-batch (every process holds the whole rollout)."""
        if not self.queue:
            self.queue = self._rollout()
        return _local_rows(self.queue.pop(0))

    @property
    def at_boundary(self) -> bool:
        """Between rollouts: the only place a checkpoint may fall (its mini-batches are not saved)."""
        return not self.queue

    def get_state(self) -> dict[str, Any]:
        if self.queue:
            raise RuntimeError("an RL checkpoint must fall between rollouts (train.steps and checkpoint.every are "
                               "multiples of the train steps per rollout)")
        return dict(self.state)

    def set_state(self, state: dict[str, Any]) -> None:
        self.state, self.queue = {"rollouts": int(state["rollouts"]), "kl_coef": float(state["kl_coef"])}, []

    def _prompts(self, k: int) -> list[dict[str, Any]]:
        """Rollout k's prompts: positions k·P ... of the concatenated per-pass permutations."""
        n, P, seed = len(self.records), self.config.rollout.batch_prompts, self.config.seed
        orders = {p: np.random.default_rng([seed, p]).permutation(n) for p in {j // n for j in range(k * P, (k + 1) * P)}}
        return [self.records[orders[j // n][j % n]] for j in range(k * P, (k + 1) * P)]

    def _rollout(self) -> list[dict[str, np.ndarray]]:
        config, ro, run = self.config, self.config.rollout, self.run
        k, started = self.state["rollouts"], time.perf_counter()
        chosen = self._prompts(k)
        chats = [p["prompt"] for p in chosen]
        policy = policy_of(nnx.merge(run.graphdef, run.state.params, run.frozen))
        sampler = generate.Sampler(policy, run.tokenizer, mesh=run.mesh, rules=config.mesh.rules,
                                   chat_template=config.data.chat_template)
        prompt_ids, replies = sample(sampler, chats, ro, jax.random.fold_in(jax.random.key(config.seed), k))
        sampled = time.perf_counter()
        G = ro.num_samples
        truncated = np.array([r["finish_reason"] == "length" for r in replies])
        check_truncation(truncated, ro, k)
        scores = self.score([c for c in chats for _ in range(G)], [r["text"] for r in replies],
                            [p["answer"] for p in chosen for _ in range(G)]) - ro.format_penalty * truncated
        rows = token_rows(prompt_ids, replies, G, config.data.seq_len, run.tokenizer.pad_id, ro.mask_truncated)
        batch = self._score_rollout(rows, scores.astype(np.float32))
        lengths = np.array([len(r["token_ids"]) for r in replies])
        self.metrics.update({"reward/mean": float(scores.mean()), "reward/std": float(scores.std()),
                             "completion_length": float(lengths.mean()), "rollout/truncated": float(truncated.mean()),
                             "rollout/tokens_per_s": float(lengths.sum() / (sampled - started)),
                             "rollout/seconds": time.perf_counter() - started})
        self.state["rollouts"] = k + 1
        return self._minibatches(batch, k)

    def _score_rollout(self, rows: dict[str, np.ndarray], scores: np.ndarray) -> dict[str, np.ndarray]:
        """The rows with the per-token log-probs, values and advantages the loss reads (host arrays)."""
        config, ro, run = self.config, self.config.rollout, self.run
        device = loader.global_batch(_local_rows(rows), run.mesh)
        if run.rollout_reference is not None:
            device = run.rollout_reference(device)
        if self._stats is not None:
            device.update(self._stats(run.state.params, run.frozen, {k: device[k] for k in rows}))
        out = to_host(device)
        mask = out["loss_mask"].astype(np.float32)
        if config.stage == "grpo":
            adv = np.asarray(rl.group_advantages(scores, ro.num_samples, method=ro.advantage))
            out["advantages"] = (adv[:, None] * mask).astype(np.float32)
            return out
        kl = (np.asarray(rl.kl_penalty(out["old_logps"], out["ref_logps"], config.loss.kl_estimator)) * mask
              if "ref_logps" in out else np.zeros_like(mask))
        token_rewards = -self.state["kl_coef"] * kl
        has = mask.sum(axis=1) > 0
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
        token_rewards[np.arange(len(scores))[has], last[has]] += scores[has]
        adv, returns = rl.gae(token_rewards, out["old_values"], mask, gamma=ro.gamma, lam=ro.lam)
        out["advantages"] = np.asarray(rl.whiten(adv, mask), np.float32)
        out["returns"] = np.asarray(returns, np.float32)
        valid = mask > 0
        residual = (out["returns"] - out["old_values"])[valid]
        kl_per_reply = float(kl.sum(axis=1)[has].mean()) if has.any() else 0.0
        self.metrics.update({"kl_coef": self.state["kl_coef"], "objective/kl": kl_per_reply,
                             "explained_variance": float(1 - residual.var() / max(out["returns"][valid].var(), 1e-8))})
        if ro.kl_target > 0:
            self.state["kl_coef"] = rl.adaptive_kl_coef(self.state["kl_coef"], kl_per_reply, ro.kl_target, len(scores),
                                                        ro.kl_horizon)
        return out

    def _minibatches(self, batch: dict[str, np.ndarray], k: int) -> list[dict[str, np.ndarray]]:
        n, size = len(batch["tokens"]), self.config.data.batch_size
        out = []
        for epoch in range(self.config.rollout.epochs):
            order = np.random.default_rng([self.config.seed, k, epoch, 1]).permutation(n)
            out += [{key: v[order[i:i + size]] for key, v in batch.items()} for i in range(0, n, size)]
        return out


def _local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's share of rows of a batch every process holds whole (all of it with one process)."""
    n, i = jax.process_count(), jax.process_index()
    if n == 1:
        return batch
    size = len(next(iter(batch.values()))) // n
    return {k: v[i * size:(i + 1) * size] for k, v in batch.items()}
