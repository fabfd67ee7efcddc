"""A cache through which every call is computed again: :class:`RefreshingCache`.

    >>> from fleche import fleche
    >>> from fleche.caches import memory_cache
    >>> store = memory_cache()
    >>> runs = []
    >>> @fleche(cache=RefreshingCache(store))
    ... def square(x):
    ...     runs.append(x)
    ...     return x * x
    >>> square(3), square(3), runs
    (9, 9, [3, 3])
    >>> store.load_result(square.digest(3))        # what the last run stored
    9
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .caches import CacheWrapper
from .digest import Digest

__all__ = ["RefreshingCache"]


@dataclass(frozen=True)
class RefreshingCache(CacheWrapper):
    """``cache``, except that :meth:`load_result`, the decorator's lookup, always misses: a
    decorated call through it runs its body every time and its save replaces the stored
    entry (with ``compute_once``, under the key's lock). Everything else is forwarded, so
    ``load``, ``contains``, ``query`` and the rest see the store as it is; a call refreshed
    here is a hit for every other cache on the same store. Thread- and process-safe as
    ``cache`` is.
    """

    def load_result(self, key: Digest | str) -> Any:
        """Raise ``KeyError``: a refreshing cache serves no stored result.

        The stored entry is read first, so what the decorator must know about it still
        reaches it: ``SignatureError`` for an entry signed with another key (left alone, the
        call runs uncached), ``CorruptEntryError`` for a damaged one (replaced). That read
        costs what a hit costs, before the call computes.
        """
        self.cache.load_result(key)  # raises KeyError if absent, or what is wrong with it
        raise KeyError(
            f"{key}: a RefreshingCache serves no stored result (every call is computed again)"
        )
