"""Pieces shared by the task-scheduler integrations (:mod:`fleche.dask`, :mod:`fleche.ray`).

A scheduler integration keys a task before it runs, standing in for upstream results by the
digests of the calls that produce them (:class:`Upstream`), then either loads the stored result
(:func:`load_result`) or runs the function where the task lands and saves what it returns
(:class:`ComputeAndSave`). :class:`Whole` keeps a large container result as one stored value.
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

__all__ = ["ComputeAndSave", "Upstream", "Whole", "load_result", "map_nested", "whole"]

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


class Whole:
    """A result stored as one value although it is a large container.

    Value storages that destructure containers store every element as an entry of its own;
    for a task result of many elements (a bag partition, a list of a thousand results) that is
    a thousand entries. Wrapped, it is one. :func:`load_result` unwraps it.
    """

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __digest__(self) -> Any:
        return self.value

    def __reduce__(self) -> tuple[type, tuple[Any]]:
        return (Whole, (self.value,))


WHOLE_FROM = 64
"""Containers with more elements than this, counted through nested containers, are kept whole."""


def whole(result: Any) -> Any:
    """``result`` wrapped in :class:`Whole` if it is a container of more than ``WHOLE_FROM``
    elements, else ``result`` itself (small results stay plain, and inline in call records)."""
    budget, pending = WHOLE_FROM, [result]
    while pending:
        obj = pending.pop()
        if type(obj) in (list, tuple, set, frozenset):
            budget -= len(obj)
            pending.extend(obj)
        elif type(obj) is dict:
            budget -= len(obj)
            pending.extend(obj.values())
        if budget < 0:
            return Whole(result)
    return result


class ComputeAndSave:
    """Runs a task's function where the task runs and saves its result under the call's key.

    ``call`` is the call as keyed (upstream results may be :class:`Upstream` digests); the
    function itself receives the task's actual arguments. An exception propagates and nothing is
    saved; a result that cannot be stored, for whatever reason (a full disk, a read-only
    mount, a database gone), is returned with a logged warning naming the cause. A result
    computed in less than ``min_seconds`` is returned without being saved (0 saves every
    result). ``pack`` turns the result into what is stored (e.g. :func:`whole`); loads undo it.
    """

    def __init__(
        self,
        store: BaseCache,
        call: Call,
        func: Callable[..., Any],
        metadata: Mapping[str, Any] | None = None,
        min_seconds: float = 0.0,
        pack: Callable[[Any], Any] | None = None,
    ) -> None:
        self.store = store
        self.call = call
        self.func = func
        self.metadata = dict(metadata or {})
        self.min_seconds = min_seconds
        self.pack = pack

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started, t0 = time.time(), time.perf_counter()
        result = self.func(*args, **kwargs)
        wall = time.perf_counter() - t0
        if wall < self.min_seconds:
            return result
        metadata = {"runtime": runtime_metadata(started, wall), **self.metadata}
        stored = result if self.pack is None else self.pack(result)
        try:
            self.store.save(self.call.replace(result=stored, metadata=metadata))
        except (SaveError, Indigestible) as e:  # names the argument or the result
            logger.warning(
                "result of %s (type %s) not cached: %s", self.call.name, type(result).__name__, e
            )
        except Exception as e:  # noqa: BLE001 - the cache never fails a task (issue 14)
            logger.warning(
                "result of %s (type %s) not cached: %s: %s", self.call.name,
                type(result).__name__, type(e).__name__, e,
            )
        return result


def load_result(store: BaseCache, key: Digest) -> Any:
    """The stored result under ``key`` (unwrapped if :class:`Whole`); a ``KeyError`` that says
    it vanished after keying."""
    try:
        result = store.load_result(key)
    except KeyError:
        raise KeyError(
            f"cached task result {key} vanished after the graph was built (evicted meanwhile?); "
            "build and compute the graph again"
        ) from None
    return result.value if type(result) is Whole else result
