"""A backend keeping one file per key in a directory that many processes may share.

Layout under ``root``: each entry is ``root/<first two hex digits>/<full key><suffix>``, where a
backend may set ``_entry_suffix`` (e.g. ``".h5"``; none by default); temporary files are dot-files
next to the entry they will replace; lock files live in ``root/.locks/``. Nothing else is ever
read as an entry.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..counters import BYTES_WRITTEN
from ..digest import Digest, _mk
from .base import StorageBackend

__all__ = ["FileStorage"]

_FAN_OUT = re.compile(r"[0-9a-f]{2}")
_ENTRY = re.compile(r"[0-9a-f]{64}")
_TEMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class FileStorage(StorageBackend):
    """File-based storage backend: one file per key under ``root``.

    Subclasses implement :meth:`_write_file` and :meth:`_read_file` (the entry format). A write
    goes to a temporary file in the entry's directory, which ``os.replace`` then moves into place,
    so a reader in any process sees the old complete entry or the new complete one, never a part
    and never a gap. With ``durable=True`` the file and its directory are fsynced as well, so an
    acknowledged write survives a power cut; the default only survives process crashes.

    ``root`` may be a ``str`` or ``Path``; ``~`` is expanded and the directory is created on the
    first write. ``lock_timeout`` (seconds, ``None`` for ever) bounds how long an operation waits
    for a lock taken by locking mixins. A storage pickles as its settings only.
    """

    root: Path
    lock_timeout: float | None = 1.0
    durable: bool = False

    _atomic_writes: ClassVar[bool] = True
    """Writes replace whole entries atomically, so readers need no lock."""

    _entry_suffix: ClassVar[str] = ""
    """Appended to the key to name an entry file (e.g. ``".h5"``), so other tools recognize it."""

    def __post_init__(self) -> None:
        if not isinstance(self.root, (str, os.PathLike)):
            raise TypeError(f"root must be a str or Path, got {type(self.root).__name__}")
        root = Path(os.path.abspath(os.path.expanduser(os.fspath(self.root))))
        object.__setattr__(self, "root", root)
        if self.lock_timeout is not None and not (
            isinstance(self.lock_timeout, (int, float)) and self.lock_timeout >= 0
        ):
            raise ValueError(f"lock_timeout must be a number >= 0 or None, got {self.lock_timeout!r}")

    # -- the entry format (subclasses) ----------------------------------------------------------

    def _write_file(self, value: Any, tmp_path: str) -> int | None:
        """Write ``value`` for ``key`` into the new file ``tmp_path``; return its size if known.

        Note for implementers: raise before creating ``tmp_path`` if the value cannot be stored,
        or leave it to be removed; never touch any other path. Returning ``None`` makes ``put``
        ask the file system for the size (for the bytes-written statistics).
        """
        raise NotImplementedError

    def _read_file(self, path: str, key: Digest) -> Any:
        """Read the entry ``key`` from ``path``; raise ``FileNotFoundError`` if it is gone and
        :class:`~fleche.errors.CorruptEntryError` if it cannot be read."""
        raise NotImplementedError

    # -- layout ---------------------------------------------------------------------------------

    def _path(self, key: Digest) -> str:
        return f"{self.root}/{key[:2]}/{key}{self._entry_suffix}"

    def _lock_directory(self) -> str:
        return f"{self.root}/.locks"

    # -- backend primitives ---------------------------------------------------------------------

    def list(self) -> Iterable[Digest]:
        """A snapshot of the stored keys; temporary, lock and stray files are never listed.

        Scans the directory (O(n)); entries written or evicted while it runs may or may not be
        included.
        """
        keys: list[Digest] = []
        suffix = self._entry_suffix
        try:
            top = os.scandir(self.root)
        except FileNotFoundError:
            return keys
        with top:
            for sub in top:
                if not (_FAN_OUT.fullmatch(sub.name) and sub.is_dir(follow_symlinks=False)):
                    continue
                try:
                    entries = os.scandir(sub.path)
                except FileNotFoundError:
                    continue
                with entries:
                    keys.extend(
                        _mk(e.name[:64])
                        for e in entries
                        if e.name.endswith(suffix)
                        and _ENTRY.fullmatch(e.name, 0, len(e.name) - len(suffix))
                        and e.name.startswith(sub.name)
                        and e.is_file(follow_symlinks=False)
                    )
        return keys

    def sweep(self, older_than: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove temporary files that writers left behind (killed mid-write) and return them.

        Only temporary files last modified more than ``older_than`` seconds ago are touched; a
        live writer's file is milliseconds old, so sweeping is safe while others write. Entries
        are never touched. Scans the directory (O(n)).
        """
        cutoff = time.time() - older_than
        removed: list[str] = []
        try:
            top = os.scandir(self.root)
        except FileNotFoundError:
            return removed
        with top:
            subdirs = [d.path for d in top if _FAN_OUT.fullmatch(d.name) and d.is_dir()]
        for sub in subdirs:
            try:
                entries = list(os.scandir(sub))
            except FileNotFoundError:
                continue
            for e in entries:
                if not (e.name.startswith(".") and e.name.endswith(_TEMP_SUFFIX)):
                    continue
                try:
                    if e.stat(follow_symlinks=False).st_mtime >= cutoff:
                        continue
                    if not dry_run:
                        os.unlink(e.path)
                except FileNotFoundError:
                    continue
                removed.append(e.path)
        return removed

    def put(self, value: Any, key: Digest) -> Digest:
        """Write ``value`` under ``key`` atomically, replacing any entry in one step.

        Nothing is left on disk if writing fails. Concurrent puts of one key without a lock are
        still safe: the last rename wins and every reader sees one whole entry.
        """
        path = self._path(key)
        directory = os.path.dirname(path)
        tmp = f"{directory}/.{key}.{secrets.token_hex(6)}{_TEMP_SUFFIX}"
        try:
            try:
                size = self._write_file(value, tmp)
            except FileNotFoundError:
                if os.path.exists(tmp):
                    raise
                os.makedirs(directory, exist_ok=True)  # first write to this fan-out directory
                size = self._write_file(value, tmp)
            if self.durable:
                _fsync_path(tmp)
            BYTES_WRITTEN.add("bytes", os.stat(tmp).st_size if size is None else size)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        if self.durable:
            _fsync_path(directory)
        return key

    def get(self, key: Digest) -> Any:
        """Read the entry under ``key``: one open and one read, no lock.

        Raises ``KeyError`` if there is none and :class:`~fleche.errors.CorruptEntryError` if it
        is torn, tampered with or cannot be unpickled; ``evict`` removes such an entry.
        """
        path = self._path(key)
        try:
            return self._read_file(path, key)
        except FileNotFoundError:
            raise KeyError(f"nothing stored under {key}") from None

    def _contains(self, key: Digest) -> bool:
        return os.path.isfile(self._path(key))

    def _evict(self, key: Digest) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise KeyError(f"nothing stored under {key}") from None
        if self.durable:
            _fsync_path(os.path.dirname(path))


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
