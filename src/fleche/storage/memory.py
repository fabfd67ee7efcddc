"""In-process storages backed by a dict: fast, private to one process, gone when it exits."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..digest import Digest
from .base import CallMixin, StorageBackend, ValueMixin
from .destructuring import DestructuringMixin
from .thread_safe import PerKeyLockMixin

__all__ = ["CallMemory", "MemoryBackend", "ValueMemory"]


@dataclass(frozen=True)
class MemoryBackend(StorageBackend):
    """Backend keeping entries in the dict ``storage``.

    Entries are kept by reference: mutating a loaded object mutates the stored one. Single dict
    operations are atomic under the GIL, so a reader sees a whole entry or none. A pickled copy
    carries a copy of the dict; it shares nothing with the original.
    """

    storage: dict[Digest, Any] = field(default_factory=dict)
    _atomic_writes: ClassVar[bool] = True  # one dict assignment: readers need no lock

    def list(self) -> Iterable[Digest]:
        """A snapshot of the stored keys."""
        return list(self.storage)

    def _evict(self, key: Digest) -> None:
        try:
            del self.storage[key]
        except KeyError:
            raise KeyError(f"nothing stored under {key}") from None

    def put(self, value: Any, key: Digest) -> Digest:
        self.storage[key] = value
        return key

    def get(self, key: Digest) -> Any:
        try:
            return self.storage[key]
        except KeyError:
            raise KeyError(f"nothing stored under {key}") from None

    def _contains(self, key: Digest) -> bool:
        return key in self.storage


def _identity_hash(self: MemoryBackend) -> int:
    # Two handles on one dict are one storage; the dict itself is unhashable.
    return hash((type(self), id(self.storage)))


def _identity_eq(self: MemoryBackend, other: object) -> bool:
    if type(other) is not type(self):
        return NotImplemented
    return self.storage is other.storage and _settings(self) == _settings(other)


def _settings(storage: MemoryBackend) -> list[object]:
    return [
        getattr(storage, f.name)
        for f in dataclasses.fields(storage)
        if f.compare and f.name != "storage"
    ]


@dataclass(frozen=True)
class ValueMemory(PerKeyLockMixin, DestructuringMixin, ValueMixin, MemoryBackend):
    """A destructuring value storage in a dict, with per-key locking for threads.

    >>> values = ValueMemory()
    >>> values.load(values.save({"a": [1, 2]}))
    {'a': [1, 2]}
    """

    __hash__ = _identity_hash
    __eq__ = _identity_eq


@dataclass(frozen=True)
class CallMemory(PerKeyLockMixin, CallMixin, MemoryBackend):
    """A call storage in a dict, with per-key locking for threads."""

    __hash__ = _identity_hash
    __eq__ = _identity_eq
