"""Progress bars (tqdm) for the long CLI commands, fed by the pipeline's `(fraction, message)` callbacks.

Bars go to stderr and log lines are routed through tqdm while a bar is open, so neither breaks the other.
With `--quiet`, or when stderr is not a terminal and INSPECTION_PROGRESS is unset, tqdm still prints, at
most every few seconds (its `mininterval`), so CI logs stay short.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

ProgressCallback = Callable[[float, str], None]
_STEPS = 1000  # a fraction in [0, 1] shown with 0.1% resolution


@contextmanager
def fraction_bar(title: str, disable: bool = False) -> Iterator[ProgressCallback]:
    """A bar for one job reporting fractions; yields the callback to hand to the pipeline."""
    bar = tqdm(total=_STEPS, desc=title, unit="‰", dynamic_ncols=True, disable=disable,
               mininterval=0.5 if sys.stderr.isatty() else 5.0,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, message: str) -> None:
        target = int(round(min(max(fraction, 0.0), 1.0) * _STEPS))
        if target > bar.n:
            bar.update(target - bar.n)
        bar.set_postfix_str(message[:80], refresh=False)

    with logging_redirect_tqdm():
        try:
            yield update
        finally:
            bar.close()


@contextmanager
def count_bar(title: str, total: int | None, unit: str, disable: bool = False) -> Iterator[tqdm]:
    """A bar over `total` items (tasks, categories, frames); call `.update(1)` per item."""
    bar = tqdm(total=total, desc=title, unit=unit, dynamic_ncols=True, disable=disable,
               mininterval=0.5 if sys.stderr.isatty() else 5.0)
    with logging_redirect_tqdm():
        try:
            yield bar
        finally:
            bar.close()


def bars_disabled(quiet: bool) -> bool:
    return quiet or os.environ.get("INSPECTION_PROGRESS", "1") == "0"
