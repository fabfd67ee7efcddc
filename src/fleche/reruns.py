"""``fleche.rerun()``: recompute the calls made inside a block and replace their entries.

    with fleche.rerun():           # every decorated call inside, nested ones included
        fit(data)
    with fleche.rerun(load):       # only the calls of these decorated functions
        fit(data)
    fit.rerun(data)                # this call, with every decorated call inside it

Each call is recomputed once per block and cache object: calling it again inside the same block loads
the entry just written, so a diamond of dependencies still computes each node once. A call
that raises, or whose result could not be saved (a read-only cache, a store error), is not
counted, so it is recomputed if called again. Only calls that actually happen are recomputed:
under ``rerun(load)``, a ``fit`` that is a hit loads its stored result without calling
``load``. A ``contextvars`` setting, like ``fleche.cache(c)``: it holds in this thread, in the
asyncio tasks started inside and in thread pool tasks submitted inside (:mod:`fleche.threads`),
not in other processes; the innermost block applies.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .threads import follow

if TYPE_CHECKING:
    from .decorator import _Cached

__all__ = ["Rerun", "active_rerun", "rerun"]

_RERUN: contextvars.ContextVar[Rerun | None] = contextvars.ContextVar("fleche_rerun", default=None)


class Rerun:
    """An active ``rerun`` block: which functions it applies to and the calls recomputed in it
    so far. Thread-safe: the threads and tasks of one block share it."""

    def __init__(self, functions: frozenset[_Cached] | None) -> None:
        self.functions = functions
        self._done: set[tuple[int, str]] = set()  # (id of the cache, call key)
        self._caches: dict[int, object] = {}  # keeps those caches alive, so ids stay theirs
        self._lock = threading.Lock()
        self._tokens: list[contextvars.Token] = []

    def applies(self, cached: _Cached, cache: object, key: str) -> bool:
        """Whether this call must be recomputed: one of the block's functions, not yet
        recomputed in this block for this cache. Thread-safe."""
        if self.functions is not None and cached not in self.functions:
            return False
        with self._lock:
            return (id(cache), key) not in self._done

    def recomputed(self, cache: object, key: str) -> None:
        """Record that the call was recomputed and its entry replaced in ``cache``.
        Thread-safe."""
        with self._lock:
            self._caches[id(cache)] = cache
            self._done.add((id(cache), key))

    def __enter__(self) -> Rerun:
        follow(_RERUN)
        self._tokens.append(_RERUN.set(self))
        return self

    def __exit__(self, *exc: Any) -> None:
        _RERUN.reset(self._tokens.pop())

    def __repr__(self) -> str:
        which = "every call" if self.functions is None else ", ".join(
            sorted(c.name for c in self.functions))
        return f"<fleche.rerun of {which}>"


def rerun(*functions: Callable[..., Any]) -> Rerun:
    """A context manager: inside it, calls of ``functions`` (``@fleche``-decorated; none given:
    every decorated function) are recomputed and their entries replaced (see the module
    docstring). ``TypeError`` for a function ``@fleche`` did not return."""
    from .decorator import registered

    if not functions:
        return Rerun(None)
    chosen = []
    for f in functions:
        cached = registered(f)
        if cached is None:
            raise TypeError(f"fleche.rerun takes functions decorated with @fleche, got {f!r}")
        chosen.append(cached)
    return Rerun(frozenset(chosen))


def active_rerun() -> Rerun | None:
    """The innermost ``rerun`` block active here, if any."""
    return _RERUN.get()
