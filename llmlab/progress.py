"""Progress bars: every long loop's tqdm bar comes from ``progress_bar``.

On a terminal a bar redraws as tqdm likes (up to ten times a second, in place). When stderr is not a terminal
(CI, ``nohup``, a log file) each redraw becomes more text in the log, so the bar then redraws at most every
``LOG_INTERVAL`` seconds, and once at its end: a 2,000-step run leaves a few dozen updates, not 2,000.
Callers that change the postfix every step pass ``refresh=False`` to ``set_postfix``, so that it shows at the
next redraw instead of forcing one.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL = 5.0       # seconds between redraws when the bar is written to a file or pipe


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, with ``mininterval=LOG_INTERVAL`` unless it writes to a terminal."""
    if not is_terminal(kwargs.get("file") or sys.stderr):
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(iterable, **kwargs)


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):        # no isatty, or a closed stream
        return False
