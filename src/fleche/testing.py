"""The storage contract, as pytest test classes every storage's tests subclass.

A storage's test module subclasses :class:`ValueStorageTests` or :class:`CallStorageTests` and
implements ``make_storage(tmp_path)``; capability flags switch groups of tests on or off::

    class TestValueMemory(ValueStorageTests):
        def make_storage(self, tmp_path):
            return ValueMemory()

Third-party storages can run the same contract. Requires pytest.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import pickle
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from .call import Call, DigestedCall, QueryCall
from .digest import Digest, digest
from .storage.base import AmbiguousDigestError, KeyManagement

__all__ = [
    "CallStorageTests",
    "StorageTests",
    "ValueStorageTests",
    "assert_corrupt_entry_is_reported_and_evictable",
]


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


class StorageTests:
    """Contract shared by value and call storages: keys, short digests, pickling, threads."""

    persistent: ClassVar[bool] = True
    """The storage keeps what is saved (False for void storages)."""
    shared_between_processes: ClassVar[bool] = False
    """Pickled copies in other processes see the same entries (file and database storages)."""

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
        with pytest.raises(KeyError):
            storage.evict(missing)

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

    @pytest.mark.persistent
    def test_threads_on_shared_keys(self, storage: Any) -> None:
        """8 threads save, load and check overlapping keys; nothing is lost or torn."""
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def work(t: int) -> None:
            try:
                start.wait()
                for n in range(30):
                    i = (t + n) % 12
                    key = self.save(storage, self.item(i))
                    self.assert_loaded(storage, key, self.item(i))
                    assert storage.contains(key)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
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

    @pytest.mark.persistent
    def test_locked_read_modify_write_threads(self, storage: Any) -> None:
        """8 threads increment one counter under ``locked``; no increment is lost."""
        start = threading.Barrier(8)
        errors: list[BaseException] = []
        storage = _with_lock_timeout(storage, 60.0)  # eight writers queue on one key

        def work() -> None:
            try:
                start.wait()
                _bump(storage, self, 25)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert self.read_counter(storage) == 200

    @pytest.mark.persistent
    def test_locked_is_reentrant(self, storage: Any) -> None:
        with storage.locked(self.counter_key()) as key:
            assert key == self.counter_key()
            with storage.locked(key):
                self.write_counter(storage, 1)
        assert self.read_counter(storage) == 1

    # -- processes --------------------------------------------------------------------------

    def test_processes_locked_read_modify_write(self, storage: Any) -> None:
        """3 processes x 2 threads increment one counter under ``locked``; none is lost."""
        if not self.shared_between_processes:
            pytest.skip(f"{type(self).__name__} is private to one process")
        ctx = multiprocessing.get_context("spawn")
        # Six writers queue on one key: give slow backends on a loaded machine time to take turns.
        patient = _with_lock_timeout(storage, 60.0)
        with ctx.Pool(3) as pool:
            pool.starmap(_bump_in_threads, [(patient, self, 2, 15)] * 3)
        assert self.read_counter(storage) == 90

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
    """A copy of ``storage`` that waits up to ``timeout`` for locks (itself if it has none)."""
    if dataclasses.is_dataclass(storage) and any(
        f.name == "lock_timeout" for f in dataclasses.fields(storage)
    ):
        return dataclasses.replace(storage, lock_timeout=timeout)
    return storage


def _save_items(storage: Any, contract: StorageTests, indices: range) -> list[tuple[int, Digest]]:
    return [(i, contract.save(storage, contract.item(i))) for i in indices]


def _bump(storage: Any, contract: StorageTests, times: int) -> None:
    for _ in range(times):
        with storage.locked(contract.counter_key()):
            contract.write_counter(storage, contract.read_counter(storage) + 1)


def _bump_in_threads(storage: Any, contract: StorageTests, threads: int, times: int) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            _bump(storage, contract, times)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
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
