"""Supervised fine-tuning: next-token loss on the assistant's (or the completion's) tokens only.

The data layer's `loss_mask` is 1 on exactly those targets (data/chat.py decides which tokens a
template trains), so the loss is next-token cross-entropy under that mask. It is a sum over tokens
that the shared step divides by the step's token count: every trained token weighs the same,
however the examples were packed into rows or split over micro-batches and devices, so packed and
one-per-row batches of the same examples give the same loss.
"""
from __future__ import annotations

from typing import Any

from train.losses import LossFn, register
from train.losses.next_token import make_next_token


@register("sft", kinds=("sft",))
def make_sft(cfg: Any) -> LossFn:
    """SFT's loss: `next_token` (with its optional z-loss) on SFT batches."""
    return make_next_token(cfg)
