"""The ``@fleche`` decorator and the choice of the cache it uses.

Which cache a decorated function uses, first match wins:

1. the ``cache=`` argument of the decorator;
2. the active cache of the current context, set with ``fleche.cache(c)`` (a ``contextvars``
   variable: it holds in this thread and in asyncio tasks started from it, not in other threads);
3. the process-wide default: the cache set with :func:`set_default_cache` (what worker plugins
   install), else the cache the environment variable ``FLECHE_CACHE`` names (a store spec, see
   :mod:`fleche.spec`; read once, when first needed, so worker processes started with it use
   it; changing it later in the same process has no effect);
4. the default store, persistent: pickle files in fleche's directory of the user's cache
   directory (:func:`fleche.spec.default_spec`, ``~/.cache/fleche`` on Linux), opened on first
   use; ``FLECHE_CACHE=memory://`` keeps calls in memory instead.

A bad ``FLECHE_CACHE`` makes every decorated call without a cache of its own fail with a
:class:`~fleche.errors.SpecError` naming the variable, rather than silently cache elsewhere.
Thread pool tasks submitted inside ``with fleche.cache(c):`` use ``c`` too (see
:mod:`fleche.threads`); other threads and processes do not (see :func:`fleche.bind`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import functools
import inspect
import os
import socket
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, overload

from .caches import BaseCache
from .call import Call, KnownArguments, lookup_key, with_lookup_key
from .digest import (
    Digest,
    Indigestible,
    callable_digest,
    callable_name,
    callable_references,
    digest,
    digest_as,
    digests_by_name,
)
from .digest_arguments import D, by_value
from .errors import (
    CorruptEntryError,
    FlecheWarning,
    LockTimeout,
    SaveError,
    SignatureError,
    SpecError,
)
from .isolation import isolated_directory
from .meta import Provider, collect, providers
from .namespace import FunctionNamespace
from .reruns import Rerun, active_rerun
from .spec import CACHE_ENV, as_cache, default_spec, open_store
from .query import start_time
from .storage.envelope import SECRET_KEY_ENV
from .threads import follow

__all__ = [
    "active_cache",
    "cache",
    "fleche",
    "get_default_cache",
    "set_default_cache",
]

F = TypeVar("F", bound=Callable[..., Any])

_ACTIVE: contextvars.ContextVar[BaseCache | None] = contextvars.ContextVar(
    "fleche_active_cache", default=None
)
_default: BaseCache | None = None
_fallback: BaseCache | None = None
_fallback_lock = threading.Lock()
_from_env: tuple[str | None, BaseCache | None] | None = None  # (FLECHE_CACHE, its cache) once read
_HOST = socket.gethostname()


class _CacheSetting:
    """The result of :func:`cache`: already in effect; as a context manager, undone on exit."""

    def __init__(self, cache: BaseCache | None, token: contextvars.Token) -> None:
        self.cache = cache
        self._token = token

    def __enter__(self) -> BaseCache | None:
        return self.cache

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reset(self._token)


_ACTIVE_NOW: Any = object()  # cache() called without an argument: a getter


@overload
def cache() -> BaseCache: ...
@overload
def cache(c: BaseCache | None) -> _CacheSetting: ...


def cache(c: Any = _ACTIVE_NOW) -> Any:
    """Make ``c`` the active cache of the current context (``None`` clears it); without an
    argument, return the cache a decorated function without ``cache=`` would use now (see
    :func:`active_cache`).

    Takes effect at once; used as ``with fleche.cache(c): ...`` the previous setting returns
    when the block ends. Other threads are not affected, except the tasks submitted to a
    ``concurrent.futures.ThreadPoolExecutor`` while ``c`` is active, which run with ``c`` (see
    :mod:`fleche.threads`).
    """
    if c is _ACTIVE_NOW:
        return active_cache()
    if c is not None and not isinstance(c, BaseCache):
        raise TypeError(f"fleche.cache needs a cache (e.g. fleche.caches.Cache), got {c!r}")
    if c is not None:
        follow(_ACTIVE)  # thread pool tasks submitted while it is active use it too
    return _CacheSetting(c, _ACTIVE.set(c))


def set_default_cache(c: BaseCache | None) -> None:
    """Make ``c`` the process-wide default cache, used where no cache is active."""
    global _default
    if c is not None and not isinstance(c, BaseCache):
        raise TypeError(f"set_default_cache needs a cache, got {c!r}")
    _default = c


def get_default_cache() -> BaseCache | None:
    """The process-wide default cache: the one set with :func:`set_default_cache`, else the one
    ``FLECHE_CACHE`` names, else ``None``. Raises :class:`~fleche.errors.SpecError` for a bad
    ``FLECHE_CACHE``."""
    if _default is not None:
        return _default
    return _environment_cache()


def _environment_cache() -> BaseCache | None:
    """The cache ``FLECHE_CACHE`` names, read and opened once per process, on first use (the
    variable is not looked at again: decorated calls stay cheap)."""
    global _from_env
    known = _from_env
    if known is not None:
        return known[1]
    with _fallback_lock:
        if _from_env is None:
            text = os.environ.get(CACHE_ENV)
            try:
                _from_env = (text, open_store(text) if text else None)
            except SpecError as e:
                raise SpecError(
                    e.spec, f"{e.reason} (from the environment variable {CACHE_ENV})"
                ) from None
        return _from_env[1]


def active_cache() -> BaseCache:
    """The cache a decorated function without ``cache=`` would use now; in the end the
    default store in the user's cache directory, opened once per process."""
    global _fallback
    c = _ACTIVE.get()
    if c is not None:
        return c
    c = get_default_cache()
    if c is not None:
        return c
    if _fallback is None:
        with _fallback_lock:
            if _fallback is None:
                _fallback = open_store(default_spec())
    return _fallback


def runtime_metadata(started: float, wall: float) -> dict[str, Any]:
    """When and where a call ran: start (ISO 8601, UTC), wall time in seconds, host, pid."""
    return {
        "start": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
        "wall_time": wall,
        "host": _HOST,
        "pid": os.getpid(),
    }


def _warn(message: str, stacklevel: int = 3) -> None:
    warnings.warn(message, FlecheWarning, stacklevel=stacklevel)


class _Cached:
    """What ``@fleche`` builds around one function (see :func:`fleche`)."""

    def __init__(
        self,
        func: Callable[..., Any],
        *,
        version: str | None,
        hash_version: bool,
        hash_module: bool,
        hash_code: bool,
        ignore: Iterable[str],
        cache: BaseCache | str | os.PathLike[str] | None,
        compute_once: bool = False,
        meta: Mapping[str, Provider] | Iterable[Provider] | None = None,
        isolate: bool = False,
        expire: float | datetime.timedelta | None = None,
    ) -> None:
        name, module = callable_name(func)
        if inspect.isasyncgenfunction(func):
            raise TypeError(f"@fleche cannot cache an async generator (its values come one by "
                            f"one, there is no result to store): {name}")
        self.is_async = inspect.iscoroutinefunction(func)
        if isolate and self.is_async:
            raise ValueError(
                f"isolate=True cannot be used with the async function {name}: the working "
                "directory belongs to the process, so every task of the event loop would run in it"
            )
        self.func = func
        self.name = name
        self.signature = inspect.signature(func)
        self.ignore = frozenset(ignore)
        unknown = self.ignore - set(self.signature.parameters)
        if unknown:
            raise ValueError(
                f"ignore names {sorted(unknown)} that are not parameters of {name}{self.signature}"
            )
        if cache is not None and not isinstance(cache, (BaseCache, str, os.PathLike)):
            raise TypeError(
                f"cache= needs a cache (e.g. fleche.caches.Cache) or a store spec, got {cache!r}"
            )
        self.cache = None if cache is None else as_cache(cache)
        self.compute_once = compute_once
        self.meta = providers(meta)
        self.isolate = isolate
        self.expire = _seconds(expire)
        self.version = version
        # A function known by its name is keyed by it (and hash_code=False keeps its key when
        # its body changes); any other callable by what it computes, taken at each call, since
        # captured values, globals and an object's state may change between calls.
        self.hash_code = hash_code
        self._by_name = digests_by_name(func) and not hash_code
        self._identity: tuple[tuple[Any, ...], Call] | None = None  # (what it read, template)
        self.template = Call(
            name=name,
            arguments={},
            module=module if hash_module else None,
            version=version if hash_version else None,
            code_digest=None,
        )
        self.info = {"version": version, "module": module}
        params = list(self.signature.parameters.values())
        plain = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
        self._simple = tuple(p.name for p in params) if plain else None
        self._positional = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        self._defaults = {p.name: p.default for p in params if p.default is not p.empty}
        if not self._by_name:
            # Taken now rather than at the first call, so threads racing the first call, while
            # one of them changes a captured value in place, all get the same key.
            with contextlib.suppress(Indigestible):
                self.identity()

    def __getstate__(self) -> dict[str, Any]:
        # What the identity read stays behind (another process digests it anew): it may hold
        # globals that do not pickle, although the function, pickled by reference, does.
        return {**self.__dict__, "_identity": None}

    def resolve_cache(self) -> BaseCache:
        return self.cache if self.cache is not None else active_cache()

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name, in signature order, defaults applied, ignored ones left
        out; ``TypeError`` if they do not fit the signature."""
        arguments = self._fast_bind(args, kwargs)
        if arguments is None:
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
        if self.ignore:
            arguments = {k: v for k, v in arguments.items() if k not in self.ignore}
        return arguments

    def _fast_bind(self, args: tuple, kwargs: dict) -> dict[str, Any] | None:
        # Signatures of plain parameters bind without inspect (a large part of a hit's cost);
        # anything unusual, including every error, takes inspect's path.
        if self._simple is None or len(args) > self._positional:
            return None
        arguments = dict(zip(self._simple, args))
        used = 0
        for name in self._simple[len(args):]:
            if name in kwargs:
                arguments[name] = kwargs[name]
                used += 1
            elif name in self._defaults:
                arguments[name] = self._defaults[name]
            else:
                return None
        return arguments if used == len(kwargs) else None

    def identity(self) -> Call:
        """The call template as of now: name, module, version and, for a function not keyed by
        its name alone, the digest of what it computes; ``Indigestible`` if that has none.

        That digest is taken again whenever something it read was rebound (a global, a captured
        variable, an attribute of a callable object); a value changed in place is not seen.
        """
        if self._by_name:
            return self.template
        refs = callable_references(self.func, hash_code=self.hash_code)
        known = self._identity
        if known is not None and len(known[0]) == len(refs):
            if all(a is b for a, b in zip(known[0], refs)):
                return known[1]
        # A plain str, as Call.code_digest is typed (storages such as Sql check the type).
        code = str(callable_digest(self.func, hash_code=self.hash_code))
        template = self.template.replace(code_digest=code)
        self._identity = (refs, template)
        return template

    def make_call(self, args: tuple, kwargs: dict) -> Call:
        return self.identity().replace(arguments=self.bind(args, kwargs))

    def key(
        self, arguments: Mapping[str, Any], template: Call | None = None
    ) -> tuple[Digest, dict[str, Digest]]:
        """The lookup key of a call with these bound arguments (under ``template``, by default
        :meth:`identity`) and the arguments' digests; ``Indigestible`` naming the argument, or
        the function's part, whose digest failed."""
        t = self.identity() if template is None else template
        digests = {}
        for name, value in arguments.items():
            try:
                digests[name] = digest(value)
            except Indigestible as e:
                raise Indigestible(f"argument {name!r} has no digest: {e}") from e
        return lookup_key(t.name, t.module, t.version, t.code_digest, digests), digests

    def body(self, args: tuple, kwargs: dict) -> Any:
        """Run the function itself (in a fresh working directory with ``isolate=True``)."""
        if self.isolate:
            with isolated_directory(self.name):
                return self.func(*args, **kwargs)
        return self.func(*args, **kwargs)

    def _prepare(self, cache: BaseCache, args: tuple, kwargs: dict) -> tuple[Digest, Call] | None:
        """The call's key and its ``Call``; ``None`` if it must run uncached: arguments that do
        not fit the signature (the function raises its own error) or that have no digest (with a
        warning naming the argument)."""
        try:
            arguments = self.bind(args, kwargs)
        except TypeError:
            return None
        try:
            return self.keyed_call(arguments)
        except Indigestible as e:  # digest() raises nothing else: the call runs, uncached
            _warn(f"{self.name} ran uncached: {e}", stacklevel=4)
            return None

    def keyed_call(self, arguments: Mapping[str, Any]) -> tuple[Digest, Call]:
        """The lookup key and the ``Call`` of these bound arguments under :meth:`identity`, the
        call remembering its key and its arguments' digests, so no later step digests again;
        ``Indigestible`` as :meth:`key`."""
        template = self.identity()
        key, digests = self.key(arguments, template)
        return key, with_lookup_key(template.replace(arguments=KnownArguments(arguments, digests)), key)

    def run(self, args: tuple, kwargs: dict) -> Any:
        cache = self.resolve_cache()
        args, kwargs = by_value(self.resolve_cache, self.signature, args, kwargs)
        prepared = self._prepare(cache, args, kwargs)
        if prepared is None:
            return self.body(args, kwargs)
        key, call = prepared
        rerun = active_rerun()
        if rerun is not None and rerun.applies(self, cache, key):
            return self.recompute(cache, key, args, kwargs, call, rerun)
        return self.serve(cache, key, call, lambda: (args, kwargs))

    def serve(
        self, cache: BaseCache, key: Digest, call: Call, arguments: Callable[[], tuple[tuple, dict]]
    ) -> Any:
        """The result stored under ``key``, else the function run on ``arguments()`` (args and
        kwargs, asked for only then) and saved as ``call``: what a direct call does once the key
        is known, with expiry, repair of a corrupt entry, compute-once across processes,
        ``meta=`` and ``isolate=``. :mod:`fleche.ray`'s workers use it with a ``call`` that may
        name upstream results by digest and arguments fetched only on a miss."""
        found, overwrite = self._lookup(cache, key)
        if found is not _MISS:
            return found
        args, kwargs = arguments()
        if overwrite is None:  # refused for its signature: another key's entry, left alone
            return self.body(args, kwargs)
        if self.compute_once and cache.writable:
            return self._compute_once(cache, key, args, kwargs, call, overwrite)[0]
        return self._compute(cache, args, kwargs, call, overwrite)[0]

    def recompute(
        self, cache: BaseCache, key: Digest, args: tuple, kwargs: dict, call: Call,
        rerun: Rerun | None = None,
    ) -> Any:
        """Run the call whether stored or not and replace its entry (under the key's lock with
        ``compute_once``); tell ``rerun`` once the entry is replaced."""
        if self.compute_once and cache.writable:
            result, saved = self._compute_once(cache, key, args, kwargs, call, True, look=False)
        else:
            result, saved = self._compute(cache, args, kwargs, call, True)
        if rerun is not None and saved:
            rerun.recomputed(cache, key)
        return result

    def _lookup(self, cache: BaseCache, key: Digest) -> tuple[Any, bool | None]:
        """The stored result (``_MISS`` if there is none to use) and whether a save must
        overwrite a damaged entry (``None``: do not save at all).

        Whatever the store raises (``OSError``, a database gone, a corrupt entry) makes a miss
        with a warning naming the cause; only ``KeyboardInterrupt`` and the like propagate.
        """
        name = self.name
        try:
            if self.expire is not None:
                return self._unexpired(cache, key), False
            return cache.load_result(key), False
        except KeyError:
            return _MISS, False
        except SignatureError as e:
            # Another process may sign with another key: its entry is valid to it, so neither
            # evict it nor overwrite it (which would make it evict ours in turn).
            _warn(f"{name} ran uncached: the stored entry is signed with another secret key, or "
                  f"unsigned, and is left alone (check {SECRET_KEY_ENV} in every process): {e}")
            return _MISS, None
        except CorruptEntryError as e:
            _warn(f"{name}: recomputing over a corrupt cache entry ({e})")
            if cache.writable:
                try:
                    cache.discard(e.key)
                except Exception as d:  # noqa: BLE001 - the save that follows may still work
                    _warn(f"{name}: cannot remove the corrupt entry: {_cause(d)}")
            return _MISS, True
        except Exception as e:  # noqa: BLE001 - the cache never fails a call (issue 14)
            _warn(f"{name}: cache lookup failed, computing: {_cause(e)}")
            return _MISS, False

    def _unexpired(self, cache: BaseCache, key: Digest) -> Any:
        """The stored result, unless the call started more than ``expire`` seconds ago (or
        its start is unknown): then ``KeyError``, a miss, whose save replaces the entry."""
        stored = cache.load(key)
        started = start_time(stored)
        if started is None or time.time() - started.timestamp() > self.expire:  # type: ignore[operator]
            raise KeyError(f"{key}: expired (stored more than {self.expire:g} s ago)")
        return stored.result

    def _compute(
        self, cache: BaseCache, args: tuple, kwargs: dict, call: Call, overwrite: bool
    ) -> tuple[Any, bool]:
        """Run the call and save it if the cache is writable: the result, and whether it was
        saved."""
        started = time.time()
        t0 = time.perf_counter()
        result = self.body(args, kwargs)
        wall = time.perf_counter() - t0
        saved = cache.writable and self.store(cache, call, result, started, wall, overwrite)
        return result, saved

    def _compute_once(
        self, cache: BaseCache, key: Digest, args: tuple, kwargs: dict, call: Call,
        overwrite: bool, look: bool = True,
    ) -> tuple[Any, bool]:
        # Single flight: hold the key's lock (across processes for file storages), look again
        # (unless recomputing), and compute only if still missing. A waiter that times out
        # computes itself, and so does a caller whose lock cannot be taken at all (an unusable
        # lock file or directory).
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(cache.locked(key))
            except LockTimeout as e:
                _warn(f"{self.name}: computing without waiting longer ({e})")
                return self._compute(cache, args, kwargs, call, overwrite)
            except Exception as e:  # noqa: BLE001 - the cache never fails a call
                _warn(f"{self.name}: computing without the key's lock: {_cause(e)}")
                return self._compute(cache, args, kwargs, call, overwrite)
            if look and not overwrite:
                found, again = self._lookup(cache, key)
                if found is not _MISS:
                    return found, False
                if again is None:
                    return self.body(args, kwargs), False
                overwrite = again
            return self._compute(cache, args, kwargs, call, overwrite)

    # -- async functions: the same steps, with the store's work in threads -------------------

    async def run_async(self, args: tuple, kwargs: dict) -> Any:
        """:meth:`run` for an ``async def`` function: lookups and saves run in a worker thread
        (``asyncio.to_thread``), so a slow store never blocks the event loop; digests of the
        arguments are taken on the loop."""
        cache = self.resolve_cache()
        args, kwargs = await _off_loop(by_value, lambda: cache, self.signature, args, kwargs)
        prepared = self._prepare(cache, args, kwargs)
        if prepared is None:
            return await self.func(*args, **kwargs)
        key, call = prepared
        rerun = active_rerun()
        if rerun is not None and rerun.applies(self, cache, key):
            return await self.recompute_async(cache, key, args, kwargs, call, rerun)
        found, overwrite = await asyncio.to_thread(self._lookup, cache, key)
        if found is not _MISS:
            return found
        if overwrite is None:
            return await self.func(*args, **kwargs)
        if self.compute_once and cache.writable:
            return (await self._compute_once_async(cache, key, args, kwargs, call, overwrite))[0]
        return (await self._compute_async(cache, args, kwargs, call, overwrite, asyncio.to_thread))[0]

    async def recompute_async(
        self, cache: BaseCache, key: Digest, args: tuple, kwargs: dict, call: Call,
        rerun: Rerun | None = None,
    ) -> Any:
        """:meth:`recompute` for an ``async def`` function."""
        if self.compute_once and cache.writable:
            result, saved = await self._compute_once_async(
                cache, key, args, kwargs, call, True, look=False
            )
        else:
            result, saved = await self._compute_async(
                cache, args, kwargs, call, True, asyncio.to_thread
            )
        if rerun is not None and saved:
            rerun.recomputed(cache, key)
        return result

    async def _compute_async(
        self, cache: BaseCache, args: tuple, kwargs: dict, call: Call, overwrite: bool,
        in_thread: Callable[..., Awaitable[Any]],
    ) -> tuple[Any, bool]:
        started = time.time()
        t0 = time.perf_counter()
        result = await self.func(*args, **kwargs)
        wall = time.perf_counter() - t0  # includes the time the coroutine spent waiting
        if not cache.writable:
            return result, False
        return result, await in_thread(self.store, cache, call, result, started, wall, overwrite)

    async def _compute_once_async(
        self, cache: BaseCache, key: Digest, args: tuple, kwargs: dict, call: Call,
        overwrite: bool, look: bool = True,
    ) -> tuple[Any, bool]:
        # The key's lock belongs to the thread that took it (a thread lock, a file lock of this
        # process), so one thread of our own takes it, saves under it and releases it, while the
        # coroutine computes on the event loop. Waiting for the lock blocks that thread only.
        held = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleche-key-lock")
        stack = contextlib.ExitStack()
        loop = asyncio.get_running_loop()

        async def in_held(fn: Callable[..., Any], *a: Any) -> Any:
            return await loop.run_in_executor(held, functools.partial(fn, *a))

        try:
            try:
                await in_held(lambda: stack.enter_context(cache.locked(key)))
            except LockTimeout as e:
                _warn(f"{self.name}: computing without waiting longer ({e})")
                return await self._compute_async(cache, args, kwargs, call, overwrite, asyncio.to_thread)
            except Exception as e:  # noqa: BLE001 - the cache never fails a call
                _warn(f"{self.name}: computing without the key's lock: {_cause(e)}")
                return await self._compute_async(cache, args, kwargs, call, overwrite, asyncio.to_thread)
            if look and not overwrite:
                found, again = await in_held(self._lookup, cache, key)
                if found is not _MISS:
                    return found, False
                if again is None:
                    return await self.func(*args, **kwargs), False
                overwrite = again
            return await self._compute_async(cache, args, kwargs, call, overwrite, in_held)
        finally:
            held.submit(stack.close)  # queued after the acquisition: released even if cancelled
            held.shutdown(wait=False)

    def store(
        self, cache: BaseCache, call: Call, result: Any, started: float, wall: float,
        overwrite: bool = False,
    ) -> bool:
        """Save the call with its result and metadata (``runtime``, ``function`` and the
        sections of ``meta=``); whether it was saved. A failure of any kind is a warning naming
        the cause (the result is returned all the same), never an exception."""
        metadata = {"runtime": runtime_metadata(started, wall), "function": self.info}
        if self.meta:  # the providers see the call with its result
            call = call.replace(result=result)
            metadata.update(collect(self.meta, call, self.name))
            call = call.replace(metadata=metadata)
        else:
            call = call.replace(result=result, metadata=metadata)
        name = self.name
        try:
            cache.save(call, overwrite=overwrite)
            return True
        except Indigestible as e:  # the arguments were digested already: it is the result
            _warn(f"{name}: result not cached, it has no digest: {e}")
        except LockTimeout as e:
            _warn(f"{name}: result not cached, its key stayed locked: {e}")
        except SaveError as e:  # says which argument or the result could not be stored
            _warn(f"{name}: call not cached: {e}")
        except Exception as e:  # noqa: BLE001 - a full disk, a read-only mount, a database gone
            _warn(f"{name}: call not cached: {_cause(e)}")
        return False


async def _off_loop(
    resolve: Callable[..., tuple[tuple, dict]], cache: Callable[[], BaseCache],
    signature: inspect.Signature, args: tuple, kwargs: dict,
) -> tuple[tuple, dict]:
    """``resolve(cache, signature, args, kwargs)`` (:func:`by_value`) in a worker thread when an
    argument is a ``D`` (which loads a value), else at once."""
    if D in map(type, args) or (kwargs and D in map(type, kwargs.values())):
        return await asyncio.to_thread(resolve, cache, signature, args, kwargs)
    return args, kwargs


_MISS = object()
"""What :meth:`_Cached._lookup` returns when there is no stored result to use."""


def _seconds(expire: float | datetime.timedelta | None) -> float | None:
    """``expire=`` in seconds; ``ValueError`` for what is not a duration of 0 or more."""
    if expire is None:
        return None
    if isinstance(expire, datetime.timedelta):
        seconds = expire.total_seconds()
    elif type(expire) in (int, float):
        seconds = float(expire)
    else:
        raise TypeError(f"expire= takes seconds or a datetime.timedelta, got {expire!r}")
    if not seconds >= 0:
        raise ValueError(f"expire= must be 0 or more seconds, got {expire!r}")
    return seconds


def _cause(e: BaseException) -> str:
    """An exception as a warning names it: its type and its message."""
    return f"{type(e).__name__}: {e}"


def _attach(wrapper: Any, cached: _Cached) -> None:
    namespace = FunctionNamespace(cached, wrapper)
    wrapper.fleche = namespace
    wrapper.digest = namespace.digest
    wrapper.contains = namespace.contains
    wrapper.load = namespace.load
    wrapper.call = namespace.call
    wrapper.query = namespace.query
    wrapper.clear = namespace.clear
    wrapper.refresh = namespace.refresh
    wrapper.rerun = namespace.rerun
    wrapper.__fleche__ = cached
    _DECORATED[wrapper] = cached


_DECORATED: weakref.WeakKeyDictionary[Callable[..., Any], _Cached] = weakref.WeakKeyDictionary()
"""Every function ``@fleche`` returned, with what it built around it (see :func:`_cached_of`)."""


def registered(func: Callable[..., Any]) -> _Cached | None:
    """What ``@fleche`` built around ``func`` if ``@fleche`` returned ``func``, else ``None``."""
    try:
        return _DECORATED.get(func)
    except TypeError:  # not hashable or not weakly referenceable: not a wrapper of ours
        return None


def namespace_of(func: Callable[..., Any]) -> FunctionNamespace | None:
    """``func.fleche`` if ``@fleche`` returned ``func``, else ``None`` (for
    :meth:`~fleche.call.QueryCall.from_call`, which takes plain and decorated functions)."""
    try:
        known = _DECORATED.get(func)
    except TypeError:  # not hashable or not weakly referenceable: not a wrapper of ours
        return None
    return None if known is None else FunctionNamespace(known, func)


def _cached_of(func: Callable[..., Any]) -> _Cached:
    """What ``@fleche`` built around ``func`` if ``@fleche`` returned ``func``, else what plain
    ``@fleche`` builds around it; for the integrations that take plain and decorated functions
    alike (:mod:`fleche.ray`)."""
    try:
        known = _DECORATED.get(func)
    except TypeError:  # not hashable or not weakly referenceable: not a wrapper of ours
        known = None
    return known if known is not None else _DECORATED[fleche(func)]


@overload
def fleche(func: F, /) -> F: ...
@overload
def fleche(
    *,
    version: str | None = None,
    hash_version: bool = True,
    hash_module: bool = True,
    hash_code: bool = False,
    ignore: Iterable[str] = (),
    cache: BaseCache | str | os.PathLike[str] | None = None,
    compute_once: bool = False,
    meta: Mapping[str, Provider] | Iterable[Provider] | None = None,
    isolate: bool = False,
    expire: float | datetime.timedelta | None = None,
) -> Callable[[F], F]: ...


def fleche(
    func: Callable[..., Any] | None = None,
    /,
    *,
    version: str | None = None,
    hash_version: bool = True,
    hash_module: bool = True,
    hash_code: bool = False,
    ignore: Iterable[str] = (),
    cache: BaseCache | str | os.PathLike[str] | None = None,
    compute_once: bool = False,
    meta: Mapping[str, Provider] | Iterable[Provider] | None = None,
    isolate: bool = False,
    expire: float | datetime.timedelta | None = None,
) -> Any:
    """Cache a function's calls by the content of their arguments.

    A call whose key is stored returns the stored result without running the body; any other
    call runs and its result is saved with metadata (start time, wall time, host, pid).
    The key is built from the function's qualified name, its module (``hash_module``), its
    ``version`` (``hash_version``), what it computes when its name does not identify it or
    ``hash_code`` is set, and the bound arguments (defaults applied) except those named in
    ``ignore``. A lambda, a function defined inside another function (a closure) is keyed by
    its code, closure cells, defaults and keyword-only defaults; ``hash_code=True`` adds them,
    and the globals the body reads, for any function (editing the body gives new keys). A
    ``functools.partial`` is keyed by its function and bound arguments, a bound method or
    callable object by its class and state. That part is digested again whenever something it
    read (a global, a captured variable, an attribute) is rebound, not when a value is changed
    in place. The wrapper digests as ``func``, so it can be an argument of a cached call.

    Caching never changes what a call does: an argument (or a captured value) whose digest
    fails in any way runs the call uncached with a ``FlecheWarning`` naming it and the cause,
    exceptions propagate unchanged and are not cached, and a store that fails to look up or to
    save in any way (a full disk, a read-only mount, a lock that cannot be taken, a database
    gone, a damaged entry) costs a ``FlecheWarning`` naming the cause, never the call; an entry
    refused for its signature is left alone (it may be another process's, signed with another
    key) and the call runs uncached. The wrapper keeps the function's name, signature and
    docstring and gains ``.fleche``, a :class:`~fleche.namespace.FunctionNamespace` of its cache
    operations (``cache``, ``digest``, ``contains``, ``load``, ``evict``, ``call``, ``query``,
    ``clear``, ``refresh``), with the short forms ``.digest``, ``.contains``, ``.load``,
    ``.call``, ``.query``, ``.clear`` and ``.refresh`` (each taking the call's arguments). An
    argument given as ``fleche.D(key)`` is replaced by the stored value under that (short) key
    before the call. Safe to call from many threads and processes at once.
    Two callers that miss the same key at once may both compute it, unless
    ``compute_once=True``: then a caller that misses holds the key's lock (across processes for
    file storages) while it looks again and computes, and the others wait for its result; a
    waiter gives up after the storage's ``lock_timeout`` and computes itself rather than hang,
    so set ``lock_timeout`` above the usual computing time. ``expire`` (seconds or a
    ``datetime.timedelta``) makes a stored call that started longer ago than that (or whose
    start was not recorded) a miss: it is computed again and its entry replaced.

    ``cache`` is a cache or a store spec (``"/shared/sweep"``, ``"sqlite:///calls.db"``, see
    :mod:`fleche.spec`), opened when decorating; without it the function uses the active cache
    (see the module docstring). ``meta`` adds metadata sections to every computed call: a dict
    of section name to provider, or a list of providers named after themselves, each taking
    the computed :class:`~fleche.call.Call` and returning a dict (see :mod:`fleche.meta`).
    ``isolate=True`` runs each computed call in a fresh temporary working directory, removed
    afterwards (see :mod:`fleche.isolation`: the working directory belongs to the process, so
    isolated calls of one process run one at a time). ``f.rerun(*args)``, or any call inside
    ``with fleche.rerun():``, recomputes and replaces the entry (see :mod:`fleche.reruns`).

    An ``async def`` function gives an ``async def`` wrapper, cached by the same rules: the
    awaited result is stored, lookups and saves run in a worker thread (``asyncio.to_thread``)
    so a slow store never blocks the event loop, and with ``compute_once`` the key's lock is
    held by a thread of its own while the coroutine computes on the loop (a waiter blocks a
    thread, not the loop). The stored wall time includes the time the coroutine awaited.
    Async generators are refused (``TypeError``), and so is ``isolate=True`` for async functions
    (``ValueError``: every task of the loop would share the directory).

    >>> from fleche.caches import memory_cache
    >>> @fleche(cache=memory_cache())
    ... def square(x):
    ...     return x * x
    >>> square(4), square.contains(4), square.load(4)
    (16, True, 16)
    """

    def decorate(f: Callable[..., Any]) -> Any:
        cached = _Cached(
            f, version=version, hash_version=hash_version, hash_module=hash_module,
            hash_code=hash_code, ignore=ignore, cache=cache, compute_once=compute_once,
            meta=meta, isolate=isolate, expire=expire,
        )
        if cached.is_async:
            @functools.wraps(f)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                return await cached.run_async(args, kwargs)
        else:
            @functools.wraps(f)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return cached.run(args, kwargs)

        _attach(wrapper, cached)
        digest_as(wrapper, f)
        return wrapper

    if func is not None:
        if not callable(func):
            raise TypeError(f"@fleche decorates functions, got {func!r}")
        return decorate(func)
    return decorate
