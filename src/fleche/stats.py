"""Cache statistics: a wrapper that counts hits, misses and saves, and times them.

:class:`StatsCache` wraps any cache and counts what passes through it, so statistics are written
once for every kind of storage. File storages add the bytes they write to the process-wide
:data:`BYTES_WRITTEN` counter, which the wrapper reports as the growth since it was created.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .caches import CacheWrapper
from .counters import BYTES_WRITTEN, Counters
from .call import Call
from .digest import Digest

__all__ = ["BYTES_WRITTEN", "Counters", "StatsCache"]


@dataclass(frozen=True)
class StatsCache(CacheWrapper):
    """A cache that forwards every operation to ``cache`` and counts lookups and saves.

    Counters: ``hits`` and ``misses`` of :meth:`load_result` (the decorator's lookup),
    ``saves``, ``load_seconds``, ``save_seconds``, ``errors`` (saves that raised), and
    ``bytes_written`` by file storages of this process since the wrapper was created. Counting is
    thread-safe; each process (each Dask worker) has its own counts.
    """

    counters: Counters = field(default_factory=Counters, compare=False, repr=False)
    _bytes_at_start: float = field(
        default_factory=lambda: BYTES_WRITTEN.get("bytes"), init=False, compare=False, repr=False
    )

    def stats(self) -> dict[str, float]:
        """The counters now."""
        counts = {"hits": 0, "misses": 0, "saves": 0, "errors": 0, "load_seconds": 0.0,
                  "save_seconds": 0.0}
        counts.update(self.counters.snapshot())
        counts["bytes_written"] = BYTES_WRITTEN.get("bytes") - self._bytes_at_start
        return counts

    def load_result(self, key: Digest | str) -> Any:
        t0 = time.perf_counter()
        try:
            result = self.cache.load_result(key)
        except KeyError:
            self.counters.add("misses")
            raise
        finally:
            self.counters.add("load_seconds", time.perf_counter() - t0)
        self.counters.add("hits")
        return result

    def save(self, call: Call, *, overwrite: bool = False) -> Digest:
        t0 = time.perf_counter()
        try:
            key = self.cache.save(call, overwrite=overwrite)
        except Exception:
            self.counters.add("errors")
            raise
        finally:
            self.counters.add("save_seconds", time.perf_counter() - t0)
        self.counters.add("saves")
        return key
