"""In-process storages backed by a dict: fast, private to one process, gone when it exits."""

from __future__ import annotations

import dataclasses
import pickle
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..digest import Digest
from .base import CallMixin, EntryUsage, StorageBackend, ValueMixin
from .destructuring import DestructuringMixin
from .thread_safe import PerKeyLockMixin

__all__ = ["CallMemory", "MemoryBackend", "ValueMemory"]


@dataclass(frozen=True)
class MemoryBackend(StorageBackend):
    """Backend keeping entries in the dict ``storage``.

    Entries are kept by reference: mutating a loaded object mutates the stored one. Single dict
    operations are atomic under the GIL, so a reader sees a whole entry or none. A pickled copy
    carries a copy of the dict; it shares nothing with the original. When each entry was saved
    or touched is kept by this handle (another handle on the same dict keeps its own).
    """

    storage: dict[Digest, Any] = field(default_factory=dict)
    _used: dict[Digest, float] = field(default_factory=dict, init=False, repr=False, compare=False)
    """When each entry was saved or last touched."""
    _sizes: dict[Digest, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    """The pickled size of each entry, measured when :meth:`usage` first asks."""
    _atomic_writes: ClassVar[bool] = True  # one dict assignment: readers need no lock

    def list(self) -> Iterable[Digest]:
        """A snapshot of the stored keys."""
        return list(self.storage)

    def _evict(self, key: Digest) -> None:
        try:
            del self.storage[key]
        except KeyError:
            raise KeyError(f"nothing stored under {key}") from None
        self._used.pop(key, None)
        self._sizes.pop(key, None)

    def put(self, value: Any, key: Digest) -> Digest:
        self._sizes.pop(key, None)
        self.storage[key] = value
        self._used[key] = time.time()
        return key

    def usage(self) -> dict[Digest, EntryUsage]:
        """Every stored key with the size its entry would have pickled (``sys.getsizeof``
        where it does not pickle; measured once per entry, O(n) the first time) and when it
        was saved or last touched through this handle (0.0 if neither)."""
        found: dict[Digest, EntryUsage] = {}
        for key in list(self.storage):
            size = self._sizes.get(key)
            if size is None:
                try:
                    value = self.storage[key]
                except KeyError:
                    continue  # evicted since listed
                size = self._sizes[key] = _pickled_size(value)
            found[key] = EntryUsage(size, self._used.get(key, 0.0))
        return found

    def volume(self) -> int:
        """The sum of the sizes :meth:`usage` reports: what the entries would take on disk."""
        return sum(u.size for u in self.usage().values())

    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        """Record the use of the stored ones among ``keys`` in this handle (a dict update)."""
        when = time.time() if when is None else when
        for full in self._full_keys(keys):
            if full in self.storage and self._used.get(full, 0.0) < when:
                self._used[full] = when

    def get(self, key: Digest) -> Any:
        try:
            return self.storage[key]
        except KeyError:
            raise KeyError(f"nothing stored under {key}") from None

    def _contains(self, key: Digest) -> bool:
        return key in self.storage


def _pickled_size(value: Any) -> int:
    try:
        return len(pickle.dumps(value, protocol=5))
    except Exception:  # noqa: BLE001 - memory keeps what does not pickle too
        return sys.getsizeof(value)


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
