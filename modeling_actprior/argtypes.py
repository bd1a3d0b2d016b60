"""Command-line value types that refuse out-of-range values in the parser, with the allowed range in the message
(``argparse`` then prints ``argument --batch_size: must be an integer >= 1; got 0``)."""

from __future__ import annotations

import argparse
import math


def int_at_least(low: int, high: int | None = None):
    """An ``argparse`` type for integers in ``[low, high]`` (``high`` None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {allowed}; got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


def float_in(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An ``argparse`` type for finite floats in the interval from ``low`` to ``high`` (open ends as flagged)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
        bad = (not math.isfinite(value) or value < low or (low_open and value == low)
               or (high is not None and (value > high or (high_open and value == high))))
        if bad:
            interval = (("(" if low_open else "[") + f"{low:g}, " + (f"{high:g}" if high is not None else "inf")
                        + (")" if high_open or high is None else "]"))
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}; got {text}")
        return value

    parse.__name__ = "float"
    return parse


#: Seeds go to numpy's legacy seeding through accelerate's ``set_seed``, which takes 32 bits.
MAX_SEED = 2**32 - 1
#: Square camera sizes the simulators render: Meta-World's offscreen framebuffer is 640 x 480.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 480
