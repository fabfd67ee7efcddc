"""A Dask graph rewritten to compute through a store, and collections rebuilt on it.

:func:`rewrite_graph` keys every task by content (:mod:`fleche.dask_keys`), asks the store in
one batch which keys it has, turns those tasks into loads, culls everything only they needed,
and wraps the tasks worth keeping so that they save their results where they run.

Which results are saved (:class:`StoreRule`): a task's result is saved when the task computes
one of the requested keys (an *output*), or when the time it saves reaches ``min_seconds``:
the task's runtime times the number of tasks that use its result. Cheap tasks (getitem,
rechunk splits, aliases, data) therefore never become entries of their own. ``select(key,
task)`` overrides the rule per task: ``True`` saves, ``False`` never saves, ``None`` leaves it
to the rule. Whatever the rule, a result already stored is loaded rather than computed. A
result that is a container of many elements (a bag partition) is stored as one value
(:class:`~fleche._tasks.Whole`), not one entry per element.
"""

from __future__ import annotations

import functools
import pickle
import sys
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle
import dask
import dask._task_spec as ts
from dask.base import optimization_function
from dask.core import flatten
from dask.utils import ensure_dict, key_split

from ._tasks import ComputeAndSave, load_result, whole
from .caches import BaseCache, CacheWrapper
from .dask_keys import GraphKeys, Keying

__all__ = [
    "MIN_SECONDS",
    "CollectionGraph",
    "ShippedStore",
    "StoreRule",
    "cache_collections",
    "collection_graph",
    "rewrite_graph",
]

Key = Hashable
MIN_SECONDS = 0.1
"""The default of ``min_seconds``: a result that saves a tenth of a second is worth an entry."""
Select = Callable[[Key, ts.Task], "bool | None"]


@dataclass(frozen=True)
class StoreRule:
    """Which task results are saved; see the module docstring.

    ``min_seconds=None`` saves only outputs (and what ``select`` picks); ``0`` saves every task
    with a content key.
    """

    min_seconds: float | None = MIN_SECONDS
    select: Select | None = None

    def __post_init__(self) -> None:
        if self.min_seconds is not None and not (
            isinstance(self.min_seconds, (int, float)) and self.min_seconds >= 0
        ):
            raise ValueError(
                f"min_seconds must be a number >= 0 or None, got {self.min_seconds!r}"
            )
        if self.select is not None and not callable(self.select):
            raise TypeError(
                f"select must be a callable (key, task) -> bool | None, got {self.select!r}"
            )

    def threshold(self, key: Key, task: ts.Task, output: bool, uses: int) -> float | None:
        """The runtime from which ``task``'s result is saved; ``None`` never saves it."""
        if self.select is not None:
            choice = self.select(key, task)
            if choice is not None:
                return 0.0 if choice else None
        if output:
            return 0.0
        if self.min_seconds is None:
            return None
        return self.min_seconds / max(uses, 1)


@dataclass(frozen=True)
class ShippedStore(CacheWrapper):
    """``cache`` as the tasks of a rewritten graph carry it: pickled once, unpickled once.

    distributed pickles every task on its own, so each task would carry, and each worker
    rebuild, its own copy of the store (about 0.1 ms per task). This wrapper pickles as the
    bytes of ``cache``, made once per graph, and unpickles to one wrapper per process and store;
    it forwards every operation, and caches are safe to share between threads.
    """

    @functools.cached_property
    def _blob(self) -> bytes:
        return cloudpickle.dumps(self.cache)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (_unship, (self._blob,))


_shipped: dict[bytes, ShippedStore] = {}
_shipped_lock = threading.Lock()


def _unship(blob: bytes) -> ShippedStore:
    known = _shipped.get(blob)
    if known is not None:
        return known
    store = ShippedStore(pickle.loads(blob))
    with _shipped_lock:
        if len(_shipped) > 256:  # many stores in one process: start over rather than grow
            _shipped.clear()
        return _shipped.setdefault(blob, store)


def rewrite_graph(
    dsk: Mapping[Key, Any],
    keys: Iterable[Key],
    store: BaseCache,
    *,
    rule: StoreRule = StoreRule(),
    keying: Keying = Keying(),
) -> dict[Key, ts.GraphNode]:
    """The graph ``dsk`` computing ``keys`` through ``store``.

    Tasks are keyed as ``keying`` says (:mod:`fleche.dask_keys`). Tasks the store has become
    loads; everything only they needed is culled; the tasks ``rule`` picks save their results
    on the worker that runs them. Tasks without a content key (see
    :mod:`fleche.dask_keys`) and everything downstream of them run as they are. Asks the store
    once (``contains_many``), on the calling thread; a result evicted after that makes its load
    fail with a ``KeyError`` that says so. Rewriting a rewritten graph changes nothing but turns
    tasks stored meanwhile into loads.
    """
    graph = ts.convert_legacy_graph(ensure_dict(dsk))
    keys = list(keys)
    shipped = store if isinstance(store, ShippedStore) else ShippedStore(store)
    content = GraphKeys(graph, keying)
    lookup = content.lookup_keys()
    stored = store.contains_many(set(lookup.values())) if lookup else set()
    outputs = _outputs(graph, keys)
    uses = _uses(graph)
    new: dict[Key, ts.GraphNode] = {}
    for key, node in graph.items():
        d = lookup.get(key)
        if d is None:
            new[key] = node
        elif d in stored:
            new[key] = ts.Task(key, load_result, shipped, d, _data_producer=True)
        elif isinstance(node.func, ComputeAndSave):
            new[key] = node
        else:
            threshold = rule.threshold(key, node, key in outputs, uses[key])
            if threshold is None:
                new[key] = node
                continue
            metadata = {"dask": {"task": key_split(key)}}
            run = ComputeAndSave(
                shipped, content.calls[key], node.func, metadata, threshold, pack=whole
            )
            new[key] = ts.Task(
                key, run, *node.args, _data_producer=node.data_producer, **node.kwargs
            )
    return ts.cull(new, keys)


def _target(graph: Mapping[Key, ts.GraphNode], key: Key) -> Key:
    seen = set()
    while isinstance(graph.get(key), ts.Alias) and key not in seen:
        seen.add(key)
        key = graph[key].target
    return key


def _outputs(graph: Mapping[Key, ts.GraphNode], keys: Iterable[Key]) -> set[Key]:
    """The requested keys and the tasks their aliases point to."""
    out = set()
    for key in keys:
        out.add(key)
        out.add(_target(graph, key))
    return out


def _uses(graph: Mapping[Key, ts.GraphNode]) -> Counter:
    """How many nodes use each key's result, counted at the end of alias chains."""
    uses: Counter = Counter()
    for node in graph.values():
        if isinstance(node, ts.Alias):
            continue
        for dep in node.dependencies:
            uses[_target(graph, dep)] += 1
    return uses


# -- collections ------------------------------------------------------------------------------


@dataclass
class CollectionGraph:
    """A collection's graph, its output keys, and how to rebuild it on a new graph."""

    graph: Mapping[Key, Any]
    keys: list[Key]
    rebuild: Callable[[dict[Key, ts.GraphNode]], Any]


def collection_graph(collection: Any, optimize_graph: bool = True) -> CollectionGraph:
    """The graph ``collection`` computes, with its output keys and its rebuild.

    With ``optimize_graph``, the graph is shaped as ``compute`` shapes it, so its tasks are the
    ones that run: dataframes are optimized as expressions (stages stay tasks of their own),
    other collections by dask's high-level optimizations (culling, blockwise fusion: a chain of
    elementwise array operations or bag maps becomes one task). The low-level fusion is left
    to the compute that follows, which optimizes the rewritten graph once (optimizing a
    ``dask.array`` graph twice can duplicate its tasks). Without it, every stage is a task.

    Dask DataFrame collections are rebuilt with ``dd.from_graph``, since their
    ``__dask_postpersist__`` takes the output keys from the mapping it gets and so cannot take
    a whole graph; every other collection by its ``__dask_postpersist__``.
    """
    dd = sys.modules.get("dask.dataframe")  # imported by whoever made a dataframe collection
    if dd is not None and isinstance(collection, (dd.DataFrame, dd.Series, dd.Index, dd.Scalar)):
        return _frame_graph(dd, collection, optimize_graph)
    keys = list(flatten(collection.__dask_keys__()))
    graph = collection.__dask_graph__()
    if optimize_graph:
        # Dask's high-level optimizations only (blockwise fusion, culling): low-level fusion
        # is left to the compute that follows.
        with dask.config.set({"optimization.fuse.active": False}):
            graph = optimization_function(collection)(graph, keys)
    rebuild, extra = collection.__dask_postpersist__()
    return CollectionGraph(ensure_dict(graph), keys, lambda dsk: rebuild(dsk, *extra))


def _frame_graph(dd: Any, frame: Any, optimize_graph: bool) -> CollectionGraph:
    if optimize_graph:
        frame = frame.optimize(fuse=False)  # as compute does: each stage stays a task
    keys = list(flatten(frame.__dask_keys__()))
    graph = frame.__dask_graph__()
    meta, divisions, prefix = frame._meta, frame.divisions, key_split(frame._name)
    return CollectionGraph(
        graph, keys, lambda dsk: dd.from_graph(dsk, meta, divisions, keys, prefix)
    )


def cache_collections(
    collections: Iterable[Any],
    store: BaseCache,
    *,
    rule: StoreRule = StoreRule(),
    keying: Keying = Keying(),
    optimize_graph: bool = True,
) -> list[Any]:
    """``collections`` rebuilt on one graph rewritten through ``store`` (:func:`rewrite_graph`).

    The collections' graphs are merged first, so tasks they share are keyed, looked up and run
    once; each collection is then rebuilt on the part of the rewritten graph it needs.
    """
    parts = [collection_graph(c, optimize_graph) for c in collections]
    merged: dict[Key, Any] = {}
    for part in parts:
        merged.update(part.graph)
    keys = [key for part in parts for key in part.keys]
    new = rewrite_graph(merged, keys, store, rule=rule, keying=keying)
    return [part.rebuild(ts.cull(new, part.keys)) for part in parts]
