"""Per-key locks that exclude threads of this process and every other process sharing a store.

A key's lock is two locks, taken in order within one deadline (``lock_timeout`` bounds the
whole acquisition, see :func:`fleche.storage.thread_safe.lock_deadline`):

1. a *key lock*, a ``threading.RLock`` per (lock file, key) in a per-process registry, so every
   storage object of this process on the store (unpickled copies included) excludes the others'
   threads on that key, and the owning thread may re-enter;
2. a *byte-range lock* on one byte of the store's one lock file, ``<lock directory>/keys.lock``:
   byte :func:`stripe` of the key (its first four hex digits, one of :data:`STRIPES`), chosen
   from the key alone, so processes can never disagree about which byte guards a key. The file
   and its directory are made by the store's first lock; no later lock creates anything, which
   keeps a miss free of file creations (a new file costs about as much as the write itself).

On Linux the byte-range locks are open-file-description locks (``F_OFD_SETLK``): they belong to
the descriptor, not to the process. Elsewhere (or on kernels before 3.15) they are POSIX record
locks (``fcntl.lockf``), which belong to the whole process and are dropped when *any* descriptor
of the file is closed. Either way this process opens the lock file once, through one
:class:`_LockFile` shared by all its threads: the first thread to need a stripe takes its byte,
later threads holding other keys of the same stripe count themselves in, the last one out
releases it. Threads of one process never wait on each other for a stripe, only for the same
key, so keys that share a stripe cannot deadlock threads of one process; processes can still
wait on each other for a stripe held for an unrelated key (one chance in 65536 for two keys;
with crossed nested holds, ``lock_timeout`` turns the lock-order deadlock into
:class:`~fleche.errors.LockTimeout`). Roots are compared after ``realpath`` (by
:class:`~fleche.storage.file.FileStorage`), so a store reached through a symlink shares the
descriptor of its real path.

A lock must keep excluding when the store is tampered with:

- the lock file and its directory are opened with ``O_NOFOLLOW`` (the directory also
  ``O_DIRECTORY``): a symlink or a directory where the lock file belongs raises
  :class:`~fleche.errors.LockError` instead of locking some other file;
- after a byte is locked, the path must still name the locked inode; if the lock file was
  deleted or replaced (by hand, or with the whole root), the byte is unlocked and locked again in
  the file now at the path, within the same deadline. Holds already taken in the old file keep
  their descriptor until they end, so they keep excluding the processes that still use it; every
  later acquisition, in every process, moves to the new file.

Stores shared with an older fleche: versions before this one locked ``<lock directory>/<stripe>.lock``,
one file per stripe (1024 of them). The two kinds of lock do not see each other, so an older and
a newer fleche writing one store *at the same time* do not exclude each other on a key: their
writes stay atomic (a reader sees a whole entry either way), but compute-once and ``locked``
sections are not shared between them. Upgrade every process that writes a store together; the
old stripe files are then unused and may be deleted.

Why this module owns its locking code instead of using ``fasteners``: fasteners locks whole
files, opens the lock path anew on every acquire (following symlinks) and closes it on every
release, which drops the record locks of other threads holding the same file. The code needed is
a polling loop around a non-blocking byte-range lock with these checks. POSIX only; record locks
work on NFS (v4, or v3 with NLM) unless it is mounted ``nolock``.

After ``fork`` the child starts with an empty registry and closes the descriptors it inherited:
it holds no lock there (POSIX record locks are not inherited; an inherited open-file-description
lock stays the parent's, and closing the child's copy of the descriptor leaves it alone), and the
parent's thread locks mean nothing there. A lock held by a process that died is free at once: the
kernel drops its locks with its descriptors (a child forked without Python's fork hooks that
kept the descriptor, which ``O_CLOEXEC`` closes on ``exec``, keeps them until it exits).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import os
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..digest import Digest
from ..errors import LockError, LockTimeout
from .base import Intent
from .file import FileStorage
from .thread_safe import lock_deadline, wait_time

__all__ = ["LOCK_FILE", "STRIPES", "InterProcessLockMixin", "hold", "lock_path", "stripe"]

STRIPES = 1 << 16
"""Bytes of the lock file that guard keys: a key's byte depends on the key alone, never on a
setting."""

LOCK_FILE = "keys.lock"
"""The name of a store's one lock file in its lock directory."""

# Polling of the non-blocking lock: first retry after 50 us, then up to every 5 ms (a write
# holds a lock for some tens of microseconds, so a waiter that sleeps longer only loses time;
# two processes writing one store wait on each other this way).
_DELAY = 0.00005
_MAX_DELAY = 0.005
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_HELD = (errno.EACCES, errno.EAGAIN)  # what a non-blocking lock says when another owner holds it


def stripe(key: str) -> int:
    """The byte of the lock file that guards ``key`` (at least four hex digits)."""
    return int(key[:4], 16) % STRIPES


def lock_path(directory: str) -> str:
    """The lock file of the lock ``directory``, which guards every key of its store."""
    return f"{directory}/{LOCK_FILE}"


# -- the byte-range lock calls --------------------------------------------------------------------

# struct flock of 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (0 for open-file-description locks), padded to 32 bytes.
_FLOCK = struct.Struct("@hhqqi4x")
_ofd = sys.platform == "linux" and hasattr(fcntl, "F_OFD_SETLK") and _FLOCK.size == 32


def _lock_byte(fd: int, offset: int) -> None:
    """Lock byte ``offset`` of ``fd`` without waiting; ``OSError`` (``EAGAIN``/``EACCES``) if
    another owner holds it."""
    global _ofd
    if _ofd:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
            return
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: a kernel without OFD locks
                raise
            _ofd = False
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)


def _unlock_byte(fd: int, offset: int) -> None:
    if _ofd:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)


# -- opening the lock file ------------------------------------------------------------------------


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


class _Descriptor:
    """One open descriptor on a lock file, and the holds (taken or being taken) that use it."""

    __slots__ = ("fd", "inode", "uses", "stale")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.inode = _identity(os.fstat(fd))
        self.uses = 0
        self.stale = False  # the path names another file now: no new hold uses this one

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Stripe:
    """This process's share of one byte: how many threads hold it, on which descriptor."""

    __slots__ = ("holders", "acquiring", "descriptor")

    def __init__(self) -> None:
        self.holders = 0
        self.acquiring = False
        self.descriptor: _Descriptor | None = None


class _LockFile:
    """This process's descriptor on a store's lock file, and its threads' shares of its bytes.

    ``users`` (guarded by the registry) counts holds in progress; the descriptor is only closed
    while it is zero. ``keys`` (guarded by the registry too) holds the thread lock of each key
    in use, with the number of holds using it. Everything else is guarded by ``_cond``: the descriptor new holds use, the
    stripes in use and, per stripe, the threads holding its byte and whether one is taking it.
    """

    __slots__ = ("directory", "path", "users", "keys", "_cond", "_stripes", "_current")

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = lock_path(directory)
        self.users = 0
        self.keys: dict[str, list[Any]] = {}  # key: [its RLock, holds using it] (registry's)
        self._cond = threading.Condition(threading.Lock())
        self._stripes: dict[int, _Stripe] = {}
        self._current: _Descriptor | None = None

    def close_if_idle(self) -> bool:
        """Close the descriptor unless a thread holds or is taking a lock."""
        with self._cond:
            if self._stripes:
                return False
            self._close()
            return True

    def _close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def enter(self, key: str, deadline: float | None) -> bool:
        """Count one hold of ``key``'s stripe in, locking its byte if no thread of this process
        holds it; False at the deadline."""
        offset = stripe(key)
        with self._cond:
            share = self._stripes.get(offset)
            if share is None:
                # No thread of ours holds or takes this byte: one try at once, without the
                # bookkeeping of a wait (the usual case, a write on a free key).
                descriptor = self._take_now(key, offset)
                share = self._stripes[offset] = _Stripe()
                if descriptor is not None:
                    share.holders, share.descriptor = 1, descriptor
                    return True
            while share.acquiring:  # another thread is polling for this byte: wait for it
                if not self._cond.wait(wait_time(deadline)):
                    self._forget(offset, share)
                    return False
            if share.holders:
                share.holders += 1
                return True
            share.acquiring = True
        descriptor = None
        try:
            descriptor = self._take(key, offset, deadline)
        finally:
            with self._cond:
                share.acquiring = False
                if descriptor is not None:
                    share.holders, share.descriptor = 1, descriptor
                else:
                    self._forget(offset, share)
                self._cond.notify_all()
        return descriptor is not None

    def _take_now(self, key: str, offset: int) -> _Descriptor | None:
        """Lock ``offset`` in the file at the path without waiting (``_cond`` held): the
        descriptor it is locked on, counted as used, or None if another owner holds it or the
        file at the path changed (:meth:`_take` then waits, and moves to the new file)."""
        if self._current is None:
            self._current = _Descriptor(_open_lock_file(self.directory, self.path, key))
        descriptor = self._current
        try:
            _lock_byte(descriptor.fd, offset)
        except OSError as e:
            if e.errno not in _HELD:
                raise LockError(key, self.path, _refusal(e, self.path)) from e
            return None
        if self._still_at_path(descriptor):
            descriptor.uses += 1
            return descriptor
        _unlock_byte(descriptor.fd, offset)
        descriptor.stale, self._current = True, None
        if descriptor.uses == 0:
            descriptor.close()
        return None

    def _forget(self, offset: int, share: _Stripe) -> None:
        """Drop an unused stripe's entry (``_cond`` held)."""
        if not share.holders and not share.acquiring and self._stripes.get(offset) is share:
            del self._stripes[offset]

    def _descriptor(self, key: str) -> _Descriptor:
        """The descriptor new holds use, opened if needed, counted as used once more."""
        with self._cond:
            if self._current is None:
                self._current = _Descriptor(_open_lock_file(self.directory, self.path, key))
            self._current.uses += 1
            return self._current

    def _release(self, descriptor: _Descriptor) -> None:
        """Count one use of ``descriptor`` out, closing it if it is stale and unused."""
        with self._cond:
            descriptor.uses -= 1
            if descriptor.stale and descriptor.uses == 0:
                descriptor.close()

    def _take(self, key: str, offset: int, deadline: float | None) -> _Descriptor | None:
        """Lock ``offset`` in the file the path names now (the only thread doing so for this
        stripe); the descriptor it is locked on, or None at the deadline."""
        delay = _DELAY
        while True:
            descriptor = self._descriptor(key)
            try:
                _lock_byte(descriptor.fd, offset)
            except OSError as e:
                self._release(descriptor)
                if e.errno not in _HELD:
                    raise LockError(key, self.path, _refusal(e, self.path)) from e
                left = wait_time(deadline)
                if left == 0:
                    return None
                time.sleep(delay if left is None else min(delay, left))
                delay = min(2 * delay, _MAX_DELAY)
                continue
            except BaseException:
                self._release(descriptor)
                raise
            if self._still_at_path(descriptor):
                return descriptor
            # Deleted or replaced since we opened it: locking it excludes nobody who opens the
            # path now. Let go of it and lock the file that is there.
            _unlock_byte(descriptor.fd, offset)
            with self._cond:
                descriptor.stale = True
                if self._current is descriptor:
                    self._current = None
            self._release(descriptor)
            if wait_time(deadline) == 0:
                return None

    def _still_at_path(self, descriptor: _Descriptor) -> bool:
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return False
        return stat.S_ISREG(named.st_mode) and _identity(named) == descriptor.inode

    def leave(self, key: str) -> None:
        """Count one hold of ``key``'s stripe out, unlocking its byte with the last one."""
        offset = stripe(key)
        with self._cond:
            share = self._stripes[offset]
            share.holders -= 1
            if share.holders:
                return
            descriptor = share.descriptor
            del self._stripes[offset]
            assert descriptor is not None
            _unlock_byte(descriptor.fd, offset)
            descriptor.uses -= 1
            if descriptor.stale and descriptor.uses == 0:
                descriptor.close()


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
"""Lock files (one per store) a process keeps open at most: an eighth of its file descriptor
limit, at most 1024. Idle ones beyond it are closed, least recently used first."""


class _Registry:
    """This process's lock files, by lock directory (roots already resolved), least recently
    used first."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.files: dict[str, _LockFile] = {}

    def checkout(self, directory: str, key: str) -> tuple[_LockFile, Any]:
        """The lock file of ``directory`` and the thread lock of ``key`` in it (one per lock
        file and key, kept while in use), both counted as in use until :meth:`checkin`."""
        with self.guard:
            lock_file = self.files.pop(directory, None)
            if lock_file is None:
                lock_file = _LockFile(directory)
            self.files[directory] = lock_file
            lock_file.users += 1
            entry = lock_file.keys.get(key)
            if entry is None:
                entry = lock_file.keys[key] = [threading.RLock(), 0]
            entry[1] += 1
            if len(self.files) > _MAX_OPEN_LOCK_FILES:
                self._close_idle()
            return lock_file, entry[0]

    def checkin(self, lock_file: _LockFile, key: str) -> None:
        with self.guard:
            lock_file.users -= 1
            entry = lock_file.keys[key]
            entry[1] -= 1
            if not entry[1]:
                del lock_file.keys[key]

    def _close_idle(self) -> None:
        for directory, lock_file in list(self.files.items()):
            if len(self.files) <= _MAX_OPEN_LOCK_FILES // 2:
                break
            if lock_file.users == 0 and lock_file.close_if_idle():
                del self.files[directory]

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
    for lock_file in inherited.files.values():  # this process holds no lock through them
        descriptors = {share.descriptor for share in lock_file._stripes.values()}
        for descriptor in descriptors | {lock_file._current}:
            if descriptor is not None:
                with contextlib.suppress(OSError):
                    descriptor.close()


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(lambda: _registry.close_all_idle())


def hold(
    directory: str, key: str, *, timeout: float | None = 1.0
) -> contextlib.AbstractContextManager[None]:
    """Hold ``key``'s lock against every thread and process locking it through the lock
    ``directory`` (a store's ``.locks``, its root resolved).

    Reentrant for the holding thread. Waits until the deadline of the acquisition this is part
    of, else at most ``timeout`` seconds (``None``: for ever), then raises
    :class:`~fleche.errors.LockTimeout` holding nothing; raises :class:`~fleche.errors.LockError`
    if the lock file cannot be used. A lock held by a process that died is free at once.
    """
    return _Hold(directory, key, timeout)


class _Hold:
    """What :func:`hold` returns, for one entry (a class: it is on the path of every write)."""

    __slots__ = ("_directory", "_key", "_timeout", "_registry", "_lock_file", "_key_lock")

    def __init__(self, directory: str, key: str, timeout: float | None) -> None:
        self._directory, self._key, self._timeout = directory, key, timeout

    def __enter__(self) -> None:
        deadline = lock_deadline(self._timeout)
        registry = _registry
        lock_file, key_lock = registry.checkout(self._directory, self._key)
        try:
            left = wait_time(deadline)
            if not key_lock.acquire(timeout=-1 if left is None else left):
                raise LockTimeout(self._key, lock_file.path, self._timeout)  # type: ignore[arg-type]
            try:
                if not lock_file.enter(self._key, deadline):
                    raise LockTimeout(self._key, lock_file.path, self._timeout)  # type: ignore[arg-type]
            except BaseException:
                key_lock.release()
                raise
        except BaseException:
            registry.checkin(lock_file, self._key)
            raise
        self._registry, self._lock_file, self._key_lock = registry, lock_file, key_lock

    def __exit__(self, *exc: Any) -> None:
        try:
            self._lock_file.leave(self._key)
        finally:
            try:
                self._key_lock.release()
            finally:
                self._registry.checkin(self._lock_file, self._key)


class _Nested:
    """Enter ``outer``, then ``inner``; leave in reverse order (``contextlib.ExitStack`` for two,
    without its cost on every write)."""

    __slots__ = ("_outer", "_inner")

    def __init__(
        self, outer: contextlib.AbstractContextManager[None],
        inner: contextlib.AbstractContextManager[None],
    ) -> None:
        self._outer, self._inner = outer, inner

    def __enter__(self) -> None:
        self._outer.__enter__()
        try:
            self._inner.__enter__()
        except BaseException:
            if not self._outer.__exit__(*sys.exc_info()):
                raise

    def __exit__(self, *exc: Any) -> bool:
        try:
            suppressed = bool(self._inner.__exit__(*exc))
        except BaseException:
            if not self._outer.__exit__(*sys.exc_info()):
                raise
            return True
        if suppressed:
            exc = (None, None, None)
        return bool(self._outer.__exit__(*exc)) or suppressed


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

    _key_lock_excludes_threads = True  # the registry's key lock: every thread of the process

    def _operation_context(
        self, key: Digest | str, *, intent: Intent = Intent.WRITE
    ) -> contextlib.AbstractContextManager[None]:
        if intent is Intent.READ:  # no lock layer on the hit path
            return super()._operation_context(key, intent=intent)
        return _Nested(
            hold(self._lock_directory(), str(key), timeout=self.lock_timeout),
            super()._operation_context(key, intent=intent),
        )
