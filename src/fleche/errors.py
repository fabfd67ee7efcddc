"""Exceptions raised by fleche. Each also derives from the builtin it refines, where one fits."""

from __future__ import annotations

__all__ = [
    "AmbiguousDigestError",
    "CorruptEntryError",
    "DatabaseError",
    "FlecheError",
    "FlecheWarning",
    "LockError",
    "LockTimeout",
    "NetworkFilesystemWarning",
    "ObjectStoreError",
    "SaveError",
    "SchemaVersionError",
    "SignatureError",
    "SpecError",
    "WriteError",
    "UnsignedStoreWarning",
]


class FlecheError(Exception):
    """Base of every fleche exception."""


class SaveError(FlecheError):
    """A value or call could not be stored; nothing was written for it, and nothing stored
    before was lost."""


class WriteError(SaveError, OSError):
    """The file system refused to store an entry: disk full, read-only file system, permission
    denied, or a path inside the store that is not a real directory.

    ``key`` and ``path`` name the entry, ``reason`` the cause; ``errno`` and ``filename`` are set
    as for the ``OSError`` it came from. Nothing was written for the entry (no temporary file is
    left behind) and what was stored before is intact.
    """

    def __init__(self, key: str, path: str, errno: int | None, reason: str) -> None:
        OSError.__init__(self, errno, reason, path)
        self.key = key
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot store {self.key} at {self.path}: {self.reason}"

    def __reduce__(self):
        return (type(self), (self.key, self.path, self.errno, self.reason))


class AmbiguousDigestError(FlecheError, ValueError):
    """A short digest matches more than one stored key."""


class CorruptEntryError(FlecheError, ValueError):
    """A stored entry is torn, truncated, tampered with or unreadable.

    Nothing from it was unpickled. ``evict`` removes it; a cache treats it as a miss and
    overwrites it.
    """

    def __init__(self, key: str, location: str, reason: str) -> None:
        super().__init__(f"corrupt entry {key} at {location}: {reason}")
        self.key = key
        self.location = location
        self.reason = reason

    def __reduce__(self):  # keep the three fields through pickling (e.g. from a Dask worker)
        return (type(self), (self.key, self.location, self.reason))


class SignatureError(CorruptEntryError):
    """A storage with a secret key found an entry that is unsigned or whose signature matches
    none of its keys; nothing from it was unpickled."""


class LockError(FlecheError):
    """A key's lock cannot be taken because its lock file or lock directory is unusable: a
    read-only file system, permission denied, a full disk, or a lock path replaced by a directory
    or a symbolic link (fleche never follows symlinks inside a store).

    ``key``, ``lock_path`` and ``reason`` say which lock and why. Nothing was written or removed
    under the key; an operation that needed the lock (a save, an eviction, a ``locked`` section)
    did not run.
    """

    def __init__(self, key: str, lock_path: str, reason: str) -> None:
        super().__init__(f"cannot take the lock on {key} ({lock_path}): {reason}")
        self.key = key
        self.lock_path = lock_path
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.key, self.lock_path, self.reason))


class LockTimeout(LockError, TimeoutError):
    """A lock on a key could not be taken within the storage's ``lock_timeout``.

    The storage is left as it was.
    """

    def __init__(self, key: str, lock_path: str, timeout: float) -> None:
        TimeoutError.__init__(
            self,
            f"timed out after {timeout:g} s waiting for the lock on {key} ({lock_path}); another "
            "thread or process holds it. Raise lock_timeout if the work under it takes longer.",
        )
        self.reason = "held by another thread or process"
        self.key = key
        self.lock_path = lock_path
        self.timeout = timeout

    def __reduce__(self):
        return (type(self), (self.key, self.lock_path, self.timeout))


class FlecheWarning(UserWarning):
    """Caching was skipped for a call (it still ran and returned its result)."""


class DatabaseError(FlecheError, ConnectionError):
    """A database cannot be reached or used: wrong URL, missing driver, server down.

    ``url`` is the database URL with any password replaced by ``***``.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot use the database {url}: {reason}")
        self.url = url
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.url, self.reason))


class ObjectStoreError(FlecheError, OSError):
    """An object store cannot be read or used: the endpoint cannot be reached, access is denied,
    credentials are missing, an option of the filesystem is wrong.

    ``location`` is the URL of the store or object (object URLs carry no credentials);
    ``reason`` says what failed. Nothing stored was changed by the failed operation.
    """

    def __init__(self, location: str, reason: str) -> None:
        FlecheError.__init__(self, f"cannot use the object store {location}: {reason}")
        self.location = location
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot use the object store {self.location}: {self.reason}"

    def __reduce__(self):
        return (type(self), (self.location, self.reason))


class SchemaVersionError(DatabaseError):
    """A database holds fleche tables of a schema version this fleche cannot read or write.

    Nothing in it was changed.
    """

    def __init__(self, url: str, found: object, expected: int) -> None:
        FlecheError.__init__(
            self,
            f"the database {url} holds fleche tables of schema version {found}, but this fleche "
            f"reads and writes version {expected} only; use a fleche release that matches it, "
            "or another database",
        )
        self.url = url
        self.reason = f"schema version {found}, expected {expected}"
        self.found = found
        self.expected = expected

    def __reduce__(self):
        return (type(self), (self.url, self.found, self.expected))


class UnsignedStoreWarning(UserWarning):
    """Pickle entries of a shared store are read or written without a secret key: whoever can
    write to the store can run code in every process that loads from it.

    Given once per process. Set ``FLECHE_SECRET_KEY`` (the same in every process) to sign and
    check entries, or ``FLECHE_SECRET_KEY=none`` to use unsigned stores without the warning
    (or filter it: ``warnings.filterwarnings("ignore", category=UnsignedStoreWarning)``).
    """


class NetworkFilesystemWarning(UserWarning):
    """A SQLite database lies on a network filesystem, where WAL mode and locking are unsafe."""


class SpecError(FlecheError, ValueError):
    """A store spec (the string ``fleche.open`` and ``FLECHE_CACHE`` take) is malformed.

    ``spec`` is the spec with any password replaced by ``***``; ``reason`` says what is wrong.
    """

    def __init__(self, spec: str, reason: str) -> None:
        super().__init__(f"bad store spec {spec!r}: {reason}")
        self.spec = spec
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.spec, self.reason))
