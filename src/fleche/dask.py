"""Dask integration: a cluster that never computes the same call twice.

Two ways in, usable together:

- :class:`FlecheCache`, a worker plugin. ``client.register_plugin(FlecheCache(store))`` makes
  ``store`` the process-wide default cache of every worker (also of workers that join later),
  so every ``@fleche`` function run in a task, however it was submitted, reads and writes
  through it.
- :func:`cached`, whole-graph caching for every collection (``dask.array``, ``dask.bag``,
  ``dask.dataframe``, ``delayed`` and mixtures) and plain functions. It gives every task a
  content key (a Merkle chain of function identity and argument digests, an upstream task
  standing for its own key rather than its random name; :mod:`fleche.dask_keys`), turns tasks
  the store already has into loads, culls everything upstream of them, and makes the tasks worth
  keeping save their results on the worker (:mod:`fleche.dask_graph` says which).
  :func:`caching` does the same for every computation of the process without wrapping
  collections (:mod:`fleche.dask_switch`); :class:`CachingOptimizer` does it as a
  ``dask.config`` graph optimizer.

Storages and caches can also be passed to tasks as plain arguments: they pickle as their
settings and coordinate through the same files or database in every worker.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Hashable, Mapping
from typing import Any

import cloudpickle

from .extras import needs_extra

with needs_extra("dask", "fleche.dask"):
    from dask.core import flatten
    from distributed import Client, WorkerPlugin

from .caches import BaseCache
from .dask_graph import MIN_SECONDS, Select, StoreRule, cache_collections, rewrite_graph
from .dask_keys import Keying, SourceState, file_state
from .dask_switch import caching, resolve_store
from .decorator import active_cache, get_default_cache, set_default_cache
from .spec import as_cache, spec_of
from .spec import parse as parse_spec
from .stats import StatsCache

__all__ = [
    "CachingOptimizer",
    "FlecheCache",
    "Keying",
    "StoreRule",
    "cached",
    "caching",
    "file_state",
    "rewrite_graph",
]

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


def cached(
    *collections: Any,
    store: BaseCache | str | os.PathLike[str] | None = None,
    min_seconds: float | None = MIN_SECONDS,
    select: Select | None = None,
    source_state: SourceState | None = None,
    hash_code: bool = False,
    optimize_graph: bool = True,
) -> Any:
    """Collections that compute like ``collections`` but through ``store``.

    Takes any Dask collections (arrays, bags, dataframes, delayed, mixed) and returns
    collections of the same types, one for one argument, else a tuple; they compute to the same
    results, bit for bit. ``store`` is a cache or a store spec, by default the active cache; it
    must be shared with the workers (files, a database) for results to outlive them.

    Every task is keyed by content, so the same pipeline built again, in a new process with new
    random or tokenized names, is served from the store, and a pipeline with one stage changed
    computes that stage and what depends on it and loads the rest. Outputs are saved, and
    intermediate results whose runtime times their number of uses reaches ``min_seconds``;
    ``select(key, task)`` decides per task instead where it returns ``True`` or ``False``
    (:class:`StoreRule`). ``source_state(task)`` adds to the keys of tasks that read inputs,
    e.g. :func:`file_state`; ``hash_code=True`` adds the code of the Python functions (see
    :mod:`fleche.dask_keys`). The tasks are those ``compute`` runs: stages dask fuses into one
    task (chains of elementwise array operations, bag maps) are stored and recomputed together;
    ``optimize_graph=False`` keeps every stage a task of its own, for finer reuse at the price
    of a slower computation.

    The graphs are keyed and looked up here, on the calling thread, with one batch question to
    the store; loads and saves run on the workers. Thread-safe; collections rebuilt by
    different processes share entries, and two of them computing the same task at once may
    both compute and save it (the same content under the same key).

    >>> total = cached(delayed(sum)(parts), store=store)  # doctest: +SKIP
    >>> total.compute()  # doctest: +SKIP
    """
    store = resolve_store(store) if store is not None else active_cache()
    out = cache_collections(
        collections,
        store,
        rule=StoreRule(min_seconds, select),
        keying=Keying(source_state, hash_code),
        optimize_graph=optimize_graph,
    )
    return out[0] if len(out) == 1 else tuple(out)


class CachingOptimizer:
    """A graph optimizer that rewrites every graph through ``store`` (see :func:`rewrite_graph`).

    Opt in with ``dask.config.set(delayed_optimize=CachingOptimizer(store))`` (or
    ``array_optimize``, ``bag_optimize``; it replaces dask's own optimizer there). Optimizers
    run where the graph is materialized, on the scheduler with distributed, so the store must be
    reachable there too; ``client.submit`` and ``optimize_graph=False`` bypass optimizers, and
    dataframes have none: :func:`caching` covers every collection. The options are those of
    :func:`cached`.
    """

    def __init__(
        self,
        store: BaseCache | str | os.PathLike[str],
        *,
        min_seconds: float | None = MIN_SECONDS,
        select: Select | None = None,
        source_state: SourceState | None = None,
        hash_code: bool = False,
    ) -> None:
        self.store = resolve_store(store)
        self.rule = StoreRule(min_seconds, select)
        self.keying = Keying(source_state, hash_code)

    def __call__(self, dsk: Mapping[Hashable, Any], keys: Any, **kwargs: Any) -> dict:
        keys = list(flatten(keys)) if isinstance(keys, list) else [keys]
        return rewrite_graph(dsk, keys, self.store, rule=self.rule, keying=self.keying)
