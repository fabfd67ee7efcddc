"""Memory and void storages under the shared storage contract."""

import pytest

from fleche.digest import digest
from fleche.storage import CallMemory, CallVoid, ValueMemory, ValueVoid
from fleche.testing import CallStorageTests, ValueStorageTests
from tests_support import SerializingCallMemory, SerializingValueMemory


class TestValueMemory(ValueStorageTests):
    def make_storage(self, tmp_path):
        return ValueMemory()


class TestCallMemory(CallStorageTests):
    def make_storage(self, tmp_path):
        return CallMemory()


class TestSerializingValueMemory(ValueStorageTests):
    def make_storage(self, tmp_path):
        return SerializingValueMemory()


class TestSerializingCallMemory(CallStorageTests):
    def make_storage(self, tmp_path):
        return SerializingCallMemory()


class TestValueVoid(ValueStorageTests):
    persistent = False

    def make_storage(self, tmp_path):
        return ValueVoid()


class TestCallVoid(CallStorageTests):
    persistent = False

    def make_storage(self, tmp_path):
        return CallVoid()


def test_void_accepts_and_forgets():
    values = ValueVoid()
    key = values.save([1, 2])
    assert key == digest([1, 2])
    assert not values.contains(key)
    assert list(values.list()) == []


def test_memory_handles_on_one_dict_are_one_storage():
    shared = {}
    a, b = ValueMemory(storage=shared), ValueMemory(storage=shared)
    assert a == b and hash(a) == hash(b)
    assert ValueMemory() != ValueMemory()
    key = a.save("x")
    assert b.load(key) == "x"


def test_pickled_memory_storage_is_a_copy():
    import pickle

    values = ValueMemory()
    key = values.save("kept")
    copy = pickle.loads(pickle.dumps(values))
    assert copy.load(key) == "kept"
    copy.save("only in the copy")
    assert not values.contains(digest("only in the copy"))


@pytest.mark.parametrize("cls", [ValueMemory, SerializingValueMemory])
def test_lock_tables_are_fresh_after_pickling(cls):
    import pickle

    storage = cls()
    held = storage._get_key_lock("abcd") if hasattr(storage, "_get_key_lock") else storage._lock
    with held:
        copy = pickle.loads(pickle.dumps(storage))
        lock = copy._get_key_lock("abcd") if hasattr(copy, "_get_key_lock") else copy._lock
        assert lock.acquire(blocking=False)
        lock.release()
