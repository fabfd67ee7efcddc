"""Storage and cache classes the tests compose from the public mixins."""

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from fleche.caches import Cache
from fleche.storage import CallMemory, Intent, OperationContext, SerializingMixin, ValueMemory


@dataclass(frozen=True)
class SerializingValueMemory(SerializingMixin, ValueMemory):
    """A value memory storage serialized behind one lock."""


@dataclass(frozen=True)
class SerializingCallMemory(SerializingMixin, CallMemory):
    """A call memory storage serialized behind one lock."""


import pickle
from typing import Any

from fleche.digest import Digest
from fleche.storage import SaveError


@dataclass(frozen=True)
class PickledValueMemory(ValueMemory):
    """Keeps pickled bytes, like a file storage would: unpicklable values raise SaveError."""

    def put(self, value: Any, key: Digest) -> Digest:
        try:
            data = pickle.dumps(value)
        except Exception as e:
            raise SaveError(f"cannot pickle {type(value).__qualname__}: {e}") from e
        return super().put(data, key)

    def get(self, key: Digest) -> Any:
        return pickle.loads(super().get(key))

    __hash__ = ValueMemory.__hash__
    __eq__ = ValueMemory.__eq__


@dataclass(frozen=True)
class RecordingMixin(OperationContext):
    """Records every operation context entered, as ``(key, intent)``."""

    entered: list = field(default_factory=list, compare=False, repr=False)

    @contextlib.contextmanager
    def _operation_context(self, key, *, intent=Intent.WRITE) -> Iterator[None]:
        self.entered.append((key, str(intent)))
        with super()._operation_context(key, intent=intent):
            yield


@dataclass(frozen=True)
class RecordingCache(RecordingMixin, Cache):
    """A cache recording the operation contexts it enters."""


@dataclass(frozen=True)
class RecordingValueMemory(RecordingMixin, ValueMemory):
    """A value storage recording the operation contexts it enters."""

    __hash__ = ValueMemory.__hash__
    __eq__ = ValueMemory.__eq__


@dataclass(frozen=True)
class RacedValueMemory(ValueMemory):
    """A value storage that another party races: right after a listing, ``victim`` (once set)
    is evicted behind the lister's back, as another process's gc would."""

    victim: Digest | None = None

    def list(self) -> Iterable[Digest]:
        keys = super().list()
        if self.victim is not None and self.victim in self.storage:
            del self.storage[self.victim]
        return keys

    __hash__ = ValueMemory.__hash__
    __eq__ = ValueMemory.__eq__


def cache_on(kind: str, tmp_path: Any) -> Cache:
    """A real cache of the given kind: ``memory``, ``pickle`` (pickle files for values and
    calls), ``index`` (pickle-file values, call records in ``tmp_path/index.sqlite``, the
    default directory layout) or ``sqlite`` (pickle-file values, SQLite call records through
    ``Sql``; skips without SQLAlchemy)."""
    import pytest

    from fleche.storage import CallDirectoryIndex, CallPickleFile, ValuePickleFile

    if kind == "memory":
        return Cache(ValueMemory(), CallMemory())
    values = ValuePickleFile(root=tmp_path / "values")
    if kind == "pickle":
        return Cache(values, CallPickleFile(root=tmp_path / "calls"))
    if kind == "index":
        return Cache(values, CallDirectoryIndex(root=tmp_path))
    pytest.importorskip("sqlalchemy")
    from fleche.storage import Sql

    return Cache(values, Sql(str(tmp_path / "calls.sqlite")))


@dataclass(frozen=True)
class FaultMixin(OperationContext):
    """Raises the exception ``faults[intent]`` (``"read"`` or ``"write"``), once one is set, on
    every operation of that kind: a storage that starts failing the way a dead disk or server
    would, raising a plain ``OSError`` rather than any fleche error."""

    faults: dict = field(default_factory=dict, compare=False, repr=False)

    def _operation_context(self, key, *, intent=Intent.WRITE):
        fault = self.faults.get(str(intent))
        if fault is not None:
            raise fault
        return super()._operation_context(key, intent=intent)


@dataclass(frozen=True)
class FaultyCallMemory(FaultMixin, CallMemory):
    """A call storage in memory that fails on command (see :class:`FaultMixin`)."""

    __hash__ = CallMemory.__hash__
    __eq__ = CallMemory.__eq__


def plant(cache: Cache, key: Any, kind: str) -> None:
    """Put an intact entry that is not a call record under the call key ``key``: a value
    written raw, or a destructured one, as a value storage on the calls directory writes it
    (in the index layout: that entry as the key's row)."""
    import tempfile

    from fleche.storage import DirectoryIndexBackend, PickleFileBackend, ValuePickleFile

    if isinstance(cache.calls, DirectoryIndexBackend):
        scratch = tempfile.mkdtemp()
        if kind == "a value":
            PickleFileBackend(scratch).put({"not": "a call"}, key)
        else:
            ValuePickleFile(scratch).save(["a", "destructured", "list"], key)
        DirectoryIndexBackend(cache.calls.root).put(PickleFileBackend(scratch).get(key), key)
    elif kind == "a value":
        PickleFileBackend(cache.calls.root).put({"not": "a call"}, key)
    else:
        ValuePickleFile(cache.calls.root).save(["a", "destructured", "list"], key)
