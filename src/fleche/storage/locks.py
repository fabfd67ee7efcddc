"""Per-key locks that exclude threads of this process and every other process sharing a directory.

A key's lock is two locks taken in order:

1. a *key lock*, a ``threading.RLock`` per ``(lock directory, key)`` kept in a per-process
   registry, so every storage object in this process that uses the directory (including unpickled
   copies) excludes the others' threads on that key, and the owning thread may re-enter;
2. a *stripe lock*, a ``fasteners.InterProcessLock`` on one of a bounded number of lock files
   (``<directory>/<stripe>.lock``) chosen by the key's prefix, which excludes other processes.

POSIX record locks (what fasteners uses) belong to the whole process and are dropped when *any*
descriptor of the file is closed, so this process opens each stripe file through exactly one
lock object, shared by all its threads: the first thread to need a stripe takes the file lock,
later threads holding other keys of the same stripe only count themselves in, and the last one out
releases it. Threads of one process never wait on each other for a stripe, only for the same key,
so keys that share a stripe cannot deadlock threads of one process. Processes can still wait on
each other for a stripe held for an unrelated key; with nested holds in two processes that is the
classic lock-order deadlock, which ``timeout`` turns into :class:`~fleche.errors.LockTimeout`.

After ``fork`` the child starts with an empty registry: it holds no file lock (the kernel does not
pass record locks to children), and the parent's thread locks mean nothing there.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fasteners

from ..digest import Digest
from ..errors import LockTimeout
from .base import Intent, OperationContext

__all__ = ["DEFAULT_STRIPES", "InterProcessLockMixin", "hold", "stripe_path"]

DEFAULT_STRIPES = 1024
"""Default number of lock files per lock directory."""

# Polling of fasteners' non-blocking lockf: first retry after 0.2 ms, then up to every 10 ms
# (a write holds a lock for well under a millisecond, so waiters should look again soon).
_DELAY = 0.0002
_MAX_DELAY = 0.01


class _KeptOpenLock(fasteners.InterProcessLock):
    """A fasteners lock whose file stays open between holds.

    fasteners opens (and creates the directory of) its lock file on every acquire and closes it
    on every release; both syscalls cost more than the lock itself. The registry opens each lock
    file once per process and closes it only while it is not held (see ``_Registry.touch``).
    """

    def _do_open(self) -> None:
        if self.lockfile is None or self.lockfile.closed:
            self.lockfile = open(self.path, "a")  # noqa: SIM115 - kept open on purpose

    def _do_close(self) -> None:
        pass

    def close_file(self) -> None:
        if self.lockfile is not None:
            self.lockfile.close()
            self.lockfile = None


class _Stripe:
    """This process's share of one lock file: the file lock and how many holds use it."""

    __slots__ = ("path", "_cond", "_holders", "_acquiring", "_file_lock")

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition(threading.Lock())
        self._holders = 0
        self._acquiring = False
        self._file_lock = _KeptOpenLock(path)

    def close_if_idle(self) -> bool:
        """Close the lock file unless a thread holds or is taking the lock."""
        with self._cond:
            if self._holders or self._acquiring:
                return False
            self._file_lock.close_file()
            return True

    def enter(self, deadline: float | None) -> bool:
        """Count one hold in, taking the file lock if none is held; False on timeout."""
        with self._cond:
            while self._acquiring:  # another thread is polling for the file lock: wait for it
                if not self._cond.wait(_remaining(deadline)):
                    return False
            if self._holders:
                self._holders += 1
                return True
            self._acquiring = True
        ok = False
        try:
            remaining = _remaining(deadline)
            if remaining == 0:
                ok = self._file_lock.acquire(blocking=False)
            else:
                ok = self._file_lock.acquire(
                    blocking=True, delay=_DELAY, max_delay=_MAX_DELAY, timeout=remaining
                )
        finally:
            with self._cond:
                self._acquiring = False
                if ok:
                    self._holders = 1
                self._cond.notify_all()
        return ok

    def leave(self) -> None:
        """Count one hold out, releasing the file lock with the last one."""
        with self._cond:
            self._holders -= 1
            if self._holders == 0:
                self._file_lock.release()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _open_file_budget() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 64
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 8))


_MAX_OPEN_LOCK_FILES = _open_file_budget()
"""Lock files a process keeps open at most: an eighth of its file descriptor limit, at most
1024 (one storage's default stripes). Idle ones beyond it are closed, least recently used first."""


class _Registry:
    """Per-process tables of stripes (by lock file) and key locks (by directory and key)."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.stripes: dict[str, _Stripe] = {}
        self.open_order: dict[str, _Stripe] = {}  # insertion order = least recently used first
        self.keys: weakref.WeakValueDictionary[tuple[str, str], Any] = (
            weakref.WeakValueDictionary()
        )
        self.made_dirs: set[str] = set()

    def stripe(self, directory: str, path: str) -> _Stripe:
        with self.guard:
            stripe = self.stripes.get(path)
            if stripe is None:
                if directory not in self.made_dirs:
                    os.makedirs(directory, exist_ok=True)
                    self.made_dirs.add(directory)
                stripe = self.stripes[path] = _Stripe(path)
            self.open_order.pop(path, None)
            self.open_order[path] = stripe
            if len(self.open_order) > _MAX_OPEN_LOCK_FILES:
                self._close_idle()
            return stripe

    def _close_idle(self) -> None:
        for path, stripe in list(self.open_order.items()):
            if len(self.open_order) <= _MAX_OPEN_LOCK_FILES // 2:
                break
            if stripe.close_if_idle():
                del self.open_order[path]

    def key_lock(self, directory: str, key: str) -> Any:
        with self.guard:
            lock = self.keys.get((directory, key))
            if lock is None:
                lock = self.keys[(directory, key)] = threading.RLock()
            return lock


_registry = _Registry()


def _close_lock_files() -> None:
    for stripe in list(_registry.stripes.values()):
        stripe.close_if_idle()


atexit.register(_close_lock_files)


def _reset_after_fork() -> None:
    global _registry
    _registry = _Registry()


def _close_lock_files() -> None:
    for stripe in list(_registry.stripes.values()):
        stripe.close_if_idle()


atexit.register(_close_lock_files)


os.register_at_fork(after_in_child=_reset_after_fork)


def stripe_path(directory: str, key: str, stripes: int = DEFAULT_STRIPES) -> str:
    """The lock file guarding ``key`` (a digest of at least four hex characters)."""
    return os.path.join(directory, f"{int(key[:4], 16) % stripes:04x}.lock")


@contextlib.contextmanager
def hold(
    directory: str, key: str, *, stripes: int = DEFAULT_STRIPES, timeout: float | None = 1.0
) -> Iterator[None]:
    """Hold ``key``'s lock against every thread and process locking it through ``directory``.

    Reentrant for the holding thread. Waits at most ``timeout`` seconds in total (``None``: for
    ever), then raises :class:`~fleche.errors.LockTimeout` holding nothing. A lock held by a
    process that died is free at once.
    """
    registry = _registry
    path = stripe_path(directory, key, stripes)
    deadline = None if timeout is None else time.monotonic() + timeout
    key_lock = registry.key_lock(directory, key)
    if not key_lock.acquire(timeout=-1 if timeout is None else timeout):
        raise LockTimeout(key, path, timeout)  # type: ignore[arg-type]
    try:
        stripe = registry.stripe(directory, path)
        if not stripe.enter(deadline):
            raise LockTimeout(key, path, timeout)  # type: ignore[arg-type]
        try:
            yield
        finally:
            stripe.leave()
    finally:
        key_lock.release()


@dataclass(frozen=True)
class InterProcessLockMixin(OperationContext):
    """Mixin that makes every write, eviction and :meth:`locked` section on a key exclusive
    across threads and processes sharing the storage's lock directory.

    Place right after ``PerKeyLockMixin`` in the MRO of a storage whose backend provides
    ``_lock_directory()`` (where the lock files go; every process sharing the storage must agree
    on it) and ``lock_timeout``. Reads (``Intent.READ``) take no lock: the backend's
    writes must be atomic replacements, so a reader sees a whole entry either way. The mixin keeps
    no lock state of its own: locks live in a per-process registry, so a pickled copy joins the
    locks of the process it is unpickled in. ``lock_stripes`` bounds the number of lock files.
    """

    lock_stripes: int = DEFAULT_STRIPES

    def __post_init__(self) -> None:
        if not (isinstance(self.lock_stripes, int) and 1 <= self.lock_stripes <= 0x10000):
            raise ValueError(f"lock_stripes must be an int in 1..65536, got {self.lock_stripes!r}")
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    def _operation_context(
        self, key: Digest | str, *, intent: Intent = Intent.WRITE
    ) -> contextlib.AbstractContextManager[None]:
        if intent is Intent.READ:  # no generator layer on the hit path
            return super()._operation_context(key, intent=intent)
        return self._write_context(key, intent)

    @contextlib.contextmanager
    def _write_context(self, key: Digest | str, intent: Intent) -> Iterator[None]:
        with hold(
            self._lock_directory(),
            str(key),
            stripes=self.lock_stripes,
            timeout=getattr(self, "lock_timeout", None),
        ):
            with super()._operation_context(key, intent=intent):
                yield
