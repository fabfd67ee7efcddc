"""Storage subpackage public API.

Value storages keep values under their content digest; call storages keep
:class:`~fleche.call.DigestedCall` records under their lookup key. Each concrete storage is a
frozen dataclass composed of mixins (locking, destructuring, the domain layer) over a backend.

Storages that need optional dependencies (``Sql`` and ``SqlValues``: the ``sql`` extra; the
HDF5 storages: the ``h5`` extra) are imported on first access, so ``import fleche.storage`` needs neither; the
object storages (``ValueObjectStore``, ``CallObjectStore``: the ``s3`` extra) import fsspec
only when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import (
    AmbiguousDigestError,
    CallMixin,
    CallStorage,
    CorruptEntryError,
    Intent,
    KeyManagement,
    LockTimeout,
    OperationContext,
    SaveError,
    StorageBackend,
    ValueMixin,
    ValueStorage,
)
from .destructuring import DestructuringMixin, register_destructurer
from .directory_index import CallDirectoryIndex, DirectoryIndexBackend
from .file import FileStorage
from .locks import InterProcessLockMixin
from .memory import CallMemory, MemoryBackend, ValueMemory
from .object_store import CallObjectStore, ObjectStoreBackend, ValueObjectStore
from .pickle_file import CallPickleFile, PickleFileBackend, ValuePickleFile
from .thread_safe import PerKeyLockMixin, SerializingMixin
from .void import CallVoid, ValueVoid, VoidBackend

__all__ = [
    "AmbiguousDigestError",
    "CallDirectoryIndex",
    "CallMemory",
    "CallMixin",
    "CallObjectStore",
    "CallPickleFile",
    "CallStorage",
    "CallVoid",
    "CorruptEntryError",
    "DestructuringMixin",
    "DirectoryIndexBackend",
    "FileStorage",
    "Intent",
    "InterProcessLockMixin",
    "KeyManagement",
    "LockTimeout",
    "MemoryBackend",
    "ObjectStoreBackend",
    "OperationContext",
    "PerKeyLockMixin",
    "PickleFileBackend",
    "SaveError",
    "SerializingMixin",
    "StorageBackend",
    "ValueMemory",
    "ValueMixin",
    "ValueObjectStore",
    "ValuePickleFile",
    "ValueStorage",
    "ValueVoid",
    "VoidBackend",
    "register_destructurer",
]

# Storages that need optional dependencies or later modules: name -> submodule.
_LAZY: dict[str, str] = {
    "Sql": "sql",
    "SqlValues": "sql",
    "BagOfHoldingH5FileBackend": "h5_file",
    "CallBagOfHoldingH5File": "h5_file",
    "ValueBagOfHoldingH5File": "h5_file",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fleche.storage' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*__all__, *_LAZY])
