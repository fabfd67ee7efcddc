"""Thread-safety mixins and lock shims that survive pickling.

Locks cannot be pickled, yet storages must be shipped to worker processes. The shims here pickle
as "a new lock": the unpickled copy gets a fresh, unlocked one. That is the right meaning, since a
thread lock only ever coordinates threads of the process that holds it; coordination between
processes is the business of ``fleche.storage.locks``.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..digest import Digest
from ..errors import LockTimeout
from .base import Intent, OperationContext

__all__ = ["PerKeyLockMixin", "SerializingMixin", "_PicklableLock", "_PicklableRLock"]


class _PicklableLock:
    """A ``threading.Lock`` that pickles as a fresh, unlocked lock."""

    _factory = staticmethod(threading.Lock)

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = self._factory()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._lock.__exit__(*exc)

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (type(self), ())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._lock!r}>"


class _PicklableRLock(_PicklableLock):
    """A ``threading.RLock`` that pickles as a fresh, unowned lock."""

    _factory = staticmethod(threading.RLock)

    __slots__ = ()


class _KeyLockTable:
    """One ``RLock`` per key, alive while some thread holds or waits on it.

    A ``threading.Lock`` guards the table itself, and only while a lock is looked up; the
    per-key locks are weakly referenced, so the table never grows beyond the keys in use.
    Pickles as an empty table.
    """

    __slots__ = ("_guard", "_locks")

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

    def get(self, key: str) -> Any:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.RLock()
            return lock

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (type(self), ())


@dataclass(frozen=True)
class SerializingMixin(OperationContext):
    """Mixin that serializes all storage operations behind a single reentrant lock.

    Every operation of the instance, on any key, runs alone among the threads of one process;
    it says nothing about other processes. Place before the concrete storage class in the MRO::

        @dataclass(frozen=True)
        class SerializingValueMemory(SerializingMixin, ValueMemory):
            ...
    """

    _lock: _PicklableRLock = field(
        default_factory=_PicklableRLock, init=False, repr=False, compare=False
    )

    @contextlib.contextmanager
    def _operation_context(
        self, key: Digest | str, *, intent: Intent = Intent.WRITE
    ) -> Iterator[None]:
        with self._lock:
            with super()._operation_context(key, intent=intent):
                yield


@dataclass(frozen=True)
class PerKeyLockMixin(OperationContext):
    """Mixin that locks per-key so concurrent ops on different keys proceed in parallel.

    A lightweight ``threading.Lock`` guards the lock table itself; once the per-key ``RLock`` is
    obtained the table lock is released, so two threads operating on different keys never block
    each other. Operations on the same key are serialized by the per-key lock, which is reentrant
    to allow nested calls (e.g. ``expand`` inside ``load``). The guarantee covers the threads of
    one process; pickled copies start with their own, fresh lock table. A storage with a
    ``lock_timeout`` attribute waits at most that long, then raises ``LockTimeout``.

    Place before the concrete storage class in the MRO::

        @dataclass(frozen=True)
        class PerKeyValuePickle(PerKeyLockMixin, ValuePickleFile):
            ...
    """

    _key_locks: _KeyLockTable = field(
        default_factory=_KeyLockTable, init=False, repr=False, compare=False
    )

    def _get_key_lock(self, key: Digest | str) -> Any:
        """The reentrant lock for ``key``: the same object for as long as anyone holds it."""
        return self._key_locks.get(str(key))

    def _operation_context(
        self, key: Digest | str, *, intent: Intent = Intent.WRITE
    ) -> contextlib.AbstractContextManager[None]:
        # Backends whose writes are atomic replacements (class flag ``_atomic_writes``) serve
        # reads without the lock, so a reader never waits for a long ``locked`` section.
        if intent is Intent.READ and getattr(self, "_atomic_writes", False):
            return super()._operation_context(key, intent=intent)
        return self._locked_context(key, intent)

    @contextlib.contextmanager
    def _locked_context(self, key: Digest | str, intent: Intent) -> Iterator[None]:
        lock = self._get_key_lock(key)
        timeout = getattr(self, "lock_timeout", None)  # honoured where the storage has one
        if not lock.acquire(timeout=-1 if timeout is None else timeout):
            raise LockTimeout(str(key), "a thread lock of this process", timeout)
        try:
            with super()._operation_context(key, intent=intent):
                yield
        finally:
            lock.release()
