"""Progress bars: fractions from the pipeline's callbacks become a bar that ends full, logs still show."""

from __future__ import annotations

import logging

from tools.progress import count_bar, fraction_bar


def test_fraction_bar_follows_fractions_and_ends_full(capsys) -> None:
    with fraction_bar("training brick") as on_progress:
        for fraction in (0.0, 0.05, 0.05, 0.5, 0.4, 1.2):  # repeats, a step back and an overshoot
            on_progress(fraction, f"at {fraction}")
        logging.getLogger("test").warning("a log line while the bar is open")
    err = capsys.readouterr().err
    assert "training brick" in err and "100%" in err and "at 1.2" in err
    assert "a log line while the bar is open" in err


def test_count_bar_counts_items(capsys) -> None:
    with count_bar("continual", 3, "task") as bar:
        for _ in range(3):
            bar.update(1)
    assert "3/3" in capsys.readouterr().err
