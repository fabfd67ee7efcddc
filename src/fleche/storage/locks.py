"""Per-key locks that exclude threads of this process and every other process sharing a store.

A key's lock is two locks, taken in order within one deadline (``lock_timeout`` bounds the
whole acquisition, see :func:`fleche.storage.thread_safe.lock_deadline`):

1. a *key lock*, a ``threading.RLock`` per (lock file, key) in a per-process registry, so every
   storage object of this process on the store (unpickled copies included) excludes the others'
   threads on that key, and the owning thread may re-enter;
2. the *file lock*, a POSIX record lock (``fcntl.lockf``) on one of :data:`STRIPES` lock files,
   ``<root>/.locks/<stripe>.lock``, chosen from the key alone (its first four hex digits modulo
   :data:`STRIPES`), so processes can never disagree about which file guards a key.

POSIX record locks belong to the whole process and are dropped when *any* descriptor of the file
is closed. So this process opens each lock file exactly once, through one :class:`_LockFile`
shared by all its threads: the first thread to need it takes the record lock, later threads
holding other keys of the same stripe count themselves in, the last one out releases it. Threads
of one process never wait on each other for a stripe, only for the same key, so keys that share
a stripe cannot deadlock threads of one process; processes can still wait on each other for a
stripe held for an unrelated key (with crossed nested holds, ``lock_timeout`` turns the
lock-order deadlock into :class:`~fleche.errors.LockTimeout`). Roots are compared after
``realpath`` (by :class:`~fleche.storage.file.FileStorage`), so a store reached through a
symlink shares the descriptors of its real path.

A lock must keep excluding when the store is tampered with:

- lock files and ``.locks`` are opened with ``O_NOFOLLOW`` (``.locks`` also ``O_DIRECTORY``): a
  symlink or a directory where a lock file belongs raises :class:`~fleche.errors.LockError`
  instead of locking some other file;
- after the record lock is taken, the path must still name the locked inode; if the lock file
  was deleted or replaced (by hand, or with the whole root), the lock is dropped and taken again
  on the file now at the path, within the same deadline. A process that locked the old file keeps
  excluding the processes that still use it until its hold ends; every later acquisition, in
  every process, moves to the new file.

Why this module owns its ``lockf`` code instead of using ``fasteners``: fasteners opens the
lock path anew on every acquire (following symlinks) and closes it on every release, which
drops the record locks of other threads holding the same file; keeping one descriptor, opening
with ``O_NOFOLLOW`` and checking the inode would need overrides of its private methods. The code
needed is a polling loop around ``lockf`` with these checks. POSIX only; record locks work on
NFS (v4, or v3 with NLM) unless it is mounted ``nolock``.

After ``fork`` the child starts with an empty registry and closes the descriptors it inherited:
it holds no record lock (the kernel does not pass them to children), closing them cannot drop the
parent's, and the parent's thread locks mean nothing there.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..digest import Digest
from ..errors import LockError, LockTimeout
from .base import Intent
from .file import FileStorage
from .thread_safe import lock_deadline, wait_time

__all__ = ["STRIPES", "InterProcessLockMixin", "hold", "stripe_path"]

STRIPES = 1024
"""Lock files per store: a key's lock file depends on the key alone, never on a setting."""

# Polling of the non-blocking lockf: first retry after 0.2 ms, then up to every 10 ms (a write
# holds a lock for well under a millisecond, so waiters should look again soon).
_DELAY = 0.0002
_MAX_DELAY = 0.01
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_HELD = (errno.EACCES, errno.EAGAIN)  # what lockf(LOCK_NB) says when another process holds it


def stripe_path(directory: str, key: str) -> str:
    """The lock file in the lock ``directory`` that guards ``key`` (at least four hex digits)."""
    return f"{directory}/{int(key[:4], 16) % STRIPES:04x}.lock"


def _refusal(e: OSError, path: str) -> str:
    """Why ``path`` cannot serve as a lock file or directory, for a :class:`LockError`."""
    if e.errno == errno.ELOOP or e.errno == errno.ENOTDIR:
        return (f"{e.filename or path} is a symbolic link or not a directory; fleche never "
                "follows symlinks inside a store (remove it)")
    if e.errno == errno.EISDIR:
        return f"{path} is a directory, not a lock file (remove it)"
    return f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})"


def _open_lock_file(directory: str, path: str, key: str) -> int:
    """Open (creating as needed) the lock file ``path`` in ``directory``, following no symlink."""
    for _ in range(3):  # the directory may vanish between creating and opening it
        try:
            dfd = os.open(directory, _DIR_FLAGS)
        except FileNotFoundError:
            try:
                os.makedirs(directory, exist_ok=True)  # first lock, or the store was deleted
            except OSError as e:
                raise LockError(key, path, _refusal(e, directory)) from e
            continue
        except OSError as e:
            raise LockError(key, path, _refusal(e, directory)) from e
        try:
            return os.open(os.path.basename(path), _FILE_FLAGS, 0o666, dir_fd=dfd)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise LockError(key, path, _refusal(e, path)) from e
        finally:
            os.close(dfd)
    raise LockError(key, path, f"{directory} keeps disappearing")


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


class _LockFile:
    """This process's one descriptor on one lock file, and its threads' shares of the lock.

    ``users`` (guarded by the registry) counts holds in progress; the descriptor is only closed
    while it is zero. ``_holders`` and ``_acquiring`` (guarded by ``_cond``) count the threads
    holding the record lock and say whether one is taking it.
    """

    __slots__ = (
        "directory", "path", "users", "keys", "_cond", "_holders", "_acquiring", "_fd", "_inode"
    )

    def __init__(self, directory: str, path: str) -> None:
        self.directory = directory
        self.path = path
        self.users = 0
        self.keys: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._cond = threading.Condition(threading.Lock())
        self._holders = 0
        self._acquiring = False
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None  # of the file open as ``_fd``

    def close_if_idle(self) -> bool:
        """Close the descriptor unless a thread holds or is taking the lock."""
        with self._cond:
            if self._holders or self._acquiring:
                return False
            self._close()
            return True

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def enter(self, key: str, deadline: float | None) -> bool:
        """Count one hold in, taking the record lock if none is held; False at the deadline."""
        with self._cond:
            while self._acquiring:  # another thread is polling for the record lock: wait for it
                if not self._cond.wait(wait_time(deadline)):
                    return False
            if self._holders:
                self._holders += 1
                return True
            self._acquiring = True
        ok = False
        try:
            ok = self._take(key, deadline)
        finally:
            with self._cond:
                self._acquiring = False
                if ok:
                    self._holders = 1
                self._cond.notify_all()
        return ok

    def _take(self, key: str, deadline: float | None) -> bool:
        """Take the record lock on the file the path names now (the only thread doing so)."""
        delay = _DELAY
        while True:
            if self._fd is None:
                self._fd = _open_lock_file(self.directory, self.path, key)
                self._inode = _identity(os.fstat(self._fd))
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in _HELD:
                    raise LockError(key, self.path, _refusal(e, self.path)) from e
                left = wait_time(deadline)
                if left == 0:
                    return False
                time.sleep(delay if left is None else min(delay, left))
                delay = min(2 * delay, _MAX_DELAY)
                continue
            if self._still_at_path():
                return True
            # Deleted or replaced since we opened it: locking it excludes nobody who opens the
            # path now. Let go of it and lock the file that is there.
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            self._close()
            if wait_time(deadline) == 0:
                return False

    def _still_at_path(self) -> bool:
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(named.st_mode) and _identity(named) == self._inode

    def leave(self) -> None:
        """Count one hold out, releasing the record lock with the last one."""
        with self._cond:
            self._holders -= 1
            if self._holders == 0 and self._fd is not None:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)


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
1024 (one store's stripes). Idle ones beyond it are closed, least recently used first."""


class _Registry:
    """This process's lock files, by path (roots already resolved), least recently used first."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.files: dict[str, _LockFile] = {}

    def checkout(self, directory: str, path: str) -> _LockFile:
        """The lock file of ``path``, counted as in use until :meth:`checkin`."""
        with self.guard:
            lock_file = self.files.pop(path, None)
            if lock_file is None:
                lock_file = _LockFile(directory, path)
            self.files[path] = lock_file
            lock_file.users += 1
            if len(self.files) > _MAX_OPEN_LOCK_FILES:
                self._close_idle()
            return lock_file

    def checkin(self, lock_file: _LockFile) -> None:
        with self.guard:
            lock_file.users -= 1

    def key_lock(self, lock_file: _LockFile, key: str) -> Any:
        """The thread lock of ``key``: one per lock file and key, alive while in use."""
        with self.guard:
            lock = lock_file.keys.get(key)
            if lock is None:
                lock = lock_file.keys[key] = threading.RLock()
            return lock

    def _close_idle(self) -> None:
        for path, lock_file in list(self.files.items()):
            if len(self.files) <= _MAX_OPEN_LOCK_FILES // 2:
                break
            if lock_file.users == 0 and lock_file.close_if_idle():
                del self.files[path]

    def close_all_idle(self) -> None:
        with self.guard:
            for lock_file in self.files.values():
                if lock_file.users == 0:
                    lock_file.close_if_idle()


_registry = _Registry()


def _reset_after_fork() -> None:
    global _registry
    inherited = _registry
    _registry = _Registry()
    for lock_file in inherited.files.values():  # this process holds no record lock on them
        with contextlib.suppress(OSError):
            lock_file._close()


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(lambda: _registry.close_all_idle())


@contextlib.contextmanager
def hold(directory: str, key: str, *, timeout: float | None = 1.0) -> Iterator[None]:
    """Hold ``key``'s lock against every thread and process locking it through the lock
    ``directory`` (a store's ``.locks``, its root resolved).

    Reentrant for the holding thread. Waits until the deadline of the acquisition this is part
    of, else at most ``timeout`` seconds (``None``: for ever), then raises
    :class:`~fleche.errors.LockTimeout` holding nothing; raises :class:`~fleche.errors.LockError`
    if the lock file cannot be used. A lock held by a process that died is free at once.
    """
    deadline = lock_deadline(timeout)
    registry = _registry
    lock_file = registry.checkout(directory, stripe_path(directory, key))
    try:
        key_lock = registry.key_lock(lock_file, key)
        left = wait_time(deadline)
        if not key_lock.acquire(timeout=-1 if left is None else left):
            raise LockTimeout(key, lock_file.path, timeout)  # type: ignore[arg-type]
        try:
            if not lock_file.enter(key, deadline):
                raise LockTimeout(key, lock_file.path, timeout)  # type: ignore[arg-type]
            try:
                yield
            finally:
                lock_file.leave()
        finally:
            key_lock.release()
    finally:
        registry.checkin(lock_file)


@dataclass(frozen=True)
class InterProcessLockMixin(FileStorage):
    """Mixin that makes every write, eviction and :meth:`locked` section on a key exclusive
    across threads and processes sharing the file storage.

    Place right after ``PerKeyLockMixin`` in the MRO of a :class:`FileStorage`. The lock files
    live in :meth:`FileStorage._lock_directory`; taking a lock waits at most ``lock_timeout`` in
    total, shared with the layers before this one. Reads (``Intent.READ``) take no lock: file
    storages' writes are atomic replacements, so a reader sees a whole entry either way. The
    mixin keeps no lock state of its own: locks live in a per-process registry, so a pickled copy
    joins the locks of the process it is unpickled in.
    """

    def _operation_context(
        self, key: Digest | str, *, intent: Intent = Intent.WRITE
    ) -> contextlib.AbstractContextManager[None]:
        if intent is Intent.READ:  # no generator layer on the hit path
            return super()._operation_context(key, intent=intent)
        return self._write_context(key, intent)

    @contextlib.contextmanager
    def _write_context(self, key: Digest | str, intent: Intent) -> Iterator[None]:
        with hold(self._lock_directory(), str(key), timeout=self.lock_timeout):
            with super()._operation_context(key, intent=intent):
                yield
