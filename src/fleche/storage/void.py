"""Storages that keep nothing: every save is accepted and forgotten.

Useful to switch caching off without changing code, and to measure the cost of digesting alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..digest import Digest
from .base import CallMixin, EntryUsage, StorageBackend, ValueMixin

__all__ = ["CallVoid", "ValueVoid", "VoidBackend"]


@dataclass(frozen=True)
class VoidBackend(StorageBackend):
    """Backend that stores nothing: ``put`` succeeds, ``get`` always raises ``KeyError``, and
    ``evict`` of any key does nothing (a void storage forgets by design, so there is never
    anything left to remove)."""

    def list(self) -> Iterable[Digest]:
        return ()

    def _evict(self, key: Digest) -> None:
        pass

    def put(self, value: Any, key: Digest) -> Digest:
        return key

    def get(self, key: Digest) -> Any:
        raise KeyError(f"nothing stored under {key}: a void storage keeps nothing")

    def _contains(self, key: Digest) -> bool:
        return False

    def usage(self) -> dict[Digest, EntryUsage]:
        """Nothing: there are no entries."""
        return {}

    def volume(self) -> int:
        """0: nothing is kept."""
        return 0


@dataclass(frozen=True)
class ValueVoid(ValueMixin, VoidBackend):
    """A value storage that keeps nothing."""


@dataclass(frozen=True)
class CallVoid(CallMixin, VoidBackend):
    """A call storage that keeps nothing."""
