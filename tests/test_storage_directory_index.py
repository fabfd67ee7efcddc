"""The index layout's call storage: records as rows of ``DIR/index.sqlite``."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sqlite3

import pytest

from fleche.caches import Cache
from fleche.call import Call
from fleche.errors import DatabaseError, SignatureError
from fleche.storage.directory_index import INDEX_NAME, CallDirectoryIndex, check_local
from fleche.storage.pickle_file import ValuePickleFile, seal_pickle
from fleche.testing import (
    CacheTests,
    CallStorageTests,
    assert_corrupt_entry_is_reported_and_evictable,
    flip_a_byte_of_row,
)


class TestCallDirectoryIndex(CallStorageTests):
    shared_between_processes = True

    def make_storage(self, tmp_path):
        return CallDirectoryIndex(tmp_path / "store")


class TestSignedCallDirectoryIndex(CallStorageTests):
    shared_between_processes = True

    def make_storage(self, tmp_path):
        return CallDirectoryIndex(tmp_path / "store", secret_key=[b"new key", "old key"])


class TestCompressedCallDirectoryIndex(CallStorageTests):
    def make_storage(self, tmp_path):
        return CallDirectoryIndex(tmp_path / "store", compression="zlib")


class TestCacheOnDirectoryIndex(CacheTests):
    def make_store(self, tmp_path):
        return Cache(
            ValuePickleFile(tmp_path / "values", lock_timeout=30),
            CallDirectoryIndex(tmp_path, lock_timeout=30),
        )

    def wrap(self, store):
        return store


def _call(i: int) -> Call:
    return Call("f", {"x": "%064x" % i}, result="%064x" % (i + 1)).digest()


def _raw_entry(storage: CallDirectoryIndex, key: str) -> bytes:
    with sqlite3.connect(storage.index_path()) as conn:
        return conn.execute("SELECT entry FROM calls WHERE key = ?", (key,)).fetchone()[0]


def _set_raw_entry(storage: CallDirectoryIndex, key: str, entry: bytes) -> None:
    conn = sqlite3.connect(storage.index_path())
    with conn:
        conn.execute("UPDATE calls SET entry = ? WHERE key = ?", (entry, key))
    conn.close()


def test_layout_on_disk(tmp_path):
    calls = CallDirectoryIndex(tmp_path)
    key = calls.save(_call(1))
    assert (tmp_path / INDEX_NAME).is_file()
    assert not (tmp_path / key[:2]).exists()  # no entry files
    with sqlite3.connect(tmp_path / INDEX_NAME) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT key, name FROM calls").fetchall() == [(key, "f")]


def test_a_flipped_byte_reads_as_corrupt(tmp_path):
    calls = CallDirectoryIndex(tmp_path)
    key = calls.save(_call(1))
    flip_a_byte_of_row(calls, key)
    assert_corrupt_entry_is_reported_and_evictable(
        calls, key, calls._location(key), "checksum"
    )


def test_a_truncated_row_reads_as_corrupt(tmp_path):
    calls = CallDirectoryIndex(tmp_path)
    key = calls.save(_call(1))
    _set_raw_entry(calls, key, _raw_entry(calls, key)[:-10])
    assert_corrupt_entry_is_reported_and_evictable(calls, key, calls._location(key), "trunc|short|length|checksum")


def test_a_row_moved_to_another_key_reads_as_corrupt(tmp_path):
    calls = CallDirectoryIndex(tmp_path, secret_key="k")
    one, two = calls.save(_call(1)), calls.save(_call(2))
    _set_raw_entry(calls, two, _raw_entry(calls, one))
    with pytest.raises(SignatureError):
        calls.load(two)
    assert calls.load(one) == _call(1)


def test_an_unsigned_row_is_refused_with_a_key(tmp_path):
    key = CallDirectoryIndex(tmp_path).save(_call(1))
    with pytest.raises(SignatureError):
        CallDirectoryIndex(tmp_path, secret_key="k").load(key)


def test_a_value_where_a_record_belongs(tmp_path):
    calls = CallDirectoryIndex(tmp_path)
    key = calls.save(_call(1))
    _set_raw_entry(calls, key, seal_pickle([1, 2], key, "pickle", ()))
    assert_corrupt_entry_is_reported_and_evictable(
        calls, key, calls._location(key), "holds a list, not a call record"
    )


def test_reads_of_a_store_not_there_create_nothing(tmp_path):
    calls = CallDirectoryIndex(tmp_path / "nothing")
    key = _call(1).to_lookup_key()
    assert not calls.contains(key) and list(calls.list()) == []
    with pytest.raises(KeyError):
        calls.load(key)
    assert calls.usage() == {} and calls.volume() == 0 and calls.contains_many([key]) == set()
    calls.touch([key])
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(KeyError):
        calls.evict(key)  # (takes the key's lock, whose file it creates)
    assert not (tmp_path / "nothing" / INDEX_NAME).exists()


def test_an_index_deleted_while_in_use_is_made_again(tmp_path):
    calls = CallDirectoryIndex(tmp_path)
    calls.save(_call(1))
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / (INDEX_NAME + suffix)).unlink(missing_ok=True)
    key = calls.save(_call(2))
    assert CallDirectoryIndex(tmp_path).list() == [key]


def test_close_then_use_again_from_threads(tmp_path):
    import threading

    calls = CallDirectoryIndex(tmp_path)
    calls.save(_call(1))
    seen = []
    ready, closed = threading.Event(), threading.Event()

    def other():
        seen.append(len(calls.list()))  # opens this thread's connection
        ready.set()
        closed.wait()
        seen.append(len(calls.list()))  # reopens after close()

    t = threading.Thread(target=other)
    t.start()
    ready.wait()
    calls.close()
    calls.save(_call(2))
    closed.set()
    t.join()
    assert seen == [1, 2]


def _save_in_child(calls: CallDirectoryIndex, i: int) -> None:
    calls.save(_call(i))


def test_a_forked_child_opens_its_own_connection(tmp_path):
    calls = CallDirectoryIndex(tmp_path)
    calls.save(_call(1))  # the parent's connection exists before the fork
    child = multiprocessing.get_context("fork").Process(target=_save_in_child, args=(calls, 2))
    child.start()
    child.join()
    assert child.exitcode == 0
    calls.save(_call(3))
    assert set(calls.list()) == {_call(i).to_lookup_key() for i in (1, 2, 3)}


def test_pickles_as_its_settings(tmp_path):
    calls = CallDirectoryIndex(tmp_path, lock_timeout=5)
    calls.save(_call(1))
    copy = pickle.loads(pickle.dumps(calls))
    assert copy == calls and copy.load(_call(1).to_lookup_key()) == _call(1)
    assert copy._connections is not calls._connections


def test_an_index_of_a_newer_format_is_refused(tmp_path):
    calls = CallDirectoryIndex(tmp_path)
    key = calls.save(_call(1))
    conn = sqlite3.connect(tmp_path / INDEX_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(DatabaseError, match="format 99"):
        CallDirectoryIndex(tmp_path).load(key)


def test_shrink_and_expand_use_neighbours(tmp_path):
    calls = CallDirectoryIndex(tmp_path)
    keys = [calls.save(_call(i)) for i in range(50)]
    short = calls.shrink(*keys)
    assert [calls.expand(s) for s in short] == keys
    ordered = sorted(keys)
    for k, s in zip(keys, short):
        others = [o for o in ordered if o != k]
        assert not any(o.startswith(s) for o in others)
        assert len(s) == 4 or any(o.startswith(s[:-1]) for o in others)


def test_a_local_directory_passes_the_network_check(tmp_path):
    check_local(str(tmp_path / "not yet"))
    assert os.path.isdir(tmp_path)


def test_newest_orders_by_the_recorded_start(tmp_path):
    calls = CallDirectoryIndex(tmp_path)
    keys = []
    for i, minute in enumerate([5, 1, 9, 3]):
        start = f"2026-01-01T10:{minute:02d}:00+00:00"
        keys.append(calls.save(_call(i).replace(metadata={"runtime": {"start": start}})))
    undated = calls.save(_call(9))
    assert calls.newest(3) == [keys[2], keys[0], keys[3]]
    assert calls.newest(10) == [keys[2], keys[0], keys[3], keys[1], undated]
    assert calls.newest(0) == [] and CallDirectoryIndex(tmp_path / "none").newest(5) == []
    with pytest.raises(ValueError, match="limit"):
        calls.newest(-1)

