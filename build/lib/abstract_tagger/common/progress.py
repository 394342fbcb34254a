"""Progress bars fit for where the output goes: a live bar on a terminal; in a log file or a pipe,
one plain line a minute instead of thousands of `\\r`-rewritten frames."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


class _LineWriter:
    """tqdm output for logs: each refresh becomes one line instead of a `\\r`-rewritten frame."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(**kwargs: Any) -> tqdm:
    """`tqdm(**kwargs)`, styled for stderr as it is now."""
    if sys.stderr.isatty():
        return tqdm(dynamic_ncols=True, **kwargs)
    return tqdm(file=_LineWriter(sys.stderr), mininterval=60.0, maxinterval=60.0, ncols=100, **kwargs)
