"""``fleche.bind(cache, f)``: a function that runs with its own cache wherever it is called,
and pickles with it, for process pools.

``with fleche.cache(c):`` holds in this process only, so tasks sent to a process pool (or
``multiprocessing``) compute and store with the workers' default cache. A bound function
carries its cache::

    with ProcessPoolExecutor(mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(fleche.bind("/shared/sweep", simulate), temperatures))

Calling it makes the cache active for the call (``with fleche.cache(cache): f(...)``), so the
function and every decorated function it calls use it. It pickles as the function (by
reference, as functions pickle) and the cache (as its settings: file and database stores are
shared by every process that unpickles them; a ``memory://`` cache is copied, not shared).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, overload

from .caches import BaseCache
from .spec import as_cache

__all__ = ["BoundFunction", "bind"]


class BoundFunction:
    """``func`` run with ``cache`` active (see the module docstring). Safe to call from many
    threads and processes at once, as ``func`` and ``cache`` are."""

    def __init__(self, func: Callable[..., Any], cache: BaseCache) -> None:
        self.func = func
        self.cache = cache
        functools.update_wrapper(self, func)
        self._is_async = inspect.iscoroutinefunction(func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .decorator import cache as activate

        if self._is_async:
            return self._call_async(args, kwargs)
        with activate(self.cache):
            return self.func(*args, **kwargs)

    async def _call_async(self, args: tuple, kwargs: dict) -> Any:
        from .decorator import cache as activate

        with activate(self.cache):
            return await self.func(*args, **kwargs)

    def __reduce__(self) -> Any:
        # Bound where it is defined (@fleche.bind(...) on a module-level function), it is that
        # module's attribute: pickled by name, as the function it replaces would be.
        module = sys.modules.get(self.__module__)
        if module is not None and vars(module).get(self.__qualname__) is self:
            return self.__qualname__
        return (BoundFunction, (self.func, self.cache))

    def __repr__(self) -> str:
        return f"<fleche function {self.__qualname__} bound to {self.cache!r}>"


@overload
def bind(cache: BaseCache | str | os.PathLike[str], func: None = None, /) -> Callable[[Callable[..., Any]], BoundFunction]: ...
@overload
def bind(cache: BaseCache | str | os.PathLike[str], func: Callable[..., Any], /) -> BoundFunction: ...


def bind(cache: Any, func: Any = None, /) -> Any:
    """``func`` bound to ``cache`` (a cache or a store spec); without ``func``, a decorator
    that binds the function it is given. ``TypeError`` for something that is neither a cache
    nor a spec, or a ``func`` that is not callable; ``SpecError`` for a bad spec. The bound
    function may be called from any thread and process: each call activates the cache in the
    calling context only."""
    store = as_cache(cache)
    if func is None:
        return functools.partial(_bind_to, store)
    return _bind_to(store, func)


def _bind_to(store: BaseCache, func: Any) -> BoundFunction:
    if not callable(func):
        raise TypeError(f"fleche.bind binds a callable, got {func!r}")
    return BoundFunction(func, store)
