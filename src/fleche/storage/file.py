"""A backend keeping one file per key in a directory that many processes may share.

Layout under ``root``: each entry is ``root/<first two hex digits>/<full key><suffix>``, where a
backend may set ``_entry_suffix`` (e.g. ``".h5"``; none by default); temporary files are dot-files
next to the entry they will replace; lock files live in ``root/.locks/``. Nothing else is ever
read as an entry.

The root is resolved (``realpath``) once per process; inside it nothing is followed: fan-out
directories are opened with ``O_DIRECTORY | O_NOFOLLOW`` and every file in them is reached
relative to that descriptor, entries with ``O_NOFOLLOW``. A symlink where a fan-out directory or
an entry belongs is not part of the store: it is not listed, loads and evictions find nothing
there, sweeps never enter it, and a save refuses it with a :class:`~fleche.errors.WriteError`.
No directory is remembered as existing: a store whose root was deleted while a process runs
works again for that process from its next write on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..counters import BYTES_WRITTEN
from ..digest import Digest, _mk
from ..errors import WriteError
from .base import EntryUsage, StorageBackend

__all__ = ["FileStorage"]

_FAN_OUT = re.compile(r"[0-9a-f]{2}")
_ENTRY = re.compile(r"[0-9a-f]{64}")
_TEMP_SUFFIX = ".tmp"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_FOLLOWED = (errno.ELOOP, errno.ENOTDIR)  # a symlink (or a file) where a directory belongs


@dataclass(frozen=True)
class FileStorage(StorageBackend):
    """File-based storage backend: one file per key under ``root``.

    Subclasses implement :meth:`_encode` and :meth:`_decode` (the entry format). A write goes to
    a temporary file in the entry's directory, which a rename then moves into place, so a reader
    in any process sees the old complete entry or the new complete one, never a part and never a
    gap. With ``durable=True`` the file and its directory are fsynced as well, so an acknowledged
    write survives a power cut; the default only survives process crashes. A write the file
    system refuses (disk full, read-only, permission denied) raises
    :class:`~fleche.errors.WriteError` naming the path and the cause, leaving no temporary file and
    the entry stored before, if any, intact.

    ``root`` may be a ``str`` or ``Path``; ``~`` is expanded, symlinks in it are resolved once per
    process, and the directory is created on the first write. ``lock_timeout`` (seconds, ``None``
    for ever) bounds how long taking a key's lock (every locking layer together) may wait. A
    storage pickles as its settings only.
    """

    root: Path
    lock_timeout: float | None = 1.0
    durable: bool = False
    _real_root: str = field(default="", init=False, repr=False, compare=False)
    """``root`` with every symlink resolved, in this process; never pickled."""

    _atomic_writes: ClassVar[bool] = True
    """Writes replace whole entries atomically, so readers need no lock."""

    _entry_suffix: ClassVar[str] = ""
    """Appended to the key to name an entry file (e.g. ``".h5"``), so other tools recognize it."""

    _writes_scratch: ClassVar[bool] = False
    """Whether :meth:`_encode` may write its ``scratch`` file (which ``put`` then removes)."""

    def __post_init__(self) -> None:
        if not isinstance(self.root, (str, os.PathLike)):
            raise TypeError(f"root must be a str or Path, got {type(self.root).__name__}")
        root = Path(os.path.abspath(os.path.expanduser(os.fspath(self.root))))
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "_real_root", os.path.realpath(root))
        if self.lock_timeout is not None and not (
            isinstance(self.lock_timeout, (int, float)) and self.lock_timeout >= 0
        ):
            raise ValueError(f"lock_timeout must be a number >= 0 or None, got {self.lock_timeout!r}")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_real_root", None)  # where symlinks lead is a fact of each machine
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_real_root", os.path.realpath(self.root))

    # -- the entry format (subclasses) ----------------------------------------------------------

    def _encode(self, value: Any, key: Digest, scratch: str) -> bytes | memoryview:
        """The bytes of the entry file that stores ``value`` under ``key``.

        ``scratch`` is a path, in the entry's (checked) directory, where an encoder whose class
        sets ``_writes_scratch`` may write a file of its own (say, for a library that only writes
        to paths); it is removed afterwards.
        Note for implementers: raise :class:`~fleche.errors.SaveError` if the value cannot be
        stored; never touch any other path.
        """
        raise NotImplementedError

    def _decode(self, data: bytes, key: Digest, path: str, fd: int) -> Any:
        """The value in the entry file ``path``, whose whole content is ``data``.

        ``fd`` is open on the file ``data`` was read from. Raise
        :class:`~fleche.errors.CorruptEntryError` if the entry cannot be read.
        """
        raise NotImplementedError

    # -- layout ---------------------------------------------------------------------------------

    def _path(self, key: Digest) -> str:
        return f"{self._real_root}/{key[:2]}/{key}{self._entry_suffix}"

    def _location(self, key: Digest) -> str:
        return self._path(key)

    def _lock_directory(self) -> str:
        """Where the inter-process lock files of this store live."""
        return f"{self._real_root}/.locks"

    def _open_fan_out(self, key: Digest, *, create: bool) -> int:
        """A descriptor on ``key``'s fan-out directory, which must be a real directory.

        Raises ``FileNotFoundError`` if it does not exist and ``create`` is false, and ``OSError``
        with ``ELOOP``/``ENOTDIR`` if a symlink or a file is where it belongs.
        """
        directory = f"{self._real_root}/{key[:2]}"
        try:
            return os.open(directory, _DIR_FLAGS)
        except FileNotFoundError:
            if not create:
                raise
        os.makedirs(directory, exist_ok=True)  # the first write here, or the root was deleted
        return os.open(directory, _DIR_FLAGS)

    # -- backend primitives ---------------------------------------------------------------------

    def list(self) -> Iterable[Digest]:
        """A snapshot of the stored keys; temporary, lock and stray files and symlinks are never
        listed.

        Scans the directory (O(n)); entries written or evicted while it runs may or may not be
        included.
        """
        return [_mk(e.name[:64]) for e in self._entries()]

    def _entries(self) -> Iterator[os.DirEntry[str]]:
        """The directory entries of the stored entry files (what :meth:`list` lists); each
        fan-out directory stays open while its entries are used (``stat`` is relative to it)."""
        suffix = self._entry_suffix
        for name, fd in self._fan_outs():
            with os.scandir(fd) as entries:
                yield from [
                    e
                    for e in entries
                    if e.name.endswith(suffix)
                    and _ENTRY.fullmatch(e.name, 0, len(e.name) - len(suffix))
                    and e.name.startswith(name)
                    and e.is_file(follow_symlinks=False)
                ]

    def usage(self) -> dict[Digest, EntryUsage]:
        """Every stored key with its file's size and last modification, which is when it was
        written or last touched (:meth:`touch`). Scans the directory and stats every entry
        (O(n)); reads take no part in it (the kernel's access times are not used)."""
        found: dict[Digest, EntryUsage] = {}
        for entry in self._entries():
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # evicted since listed
            found[_mk(entry.name[:64])] = EntryUsage(st.st_size, st.st_mtime)
        return found

    def volume(self) -> int:
        """Bytes of every regular file under the root: entries, temporary files of writers
        under way (or killed), lock files; 0 before the first write. Walks the directory
        (O(n)), following no symlink."""
        return _tree_size(self._real_root)

    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        """Set the modification time of each key's entry file to ``when`` (default now) where
        it is older, which :meth:`usage` reports: one ``stat`` and at most one ``utime`` per
        key, no lock (the entry's bytes are not touched). Keys not stored are skipped."""
        when = time.time() if when is None else when
        by_fan_out: dict[str, list[str]] = {}
        for full in self._full_keys(keys):
            by_fan_out.setdefault(full[:2], []).append(f"{full}{self._entry_suffix}")
        for names in by_fan_out.values():
            try:
                fd = self._open_fan_out(Digest(names[0][:64]), create=False)
            except OSError as e:
                if e.errno == errno.ENOENT or e.errno in _NOT_FOLLOWED:
                    continue  # nothing stored there, or not part of the store
                raise
            try:
                for name in names:
                    _touch(fd, name, when)
            finally:
                os.close(fd)

    def _fan_outs(self) -> Iterator[tuple[str, int]]:
        """The fan-out directories, each as its name and a descriptor open while it is used."""
        try:
            top = os.scandir(self._real_root)
        except FileNotFoundError:
            return
        with top:
            names = [d.name for d in top if _FAN_OUT.fullmatch(d.name)]
        for name in names:
            try:
                fd = os.open(f"{self._real_root}/{name}", _DIR_FLAGS)
            except OSError as e:
                if e.errno == errno.ENOENT or e.errno in _NOT_FOLLOWED:
                    continue  # gone, or a symlink: not part of the store
                raise
            try:
                yield name, fd
            finally:
                os.close(fd)

    def sweep(self, older_than: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove temporary files that writers left behind (killed mid-write) and return them.

        Only temporary files last modified more than ``older_than`` seconds ago are touched; a
        live writer's file is milliseconds old, so sweeping is safe while others write. Entries
        are never touched, and nothing outside the store (behind a symlink) is. Scans the
        directory (O(n)).
        """
        cutoff = time.time() - older_than
        removed: list[str] = []
        for name, fd in self._fan_outs():
            with os.scandir(fd) as entries:
                stale = [e.name for e in entries
                         if e.name.startswith(".") and e.name.endswith(_TEMP_SUFFIX)]
            for temp in stale:
                try:
                    st = os.stat(temp, dir_fd=fd, follow_symlinks=False)
                    if st.st_mtime >= cutoff:
                        continue
                    if not dry_run:
                        os.unlink(temp, dir_fd=fd)
                except FileNotFoundError:
                    continue
                removed.append(f"{self._real_root}/{name}/{temp}")
        return removed

    def put(self, value: Any, key: Digest) -> Digest:
        """Write ``value`` under ``key`` atomically, replacing any entry in one step.

        Nothing is left on disk if writing fails; a refusal of the file system raises
        :class:`~fleche.errors.WriteError`. Concurrent puts of one key without a lock are still
        safe: the last rename wins and every reader sees one whole entry.
        """
        name = f"{key}{self._entry_suffix}"
        path = f"{self._real_root}/{key[:2]}/{name}"
        try:
            fd = self._open_fan_out(key, create=True)
        except OSError as e:
            raise _write_error(key, path, e) from e
        token = secrets.token_hex(6)
        tmp, scratch = f".{key}.{token}{_TEMP_SUFFIX}", f".{key}.{token}s{_TEMP_SUFFIX}"
        try:
            data = self._encode(value, key, f"{_path_of(fd, path)}/{scratch}")
            _write_new(fd, tmp, data, self.durable)
            BYTES_WRITTEN.add("bytes", len(data))
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            if self.durable:
                os.fsync(fd)
        except OSError as e:
            _remove(fd, tmp)
            raise _write_error(key, path, e) from e
        except BaseException:
            _remove(fd, tmp)
            raise
        finally:
            if self._writes_scratch:
                _remove(fd, scratch)
            os.close(fd)
        return key

    def get(self, key: Digest) -> Any:
        """Read the entry under ``key``: no lock, a handful of syscalls.

        Raises ``KeyError`` if there is none and :class:`~fleche.errors.CorruptEntryError` if it
        is torn, tampered with or cannot be read; ``evict`` removes such an entry.
        """
        path = self._path(key)
        try:
            fd = self._open_entry(key)
        except (FileNotFoundError, _NotFollowed):
            raise KeyError(f"nothing stored under {key}") from None
        try:
            return self._decode(_read_all(fd), key, path, fd)
        finally:
            os.close(fd)

    def _open_entry(self, key: Digest) -> int:
        try:
            dfd = self._open_fan_out(key, create=False)
        except OSError as e:
            if e.errno in _NOT_FOLLOWED:
                raise _NotFollowed() from e
            raise
        try:
            return os.open(f"{key}{self._entry_suffix}", _READ_FLAGS, dir_fd=dfd)
        except OSError as e:
            if e.errno in _NOT_FOLLOWED:
                raise _NotFollowed() from e
            raise
        finally:
            os.close(dfd)

    def _contains(self, key: Digest) -> bool:
        try:
            directory = os.stat(f"{self._real_root}/{key[:2]}", follow_symlinks=False)
            entry = os.stat(self._path(key), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return stat.S_ISDIR(directory.st_mode) and stat.S_ISREG(entry.st_mode)

    def _evict(self, key: Digest) -> None:
        name = f"{key}{self._entry_suffix}"
        try:
            fd = self._open_fan_out(key, create=False)
        except OSError as e:
            if e.errno == errno.ENOENT or e.errno in _NOT_FOLLOWED:
                raise KeyError(f"nothing stored under {key}") from None
            raise
        try:
            if not stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                raise FileNotFoundError(name)  # a symlink or directory is not an entry
            os.unlink(name, dir_fd=fd)
            if self.durable:
                os.fsync(fd)
        except FileNotFoundError:
            raise KeyError(f"nothing stored under {key}") from None
        finally:
            os.close(fd)


def _touch(dir_fd: int, name: str, when: float) -> None:
    """Move the modification time of the regular file ``name`` forward to ``when``."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) and st.st_mtime < when:
            os.utime(name, (st.st_atime, when), dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass  # evicted meanwhile


def _tree_size(path: str) -> int:
    """Bytes of the regular files under ``path``, following no symlink (0 if it is gone)."""
    total = 0
    try:
        entries = os.scandir(path)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    with entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    total += _tree_size(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # removed while we walked
    return total


class _NotFollowed(Exception):
    """A symlink (or a file) sits where a directory or an entry of the store belongs."""


def _write_error(key: str, path: str, e: OSError) -> WriteError:
    if e.errno in _NOT_FOLLOWED:
        reason = (f"{os.path.dirname(path)} is a symbolic link or not a directory; fleche "
                  "never follows symlinks inside a store (remove it)")
    else:
        # os.strerror, not e.strerror: h5py puts a page of libhdf5 detail there
        reason = f"{os.strerror(e.errno or 0)} ({errno.errorcode.get(e.errno or 0, e.errno)})"
    return WriteError(key, path, e.errno, reason)


_PROC_FD = os.path.isdir("/proc/self/fd")


def _path_of(fd: int, fallback: str) -> str:
    """A path that names the directory open as ``fd`` itself (so a library writing by path
    cannot be diverted by a swapped symlink), where the system has one."""
    return f"/proc/self/fd/{fd}" if _PROC_FD else os.path.dirname(fallback)


def _write_new(dir_fd: int, name: str, data: bytes | memoryview, durable: bool) -> None:
    # os.open/os.write: no buffering layer, no isatty and seek calls on a file written once.
    fd = os.open(name, _CREATE_FLAGS, 0o666, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _remove(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _read_all(fd: int) -> bytes:
    # os.read on a descriptor: a third of the cost of open() on the hit path. Entries are never
    # written in place, so the size fstat reports is the size to read.
    size = os.fstat(fd).st_size
    data = os.read(fd, size)
    if len(data) < size:  # very large files come in several reads
        parts = [data]
        while size > (got := sum(map(len, parts))):
            chunk = os.read(fd, size - got)
            if not chunk:
                break
            parts.append(chunk)
        data = b"".join(parts)
    return data
