"""What a store's entries cost and when its calls were used: ``cache.usage()``.

A :class:`StoreUsage` is one snapshot of a cache's storages, the listing a
:class:`~fleche.limits.SizeLimitedCache` plans its evictions from::

    >>> from fleche import digest
    >>> from fleche.caches import memory_cache
    >>> from fleche.call import Call
    >>> cache = memory_cache()
    >>> key = cache.save(Call("square", {"x": 3}, result=9))
    >>> usage = cache.usage()
    >>> list(usage.calls) == [key], set(usage.values) == {digest(3), digest(9)}
    (True, True)
    >>> usage.total == sum(u.size for u in [*usage.calls.values(), *usage.values.values()])
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .digest import Digest
from .storage.base import EntryUsage

__all__ = ["EntryUsage", "StoreUsage"]


@dataclass(frozen=True)
class StoreUsage:
    """The stored call records and values of a cache with their sizes and last uses.

    ``calls`` maps each call key to its record's :class:`~fleche.storage.base.EntryUsage`
    (when it was last saved or used), ``values`` each value key (parts of destructured values
    included) to its entry's. A snapshot: calls and values saved or evicted meanwhile may or
    may not be in it.
    """

    calls: Mapping[Digest, EntryUsage] = field(default_factory=dict)
    values: Mapping[Digest, EntryUsage] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Bytes of every call record and value in it."""
        return sum(u.size for u in self.calls.values()) + sum(u.size for u in self.values.values())

    @staticmethod
    def merged(usages: Iterable[StoreUsage]) -> StoreUsage:
        """One snapshot of several stores (the layers of a stack): an entry kept in several
        counts the bytes of each copy, and its latest use."""
        calls: dict[Digest, EntryUsage] = {}
        values: dict[Digest, EntryUsage] = {}
        for usage in usages:
            for into, entries in ((calls, usage.calls), (values, usage.values)):
                for key, u in entries.items():
                    known = into.get(key)
                    into[key] = u if known is None else EntryUsage(
                        known.size + u.size, max(known.used, u.used)
                    )
        return StoreUsage(calls, values)
