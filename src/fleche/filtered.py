"""A read-only view of the calls of a cache that match a template: ``cache.filter(template)``.

    >>> from fleche.caches import memory_cache
    >>> from fleche.call import Call, QueryCall
    >>> cache = memory_cache()
    >>> keys = [cache.save(Call("f", {"x": x}, result=x)) for x in range(4)]
    >>> view = cache.filter(QueryCall(arguments={"x": 2}))
    >>> view.contains(keys[2]), view.contains(keys[1]), view.query().count()
    (True, False, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .caches import BaseCache, ReadOnlyCache
from .call import Call, QueryCall
from .digest import DIGEST_LENGTH, Digest, digest
from .storage.base import _check_key_text, _unique_match
from .usage import StoreUsage

__all__ = ["FilteredCache", "both"]


def both(a: QueryCall, b: QueryCall) -> QueryCall | None:
    """One template matching what both ``a`` and ``b`` match, or ``None`` if no call can match
    both (they ask for different names, or different values of one argument, ...)."""
    fields: dict[str, Any] = {}
    for name in ("name", "module", "version", "code_digest"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None and y is not None and x != y:
            return None
        fields[name] = x if x is not None else y
    if a.result is not None and b.result is not None and digest(a.result) != digest(b.result):
        return None
    fields["result"] = a.result if a.result is not None else b.result
    arguments = _merged(a.arguments, b.arguments)
    if arguments is _CONFLICT:
        return None
    fields["arguments"] = arguments
    metadata: dict[str, Any] | None = None
    if a.metadata is not None or b.metadata is not None:
        metadata = {}
        for section in {**(a.metadata or {}), **(b.metadata or {})}:
            entries = _merged((a.metadata or {}).get(section), (b.metadata or {}).get(section))
            if entries is _CONFLICT:
                return None
            metadata[section] = entries or {}
    fields["metadata"] = metadata
    return QueryCall(**fields)


_CONFLICT: Any = object()


def _merged(x: Any, y: Any) -> Any:
    """Two mappings of required values as one; ``_CONFLICT`` if a name needs two values."""
    if x is None or y is None:
        return y if x is None else x
    merged = dict(x)
    for name, value in y.items():
        if name in merged and digest(merged[name]) != digest(value):
            return _CONFLICT
        merged[name] = value
    return merged


@dataclass(frozen=True)
class FilteredCache(ReadOnlyCache):
    """The calls of ``cache`` that match ``template``, as a read-only cache.

    Every read sees the calls of ``cache`` that match ``template`` at the time of the read, so
    a call saved there later appears and one evicted disappears; lookups (``contains``,
    ``load``, ``load_result``) load the call to check it. Writes are refused with
    :class:`~fleche.caches.ReadOnlyError`, as :class:`~fleche.caches.ReadOnlyCache` refuses
    them; ``transfer`` copies out the matching calls only. Thread- and process-safe as
    ``cache`` is.
    """

    template: QueryCall = QueryCall()

    def _visible(self, call: Call) -> Call:
        if not self.template.matches(call):
            raise KeyError(f"the call {call.to_lookup_key()} is not in this view ({self.template})")
        return call

    def load(self, key: Digest | str) -> Call:
        return self._visible(self.cache.load(self.expand(key)))

    def load_result(self, key: Digest | str) -> Any:
        return self.load(key).result

    def contains(self, key: Digest | str) -> bool:
        try:
            self.load(key)
        except KeyError:
            return False
        return True

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        return {self.expand(k) for k in keys if self.contains(k)}

    def newest(self, limit: int) -> list[Digest]:
        """The newest matching calls: one pass over them (the wrapped cache's newest may all
        lie outside this view)."""
        return BaseCache.newest(self, limit)

    def list(self) -> Iterable[Digest]:
        return [call.to_lookup_key() for call in self.find(QueryCall())]

    def expand(self, key: Digest | str) -> Digest:
        text = _check_key_text(key)
        if len(text) == DIGEST_LENGTH:
            return self.cache.expand(text)
        return _unique_match(text, [k for k in self.list() if k.startswith(text)])

    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> Digest | tuple[Digest, ...]:
        """Shortest prefixes unique among the calls of this view (see :meth:`BaseCache.shrink`)."""
        return BaseCache.shrink(self, key, *keys)

    def find(self, template: QueryCall) -> Iterator[Call]:
        combined = both(self.template, template)
        if combined is not None:
            yield from self.cache.find(combined)

    def expand_value(self, key: Digest | str) -> Digest:
        """The full key of a value of a call in this view (O(calls))."""
        return BaseCache.expand_value(self, key)

    def load_value(self, key: Digest | str) -> Any:
        """A value of a call in this view (O(calls))."""
        return BaseCache.load_value(self, key)

    def needed_values(self, keys: Iterable[Digest | str]) -> dict[Digest, frozenset[Digest]]:
        """The values each call of this view among ``keys`` needs."""
        return self.cache.needed_values(k for k in keys if self.contains(k))

    def usage(self) -> StoreUsage:
        """The entries of the calls in this view and of the values they need."""
        full = self.cache.usage()
        mine = set(self.list())
        needed = set().union(*self.cache.needed_values(mine).values())
        return StoreUsage(
            {k: u for k, u in full.calls.items() if k in mine},
            {k: u for k, u in full.values.items() if k in needed},
        )

    def volume(self) -> int:
        """The bytes of the entries in :meth:`usage`: what the calls of this view take."""
        return self.usage().total

    def transfer(
        self,
        other: BaseCache,
        *,
        overwrite: bool = False,
        pop: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Copy the calls of this view into ``other`` (``pop`` is refused: it would evict)."""
        return BaseCache.transfer(self, other, overwrite=overwrite, pop=pop, progress=progress)

