"""Terminal output for the command line: aligned tables, truncation, sizes, a progress bar.

>>> print(table(["key", "arguments"], [["ab12", "x=1"], ["cd34", "x=" + "9" * 30]], 20, 1))
key   arguments
ab12  x=1
cd34  x=99999999999…
>>> size(1536), duration(0.0123), duration(125)
('1.5 KiB', '12 ms', '2m05s')
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from typing import TextIO

__all__ = ["Progress", "count", "duration", "size", "table", "terminal_width", "truncate"]

ELLIPSIS = "…"


def terminal_width() -> int:
    """Columns of the terminal standard output goes to; 100 when it is not a terminal, so
    piped output stays bounded (``COLUMNS`` overrides both)."""
    return shutil.get_terminal_size((100, 24)).columns


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def truncate(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis if longer."""
    text = " ".join(text.split()) if "\n" in text else text
    if len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + ELLIPSIS if width > 0 else ""


def table(
    headers: Sequence[str] | None, rows: Sequence[Sequence[str]], width: int, flexible: int
) -> str:
    """Rows as aligned columns fitting ``width``, under ``headers`` if given: the ``flexible``
    column is narrowed first (down to 12 characters), then the widest column, step by step."""
    cells = [[truncate(c, 10_000) for c in row] for row in rows]
    if headers is not None:
        cells.insert(0, list(headers))
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    gap = 2
    excess = sum(widths) + gap * (len(widths) - 1) - width
    if excess > 0:
        cut = min(excess, max(widths[flexible] - 12, 0))
        widths[flexible] -= cut
        excess -= cut
    while excess > 0:
        i = max(range(len(widths)), key=lambda j: widths[j])
        if widths[i] <= 4:
            break
        widths[i] -= 1
        excess -= 1
    return "\n".join(
        (" " * gap).join(truncate(c, w).ljust(w) for c, w in zip(row, widths)).rstrip()
        for row in cells
    )


def count(n: int, noun: str) -> str:
    """``"1 call"``, ``"3 calls"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def size(n: float | None) -> str:
    """A byte count for people: ``"1.4 MiB"``; ``"n/a"`` for ``None``."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    """A wall time for people: ``"40 µs"``, ``"12 ms"``, ``"3.4 s"``, ``"2m05s"``, ``"1h02m"``; ``""`` if
    unknown."""
    if seconds is None:
        return ""
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


class Progress:
    """A one-line progress bar on ``stream`` (standard error), redrawn at most ten times a second.

    ``mode`` is ``"auto"`` (draw only when ``stream`` is a terminal and the work takes longer
    than half a second), ``"always"`` or ``"never"``. Not thread-safe: one thread updates it.
    """

    def __init__(
        self, label: str, mode: str = "auto", stream: TextIO | None = None, delay: float = 0.5
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = mode == "always" or (mode == "auto" and _isatty(self.stream))
        self._start = time.monotonic()
        self._delay = 0.0 if mode == "always" else delay
        self._last = 0.0
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        """Show ``done`` of ``total``; cheap when nothing needs drawing."""
        if not self.enabled:
            return
        now = time.monotonic()
        finished = done >= total
        if now - self._start < self._delay or (now - self._last < 0.1 and not finished):
            return
        self._last = now
        fraction = done / total if total else 1.0
        bar = 24
        filled = int(fraction * bar)
        line = f"{self.label} [{'#' * filled}{'.' * (bar - filled)}] {done}/{total} {fraction:4.0%}"
        self.stream.write("\r" + line)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line, if one was drawn."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
