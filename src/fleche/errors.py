"""Exceptions raised by fleche. Each also derives from the builtin it refines, where one fits."""

from __future__ import annotations

__all__ = [
    "AmbiguousDigestError",
    "CorruptEntryError",
    "FlecheError",
    "LockTimeout",
    "SaveError",
    "SignatureError",
]


class FlecheError(Exception):
    """Base of every fleche exception."""


class SaveError(FlecheError):
    """A value or call could not be stored; nothing was written for it."""


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


class LockTimeout(FlecheError, TimeoutError):
    """A lock on a key could not be taken within the storage's ``lock_timeout``.

    The storage is left as it was.
    """

    def __init__(self, key: str, lock_path: str, timeout: float) -> None:
        super().__init__(
            f"timed out after {timeout:g} s waiting for the lock on {key} ({lock_path}); another "
            "thread or process holds it. Raise lock_timeout if the work under it takes longer."
        )
        self.key = key
        self.lock_path = lock_path
        self.timeout = timeout

    def __reduce__(self):
        return (type(self), (self.key, self.lock_path, self.timeout))
