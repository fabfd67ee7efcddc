"""Thread-safety mixins, lock shims that survive pickling, and the one deadline of an acquisition.

Locks cannot be pickled, yet storages must be shipped to worker processes. The shims here pickle
as "a new lock": the unpickled copy gets a fresh, unlocked one. That is the right meaning, since a
thread lock only ever coordinates threads of the process that holds it; coordination between
processes is the business of ``fleche.storage.locks``.

A key's lock may be several locks taken in turn (this module's per-key lock, then the file locks
of ``fleche.storage.locks``). ``lock_timeout`` bounds the whole acquisition, not each part: the
outermost layer fixes a deadline with :func:`lock_deadline` and enters the inner layers inside
:func:`acquiring_until`, where their own :func:`lock_deadline` calls return the same deadline.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..digest import Digest
from ..errors import LockTimeout
from .base import Intent, OperationContext

__all__ = [
    "PerKeyLockMixin",
    "SerializingMixin",
    "_PicklableLock",
    "_PicklableRLock",
    "acquiring_until",
    "lock_deadline",
    "wait_time",
]


class _Acquisition(threading.local):
    """The lock acquisition this thread is in, if an outer lock layer started one."""

    active: bool = False
    deadline: float | None = None


_ACQUISITION = _Acquisition()


def lock_deadline(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` deadline for a lock this thread takes now.

    ``timeout`` seconds from now (``None``: no deadline of its own), but never later than the
    deadline of an enclosing acquisition (see :func:`acquiring_until`), so nested lock layers
    share one. Per thread.
    """
    own = None if timeout is None else time.monotonic() + timeout
    if _ACQUISITION.active:
        outer = _ACQUISITION.deadline
        return outer if own is None or outer < own else own  # type: ignore[operator]
    return own


def wait_time(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (never negative), ``None`` for no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class acquiring_until:  # noqa: N801 - used as a function: ``with acquiring_until(d):``
    """Lock layers acquired in this block (by this thread) share ``deadline``.

    Enter only the acquisition of the inner layers in it, not the work done under the lock: a
    nested operation there starts an acquisition, and a deadline, of its own. Where an outer
    acquisition is already running, its deadline stays in force; ``None`` (no deadline) leaves
    the inner layers their own timeouts. (A class: it is on the path of every write.)
    """

    __slots__ = ("_deadline", "_own")

    def __init__(self, deadline: float | None) -> None:
        self._deadline = deadline
        self._own = False

    def __enter__(self) -> None:
        if not _ACQUISITION.active and self._deadline is not None:
            _ACQUISITION.active, _ACQUISITION.deadline = True, self._deadline
            self._own = True

    def __exit__(self, *exc: Any) -> None:
        if self._own:
            _ACQUISITION.active, _ACQUISITION.deadline = False, None
            self._own = False


# Locks copied into a child by fork may be held by a thread that does not exist there; every lock
# object this module made is renewed in the child so it starts unlocked.
_FORK_RENEWED: weakref.WeakSet[Any] = weakref.WeakSet()


def _renew_after_fork() -> None:
    for obj in list(_FORK_RENEWED):
        obj._renew()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_after_fork)


class _PicklableLock:
    """A ``threading.Lock`` that pickles as a fresh, unlocked lock (and is renewed after fork)."""

    _factory = staticmethod(threading.Lock)

    __slots__ = ("_lock", "__weakref__")

    def __init__(self) -> None:
        self._renew()
        _FORK_RENEWED.add(self)

    def _renew(self) -> None:
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
    Pickles as an empty table, and is emptied in a child after fork.
    """

    __slots__ = ("_guard", "_locks", "__weakref__")

    def __init__(self) -> None:
        self._renew()
        _FORK_RENEWED.add(self)

    def _renew(self) -> None:
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
    one process; pickled copies start with their own, fresh lock table. Taking a key's lock,
    including the locks of the layers after this one in the MRO (say, inter-process file locks),
    waits at most ``lock_timeout`` seconds in total, then raises ``LockTimeout`` holding nothing.
    Reads skip the lock where the backend declares ``_atomic_writes``, and every operation
    does where a later layer declares ``_key_lock_excludes_threads`` (its own key lock, within
    the same ``lock_timeout``, already excludes the threads of this process).

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
        # Backends whose writes are atomic replacements serve reads without the lock, so a
        # reader never waits for a long ``locked`` section; a later layer whose key lock
        # excludes this process's threads already (same deadline) makes this one redundant.
        if (intent is Intent.READ and self._atomic_writes) or self._key_lock_excludes_threads:
            return super()._operation_context(key, intent=intent)
        return _KeyLocked(
            self._get_key_lock(key), str(key), self.lock_timeout,
            super()._operation_context(key, intent=intent),
        )


class _KeyLocked:
    """Hold a key's thread lock, then enter the later layers' context (``inner``) within the
    same deadline. A class rather than a generator: it is on the path of every write."""

    __slots__ = ("_lock", "_key", "_timeout", "_inner")

    def __init__(
        self, lock: Any, key: str, timeout: float | None,
        inner: contextlib.AbstractContextManager[None],
    ) -> None:
        self._lock, self._key, self._timeout, self._inner = lock, key, timeout, inner

    def __enter__(self) -> None:
        deadline = lock_deadline(self._timeout)
        left = wait_time(deadline)
        if not self._lock.acquire(timeout=-1 if left is None else left):
            raise LockTimeout(self._key, "a thread lock of this process", self._timeout)  # type: ignore[arg-type]
        try:
            with acquiring_until(deadline):  # the later layers' locks: the same deadline
                self._inner.__enter__()
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, *exc: Any) -> bool | None:
        try:
            return self._inner.__exit__(*exc)
        finally:
            self._lock.release()
