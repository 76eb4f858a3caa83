"""Kiln's benchmarks, run by `kiln bench NAME` (launch/bench.py)."""
from __future__ import annotations

import argparse
from typing import Callable


def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` above 0. A count or size of 0 or less compiled, then timed
    nothing, and printed NaN figures as its results."""
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value" for a value that is no number
    return parse
