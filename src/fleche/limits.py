"""A cache that keeps its store within a byte budget: :class:`SizeLimitedCache`.

Wrap any cache; once the stored calls and values take more than ``size_limit`` bytes, the
least recently used calls are evicted, with the values no remaining call needs, until they take
at most ``cull_to`` of the budget (diskcache's ``size_limit``)::

    >>> from fleche import fleche
    >>> from fleche.caches import memory_cache
    >>> store = memory_cache()
    >>> limited = SizeLimitedCache(store, size_limit=20_000)
    >>> @fleche(cache=limited)
    ... def page(n):
    ...     return str(n) * 4000          # about 4 kB each
    >>> for n in range(10):
    ...     _ = page(n)
    >>> evicted = limited.cull()          # at once, rather than at the next check
    >>> store.usage().total <= 20_000, page.contains(9), page.contains(0)
    (True, True, False)

What counts is what :meth:`~fleche.caches.BaseCache.usage` reports: the bytes of each call
record and value entry (files' sizes, rows' records and inline values, the pickled size of an
object in memory), as diskcache counts its values; ``cache.volume()``, the space the store
takes on disk, can be more (a SQLite file keeps freed pages, lock files, a server database's
own overhead).
"""

from __future__ import annotations

import atexit
import math
import multiprocessing.util
import time
import warnings
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .caches import CacheWrapper, evict_each
from .call import Call, DigestedCall
from .counters import BYTES_WRITTEN
from .digest import Digest
from .errors import FlecheWarning
from .storage.thread_safe import _PicklableLock
from .usage import StoreUsage

__all__ = ["SizeLimitedCache"]

_MAX_PENDING = 1024
"""Uses a process remembers before it writes them, whatever ``touch_interval`` says."""
_RETRY_AFTER = 60.0
"""Seconds before a check that failed after a save is tried again."""
_CHECK_COST_SHARE = 20
"""A check is never due sooner than this many times as long as the last one took."""


class _State:
    """What one :class:`SizeLimitedCache` object keeps in its process: uses not written yet,
    the last measurement, when the next check is due. Pickles as a fresh state."""

    __slots__ = ("lock", "culling", "pending", "flush_at", "total", "written_at", "check_at",
                 "warned")

    def __init__(self) -> None:
        self.lock = _PicklableLock()
        self.culling = _PicklableLock()
        self.pending: dict[Digest | str, float] = {}  # key: when it was last used
        self.flush_at = 0.0
        self.total: int | None = None  # bytes at the last measurement, after what it evicted
        self.written_at = 0.0  # BYTES_WRITTEN then
        self.check_at = -math.inf
        self.warned = False

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (type(self), ())


_LIVE: weakref.WeakValueDictionary[int, SizeLimitedCache] = weakref.WeakValueDictionary()
"""Caches of this process with uses not written yet: written when the process exits."""


def _flush_all() -> None:
    for cache in list(_LIVE.values()):
        cache._flush(raising=False)


atexit.register(_flush_all)
# Processes that multiprocessing starts end without atexit; they run its finalizers instead.
multiprocessing.util.Finalize(None, _flush_all, exitpriority=10)


@dataclass(frozen=True)
class SizeLimitedCache(CacheWrapper):
    """``cache``, kept within ``size_limit`` bytes by evicting the least recently used calls.

    **Uses.** A save, and a hit (``load_result``, ``load``), count as a use of the call. The
    storages record saves themselves; hits are remembered in this process and written to the
    store (``cache.touch``) in batches, at most every ``touch_interval`` seconds or 1024 calls,
    and when the process exits, so a hit costs a dictionary update, not a write. A recorded
    use is that coarse: written up to ``touch_interval`` late, to the second (the calls used
    within one second are stamped with the last use in it), and lost if the process is killed
    first (the call then counts as used when it was last saved or touched).

    **Checks.** After a save this process measures the store (``cache.usage()``: one listing,
    O(entries)) when its own writes since the last measurement may have crossed the budget and
    otherwise at most every ``check_interval`` seconds (never sooner than 20 times as long as
    the last measurement took, so a big store is not listed over and over). Writes of other
    processes are seen at the next measurement, so the store can exceed the budget by what is
    written between two of them; :meth:`cull` measures at once.

    **Evictions.** Over budget, the calls :meth:`victims` names (least recently used first)
    are evicted one by one, each with the values no remaining call needs (a value shared by two
    calls stays while one of them is stored), until the entries take at most
    ``cull_to * size_limit``; values no call needed to begin with go first. Planning reads every
    call record and each destructured value once per process (``cache.needed_values``), as
    ``gc`` does. Thread- and process-safe: evictions and removals are the storages' atomic
    ones, and no lock is held while planning, so processes that cull at once may together
    evict somewhat more than one would; a call being saved while its value is removed reads as
    a miss and is saved again, as with ``gc``. A cull that fails after a save (a corrupt entry:
    run ``fleche verify --repair``) costs a ``FlecheWarning``, never the save, and is tried again
    a minute later (or once this process has written the budget's worth).
    """

    size_limit: int
    cull_to: float = 0.9
    check_interval: float = 1.0
    touch_interval: float = 10.0
    _state: _State = field(default_factory=_State, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.size_limit) not in (int, float) or not self.size_limit > 0:
            raise ValueError(f"size_limit must be a number of bytes > 0, got {self.size_limit!r}")
        if type(self.cull_to) not in (int, float) or not 0 < self.cull_to <= 1:
            raise ValueError(f"cull_to must be a share of size_limit in (0, 1], got {self.cull_to!r}")
        for name in ("check_interval", "touch_interval"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not value >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")

    # -- uses -----------------------------------------------------------------------------------

    def load_result(self, key: Digest | str) -> Any:
        """The stored result (see :meth:`BaseCache.load_result`); a hit counts as a use."""
        result = self.cache.load_result(key)
        self._used(key)
        return result

    def load(self, key: Digest | str) -> Call:
        """The stored call (see :meth:`BaseCache.load`); counts as a use."""
        call = self.cache.load(key)
        self._used(key)
        return call

    def _used(self, key: Digest | str) -> None:
        state = self._state
        if not state.pending:
            _LIVE[id(self)] = self
        state.pending[key] = time.time()
        if len(state.pending) >= _MAX_PENDING or time.monotonic() >= state.flush_at:
            self._flush(raising=False)

    def _flush(self, *, raising: bool) -> None:
        """Write the uses remembered so far to the store."""
        state = self._state
        with state.lock:
            uses, state.pending = state.pending, {}
            state.flush_at = time.monotonic() + self.touch_interval
        # One touch per second in which calls were used, stamped with its last use.
        by_second: dict[int, tuple[float, list[Digest | str]]] = {}
        for key, when in uses.items():
            latest, keys = by_second.setdefault(int(when), (when, []))
            keys.append(key)
            if when > latest:
                by_second[int(when)] = (when, keys)
        try:
            for when, keys in by_second.values():
                self.cache.touch(keys, when)
        except Exception as e:  # noqa: BLE001 - recording uses never fails a call
            if raising:
                raise
            if not state.warned:
                state.warned = True
                warnings.warn(
                    f"{self!r} cannot record which calls were used ({type(e).__name__}: {e}); "
                    "evictions take the least recently saved calls instead", FlecheWarning,
                    stacklevel=4,
                )

    # -- writes ---------------------------------------------------------------------------------

    def save(self, call: Call, *, overwrite: bool = False) -> Digest:
        """Save the call (see :meth:`BaseCache.save`), a use of it, then keep the budget: a
        check after the save may evict other calls (see the class docstring)."""
        key = self.cache.save(call, overwrite=overwrite)  # storages record when (see usage)
        self._after_write()
        return key

    def stash(self, call: Call) -> DigestedCall:
        """Stash the values (see :meth:`BaseCache.stash`), then keep the budget. Values no
        stored call needs are the first to go when the store is over it."""
        record = self.cache.stash(call)
        self._after_write()
        return record

    def _after_write(self) -> None:
        state = self._state
        if state.total is not None and time.monotonic() < state.check_at:
            grown = BYTES_WRITTEN.get("bytes") - state.written_at
            if state.total + grown <= self.size_limit:
                return
        if not state.culling.acquire(blocking=False):
            return  # another thread of this process is at it
        try:
            self._cull()
        except Exception as e:  # noqa: BLE001 - the save happened; the budget waits
            # Try again after a while, or once this process wrote the budget's worth.
            state.total, state.written_at = 0, BYTES_WRITTEN.get("bytes")
            state.check_at = time.monotonic() + max(self.check_interval, _RETRY_AFTER)
            warnings.warn(
                f"{self!r} could not keep its store within {self.size_limit} bytes: "
                f"{type(e).__name__}: {e}", FlecheWarning, stacklevel=3,
            )
        finally:
            state.culling.release()

    # -- culling --------------------------------------------------------------------------------

    def cull(self) -> set[Digest]:
        """Measure the store now and, if its entries take more than ``size_limit`` bytes,
        evict calls and remove values until they take at most ``cull_to * size_limit``;
        return the keys of the calls evicted.

        Writes this process's remembered uses first. Safe while other threads and processes
        use the store (see the class docstring); raises what the store raises, e.g.
        ``CorruptEntryError`` for a record whose values cannot be known.
        """
        with self._state.culling:
            return self._cull()

    def _cull(self) -> set[Digest]:
        state = self._state
        self._flush(raising=False)
        started = time.monotonic()
        written = BYTES_WRITTEN.get("bytes")
        usage = self.cache.usage()
        total = usage.total
        evicted: set[Digest] = set()
        if total > self.size_limit:
            evicted, freed = self._evict_down(usage, total)
            total -= freed
        took = time.monotonic() - started
        state.total, state.written_at = total, written
        state.check_at = time.monotonic() + max(self.check_interval, _CHECK_COST_SHARE * took)
        return evicted

    def _evict_down(self, usage: StoreUsage, total: int) -> tuple[set[Digest], int]:
        """Evict until the entries of ``usage`` take at most ``cull_to * size_limit``; return
        the calls evicted and the bytes freed."""
        target = self.size_limit * self.cull_to
        # Calls saved since the listing keep their values too.
        calls = list(dict.fromkeys([*usage.calls, *self.cache.list()]))
        needed = self.cache.needed_values(calls)
        holders = Counter(v for values in needed.values() for v in values if v in usage.values)
        garbage = [v for v in usage.values if not holders[v]]
        freed = sum(usage.values[v].size for v in garbage)
        victims: list[Digest] = []
        for key in self.victims(usage):
            if total - freed <= target:
                break
            if key not in usage.calls:
                continue
            victims.append(key)
            freed += usage.calls[key].size
            for value in needed.get(key, ()):
                if value in holders:
                    holders[value] -= 1
                    if not holders[value]:
                        garbage.append(value)
                        freed += usage.values[value].size
        evicted = evict_each(self.cache.evict, victims)
        for value in garbage:
            self.cache.discard(value)
        return evicted, freed

    def victims(self, usage: StoreUsage) -> Iterable[Digest]:
        """The stored calls in the order in which to evict them, first victim first, when the
        store is over its budget: by default the least recently used first (the oldest
        ``usage.calls[key].used``; of calls used at the same moment, the biggest record first).

        Override it to choose otherwise (the biggest first, one function's calls before
        another's, ...): return keys of ``usage.calls``; eviction takes them in order and stops
        as soon as the entries fit ``cull_to * size_limit``, counting for each call its record
        and the values that no remaining call needs. Called in the process that culls, holding
        no lock; it may read the store (``self.cache``).
        """
        calls = usage.calls
        return sorted(calls, key=lambda k: (calls[k].used, -calls[k].size))

    def close(self) -> None:
        """Write the remembered uses, then close ``cache`` (see :meth:`BaseCache.close`)."""
        self._flush(raising=False)
        self.cache.close()
