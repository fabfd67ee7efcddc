"""Storage classes the tests compose from the public mixins."""

from dataclasses import dataclass

from fleche.storage import CallMemory, SerializingMixin, ValueMemory


@dataclass(frozen=True)
class SerializingValueMemory(SerializingMixin, ValueMemory):
    """A value memory storage serialized behind one lock."""


@dataclass(frozen=True)
class SerializingCallMemory(SerializingMixin, CallMemory):
    """A call memory storage serialized behind one lock."""
