"""Per-key and serializing locks: parallel on different keys, serialized on one key."""

import pickle
import threading

import pytest

from fleche.digest import digest
from fleche.storage import SerializingMixin, ValueMemory
from fleche.storage.thread_safe import _PicklableLock, _PicklableRLock
from tests_support import SerializingValueMemory


def test_different_keys_run_in_parallel_same_key_is_serialized():
    storage = ValueMemory()
    a, b = digest("a"), digest("b")
    holding, release = threading.Event(), threading.Event()
    seen = {}

    def holder():
        with storage._operation_context(a):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(10)

    def probe():
        seen["other key"] = storage._get_key_lock(b).acquire(blocking=False)
        seen["same key"] = storage._get_key_lock(a).acquire(blocking=False)

    p = threading.Thread(target=probe)
    p.start()
    p.join()
    release.set()
    t.join()
    assert seen == {"other key": True, "same key": False}


def test_key_lock_is_reentrant_for_nested_operations():
    storage = ValueMemory()
    key = storage.save([1, 2])
    with storage._operation_context(key):
        assert storage.load(key[:6]) == [1, 2]  # expand + load nest inside the held lock


@pytest.mark.parametrize("factory", [ValueMemory, SerializingValueMemory])
def test_read_modify_write_under_the_operation_lock_loses_nothing(factory):
    storage = factory()
    key = digest("counter")
    storage.save(0, key)
    start = threading.Barrier(8)

    def bump():
        start.wait()
        for _ in range(200):
            with storage._operation_context(key):
                storage.save(storage.load(key) + 1, key)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.load(key) == 1600


def test_serializing_mixin_excludes_all_keys():
    storage = SerializingValueMemory()
    holding, release = threading.Event(), threading.Event()

    def holder():
        with storage._operation_context(digest("a")):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert holding.wait(10)
    assert not storage._lock.acquire(blocking=False)
    release.set()
    t.join()
    assert isinstance(storage, SerializingMixin)


@pytest.mark.parametrize("cls", [_PicklableLock, _PicklableRLock])
def test_lock_shims_pickle_as_fresh_locks(cls):
    lock = cls()
    with lock:
        copy = pickle.loads(pickle.dumps(lock))
        assert copy.acquire(blocking=False)
        copy.release()


def test_key_locks_are_dropped_when_unused():
    storage = ValueMemory()
    for i in range(1000):
        storage.save(i)
    assert len(storage._key_locks._locks) == 0


def test_locks_held_at_fork_are_free_in_the_child():
    import multiprocessing

    storage = SerializingValueMemory()
    key = digest("k")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    holding, release = threading.Event(), threading.Event()

    def hold():  # another thread holds the locks while the main thread forks
        with storage._operation_context(key):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    try:
        # With fork, a Process's arguments are inherited as they are, not pickled.
        child = ctx.Process(target=_save_in_child, args=(storage, key, results))
        child.start()
        outcome = results.get(timeout=30)
        child.join(30)
    finally:
        release.set()
        holder.join()
    assert outcome == [1]


def _save_in_child(storage, key, results):
    # Without renewal the child would wait for ever for locks held by a thread it does not have.
    got = storage._lock.acquire(timeout=2) and storage._get_key_lock(key).acquire(timeout=2)
    results.put([1] if got else "locks still held after fork")


def test_nested_lock_layers_share_one_deadline():
    import time

    from fleche.storage.thread_safe import acquiring_until, lock_deadline

    outer = lock_deadline(0.3)
    with acquiring_until(outer):
        assert lock_deadline(60) == outer  # an inner layer waits no longer than the outer one
        assert lock_deadline(None) == outer
        assert lock_deadline(0) < outer  # nor longer than its own timeout
        with acquiring_until(time.monotonic() + 60):
            assert lock_deadline(None) == outer
    with acquiring_until(None):  # an outer layer without deadline leaves inner ones theirs
        assert lock_deadline(None) is None and lock_deadline(5) is not None
    later = lock_deadline(0.3)
    assert later is not None and later >= outer  # outside an acquisition, a fresh deadline
    assert lock_deadline(None) is None
    seen = []
    with acquiring_until(outer):
        t = threading.Thread(target=lambda: seen.append(lock_deadline(None)))
        t.start()
        t.join()
    assert seen == [None]  # per thread
