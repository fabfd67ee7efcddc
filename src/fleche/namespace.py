"""``f.fleche``: what belongs to one ``@fleche`` function, in one place.

    >>> from fleche import fleche
    >>> from fleche.caches import memory_cache
    >>> @fleche(cache=memory_cache())
    ... def square(x):
    ...     return x * x
    >>> square(3), square(4)
    (9, 16)
    >>> square.fleche.contains(3), square.fleche.load(4), square.fleche.query().count()
    (True, 16, 2)
    >>> square.fleche.evict(3)
    >>> square.fleche.contains(3)
    False
    >>> square.fleche.clear()
    1

Every method takes the function's arguments as a call would (a :class:`~fleche.D` included)
and works on the cache the function uses now (:attr:`FunctionNamespace.cache`). The wrapper
itself keeps the short forms ``f.digest``, ``f.contains``, ``f.load``, ``f.call``, ``f.query``,
``f.clear``, ``f.refresh`` and ``f.rerun``. For an ``async def`` function, ``refresh`` and
``rerun`` return coroutines to await, like a call; the other operations stay plain calls that
do their I/O in the calling thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .call import Call, QueryCall
from .caches import BaseCache, ReadOnlyError
from .digest import Digest
from .digest_arguments import by_value
from .query import QueryIterator
from .reruns import Rerun

if TYPE_CHECKING:
    from .binding import BoundFunction
    from .decorator import _Cached

__all__ = ["FunctionNamespace"]


class FunctionNamespace:
    """The cache operations of one decorated function (``f.fleche``).

    Each operation resolves the function's cache when it runs (its ``cache=``, else the active
    cache, as a call would), so it follows ``with fleche.cache(c):``. What each guarantees
    across threads and processes is what that cache guarantees for the operation it uses.
    """

    __slots__ = ("_cached", "_wrapper")

    def __init__(self, cached: _Cached, wrapper: Callable[..., Any]) -> None:
        self._cached = cached
        self._wrapper = wrapper  # the decorated function: what bind() binds

    def __repr__(self) -> str:
        return f"<fleche namespace of {self._cached.name}>"

    @property
    def cache(self) -> BaseCache:
        """The cache a call of this function would use now."""
        return self._cached.resolve_cache()

    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        args, kwargs = by_value(self._cached.resolve_cache, self._cached.signature, args, kwargs)
        return self._cached.bind(args, kwargs)

    def digest(self, *args: Any, **kwargs: Any) -> Digest:
        """The lookup key of this call (``Indigestible`` naming an argument without one)."""
        return self._cached.key(self._arguments(args, kwargs))[0]

    def contains(self, *args: Any, **kwargs: Any) -> bool:
        """Whether this call is stored (a snapshot)."""
        return self.cache.contains(self.digest(*args, **kwargs))

    def load(self, *args: Any, **kwargs: Any) -> Any:
        """The stored result of this call, without running it; ``KeyError`` if absent."""
        return self.cache.load_result(self.digest(*args, **kwargs))

    def evict(self, *args: Any, **kwargs: Any) -> None:
        """Remove this call's record (its values stay until ``gc``); ``KeyError`` if absent."""
        self.cache.evict(self.digest(*args, **kwargs))

    def call(self, *args: Any, **kwargs: Any) -> Call:
        """The :class:`Call` this call would be looked up and stored as (without a result)."""
        return self._cached.identity().replace(arguments=self._arguments(args, kwargs))

    def template(self, *args: Any, **kwargs: Any) -> QueryCall:
        """The query template for these (partial) arguments: see :meth:`QueryCall.from_call`."""
        cached = self._cached
        args, kwargs = by_value(cached.resolve_cache, cached.signature, args, kwargs)
        t = cached.identity()
        bound = cached.signature.bind_partial(*args, **kwargs)
        return QueryCall(
            name=t.name, module=t.module, version=t.version, code_digest=t.code_digest,
            arguments={n: v for n, v in bound.arguments.items() if n not in cached.ignore},
        )

    def query(self, *args: Any, **kwargs: Any) -> QueryIterator:
        """The stored calls of this function (this version and code) whose arguments match the
        given ones, bound like a call but without defaults: an argument not given matches any
        value. A live :class:`~fleche.query.QueryIterator` over :attr:`cache`."""
        return self.cache.query(self.template(*args, **kwargs))

    def clear(self) -> int:
        """Evict every stored call of this function, whatever its version or code, and return
        how many were evicted; values stay until ``gc``. Each eviction is atomic; calls saved
        meanwhile may stay."""
        t = self._cached.identity()
        mine = self.cache.query(QueryCall(name=t.name, module=t.module))
        return mine.filter(lambda c: c.module == t.module).evict()

    def refresh(self, *args: Any, **kwargs: Any) -> Any:
        """Run this call again, whether stored or not, and store its result in place of the
        entry; return the result (a coroutine to await, for an async function). With
        ``compute_once`` the key's lock is held meanwhile. Calls it makes are not recomputed
        (see :meth:`rerun`). :class:`~fleche.caches.ReadOnlyError` before running if the cache
        takes no writes."""
        cached = self._cached
        cache = self.cache
        if not cache.writable:
            raise ReadOnlyError(f"cannot refresh a call of {cached.name}: {cache!r} is read-only")
        if cached.is_async:
            return self._refresh_async(cache, args, kwargs)
        args, kwargs = by_value(lambda: cache, cached.signature, args, kwargs)
        key, call = self._key_and_call(args, kwargs)
        return cached.recompute(cache, key, args, kwargs, call)

    async def _refresh_async(self, cache: BaseCache, args: tuple, kwargs: dict) -> Any:
        cached = self._cached
        args, kwargs = await asyncio.to_thread(by_value, lambda: cache, cached.signature, args, kwargs)
        key, call = self._key_and_call(args, kwargs)
        return await cached.recompute_async(cache, key, args, kwargs, call)

    def _key_and_call(self, args: tuple, kwargs: dict) -> tuple[Digest, Call]:
        cached = self._cached
        return cached.keyed_call(cached.bind(args, kwargs))

    def rerun(self, *args: Any, **kwargs: Any) -> Any:
        """Make this call with every decorated call inside it recomputed and its entry replaced
        (``with fleche.rerun(): f(*args)``, see :mod:`fleche.reruns`); return the result (a
        coroutine to await, for an async function)."""
        cached = self._cached
        if cached.is_async:
            return self._rerun_async(args, kwargs)
        with Rerun(None):
            return cached.run(args, kwargs)

    async def _rerun_async(self, args: tuple, kwargs: dict) -> Any:
        with Rerun(None):
            return await self._cached.run_async(args, kwargs)

    def bind(self, cache: BaseCache | str | os.PathLike[str]) -> BoundFunction:
        """This function bound to ``cache`` (a cache or a spec): it runs with that cache active
        wherever it is called and pickles with it, for process pools (see
        :func:`fleche.bind`)."""
        from .binding import bind

        return bind(cache, self._wrapper)
