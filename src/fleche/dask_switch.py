"""One switch that sends every Dask computation of this process through a store.

``with fleche.dask.caching(store): ...`` (or the ``dask.config`` setting ``fleche.dask.store``)
makes ``x.compute()``, ``x.persist()``, ``dask.compute(...)``, ``dask.persist(...)``,
``client.compute(...)`` and ``client.persist(...)`` rewrite their collections exactly as
:func:`fleche.dask.cached` does, on the local schedulers and on ``distributed`` alike.

Dask has no hook for this: every one of those calls turns its collections into one expression
with ``dask.base.collections_to_expr``, so importing :mod:`fleche.dask` wraps that function
(in ``dask.base`` and in ``distributed.client``, which imports it by name). The wrapper passes
straight through while no store is configured.

Settings (``dask.config`` keys; :func:`caching` sets them for a block):

- ``fleche.dask.store``: a cache or a store spec (see :mod:`fleche.spec`);
- ``fleche.dask.min-seconds`` (default 0.1) and ``fleche.dask.select``: which results are saved
  (:class:`~fleche.dask_graph.StoreRule`);
- ``fleche.dask.source-state`` and ``fleche.dask.hash-code``: how tasks are keyed
  (:class:`~fleche.dask_keys.Keying`, e.g. :func:`~fleche.dask_keys.file_state`).

``dask.config`` is process-wide: the switch holds in every thread of the process while it is
set, and not in other processes (worker processes only run the rewritten tasks).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import dask
import dask.base
import distributed.client

from .caches import BaseCache
from .dask_graph import MIN_SECONDS, Select, StoreRule, cache_collections
from .dask_keys import Keying, SourceState
from .spec import as_cache
from .spec import parse as parse_spec

__all__ = ["caching", "resolve_store"]

CONFIG_STORE = "fleche.dask.store"
CONFIG_MIN_SECONDS = "fleche.dask.min-seconds"
CONFIG_SELECT = "fleche.dask.select"
CONFIG_SOURCE_STATE = "fleche.dask.source-state"
CONFIG_HASH_CODE = "fleche.dask.hash-code"

_opened: dict[str, BaseCache] = {}
_opened_lock = threading.Lock()


def resolve_store(store: BaseCache | str | os.PathLike[str]) -> BaseCache:
    """``store`` as a cache: a cache as it is, a spec opened once per process and spec."""
    if isinstance(store, BaseCache):
        return store
    if isinstance(store, (str, os.PathLike)):
        text = str(parse_spec(store))
        with _opened_lock:
            if text not in _opened:
                _opened[text] = as_cache(text)
            return _opened[text]
    raise TypeError(f"a Dask graph store must be a cache or a store spec, got {store!r}")


def caching(
    store: BaseCache | str | os.PathLike[str],
    *,
    min_seconds: float | None = MIN_SECONDS,
    select: Select | None = None,
    source_state: SourceState | None = None,
    hash_code: bool = False,
) -> Any:
    """Send every Dask computation in this process through ``store`` until the block ends.

    The options are those of :func:`fleche.dask.cached`. Returns the ``dask.config.set`` of
    the settings, in effect at once; as a context manager the previous settings come back on
    exit. A bad spec or option fails here.

    >>> with fleche.dask.caching("/shared/store"):  # doctest: +SKIP
    ...     total = (x @ x.T).sum().compute()
    """
    StoreRule(min_seconds, select)  # validates the options
    Keying(source_state, hash_code)
    return dask.config.set(
        {
            CONFIG_STORE: resolve_store(store),
            CONFIG_MIN_SECONDS: min_seconds,
            CONFIG_SELECT: select,
            CONFIG_SOURCE_STATE: source_state,
            CONFIG_HASH_CODE: hash_code,
        }
    )


def _settings() -> tuple[BaseCache, StoreRule, Keying] | None:
    get = dask.config.get
    store = get(CONFIG_STORE, None)
    if store is None:
        return None
    rule = StoreRule(get(CONFIG_MIN_SECONDS, MIN_SECONDS), get(CONFIG_SELECT, None))
    keying = Keying(get(CONFIG_SOURCE_STATE, None), bool(get(CONFIG_HASH_CODE, False)))
    return resolve_store(store), rule, keying


_original_collections_to_expr: Callable[..., Any] = dask.base.collections_to_expr


def collections_to_expr(
    collections: Any, optimize_graph: bool = True, *args: Any, **kwargs: Any
) -> Any:
    """``dask.base.collections_to_expr`` on the collections rewritten through the configured
    store, or on the collections as they are while none is configured."""
    settings = _settings()
    if settings is not None:
        store, rule, keying = settings
        many = isinstance(collections, (tuple, list, set))
        items = list(collections) if many else [collections]
        rebuilt = cache_collections(
            items, store, rule=rule, keying=keying, optimize_graph=optimize_graph
        )
        collections = rebuilt if many else rebuilt[0]
    return _original_collections_to_expr(collections, optimize_graph, *args, **kwargs)


dask.base.collections_to_expr = collections_to_expr
distributed.client.collections_to_expr = collections_to_expr  # imported there by name
