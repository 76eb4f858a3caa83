"""A policy and its value model, trained together (PPO): one module, so that one train state,
one optimizer and one checkpoint hold both.

The value model is a separate decoder with a scalar head (`ModelConfig.reward_head`), started from
a reward model or from the policy; `value.values(...)` gives its estimate after every token.
"""
from __future__ import annotations

from flax import nnx

from model.transformer import Transformer


class ActorCritic(nnx.Module):
    """`policy` (an LM) and `value` (a scalar-head model reading the same tokens)."""

    def __init__(self, policy: Transformer, value: Transformer):
        if not value.cfg.reward_head:
            raise ValueError("the value model needs a scalar head (ModelConfig.reward_head)")
        self.policy, self.value = policy, value
        self.cfg = policy.cfg  # what the sampler and the step read: the policy's


def policy_of(model: nnx.Module) -> Transformer:
    """The language model of `model`: the policy of an ActorCritic, else the model itself."""
    return model.policy if isinstance(model, ActorCritic) else model
