"""Dask integration: a cluster that never computes the same call twice.

Two ways in, usable together:

- :class:`FlecheCache`, a worker plugin. ``client.register_plugin(FlecheCache(store))`` makes
  ``store`` the process-wide default cache of every worker (also of workers that join later),
  so every ``@fleche`` function run in a task, however it was submitted, reads and writes
  through it.
- :func:`cached`, whole-graph caching for plain functions. It gives every task a content digest
  (a Merkle chain of function identity and argument digests, an upstream task standing for its
  own digest rather than its random key), replaces tasks the store already has by loads, culls
  everything upstream of them, and makes the remaining tasks save their results on the worker.
  :class:`CachingOptimizer` does the same as a ``dask.config`` optimizer.

Storages and caches can also be passed to tasks as plain arguments: they pickle as their
settings and coordinate through the same files or database in every worker.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle

from .extras import needs_extra

with needs_extra("dask", "fleche.dask"):
    import dask._task_spec as ts
    from dask.core import flatten
    from dask.utils import ensure_dict
    from distributed import Client, WorkerPlugin

from ._tasks import ComputeAndSave as _ComputeAndSave
from ._tasks import Upstream
from ._tasks import load_result as _load_result
from .caches import BaseCache
from .call import Call
from .decorator import active_cache, get_default_cache, set_default_cache
from .digest import Digest, Indigestible, digest
from .spec import as_cache, spec_of
from .spec import parse as parse_spec
from .stats import StatsCache

__all__ = ["CachingOptimizer", "FlecheCache", "cached", "rewrite_graph"]

logger = logging.getLogger("fleche.dask")


_SALT = secrets.token_bytes(32)
"""Salts the plugin names of caches no spec can name; random per process, never sent anywhere."""


def _plugin_name(store: BaseCache | str) -> str:
    """A plugin name that tells stores apart and carries nothing of their secrets.

    A store a spec names is named after its spec with the password masked: its identity, the
    same in every process, whatever the password. Any other cache (which may hold secret keys
    or passwords in its settings) is named by an HMAC of its pickled settings under a salt
    that never leaves this process, so the name cannot be attacked offline.
    """
    spec = str(parse_spec(store)) if isinstance(store, str) else spec_of(store)
    if spec is not None:
        return "fleche-" + hashlib.sha256(spec.encode()).hexdigest()[:16]
    return "fleche-" + hmac.new(_SALT, cloudpickle.dumps(store), hashlib.sha256).hexdigest()[:16]


class FlecheCache(WorkerPlugin):
    """Worker plugin making ``store`` the default cache of every worker process.

    ``name`` derives from the store's identity, and ``idempotent`` is true, so registering the
    same store again changes nothing while a different store gets a plugin of its own; the name
    carries nothing of a password or secret key (see :func:`_plugin_name`). Each
    worker counts hits, misses, saves, bytes written and the time spent loading and saving;
    :meth:`stats` gathers the counts.

    ``store`` is a cache or a store spec (see :mod:`fleche.spec`). A spec is checked here and
    opened on each worker, so the plugin ships as a short string and its name derives from the
    canonical spec: registering ``"/shared/store"`` and ``"file:///shared/store"`` is one plugin.

    >>> client.register_plugin(FlecheCache(store))  # doctest: +SKIP
    >>> client.register_plugin(FlecheCache("postgresql://db-host/fleche?values=/shared/v"))  # doctest: +SKIP
    """

    idempotent = True

    def __init__(self, store: BaseCache | str | os.PathLike[str]) -> None:
        if isinstance(store, (str, os.PathLike)):
            store = parse_spec(store).reveal()  # a bad spec fails here, on the client
            self.name = _plugin_name(store)
        elif isinstance(store, BaseCache):
            self.name = _plugin_name(store)
        else:
            raise TypeError(
                f"FlecheCache needs a cache (fleche.caches.Cache) or a store spec, got {store!r}"
            )
        self.store: BaseCache | str = store
        self.cache: StatsCache | None = None
        self._previous: BaseCache | None = None

    def __repr__(self) -> str:
        shown = str(parse_spec(self.store)) if isinstance(self.store, str) else repr(self.store)
        return f"{type(self).__name__}({shown}, name={self.name!r})"

    def setup(self, worker: Any) -> None:
        """Install the store as this worker process's default cache.

        Runs once per worker, before it runs tasks (also for workers that join later).
        """
        self.cache = StatsCache(as_cache(self.store))
        self._previous = get_default_cache()
        set_default_cache(self.cache)

    def teardown(self, worker: Any) -> None:
        """Restore the previous default cache when the worker closes or the plugin goes."""
        if self.cache is None:
            return
        if get_default_cache() is self.cache:
            set_default_cache(self._previous)
        self.cache.close()  # connections and files this worker opened; the store stays as it is
        self.cache = None

    @staticmethod
    def stats(client: Client) -> Any:
        """Per-worker statistics of every ``FlecheCache`` plugin, as a pandas DataFrame.

        One row per worker and plugin: ``hits``, ``misses``, ``saves``, ``errors``,
        ``bytes_written``, ``load_seconds``, ``save_seconds``.
        """
        with needs_extra("pandas", "FlecheCache.stats"):
            import pandas as pd

        rows = []
        for worker, plugins in client.run(_collect_stats).items():
            for name, counts in plugins.items():
                rows.append({"worker": worker, "plugin": name, **counts})
        return pd.DataFrame(rows)


def _collect_stats(dask_worker: Any) -> dict[str, dict[str, float]]:
    return {
        name: plugin.cache.stats()
        for name, plugin in dask_worker.plugins.items()
        if isinstance(plugin, FlecheCache) and plugin.cache is not None
    }


# -- whole-graph caching ------------------------------------------------------------------------


@dataclass(frozen=True)
class InlineTask:
    """A task nested in another task's arguments, kept as its function and arguments."""

    func: Any
    args: tuple
    kwargs: dict

    def __digest__(self) -> tuple:
        return (self.func, self.args, self.kwargs)


class _Uncacheable(Exception):
    pass


def _structure(obj: Any, digests: Mapping[Hashable, Digest | None]) -> Any:
    """A task argument as a digestible value, upstream tasks replaced by their digests."""
    if isinstance(obj, ts.TaskRef):
        d = digests.get(obj.key)
        if d is None:
            raise _Uncacheable(obj.key)
        return Upstream(d)
    if isinstance(obj, ts.DataNode):
        return _structure(obj.value, digests)
    if isinstance(obj, ts.Alias):
        return _structure(ts.TaskRef(obj.target.key), digests)
    if isinstance(obj, ts.NestedContainer):
        items = [_structure(a, digests) for a in obj.args]
        if obj.klass is dict:
            return dict(zip(items[::2], items[1::2]))
        return obj.klass(items)
    if isinstance(obj, ts.Task):
        return InlineTask(
            obj.func,
            tuple(_structure(a, digests) for a in obj.args),
            {k: _structure(v, digests) for k, v in obj.kwargs.items()},
        )
    if isinstance(obj, (list, tuple, set, frozenset)):
        return type(obj)(_structure(a, digests) for a in obj)
    if isinstance(obj, dict):
        return {k: _structure(v, digests) for k, v in obj.items()}
    return obj


def _task_call(node: ts.Task, digests: Mapping[Hashable, Digest | None]) -> Call:
    func = node.func
    return Call(
        name=getattr(func, "__qualname__", type(func).__qualname__),
        module=getattr(func, "__module__", None),
        arguments={
            "args": tuple(_structure(a, digests) for a in node.args),
            "kwargs": {k: _structure(v, digests) for k, v in node.kwargs.items()},
        },
        version="fleche.dask.task",
        code_digest=digest(func),  # identifies partials, lambdas and local functions too
    )


def _topological(dsk: Mapping[Hashable, ts.GraphNode]) -> list[Hashable]:
    order: list[Hashable] = []
    state: dict[Hashable, int] = {}
    for root in dsk:
        stack = [(root, False)]
        while stack:
            key, done = stack.pop()
            if done:
                state[key] = 2
                order.append(key)
                continue
            if state.get(key) or key not in dsk:
                continue
            state[key] = 1
            stack.append((key, True))
            stack.extend((dep, False) for dep in dsk[key].dependencies if not state.get(dep))
    return order


def _digests(dsk: Mapping[Hashable, ts.GraphNode]) -> tuple[dict, dict]:
    """Content digest of every node (None where it has none) and the call of every task."""
    digests: dict[Hashable, Digest | None] = {}
    calls: dict[Hashable, Call] = {}
    for key in _topological(dsk):
        node = dsk[key]
        try:
            if isinstance(node, ts.Alias):
                digests[key] = digests.get(node.target.key)
            elif isinstance(node, ts.DataNode):
                digests[key] = digest(node.value)
            elif isinstance(node, ts.NestedContainer):
                digests[key] = digest(_structure(node, digests))
            elif isinstance(node, ts.Task):
                calls[key] = _task_call(node, digests)
                digests[key] = calls[key].to_lookup_key()
            else:
                digests[key] = None
        except (_Uncacheable, Indigestible):
            digests[key] = None
    return digests, calls


def rewrite_graph(
    dsk: Mapping[Hashable, Any], keys: Iterable[Hashable], store: BaseCache
) -> dict[Hashable, ts.GraphNode]:
    """The graph ``dsk`` computing ``keys`` through ``store``.

    Tasks the store has become loads; everything only they needed is culled; the other tasks
    save their results when they run. Tasks without a content digest (an argument or function
    that cannot be digested, a dependency outside the graph) and everything downstream of them
    run as they are. Checks the store once per task.
    """
    graph = ts.convert_legacy_graph(ensure_dict(dsk))
    digests, calls = _digests(graph)
    new: dict[Hashable, ts.GraphNode] = {}
    for key, node in graph.items():
        call = calls.get(key)
        d = digests.get(key)
        if call is None or d is None:
            new[key] = node
        elif store.contains(d):
            new[key] = ts.Task(key, _load_result, store, d)
        else:
            new[key] = ts.Task(key, _ComputeAndSave(store, call, node.func), *node.args, **node.kwargs)
    return ts.cull(new, list(keys))


def cached(*collections: Any, store: BaseCache | None = None) -> Any:
    """Collections that compute like ``collections`` but through ``store``.

    ``store`` defaults to the active cache (which must be shared with the workers, e.g. files
    or a database, for results to survive). Returns one collection for one argument, else a
    tuple. Results are identical to an uncached compute; the same graph built again, even in a
    new session with fresh ``delayed`` keys, is served from the store.

    >>> total = cached(delayed(sum)(parts), store=store)  # doctest: +SKIP
    >>> total.compute()  # doctest: +SKIP
    """
    store = store if store is not None else active_cache()
    out = []
    for collection in collections:
        keys = list(flatten(collection.__dask_keys__()))
        graph = rewrite_graph(collection.__dask_graph__(), keys, store)
        rebuild, extra = collection.__dask_postpersist__()
        out.append(rebuild(graph, *extra))
    return out[0] if len(out) == 1 else tuple(out)


class CachingOptimizer:
    """A graph optimizer that rewrites every graph through ``store`` (see :func:`cached`).

    Opt in with ``dask.config.set(delayed_optimize=CachingOptimizer(store))``. Optimizers run
    where the graph is optimized, on the scheduler with distributed, so the store must be
    reachable there too; ``client.submit`` and ``optimize_graph=False`` bypass optimizers.
    """

    def __init__(self, store: BaseCache) -> None:
        self.store = store

    def __call__(self, dsk: Mapping[Hashable, Any], keys: Any, **kwargs: Any) -> dict:
        return rewrite_graph(dsk, flatten(keys) if isinstance(keys, list) else [keys], self.store)
