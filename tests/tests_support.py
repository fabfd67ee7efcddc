"""Storage classes the tests compose from the public mixins."""

from dataclasses import dataclass

from fleche.storage import CallMemory, SerializingMixin, ValueMemory


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
