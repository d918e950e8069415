"""Progress bars: tqdm with an ETA. On a terminal they refresh twice a second; in a log file every 30 s."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(iterable=None, enabled: bool = True, **kw) -> tqdm:
    """A tqdm bar, or a silent one when ``enabled`` is false (``--no-progress``)."""
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, disable=not enabled, mininterval=0.5 if tty else 30.0, dynamic_ncols=True, **kw)
