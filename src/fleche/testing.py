"""The storage and cache contracts, as pytest test classes every storage's and cache's tests
subclass.

A storage's test module subclasses :class:`ValueStorageTests` or :class:`CallStorageTests` and
implements ``make_storage(tmp_path)``; capability flags switch groups of tests on or off::

    class TestValueMemory(ValueStorageTests):
        def make_storage(self, tmp_path):
            return ValueMemory()

A cache's test module subclasses :class:`CacheTests` and implements ``wrap(store)``, the cache
under test over a writable :class:`~fleche.caches.Cache`::

    class TestReadOnlyCache(CacheTests):
        writable = False

        def wrap(self, store):
            return ReadOnlyCache(store)

The thread and process tests (marked ``slow``) run at a small size by default and at full size
with ``FLECHE_STRESS=full`` in the environment.

Third-party storages and caches can run the same contracts. Requires pytest.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from .caches import BaseCache, Cache, ReadOnlyError, memory_cache
from .call import Call, DigestedCall, QueryCall
from .decorator import fleche
from .digest import Digest, digest
from .errors import CorruptEntryError, FlecheWarning
from .query import MatchCountError, QueryIterator
from .storage.base import AmbiguousDigestError, KeyManagement
from .storage.directory_index import DirectoryIndexBackend
from .storage.envelope import SECRET_KEY_ENV
from .storage.file import FileStorage
from .storage.object_store import ObjectStoreBackend

__all__ = [
    "CacheTests",
    "UNSORTED_DICTS",
    "CallStorageTests",
    "StorageTests",
    "ValueStorageTests",
    "assert_corrupt_entry_is_reported_and_evictable",
    "flip_a_byte",
    "flip_a_byte_of_object",
    "flip_a_byte_of_row",
    "key_orders",
]

FULL_SIZE = os.environ.get("FLECHE_STRESS") == "full"
"""Whether the ``slow`` thread and process tests run at full size (``FLECHE_STRESS=full``)."""


def _size(small: int, full: int) -> int:
    return full if FULL_SIZE else small


def assert_corrupt_entry_is_reported_and_evictable(
    storage: Any, key: Digest, location: Any, reason: str
) -> None:
    """A damaged entry: ``load`` raises ``CorruptEntryError`` naming key, location and
    ``reason`` (a regex); the entry still counts as stored, and ``evict`` removes it."""
    from .errors import CorruptEntryError

    with pytest.raises(CorruptEntryError, match=reason) as info:
        storage.load(key)
    assert info.value.key == key and info.value.location == str(location)
    assert key in str(info.value) and str(location) in str(info.value)
    assert storage.contains(key)
    storage.evict(key)
    assert not storage.contains(key)


def _sample_function(x: Any, y: Any = 0) -> Any:
    return (x, y)


def _unsorted_parameters(zeta: Any, alpha: Any, mid: Any) -> Any:
    return (zeta, alpha, mid)


class StorageTests:
    """Contract shared by value and call storages: keys, short digests, pickling, threads."""

    persistent: ClassVar[bool] = True
    """The storage keeps what is saved (False for void storages)."""
    shared_between_processes: ClassVar[bool] = False
    """Pickled copies in other processes see the same entries (file and database storages)."""
    locks_between_processes: ClassVar[bool] = True
    """With ``shared_between_processes``: ``locked`` sections exclude each other across
    processes too (False for object stores, whose locks reach one process's threads only)."""

    def make_storage(self, tmp_path: Any) -> KeyManagement:
        raise NotImplementedError

    def item(self, i: int) -> Any:
        """The i-th sample object to save; distinct i give distinct keys."""
        raise NotImplementedError

    def save(self, storage: Any, obj: Any) -> Digest:
        return storage.save(obj)

    def assert_loaded(self, storage: Any, key: Digest, obj: Any) -> None:
        raise NotImplementedError

    def key_of(self, obj: Any) -> Digest:
        """The key ``obj`` is saved under."""
        raise NotImplementedError

    @pytest.fixture
    def storage(self, tmp_path: Any) -> Any:
        return self.make_storage(tmp_path)

    @pytest.fixture(autouse=True)
    def _needs_persistence(self, request: Any) -> None:
        if request.node.get_closest_marker("persistent") and not self.persistent:
            pytest.skip(f"{type(self).__name__} keeps nothing")

    # -- keys -------------------------------------------------------------------------------

    @pytest.mark.persistent
    def test_round_trip(self, storage: Any) -> None:
        for i in range(5):
            key = self.save(storage, self.item(i))
            assert isinstance(key, Digest) and key.is_full
            self.assert_loaded(storage, key, self.item(i))

    @pytest.mark.persistent
    def test_contains_and_evict(self, storage: Any) -> None:
        key = self.save(storage, self.item(1))
        assert storage.contains(key)
        assert key in set(storage.list())
        storage.evict(key)
        assert not storage.contains(key)
        assert key not in set(storage.list())
        with pytest.raises(KeyError):
            storage.load(key)

    def test_missing_key(self, storage: Any) -> None:
        missing = digest("never stored")
        assert not storage.contains(missing)
        with pytest.raises(KeyError, match=missing[:8]):
            storage.load(missing)
        if self.persistent:
            with pytest.raises(KeyError):
                storage.evict(missing)
        else:
            storage.evict(missing)  # a storage that keeps nothing forgets by design: no error

    def test_shrink_of_a_key_not_stored(self, storage: Any) -> None:
        stored = self.save(storage, self.item(1))
        missing = self.key_of(self.item(2))
        with pytest.raises(KeyError, match=missing[:8]):
            storage.shrink(missing)
        with pytest.raises(KeyError):
            storage.shrink(stored, missing)

    @pytest.mark.parametrize("bad", ["", "../etc/passwd", "a/b", "XYZ", "abc", "g" * 64, "a" * 65])
    def test_invalid_keys_are_refused(self, storage: Any, bad: str) -> None:
        with pytest.raises(ValueError):
            storage.load(bad)
        with pytest.raises(ValueError):
            storage.evict(bad)

    def test_non_string_key_is_refused(self, storage: Any) -> None:
        with pytest.raises(TypeError, match="int"):
            storage.load(12345)

    @pytest.mark.persistent
    def test_contains_many(self, storage: Any) -> None:
        keys = [self.save(storage, self.item(i)) for i in range(3)]
        missing = self.key_of(self.item(99))
        asked = [keys[0], keys[1][:8], missing, "0000ffff", keys[2]]
        assert storage.contains_many(asked) == set(keys)
        assert storage.contains_many([]) == set()

    @pytest.mark.persistent
    def test_short_digests(self, storage: Any) -> None:
        keys = [self.save(storage, self.item(i)) for i in range(20)]
        shorts = storage.shrink(*keys)
        assert isinstance(shorts, tuple) and len(shorts) == len(keys)
        for key, short in zip(keys, shorts):
            assert key.startswith(short) and len(short) >= 4
            assert storage.expand(short) == key
            assert storage.contains(short)
            assert storage.shrink(key) == short
        self.assert_loaded(storage, storage.expand(shorts[3]), self.item(3))
        storage.evict(shorts[0])
        assert not storage.contains(keys[0])

    @pytest.mark.persistent
    def test_ambiguous_prefix(self, storage: Any) -> None:
        by_prefix: dict[str, int] = {}
        for i in range(5000):
            prefix = self.key_of(self.item(i))[:4]
            if prefix in by_prefix:
                a = self.save(storage, self.item(by_prefix[prefix]))
                b = self.save(storage, self.item(i))
                with pytest.raises(AmbiguousDigestError, match="at least"):
                    storage.expand(prefix)
                assert len(storage.shrink(a)) > 4 and storage.expand(storage.shrink(b)) == b
                return
            by_prefix[prefix] = i
        pytest.fail("no two sample keys share a 4-character prefix")

    @pytest.mark.persistent
    def test_usage_touch_and_volume(self, storage: Any) -> None:
        """Every entry's size and last use; a touch moves the use forward, never back."""
        keys = [self.save(storage, self.item(i)) for i in range(3)]
        usage = storage.usage()
        assert set(keys) <= set(usage)
        assert all(usage[k].size > 0 and usage[k].used >= 0 for k in keys)
        later = time.time() + 1000
        storage.touch([keys[0], keys[1][:8]], later)
        after = storage.usage()
        assert after[keys[0]].used == pytest.approx(later)
        assert after[keys[1]].used == pytest.approx(later) and after[keys[2]].used < later - 500
        storage.touch([keys[0]], later - 2000)
        assert storage.usage()[keys[0]].used == pytest.approx(later)
        missing = self.key_of(self.item(99))
        storage.touch([missing])
        assert missing not in storage.usage() and not storage.contains(missing)
        volume = storage.volume()
        assert volume is None or volume >= sum(u.size for u in after.values())
        storage.evict(keys[0])
        assert keys[0] not in storage.usage()

    def test_unknown_prefix(self, storage: Any) -> None:
        with pytest.raises(KeyError):
            storage.expand("0000ffff")
        assert not storage.contains("0000ffff")

    def test_prefix_too_short(self, storage: Any) -> None:
        with pytest.raises(ValueError, match="too short"):
            storage.expand("abc")

    # -- pickling ---------------------------------------------------------------------------

    def test_pickle_round_trip(self, storage: Any) -> None:
        key = self.save(storage, self.item(2)) if self.persistent else None
        copy = pickle.loads(pickle.dumps(storage))
        assert type(copy) is type(storage)
        if self.shared_between_processes:
            assert copy == storage
            self.assert_loaded(copy, key, self.item(2))
        # The copy's locks work: a second save through it is fine.
        self.save(copy, self.item(3))

    # -- threads ----------------------------------------------------------------------------

    @pytest.mark.slow
    @pytest.mark.persistent
    def test_threads_on_shared_keys(self, storage: Any) -> None:
        """8 threads save, load and check overlapping keys (12 saves each, 30 at full size);
        nothing is lost or torn."""

        def work(t: int) -> None:
            for n in range(_size(12, 30)):
                i = (t + n) % 12
                key = self.save(storage, self.item(i))
                self.assert_loaded(storage, key, self.item(i))
                assert storage.contains(key)

        _run_in_threads(8, work)
        for i in range(12):
            self.assert_loaded(storage, self.save(storage, self.item(i)), self.item(i))

    # -- compound sections ------------------------------------------------------------------

    def read_counter(self, storage: Any) -> int:
        """The counter kept in ``storage`` by :meth:`write_counter` (0 before the first)."""
        raise NotImplementedError

    def write_counter(self, storage: Any, n: int) -> None:
        raise NotImplementedError

    def counter_key(self) -> Digest:
        raise NotImplementedError

    @pytest.mark.slow
    @pytest.mark.persistent
    def test_locked_read_modify_write_threads(self, storage: Any) -> None:
        """8 threads increment one counter under ``locked`` (8 times each, 25 at full size); no
        increment is lost."""
        storage = _with_lock_timeout(storage, 60.0)  # eight writers queue on one key
        times = _size(8, 25)
        _run_in_threads(8, lambda _: _bump(storage, self, times))
        assert self.read_counter(storage) == 8 * times

    @pytest.mark.persistent
    def test_locked_is_reentrant(self, storage: Any) -> None:
        with storage.locked(self.counter_key()) as key:
            assert key == self.counter_key()
            with storage.locked(key):
                self.write_counter(storage, 1)
        assert self.read_counter(storage) == 1

    # -- processes --------------------------------------------------------------------------

    @pytest.mark.slow
    def test_processes_locked_read_modify_write(self, storage: Any) -> None:
        """3 processes x 2 threads increment one counter under ``locked`` (6 times each, 15 at
        full size); none is lost."""
        if not self.shared_between_processes:
            pytest.skip(f"{type(self).__name__} is private to one process")
        if not self.locks_between_processes:
            pytest.skip(f"{type(self).__name__} locks the threads of one process only")
        ctx = multiprocessing.get_context("spawn")
        # Six writers queue on one key: give slow backends on a loaded machine time to take turns.
        patient = _with_lock_timeout(storage, 60.0)
        times = _size(6, 15)
        with ctx.Pool(3) as pool:
            pool.starmap(_bump_in_threads, [(patient, self, 2, times)] * 3)
        assert self.read_counter(storage) == 3 * 2 * times

    @pytest.mark.parametrize("method", ["spawn", "fork"])
    def test_processes_share_entries(self, storage: Any, method: str) -> None:
        """4 processes save overlapping items through pickled copies; all see each other's."""
        if not self.shared_between_processes:
            pytest.skip(f"{type(self).__name__} is private to one process")
        ctx = multiprocessing.get_context(method)
        with ctx.Pool(4) as pool:
            results = pool.starmap(
                _save_items, [(storage, self, range(p, p + 12)) for p in range(0, 16, 4)]
            )
        for keys in results:
            for i, key in keys:
                self.assert_loaded(storage, key, self.item(i))


def _with_lock_timeout(storage: Any, timeout: float) -> Any:
    """A copy of ``storage`` that waits up to ``timeout`` for locks (itself if it waits for ever).

    A storage whose declared ``lock_timeout`` is not ``None`` has it as a dataclass setting.
    """
    if storage.lock_timeout is None:
        return storage
    return dataclasses.replace(storage, lock_timeout=timeout)


def _save_items(storage: Any, contract: StorageTests, indices: range) -> list[tuple[int, Digest]]:
    return [(i, contract.save(storage, contract.item(i))) for i in indices]


def _bump(storage: Any, contract: StorageTests, times: int) -> None:
    for _ in range(times):
        with storage.locked(contract.counter_key()):
            contract.write_counter(storage, contract.read_counter(storage) + 1)


def _bump_in_threads(storage: Any, contract: StorageTests, threads: int, times: int) -> None:
    _run_in_threads(threads, lambda _: _bump(storage, contract, times))


def _run_in_threads(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(i)`` for ``i`` in ``range(count)``, each in a thread, all starting together;
    re-raise the first failure once all have ended."""
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


_VALUES: list[Callable[[int], Any]] = [
    lambda i: i,
    lambda i: f"text {i}",
    lambda i: [i, [i + 1, i + 2], {"k": i}],
    lambda i: (i, None, 2.5 * i, b"bytes"),
    lambda i: {"nested": {"list": list(range(i % 7)), "t": (i,)}, "x": -i},
]


def key_orders(value: Any) -> Any:
    """``value`` with every dict as its type and list of (key, value) pairs, in order: equal
    for two values only if their dicts also list their keys in the same order."""
    if isinstance(value, dict):
        return (type(value), [(k, key_orders(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value), [key_orders(v) for v in value])
    if isinstance(value, _Holder):
        return (_Holder, key_orders(value.payload))
    return value


class _Holder:
    """An object no storage destructures, stored whole with the dicts inside it."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return type(other) is _Holder and key_orders(other.payload) == key_orders(self.payload)

    def __digest__(self) -> Any:
        return key_orders(self.payload)


class _Record(dict):
    """A dict subclass (kept whole by destructuring, which takes plain dicts apart)."""


UNSORTED_DICTS: list[Any] = [
    {"b": 1, "a": 2},
    {"00": None, "0": None},
    {"z": {"y": 1, "x": {"w": 2, "v": 3}}, "a": [{"d": 1, "c": 2}, ({"f": 1, "e": 2},)]},
    {f"k{i}": i for i in range(12, 0, -1)},
    {"é": 1, "e": 2, "Z": 3},
    {2: "b", 1: "a", "0": None},
    _Record(b=1, a={"d": 1, "c": 2}),
    _Holder({"b": 1, "a": {"d": 1, "c": 2}}),
    [_Holder([{"b": 1, "a": 2}])],
]
"""Values whose dicts list their keys out of sorted order, for checking a storage keeps it."""


class ValueStorageTests(StorageTests):
    """Contract for value storages."""

    def item(self, i: int) -> Any:
        return _VALUES[i % len(_VALUES)](i)

    def assert_loaded(self, storage: Any, key: Digest, obj: Any) -> None:
        loaded = storage.load(key)
        assert loaded == obj and type(loaded) is type(obj)

    def key_of(self, obj: Any) -> Digest:
        return digest(obj)

    def counter_key(self) -> Digest:
        return digest("fleche contract counter")

    def read_counter(self, storage: Any) -> int:
        try:
            return storage.load(self.counter_key())
        except KeyError:
            return 0

    def write_counter(self, storage: Any, n: int) -> None:
        storage.save(n, self.counter_key())

    @pytest.mark.persistent
    def test_key_is_content_digest(self, storage: Any) -> None:
        value = {"a": [1, 2.0, (3, "x")], "b": None}
        assert storage.save(value) == digest(value)
        assert storage.save(value) == digest(value)

    @pytest.mark.persistent
    def test_explicit_key(self, storage: Any) -> None:
        key = digest("my key")
        assert storage.save([1, 2], key) == key
        assert storage.load(key) == [1, 2]

    @pytest.mark.persistent
    def test_types_survive(self, storage: Any) -> None:
        for value in [(), [], {}, [()], ((1,),), {"a": ()}, True, 1, 1.0, -0.0, None, "", b""]:
            self.assert_loaded(storage, storage.save(value), value)

    @pytest.mark.persistent
    def test_dicts_keep_their_key_order(self, storage: Any) -> None:
        """A loaded dict lists its keys in the order they had when saved (equal dicts in
        another order are another result to whoever iterates them), nested ones too."""
        for value in UNSORTED_DICTS:
            loaded = storage.load(storage.save(value))
            assert key_orders(loaded) == key_orders(value), value


class CallStorageTests(StorageTests):
    """Contract for call storages."""

    def item(self, i: int) -> DigestedCall:
        call = Call.from_call(_sample_function, i, y=i % 3).replace(
            result=(i, i % 3), metadata={"runtime": {"host": f"h{i % 2}", "n": i}}
        )
        return call.digest()

    def assert_loaded(self, storage: Any, key: Digest, obj: Any) -> None:
        loaded = storage.load(key)
        assert loaded == obj
        assert loaded.to_lookup_key() == key

    def key_of(self, obj: Any) -> Digest:
        return obj.to_lookup_key()

    def _counter_call(self, n: int) -> Call:
        return Call.from_call(_sample_function, "counter").replace(metadata={"counter": {"n": n}})

    def counter_key(self) -> Digest:
        return self._counter_call(0).to_lookup_key()

    def read_counter(self, storage: Any) -> int:
        try:
            return storage.load(self.counter_key()).metadata["counter"]["n"]
        except KeyError:
            return 0

    def write_counter(self, storage: Any, n: int) -> None:
        storage.save(self._counter_call(n))

    @pytest.mark.persistent
    def test_key_is_lookup_key(self, storage: Any) -> None:
        call = self.item(7)
        assert storage.save(call) == call.to_lookup_key()

    @pytest.mark.persistent
    def test_newest(self, storage: Any) -> None:
        starts = ["2026-01-03T00:00:00+00:00", "2026-01-01T00:00:00+00:00", None,
                  "2026-01-02T00:00:00+00:00"]
        keys = []
        for i, start in enumerate(starts):
            runtime = {"host": "h"} if start is None else {"start": start}
            keys.append(storage.save(self.item(i).replace(metadata={"runtime": runtime})))
        assert storage.newest(2) == [keys[0], keys[3]]
        assert storage.newest(10) == [keys[0], keys[3], keys[1], keys[2]]  # no start: last
        assert storage.newest(0) == []

    @pytest.mark.persistent
    def test_dicts_keep_their_key_order(self, storage: Any) -> None:
        """Arguments come back in the function's parameter order and metadata dicts in the
        order they were saved in."""
        metadata = {"runtime": {"start": None, "host": "h"}, "b": {"y": [{"d": 1, "c": 2}]}, "a": {}}
        call = Call.from_call(_unsorted_parameters, 1, 2, 3).replace(result=[1], metadata=metadata)
        loaded = storage.load(storage.save(call.digest()))
        assert list(loaded.arguments) == ["zeta", "alpha", "mid"]
        assert key_orders(loaded.metadata) == key_orders(metadata)

    @pytest.mark.persistent
    def test_save_accepts_undigested_call(self, storage: Any) -> None:
        call = Call.from_call(_sample_function, [1, 2]).replace(result=[1, 2])
        key = storage.save(call)
        assert storage.load(key) == call.digest()

    @pytest.mark.persistent
    def test_resave_replaces_metadata(self, storage: Any) -> None:
        call = self.item(4)
        key = storage.save(call)
        storage.save(call.replace(metadata={"runtime": {"host": "other"}}))
        assert storage.load(key).metadata == {"runtime": {"host": "other"}}

    @pytest.mark.persistent
    def test_query(self, storage: Any) -> None:
        calls = [self.item(i) for i in range(9)]
        for call in calls:
            storage.save(call)

        def found(template: QueryCall) -> set[Digest]:
            return {c.to_lookup_key() for c in storage.query(template)}

        def expected(pred: Callable[[int], bool]) -> set[Digest]:
            return {calls[i].to_lookup_key() for i in range(9) if pred(i)}

        assert found(QueryCall()) == expected(lambda i: True)
        assert found(QueryCall(name="_sample_function")) == expected(lambda i: True)
        assert found(QueryCall(name="other")) == set()
        assert found(QueryCall(arguments={"y": 1})) == expected(lambda i: i % 3 == 1)
        assert found(QueryCall(arguments={"y": digest(1)})) == expected(lambda i: i % 3 == 1)
        assert found(QueryCall(arguments={"x": 4, "y": 1})) == expected(lambda i: i == 4)
        assert found(QueryCall(arguments={"nope": 1})) == set()
        assert found(QueryCall(result=(5, 2))) == expected(lambda i: i == 5)
        assert found(QueryCall(metadata={"runtime": {"host": "h1"}})) == expected(lambda i: i % 2)
        assert found(QueryCall(metadata={"runtime": {}})) == expected(lambda i: True)
        assert found(QueryCall(metadata={"other": {}})) == set()

    @pytest.mark.persistent
    def test_transform_rekeys(self, storage: Any) -> None:
        keys = [storage.save(self.item(i)) for i in range(4)]
        storage.transform(lambda c: c.replace(version="2"))
        new = {c.to_lookup_key() for c in storage.query(QueryCall(version="2"))}
        assert len(new) == 4 and not new & set(keys)
        assert set(storage.list()) == new
        storage.transform()
        assert set(storage.list()) == new


# -- the cache contract -------------------------------------------------------------------------


def flip_a_byte(path: str | Path, offset: int = -3) -> None:
    """Invert one byte of the file at ``path`` (by default inside the payload, near the end), as
    a disk or a network might: a checked entry then reads as corrupt."""
    with open(path, "r+b") as f:
        f.seek(offset, 2)
        byte = f.read(1)
        f.seek(offset, 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def flip_a_byte_of_object(storage: ObjectStoreBackend, key: Digest, offset: int = -3) -> None:
    """Invert one byte of the object of ``key`` in an object storage (by default inside the
    payload), and put it back whole: the entry then reads as corrupt."""
    fs, path = storage._object_path(key)
    data = bytearray(fs.cat_file(path))
    data[offset] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def flip_a_byte_of_row(storage: Any, key: Digest, offset: int = -3) -> None:
    """Invert one byte of the database row that holds the entry ``key``, written back in place
    as a bad sector would leave it, so the entry then reads as corrupt: the call record's row
    of a :class:`~fleche.storage.directory_index.CallDirectoryIndex`, or the value's last chunk
    in a :class:`~fleche.storage.SqlValues` (by default a byte inside the payload)."""
    if isinstance(storage, DirectoryIndexBackend):
        import sqlite3

        with sqlite3.connect(storage.index_path()) as conn:
            (entry,) = conn.execute("SELECT entry FROM calls WHERE key = ?", (key,)).fetchone()
            data = bytearray(entry)
            data[offset] ^= 0xFF
            conn.execute("UPDATE calls SET entry = ? WHERE key = ?", (bytes(data), key))
        conn.close()
        return
    import sqlalchemy as sa

    from .storage.sql.schema import value_chunks, values

    with storage.sql._connect().engine.begin() as conn:
        chunks = conn.execute(sa.select(values.c.chunks).where(values.c.key == key)).scalar_one()
        table = values if chunks == 1 else value_chunks
        where = [table.c.key == key] + ([] if chunks == 1 else [table.c.n == chunks - 1])
        data = bytearray(conn.execute(sa.select(table.c.data).where(*where)).scalar_one())
        data[offset] ^= 0xFF
        conn.execute(sa.update(table).where(*where).values(data=bytes(data)))


_BIG = 4096  # characters: results this long are never kept inline in a call record


def _sample_call(i: int, name: str = "sample", big: bool = False) -> Call:
    return Call(
        name, {"x": i}, module="fleche.testing", result=_sample_result(i, big),
        metadata={"runtime": {"host": f"h{i % 2}"}},
    )


def _sample_result(i: int, big: bool = False) -> Any:
    return "r" * _BIG + str(i) if big else {"x": i, "square": i * i}


def _timed_call(i: int, minute: int) -> Call:
    """A sample call with runtime metadata as the decorator records it, started at ``minute``."""
    start = f"2026-01-01T10:{minute:02d}:00+00:00"
    return _sample_call(i).replace(
        metadata={"runtime": {"start": start, "wall_time": 0.5, "host": "h"}}
    )


def _two_sharing_a_prefix() -> tuple[int, int]:
    """Two ints whose digests share their first four characters."""
    by_prefix: dict[str, int] = {}
    for i in range(100_000):
        prefix = digest(i)[:4]
        if prefix in by_prefix:
            return by_prefix[prefix], i
        by_prefix[prefix] = i
    raise AssertionError("no two ints share a digest prefix")


def _xs(calls: Any) -> list[Any]:
    return [c.arguments["x"] for c in calls]


def _is_sql_values(storage: Any) -> bool:
    """Whether ``storage`` is an ``SqlValues`` (without importing SQLAlchemy where no storage
    can be one)."""
    module = sys.modules.get("fleche.storage.sql.values")
    return module is not None and isinstance(storage, module.SqlValueBackend)


def _parity(i: int) -> str:
    return "odd" if i % 2 else "even"


class CacheTests:
    """Contract for caches: every operation that :class:`~fleche.caches.BaseCache` declares.

    Subclasses implement :meth:`wrap`; :meth:`make_store` gives the writable
    :class:`~fleche.caches.Cache` underneath, which the tests also use as "another writer" to
    put entries where the cache under test should find them. The default store is in memory;
    corrupt-entry tests need a store over file, object or SQL value storages (they
    skip otherwise), whose entries :meth:`damage` flips a byte of.
    """

    writable: ClassVar[bool] = True
    """The cache saves, evicts, discards and collects (False for read-only caches, which must
    refuse each of those with :class:`~fleche.caches.ReadOnlyError`)."""
    serves_results: ClassVar[bool] = True
    """``load_result`` returns what is stored (False for a cache that always computes again,
    whose ``load_result`` must miss however the store is)."""

    def result(self, cache: BaseCache, key: Digest | str) -> Any:
        """The stored result of ``key`` as ``cache`` has it (``load`` where ``load_result``
        misses on purpose)."""
        if self.serves_results:
            return cache.load_result(key)
        with pytest.raises(KeyError):
            cache.load_result(key)
        return cache.load(key).result

    @property
    def hits(self) -> bool:
        """Whether a decorated call through the cache is served from the store."""
        return self.writable and self.serves_results

    def make_store(self, tmp_path: Any) -> Cache:
        """The writable cache the cache under test works over."""
        return memory_cache()

    def wrap(self, store: Cache) -> BaseCache:
        """The cache under test, over ``store``."""
        raise NotImplementedError

    def damage(self, store: Cache, key: Digest) -> None:
        """Flip a byte of the entry ``key`` (a call record or a value) in ``store``'s files or
        objects."""
        for storage in (store.calls, store.values):
            if (
                isinstance(storage, DirectoryIndexBackend) or _is_sql_values(storage)
            ) and storage.contains(key):
                flip_a_byte_of_row(storage, storage.expand(key))
                return
            if isinstance(storage, FileStorage) and storage.contains(key):
                flip_a_byte(storage._path(storage.expand(key)))
                return
            if isinstance(storage, ObjectStoreBackend) and storage.contains(key):
                flip_a_byte_of_object(storage, storage.expand(key))
                return
        pytest.skip(
            f"{type(self).__name__}: only entries kept in files, objects or value rows can be "
            "damaged"
        )

    @pytest.fixture
    def store(self, tmp_path: Any) -> Cache:
        return self.make_store(tmp_path)

    @pytest.fixture
    def cache(self, store: Cache) -> BaseCache:
        return self.wrap(store)

    def refused(self) -> Any:
        return pytest.raises(ReadOnlyError, match="read-only")

    # -- lookups ----------------------------------------------------------------------------

    def test_writable_flag(self, cache: BaseCache) -> None:
        assert cache.writable is self.writable

    def test_miss(self, cache: BaseCache) -> None:
        key = _sample_call(0).to_lookup_key()
        assert not cache.contains(key)
        with pytest.raises(KeyError):
            cache.load_result(key)
        with pytest.raises(KeyError):
            cache.load(key)
        with pytest.raises(KeyError):
            cache.expand(key[:10])
        assert cache.contains_many([key]) == set()
        assert list(cache.list()) == []

    def test_hit(self, store: Cache, cache: BaseCache) -> None:
        key = store.save(_sample_call(1))
        missing = _sample_call(2).to_lookup_key()
        assert cache.contains(key) and cache.contains(key[:8])
        assert self.result(cache, key) == _sample_result(1)
        loaded = cache.load(key[:8])
        assert loaded.arguments == {"x": 1} and loaded.result == _sample_result(1)
        assert loaded.to_lookup_key() == key and loaded.metadata == {"runtime": {"host": "h1"}}
        assert set(cache.list()) == {key}
        assert cache.contains_many([key[:8], missing]) == {key}
        assert cache.expand(key[:8]) == key
        short = cache.shrink(key)
        assert key.startswith(short) and cache.expand(short) == key
        assert cache.shrink(key, key) == (short, short)

    def test_newest(self, store: Cache, cache: BaseCache) -> None:
        keys = [
            store.save(_sample_call(i).replace(metadata={"runtime": {"start": f"2026-01-0{d}"}}))
            for i, d in enumerate([2, 3, 1])
        ]
        assert cache.newest(2) == [keys[1], keys[0]]
        assert cache.newest(5) == [keys[1], keys[0], keys[2]]

    def test_shrink_of_a_key_not_stored(self, store: Cache, cache: BaseCache) -> None:
        stored = store.save(_sample_call(1))
        missing = _sample_call(2).to_lookup_key()
        with pytest.raises(KeyError):
            cache.shrink(missing)
        with pytest.raises(KeyError):
            cache.shrink(stored, missing)

    def test_query(self, store: Cache, cache: BaseCache) -> None:
        for i in range(6):
            store.save(_sample_call(i, name="odd" if i % 2 else "even"))
        assert sorted(c.arguments["x"] for c in cache.query()) == list(range(6))
        assert [c.result for c in cache.query(x=3)] == [_sample_result(3)]
        assert sorted(c.arguments["x"] for c in cache.query(QueryCall(name="odd"))) == [1, 3, 5]
        assert [c.result for c in cache.query(QueryCall(name="odd"), x=5)] == [_sample_result(5)]
        assert list(cache.query(QueryCall(name="odd"), x=4)) == []

    def test_query_skips_a_record_it_cannot_read(self, store: Cache, cache: BaseCache) -> None:
        keys = [store.save(_sample_call(i)) for i in range(3)]
        self.damage(store, keys[1])
        with pytest.warns(FlecheWarning, match=keys[1]):
            assert sorted(c.arguments["x"] for c in cache.query()) == [0, 2]

    # -- writes -----------------------------------------------------------------------------

    def test_save(self, store: Cache, cache: BaseCache) -> None:
        call = _sample_call(3)
        key = call.to_lookup_key()
        if not self.writable:
            with self.refused():
                cache.save(call)
            with self.refused():
                cache.save(call, overwrite=True)
            assert not store.contains(key)
            return
        assert cache.save(call) == key
        assert self.result(cache, key) == store.load_result(key) == _sample_result(3)
        assert cache.save(call.replace(metadata={"run": {"n": 2}}), overwrite=True) == key
        assert store.load(key).metadata == {"run": {"n": 2}}

    def test_a_save_repairs_a_value_that_lost_a_part(self, store: Cache, cache: BaseCache) -> None:
        """A destructured result whose element is gone reads as a miss; saving the call again
        writes the element back (a call is never recomputed for ever)."""
        result = [_sample_result(1, big=True), _sample_result(2, big=True)]
        call = _sample_call(8).replace(result=result)
        key = store.save(call)
        parts = store.values.child_digests(store.calls.load(key).result)
        if not parts:
            pytest.skip(f"{type(store.values).__name__} keeps values whole")
        store.values.evict(sorted(parts)[0])
        with pytest.raises(KeyError):
            cache.load_result(key)
        if not self.writable:
            with self.refused():
                cache.save(call)
            return
        assert cache.save(call) == key
        assert self.result(cache, key) == store.load_result(key) == call.result

    def test_evict(self, store: Cache, cache: BaseCache) -> None:
        key = store.save(_sample_call(4))
        if not self.writable:
            with self.refused():
                cache.evict(key)
            assert store.contains(key)
            return
        cache.evict(key[:8])
        assert not cache.contains(key) and not store.contains(key)
        with pytest.raises(KeyError):
            cache.evict(key)

    def test_discard(self, store: Cache, cache: BaseCache) -> None:
        key = store.save(_sample_call(5, big=True))
        result = store.calls.load(key).result
        if not self.writable:
            with self.refused():
                cache.discard(result)
            assert store.load_result(key) == _sample_result(5, big=True)
            return
        cache.discard(result)  # a value: the call is left without its result, a miss
        with pytest.raises(KeyError):
            cache.load_result(key)
        cache.discard(key)  # a record
        assert not cache.contains(key) and not store.contains(key)
        cache.discard(key)  # nothing there any more: nothing to do

    def test_locked_section(self, cache: BaseCache) -> None:
        call = _sample_call(6)
        key = call.to_lookup_key()
        if not self.writable:
            with self.refused():
                with cache.locked(key):
                    pass
            return
        with cache.locked(key) as full:
            assert full == key
            with cache.locked(key):  # reentrant, and saving the call inside is allowed
                cache.save(call)
        assert self.result(cache, key) == _sample_result(6)

    # -- through the decorator --------------------------------------------------------------

    def test_decorated_hits_and_misses(self, store: Cache, cache: BaseCache) -> None:
        runs: list[int] = []

        @fleche(cache=cache)
        def square(x: int) -> dict:
            runs.append(x)
            return {"square": x * x}

        store.save(square.call(1).replace(result={"square": 1}))
        assert square(1) == {"square": 1}
        assert runs == ([] if self.serves_results else [1])  # stored by another writer: a hit
        runs.clear()
        assert square(2) == {"square": 4} and runs == [2]
        assert square(2) == {"square": 4}
        assert runs == ([2] if self.hits else [2, 2])
        assert store.contains(square.digest(2)) is self.writable

    @pytest.mark.parametrize("entry", ["record", "result value"])
    def test_corrupt_entry_is_recomputed(self, store: Cache, cache: BaseCache, entry: str) -> None:
        """A damaged entry reads as a miss: the call runs, and a writable cache repairs it."""
        runs: list[int] = []

        @fleche(cache=cache)
        def big(x: int) -> str:
            runs.append(x)
            return _sample_result(x, big=True)

        key = store.save(big.call(1).replace(result=_sample_result(1, big=True)))
        self.damage(store, key if entry == "record" else store.calls.load(key).result)
        with pytest.warns(FlecheWarning, match="corrupt"):
            assert big(1) == _sample_result(1, big=True)
        assert runs == [1]
        if self.writable:
            assert store.load_result(key) == _sample_result(1, big=True)  # repaired
            assert big(1) == _sample_result(1, big=True)
            assert runs == ([1] if self.serves_results else [1, 1])  # a hit again
        else:
            with pytest.raises(CorruptEntryError):
                store.load_result(key)  # a read-only cache changes nothing
            with pytest.warns(FlecheWarning, match="corrupt"):
                assert big(1) == _sample_result(1, big=True)
            assert runs == [1, 1]

    def test_an_entry_signed_with_another_key_is_left_alone(
        self, store: Cache, cache: BaseCache, monkeypatch: Any
    ) -> None:
        """An entry this process cannot verify may be another process's, signed with its key:
        the call runs uncached with a warning, and the entry is neither evicted nor replaced."""
        if not isinstance(store.calls, (FileStorage, ObjectStoreBackend)):
            pytest.skip(f"{type(self).__name__}: only entries kept in files or objects are signed")
        runs: list[int] = []

        @fleche(cache=cache)
        def big(x: int) -> str:
            runs.append(x)
            return _sample_result(x, big=True)

        monkeypatch.setenv(SECRET_KEY_ENV, "theirs")
        key = store.save(big.call(1).replace(result=_sample_result(1, big=True)))
        monkeypatch.setenv(SECRET_KEY_ENV, "ours")
        for _ in range(2):
            with pytest.warns(FlecheWarning, match="secret key"):
                assert big(1) == _sample_result(1, big=True)
        assert runs == [1, 1]
        monkeypatch.setenv(SECRET_KEY_ENV, "theirs")
        assert store.load_result(key) == _sample_result(1, big=True)  # as they left it

    def test_compute_once_across_threads(self, cache: BaseCache) -> None:
        """Six threads miss one key at once; with compute_once the body runs once."""
        runs: list[int] = []

        @fleche(cache=cache, compute_once=True)
        def slow(x: int) -> int:
            runs.append(x)
            threading.Event().wait(0.05)  # the work being deduplicated, not synchronization
            return x * 10

        def work(_: int) -> None:
            assert slow(7) == 70

        _run_in_threads(6, work)
        assert runs == ([7] if self.hits else [7] * 6)

    # -- whole stores -----------------------------------------------------------------------

    def test_transfer(self, store: Cache, cache: BaseCache) -> None:
        keys = [store.save(_sample_call(i)) for i in range(3)]
        target = memory_cache()
        target.save(_sample_call(0))
        seen: list[tuple[int, int]] = []
        assert cache.transfer(target, progress=lambda done, total: seen.append((done, total))) == 2
        assert seen == [(1, 3), (2, 3), (3, 3)]
        assert cache.transfer(target) == 0
        assert [target.load_result(k) for k in keys] == [_sample_result(i) for i in range(3)]
        source = memory_cache()
        new = source.save(_sample_call(9))
        if not self.writable:
            with self.refused():
                source.transfer(cache)
            return
        assert source.transfer(cache) == 1
        assert self.result(cache, new) == store.load_result(new) == _sample_result(9)

    def test_gc(self, store: Cache, cache: BaseCache) -> None:
        kept = store.save(_sample_call(1, big=True))
        dropped = store.save(_sample_call(2, big=True))
        garbage = store.calls.load(dropped).result
        orphan = store.values.save({"referenced by": "nothing"})
        store.evict(dropped)
        if not self.writable:
            with self.refused():
                cache.gc()
            with self.refused():
                cache.gc(dry_run=True)
            assert store.values.contains(orphan)
            return
        would = cache.gc(dry_run=True)
        assert isinstance(would, set) and {garbage, orphan} <= would
        assert store.values.contains(garbage) and store.values.contains(orphan)
        assert cache.gc() == would
        assert not store.values.contains(garbage) and not store.values.contains(orphan)
        assert cache.gc() == set()
        assert self.result(cache, kept) == _sample_result(1, big=True)

    def test_pickle_round_trip(self, store: Cache, cache: BaseCache) -> None:
        key = store.save(_sample_call(1))
        copy = pickle.loads(pickle.dumps(cache))
        assert type(copy) is type(cache)
        assert self.result(copy, key) == _sample_result(1)
        assert copy.writable is self.writable

    def test_close_then_use_again(self, store: Cache, cache: BaseCache) -> None:
        key = store.save(_sample_call(1))
        cache.close()
        assert self.result(cache, key) == _sample_result(1)

    def test_transfer_overwrite_and_pop(self, store: Cache, cache: BaseCache) -> None:
        keys = [store.save(_sample_call(i)) for i in range(3)]
        target = memory_cache()
        target.save(_sample_call(0).replace(metadata={"runtime": {"host": "old"}}))
        assert cache.transfer(target, overwrite=True) == 3
        assert target.load(keys[0]).metadata == {"runtime": {"host": "h0"}}
        moved = memory_cache()
        if not self.writable:
            with self.refused():
                cache.transfer(moved, pop=True)
            assert all(store.contains(k) for k in keys) and list(moved.list()) == []
            return
        assert cache.transfer(moved, pop=True) == 3
        assert list(cache.list()) == [] and not any(store.contains(k) for k in keys)
        assert [moved.load_result(k) for k in keys] == [_sample_result(i) for i in range(3)]

    # -- live queries -----------------------------------------------------------------------

    def test_query_is_live_and_reiterable(self, store: Cache, cache: BaseCache) -> None:
        query = cache.query(QueryCall(name="sample"))
        assert isinstance(query, QueryIterator)
        assert query.empty() and query.count() == 0 and query.keys() == []
        keys = [store.save(_sample_call(i)) for i in range(3)]
        assert not query.empty() and query.count() == 3  # asked again: finds what is there now
        assert sorted(query.keys()) == sorted(keys)
        assert sorted(_xs(query)) == sorted(_xs(query)) == [0, 1, 2]
        store.evict(keys[0])
        assert sorted(_xs(query)) == [1, 2]
        assert sorted(query.results(), key=str) == [_sample_result(1), _sample_result(2)]

    def test_query_steps(self, store: Cache, cache: BaseCache) -> None:
        for i in range(6):
            store.save(_sample_call(i, name=_parity(i)))
        by_x = cache.query().sorted(lambda c: c.arguments["x"])
        assert _xs(by_x) == [0, 1, 2, 3, 4, 5]
        assert _xs(by_x.sorted(lambda c: c.arguments["x"], reverse=True).take(2)) == [5, 4]
        assert _xs(by_x.skip(4)) == [4, 5] and _xs(by_x.skip(1).take(2)) == [1, 2]
        assert by_x.take(0).empty() and by_x.skip(6).count() == 0
        assert _xs(by_x.filter(lambda c: c.name == "odd")) == [1, 3, 5]
        assert [c.name for c in by_x.unique(lambda c: c.name)] == ["even", "odd"]
        groups = by_x.groupby(lambda c: c.name)
        assert list(groups) == ["even", "odd"] and _xs(groups["odd"]) == [1, 3, 5]
        assert cache.query(x=4).only().result == _sample_result(4)
        assert cache.query(QueryCall(name="odd")).any().name == "odd"
        with pytest.raises(MatchCountError, match="exactly one call, found 3") as info:
            cache.query(QueryCall(name="odd")).only()
        assert info.value.found == 3
        for empty in (cache.query(x=99).only, cache.query(x=99).any, by_x.take(0).latest):
            with pytest.raises(MatchCountError, match="found 0"):
                empty()
        with pytest.raises(ValueError, match="count"):
            by_x.take(-1)
        store.save(_sample_call(7, name="odd"))
        assert _xs(groups["odd"]) == [1, 3, 5, 7]  # a group is a live query too

    def test_latest_and_oldest(self, store: Cache, cache: BaseCache) -> None:
        for i, minute in enumerate([5, 1, 9, 3]):
            store.save(_timed_call(i, minute))
        store.save(_sample_call(7))  # recorded without a start time
        query = cache.query()
        assert query.latest().arguments["x"] == 2 and query.oldest().arguments["x"] == 1
        assert _xs(query.sorted()) == [7, 1, 3, 0, 2]  # by start time; none first
        with pytest.raises(MatchCountError, match="timed"):
            cache.query(x=7).latest()

    def test_query_evict(self, store: Cache, cache: BaseCache) -> None:
        keys = [store.save(_sample_call(i, name=_parity(i), big=True)) for i in range(4)]
        odd = cache.query(QueryCall(name="odd"))
        if not self.writable:
            with self.refused():
                odd.evict()
            assert all(store.contains(k) for k in keys)
            return
        assert odd.evict() == 2 and odd.empty() and odd.evict() == 0
        assert [store.contains(k) for k in keys] == [True, False, True, False]
        assert store.values.contains(digest(_sample_result(1, big=True)))  # until gc

    def test_query_transfer(self, store: Cache, cache: BaseCache) -> None:
        keys = [store.save(_sample_call(i, name=_parity(i))) for i in range(4)]
        target = memory_cache()
        target.save(_sample_call(1, name="odd").replace(metadata={"runtime": {"host": "old"}}))
        odd = cache.query(QueryCall(name="odd"))
        assert odd.transfer(target) == 1  # the other one was there already
        assert target.load(keys[1]).metadata == {"runtime": {"host": "old"}}
        assert odd.transfer(target, overwrite=True) == 2
        assert target.load(keys[1]).metadata == {"runtime": {"host": "h1"}}
        assert not target.contains(keys[0]) and target.load_result(keys[3]) == _sample_result(3)
        moved = memory_cache()
        if not self.writable:
            with self.refused():
                odd.transfer(moved, pop=True)
            assert list(moved.list()) == [] and store.contains(keys[1])
            return
        assert odd.transfer(moved, pop=True) == 2
        assert odd.empty() and sorted(moved.list()) == sorted([keys[1], keys[3]])
        assert store.contains(keys[0]) and not store.contains(keys[3])

    def test_query_table(self, store: Cache, cache: BaseCache) -> None:
        pd = pytest.importorskip("pandas")
        keys = [store.save(_timed_call(i, minute)) for i, minute in enumerate([5, 1])]
        table = cache.query().sorted().table()
        assert list(table.columns) == [
            "function", "x", "result", "runtime.start", "runtime.stop", "runtime.wall_time",
            "runtime.host",
        ]
        assert table.index.name == "key" and list(table.index) == [
            cache.shrink(keys[1]), cache.shrink(keys[0])
        ]
        assert list(table["x"]) == [1, 0] and list(table["result"]) == [_sample_result(1), _sample_result(0)]
        assert table["runtime.start"].iloc[0] == pd.Timestamp("2026-01-01T10:01:00Z")
        assert table["runtime.stop"].iloc[0] == pd.Timestamp("2026-01-01T10:01:00.5Z")
        assert cache.query(x=99).table().empty

    # -- views and values -------------------------------------------------------------------

    def test_filter_is_a_live_read_only_view(self, store: Cache, cache: BaseCache) -> None:
        keys = [store.save(_sample_call(i, name=_parity(i))) for i in range(4)]
        view = cache.filter(QueryCall(name="odd"))
        assert isinstance(view, BaseCache) and not view.writable
        assert view.contains(keys[1]) and not view.contains(keys[0])
        assert view.load_result(keys[3]) == _sample_result(3) and view.load(keys[1][:8]).name == "odd"
        for hidden in (view.load, view.load_result):
            with pytest.raises(KeyError):
                hidden(keys[2])
        assert sorted(view.list()) == sorted([keys[1], keys[3]])
        assert view.contains_many(keys) == {keys[1], keys[3]}
        assert view.expand(keys[1][:10]) == keys[1]
        assert view.query().count() == 2 and view.query(x=3).only().result == _sample_result(3)
        assert view.query(QueryCall(name="even")).empty()
        for write in (lambda: view.save(_sample_call(9, name="odd")), lambda: view.evict(keys[1]),
                      lambda: view.query().evict(), lambda: view.transfer(memory_cache(), pop=True)):
            with pytest.raises(ReadOnlyError):
                write()
        assert store.contains(keys[1])
        new = store.save(_sample_call(5, name="odd"))
        assert view.contains(new)  # what the cache has now
        target = memory_cache()
        assert view.transfer(target) == 3 and set(target.list()) == {keys[1], keys[3], new}

    def test_load_value(self, store: Cache, cache: BaseCache) -> None:
        small = store.calls.load(store.save(_sample_call(1)))  # small values: inline if kept
        big = store.calls.load(store.save(_sample_call(2, big=True)))
        for key, value in [(small.arguments["x"], 1), (small.result, _sample_result(1)),
                           (big.result, _sample_result(2, big=True))]:
            assert cache.load_value(key) == value and cache.load_value(key[:10]) == value
            assert cache.expand_value(key[:10]) == key
        missing = digest("never stored")
        for absent in (missing, missing[:10]):
            with pytest.raises(KeyError):
                cache.load_value(absent)
        with pytest.raises(KeyError):
            cache.expand_value(missing[:10])
        with pytest.raises(ValueError, match="too short"):
            cache.load_value(missing[:3])
        a, b = _two_sharing_a_prefix()
        store.save(_sample_call(a))
        store.save(_sample_call(b))
        with pytest.raises(AmbiguousDigestError, match="at least"):
            cache.load_value(digest(a)[:4])
        assert cache.load_value(digest(b)) == b

    def test_stash_and_fetch(self, store: Cache, cache: BaseCache) -> None:
        call = _sample_call(3, big=True)
        if not self.writable:
            with self.refused():
                call.stash(cache)
            return
        record = call.stash(cache)
        assert isinstance(record, DigestedCall) and record == call.digest()
        assert not cache.contains(record.to_lookup_key())  # the values only, not a cached call
        for where in (cache, store):
            fetched = record.fetch(where)
            assert fetched.to_lookup_key() == call.to_lookup_key() and fetched.name == call.name
            assert fetched.arguments == {"x": 3} and fetched.result == _sample_result(3, big=True)
            assert fetched.metadata == call.metadata and fetched == call and call == fetched
            assert fetched.replace(result=0) == call.replace(result=0)
        with pytest.raises(TypeError, match="DigestedCall"):
            cache.stash(record)
        gone = DigestedCall("sample", {"x": digest("not stored")}, result=digest("nor this"))
        lazy = gone.fetch(cache)  # nothing is loaded yet
        assert lazy.name == "sample" and lazy.to_lookup_key() == gone.to_lookup_key()
        for read in (lambda: lazy.result, lambda: lazy.arguments["x"]):
            with pytest.raises(KeyError):
                read()

    # -- sizes, uses and clearing -----------------------------------------------------------

    def test_usage_and_volume(self, store: Cache, cache: BaseCache) -> None:
        big = store.save(_sample_call(1, big=True))
        small = store.save(_sample_call(2))
        usage = cache.usage()
        assert set(usage.calls) == {big, small}
        result = store.calls.load(big).result
        assert usage.values[result].size >= _BIG and usage.total > _BIG
        assert all(u.size > 0 and u.used >= 0 for u in usage.calls.values())
        volume = cache.volume()
        assert volume is None or volume >= usage.total
        store.evict(big)
        store.gc()
        assert cache.usage().total < usage.total - _BIG

    def test_touch(self, store: Cache, cache: BaseCache) -> None:
        key = store.save(_sample_call(1))
        later = time.time() + 1000
        if not self.writable:
            with self.refused():
                cache.touch([key], later)
            return
        cache.touch([key[:8]], later)
        assert cache.usage().calls[key].used == pytest.approx(later)
        assert store.usage().calls[key].used == pytest.approx(later)
        cache.touch([key], later - 2000)  # an earlier use: the later one stays
        assert cache.usage().calls[key].used == pytest.approx(later)
        cache.touch([_sample_call(9).to_lookup_key()])  # not stored: nothing to record
        assert set(cache.usage().calls) == {key}

    def test_needed_values(self, store: Cache, cache: BaseCache) -> None:
        shared = _sample_result(1, big=True)
        both_parts = [shared, _sample_result(2, big=True)]
        a = store.save(_sample_call(1).replace(result=both_parts))
        b = store.save(_sample_call(2).replace(result=[shared]))
        needed = cache.needed_values([a, b[:8], _sample_call(9).to_lookup_key()])
        assert set(needed) == {a, b}
        assert digest(both_parts) in needed[a] and digest([shared]) in needed[b]
        if store.values.child_digests(digest(both_parts)):  # destructured: parts are needed
            assert digest(shared) in needed[a] & needed[b]
            assert digest(both_parts[1]) in needed[a] - needed[b]

    def test_clear(self, store: Cache, cache: BaseCache) -> None:
        keys = [store.save(_sample_call(i, big=True)) for i in range(3)]
        orphan = store.values.save({"referenced by": "nothing"})
        if not self.writable:
            with self.refused():
                cache.clear()
            assert all(store.contains(k) for k in keys) and store.values.contains(orphan)
            return
        assert cache.clear() == 3
        assert list(store.list()) == [] and list(store.values.list()) == []
        assert cache.clear() == 0

    def test_redigest(self, store: Cache, cache: BaseCache) -> None:
        """A record written when its values digested otherwise is moved to today's keys."""
        old_x, old_result = digest("x as digested before"), digest("result as digested before")
        big = _sample_result(7, big=True)
        store.values.save(big, old_result)
        inline = {old_x: 7} if store.calls.keeps_inline_values else None
        if inline is None:
            store.values.save(7, old_x)
        stale = DigestedCall(
            "sample", {"x": old_x}, module="fleche.testing", result=old_result, inline=inline,
            metadata={"runtime": {"host": "h1"}},
        )
        old_key = store.calls.save(stale)
        current = store.save(_sample_call(1))
        if not self.writable:
            with self.refused():
                cache.redigest()
            assert store.contains(old_key)
            return
        assert cache.redigest() == 1
        new_key = _sample_call(7).to_lookup_key()
        assert not cache.contains(old_key) and self.result(cache, new_key) == big
        assert store.calls.load(new_key).arguments == {"x": digest(7)}
        assert store.load(new_key).arguments["x"] == 7
        assert store.load(new_key).metadata == {"runtime": {"host": "h1"}}
        assert self.result(cache, current) == _sample_result(1) and cache.redigest() == 0
        assert old_result in cache.gc()  # the value under its old key is garbage now
