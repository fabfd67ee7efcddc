"""Pieces shared by the task-scheduler integrations (:mod:`fleche.dask`, :mod:`fleche.ray`).

A scheduler integration keys a task before it runs, standing in for upstream results by the
digests of the calls that produce them (:class:`Upstream`), then either loads the stored result
(:func:`load_result`) or runs the function where the task lands and saves what it returns
(:class:`ComputeAndSave`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .caches import BaseCache
from .call import Call
from .decorator import runtime_metadata
from .digest import Digest, Indigestible
from .errors import SaveError

__all__ = ["ComputeAndSave", "Upstream", "load_result", "map_nested"]

logger = logging.getLogger("fleche.tasks")


@dataclass(frozen=True)
class Upstream:
    """Stands in a task's arguments for the result of another task, by that task's call digest.

    A downstream key built from it needs no upstream value, so a chain of tasks is keyed before
    anything in it runs.
    """

    key: Digest

    def __digest__(self) -> Digest:
        return self.key

    def __reduce__(self) -> tuple[type, tuple[Digest]]:
        return (Upstream, (self.key,))  # graphs carry thousands: the shortest pickle


def map_nested(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """``obj`` with ``leaf`` applied to everything inside lists, tuples, sets and dict values.

    Only those exact builtin types are entered (a subclass may not rebuild from an iterable);
    anything else, ``obj`` itself included, is passed to ``leaf``.
    """
    if type(obj) in (list, tuple, set, frozenset):
        return type(obj)(map_nested(a, leaf) for a in obj)
    if type(obj) is dict:
        return {k: map_nested(v, leaf) for k, v in obj.items()}
    return leaf(obj)


class ComputeAndSave:
    """Runs a task's function where the task runs and saves its result under the call's key.

    ``call`` is the call as keyed (upstream results may be :class:`Upstream` digests); the
    function itself receives the task's actual arguments. An exception propagates and nothing is
    saved; a result that cannot be stored is returned with a logged warning. A result computed
    in less than ``min_seconds`` is returned without being saved (0 saves every result).
    """

    def __init__(
        self,
        store: BaseCache,
        call: Call,
        func: Callable[..., Any],
        metadata: Mapping[str, Any] | None = None,
        min_seconds: float = 0.0,
    ) -> None:
        self.store = store
        self.call = call
        self.func = func
        self.metadata = dict(metadata or {})
        self.min_seconds = min_seconds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started, t0 = time.time(), time.perf_counter()
        result = self.func(*args, **kwargs)
        wall = time.perf_counter() - t0
        if wall < self.min_seconds:
            return result
        metadata = {"runtime": runtime_metadata(started, wall), **self.metadata}
        try:
            self.store.save(self.call.replace(result=result, metadata=metadata))
        except (SaveError, Indigestible) as e:
            logger.warning(
                "result of %s (type %s) not cached: %s", self.call.name, type(result).__name__, e
            )
        return result


def load_result(store: BaseCache, key: Digest) -> Any:
    """The stored result under ``key``; a ``KeyError`` that says it vanished after keying."""
    try:
        return store.load_result(key)
    except KeyError:
        raise KeyError(
            f"cached task result {key} vanished after the graph was built (evicted meanwhile?); "
            "build and compute the graph again"
        ) from None
