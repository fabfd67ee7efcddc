"""Ray integration: Ray tasks that never compute the same call twice.

Ray has no hook into a task's life cycle, so the decision is taken on the driver, before a task is
submitted. Two ways in, usable together:

- :func:`cached_remote` (or the decorator :func:`remote`) wraps a function, plain or
  ``@fleche``-decorated. Its ``.remote(*args)`` keys the call on the driver, exactly as
  ``@fleche`` would, and submits either a small task that loads the stored result on a worker or
  one that runs the function and saves its result there. An ``ObjectRef`` returned by such a
  wrapper stands for its call's digest in downstream keys (:class:`~fleche._tasks.Upstream`), so a
  chain of cached tasks is keyed without fetching anything; an ``ObjectRef`` from elsewhere is
  fetched on the worker and keyed by its value.
- :func:`runtime_env`, for ``ray.init(runtime_env=...)``: a worker process setup hook makes the
  store the process-wide default cache of every worker, so every ``@fleche`` function run in any
  task reads and writes through it.

Storages and caches can also be passed to tasks or ``ray.put``: they pickle as their settings and
coordinate through the same files, locks or database in every worker.

Loaded results never pass through the driver: a hit is a task that loads the value on a worker
into Ray's object store, so large results cost the driver nothing and a value needed only by
downstream tasks is loaded where they run (a tiny result pays one task round trip instead).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

from .extras import needs_extra

with needs_extra("ray", "fleche.ray"):
    import ray
    from ray import ObjectRef

from ._tasks import Upstream, map_nested
from .caches import BaseCache
from .decorator import _Cached, _cached_of, active_cache, set_default_cache
from .digest import Digest, Indigestible
from .errors import FlecheWarning
from .spec import as_cache, open_store
from .spec import parse as parse_spec

__all__ = ["CachedRemote", "cached_remote", "install_store", "key_of", "remote", "runtime_env"]

logger = logging.getLogger("fleche.ray")

MAX_TRACKED_REFS = 100_000
"""How many result references the driver remembers the call digests of (oldest forgotten first)."""


class _RefDigests:
    """Driver-side map from an ``ObjectRef``'s id to the digest of the call that produces it.

    ``ObjectRef`` takes no weak references, so the map is keyed by ``ref.hex()`` (ids are never
    reused) and bounded; a forgotten ref is keyed by its value, on the worker, like a foreign one.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._map: collections.OrderedDict[str, Digest] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, ref: ObjectRef, key: Digest) -> None:
        with self._lock:
            self._map[ref.hex()] = key
            while len(self._map) > self.maxsize:
                self._map.popitem(last=False)

    def get(self, ref: ObjectRef) -> Digest | None:
        with self._lock:
            return self._map.get(ref.hex())


_REFS = _RefDigests(MAX_TRACKED_REFS)


def key_of(ref: ObjectRef) -> Digest | None:
    """The call digest a cached task's ``ObjectRef`` stands for; ``None`` for other refs.

    Only known in the driver process that submitted the task, and only when the driver could key
    the call (not when it depends on the value of a ref from elsewhere, which the worker keys).
    Thread-safe.
    """
    return _REFS.get(ref)


# -- what runs on the workers -------------------------------------------------------------------


def _fetch_top_level(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Resolve top-level refs as Ray would have before the task ran; nested ones stay refs."""
    args = tuple(ray.get(a) if isinstance(a, ObjectRef) else a for a in args)
    kwargs = {k: ray.get(v) if isinstance(v, ObjectRef) else v for k, v in kwargs.items()}
    return args, kwargs


def _fetch_all(obj: Any) -> Any:
    return map_nested(obj, lambda v: ray.get(v) if isinstance(v, ObjectRef) else v)


class _Served:
    """One call of a cached function, run where its Ray task runs as a direct call of the
    ``@fleche`` function would run it (``_Cached.serve``): expiry, corrupt-entry repair,
    compute-once, ``meta=`` and ``isolate=`` apply."""

    def __init__(self, store: BaseCache, cached: _Cached, key: Digest, call: Any) -> None:
        self.store, self.cached, self.key, self.call = store, cached, key, call

    def __call__(self, arguments: Callable[[], tuple[tuple, dict]]) -> Any:
        return self.cached.serve(self.store, self.key, self.call, arguments)


def _run(served: _Served, *args: Any, **kwargs: Any) -> Any:
    return served(lambda: (args, kwargs))


def _load_or_run(served: _Served, packed: tuple[tuple, dict]) -> Any:
    # The arguments come packed, so Ray fetches no upstream value for a hit.
    return served(lambda: _fetch_top_level(*packed))


def _key_and_run(
    store: BaseCache, cached: _Cached, template: tuple[tuple, dict], packed: tuple[tuple, dict]
) -> Any:
    args, kwargs = _fetch_all(template)
    try:
        call = cached.make_call(args, kwargs)
        key = call.to_lookup_key()
    except Indigestible as e:
        logger.warning("%s ran uncached: %s", cached.name, e)
        args, kwargs = _fetch_top_level(*packed)
        return cached.body(args, kwargs)
    return _Served(store, cached, key, call)(lambda: _fetch_top_level(*packed))


def _plain(cached: _Cached, *args: Any, **kwargs: Any) -> Any:
    return cached.body(args, kwargs)


_REMOTE = {f.__name__: ray.remote(f) for f in (_run, _load_or_run, _key_and_run, _plain)}


# -- the driver side ----------------------------------------------------------------------------


class CachedRemote:
    """A function whose ``.remote(...)`` submits a cached Ray task (see :func:`cached_remote`).

    Safe to use from many driver threads; two drivers that miss the same key at once may both
    compute it.
    """

    def __init__(
        self, func: Callable[..., Any], store: BaseCache | str | None = None, **ray_options: Any
    ) -> None:
        if store is not None:
            store = as_cache(store)
        if ray_options.get("num_returns", 1) != 1:
            raise ValueError("cached Ray tasks return one object; num_returns must be 1")
        cached = _cached_of(func)
        if cached.is_async:
            raise TypeError(
                f"{cached.name} is an async function, which a Ray task cannot run; cache a "
                "synchronous function (one that calls asyncio.run, say) or use it from an actor"
            )
        self._cached = cached
        self._store = store
        self._options = ray_options
        self.__name__ = cached.name.rpartition(".")[2]
        self.__qualname__ = cached.name
        self.__doc__ = cached.func.__doc__
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"<cached Ray function {self.__qualname__}>"

    def options(self, **ray_options: Any) -> CachedRemote:
        """The same function with these Ray task options (``num_cpus``, ``resources``...) added."""
        return CachedRemote(self.__wrapped__, self._store, **{**self._options, **ray_options})

    @property
    def store(self) -> BaseCache:
        """The cache used: the one given, else the ``@fleche(cache=...)`` one, else the active one."""
        if self._store is not None:
            return self._store
        return self._cached.cache if self._cached.cache is not None else active_cache()

    def _template(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
        """Arguments with cached refs replaced by their digests; whether other refs remain."""
        foreign = False

        def leaf(value: Any) -> Any:
            nonlocal foreign
            if isinstance(value, ObjectRef):
                key = _REFS.get(value)
                if key is None:
                    foreign = True
                    return value
                return Upstream(key)
            return value

        return map_nested(args, leaf), map_nested(kwargs, leaf), foreign

    def key(self, *args: Any, **kwargs: Any) -> Digest | None:
        """This call's key, computed on the driver; ``None`` when it depends on the value of a ref
        from elsewhere. Raises ``Indigestible`` for arguments without a digest."""
        targs, tkwargs, foreign = self._template(args, kwargs)
        return None if foreign else self._cached.make_call(targs, tkwargs).to_lookup_key()

    def remote(self, *args: Any, **kwargs: Any) -> ObjectRef:
        """Submit the call: a load task if the store has it, else a task computing and saving it.

        Returns at once with the ``ObjectRef`` of the result. The function gets its arguments as
        from a plain Ray task (top-level refs resolved, nested refs as refs). An exception in it
        is not cached and reaches ``ray.get`` as a ``RayTaskError`` that is also an instance of
        the original exception type. Arguments without a digest run uncached with a
        ``FlecheWarning``; arguments that do not fit the signature raise ``TypeError`` here.
        """
        store = self.store
        cached = self._cached
        targs, tkwargs, foreign = self._template(args, kwargs)
        if foreign:
            return self._submit("_key_and_run", store, cached, (targs, tkwargs), (args, kwargs))
        try:
            call = cached.make_call(targs, tkwargs)
            key = call.to_lookup_key()
        except Indigestible as e:
            warnings.warn(f"{self.__qualname__} ran uncached: {e}", FlecheWarning, stacklevel=2)
            return self._submit("_plain", cached, *args, **kwargs)
        served = _Served(store, cached, key, call)
        try:
            stored = store.contains(key)
        except Exception as e:  # noqa: BLE001 - the cache never fails a call (issue 14)
            warnings.warn(f"{self.__qualname__}: cache lookup failed, computing: "
                          f"{type(e).__name__}: {e}", FlecheWarning, stacklevel=2)
            stored = False
        if stored:
            ref = self._submit("_load_or_run", served, (args, kwargs))
        else:
            ref = self._submit("_run", served, *args, **kwargs)
        _REFS.add(ref, key)
        return ref

    def _submit(self, name: str, *args: Any, **kwargs: Any) -> ObjectRef:
        task = _REMOTE[name]
        if self._options:
            task = task.options(**self._options)
        return task.remote(*args, **kwargs)


def cached_remote(
    func: Callable[..., Any], store: BaseCache | str | None = None, **ray_options: Any
) -> CachedRemote:
    """``func`` as a cached Ray task: ``cached_remote(f, store).remote(*args)``.

    ``func`` is a plain function or a ``@fleche``-decorated one (whose ``version``, ``ignore`` and
    other settings then apply); keys are those ``@fleche`` gives for the same arguments, so Ray,
    Dask and plain runs share stored results. ``store`` (a cache or a store spec, see
    :mod:`fleche.spec`) defaults to the decorator's ``cache=``, else the driver's active cache;
    it must be shared with the workers (files or a database).
    ``ray_options`` are Ray task options (``num_cpus``, ``resources``, ...).
    """
    return CachedRemote(func, store, **ray_options)


def remote(store: BaseCache | str | None = None, **ray_options: Any) -> Callable[[Callable[..., Any]], CachedRemote]:
    """Decorator form of :func:`cached_remote`::

        @fleche.ray.remote(store, num_cpus=1)
        def simulate(t): ...

        ray.get(simulate.remote(1.5))
    """

    def decorate(func: Callable[..., Any]) -> CachedRemote:
        return CachedRemote(func, store, **ray_options)

    return decorate


# -- the worker side: a default cache in every worker process -----------------------------------


def install_store(store: BaseCache | str) -> Callable[[], None]:
    """A Ray worker process setup hook that makes ``store`` the process-wide default cache.

    ``store`` is a cache or a store spec (see :mod:`fleche.spec`); a spec is checked here and
    opened in each worker. Ray pickles the hook with the store in it and runs it once in each
    worker process of the job, before the worker's first task.
    """
    if isinstance(store, (str, os.PathLike)):
        spec = parse_spec(store).reveal()  # a bad spec fails here, on the driver

        def fleche_install_store() -> None:
            set_default_cache(open_store(spec))

        return fleche_install_store
    if not isinstance(store, BaseCache):
        raise TypeError(
            f"install_store needs a cache (fleche.caches.Cache) or a store spec, got {store!r}"
        )

    def fleche_install_store() -> None:
        set_default_cache(store)

    return fleche_install_store


def runtime_env(store: BaseCache | str, **runtime_env: Any) -> dict[str, Any]:
    """A Ray ``runtime_env`` making ``store`` (a cache or a spec) the default cache in every
    worker process.

    Pass it to ``ray.init(runtime_env=...)`` (Ray runs setup hooks for the job's workers only, not
    per task); other ``runtime_env`` entries go in as keyword arguments. Every ``@fleche``
    function called in any task of the job then uses ``store`` unless it names its own cache.

    >>> ray.init(runtime_env=fleche.ray.runtime_env(store))  # doctest: +SKIP
    """
    if "worker_process_setup_hook" in runtime_env:
        raise ValueError("runtime_env already has a worker_process_setup_hook; combine them yourself")
    return {**runtime_env, "worker_process_setup_hook": install_store(store)}

