"""Process-wide counters that storages update and statistics wrappers read."""

from __future__ import annotations

import threading

__all__ = ["BYTES_WRITTEN", "Counters"]


class Counters:
    """Named numeric counters that many threads update at once; pickles as zeroed counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}

    def add(self, name: str, amount: float = 1) -> None:
        """Add ``amount`` to counter ``name`` (atomic among threads of this process)."""
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def get(self, name: str) -> float:
        return self._values.get(name, 0)

    def snapshot(self) -> dict[str, float]:
        """A consistent copy of every counter."""
        with self._lock:
            return dict(self._values)

    def reset(self) -> None:
        with self._lock:
            self._values.clear()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (type(self), ())


BYTES_WRITTEN = Counters()
"""Bytes written by file storages in this process, under the name ``"bytes"``."""
