"""Inter-process locks: registry, reentrancy, striping, timeouts, dead holders, fork, pickling."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from fleche.digest import digest
from fleche.errors import LockError, LockTimeout
from fleche.storage import CallPickleFile, ValuePickleFile, locks
from fleche.storage.locks import LOCK_FILE, STRIPES, hold, lock_path, stripe

SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")


def _keys_in(same: bool, n: int = 2) -> list[str]:
    """n keys that all share one stripe (same=True) or all lie in different stripes."""
    seen: dict[str, list[str]] = {}
    for i in range(100000):
        key = digest(i)
        slot = stripe(key)
        if same:
            seen.setdefault(slot, []).append(key)
            if len(seen[slot]) == n:
                return seen[slot]
        elif slot not in seen:
            seen[slot] = [key]
            if len(seen) == n:
                return [v[0] for v in seen.values()]
    raise AssertionError("no keys found")


def _pair_in_another_stripe(key: str) -> list[str]:
    """Two keys that share a stripe other than ``key``'s."""
    seen: dict[str, list[str]] = {}
    for i in range(100000):
        k = digest(("other", i))
        slot = stripe(k)
        if slot != stripe(key):
            seen.setdefault(slot, []).append(k)
            if len(seen[slot]) == 2:
                return seen[slot]
    raise AssertionError("no keys found")


def _try_lock(storage, key, timeout, result) -> None:
    try:
        with hold(storage._lock_directory(), key, timeout=timeout):
            result.append("acquired")
    except LockTimeout as e:
        result.append(e)


def _holder(storage, key, holding, release) -> None:
    """Child process: hold ``key`` through a pickled storage until told to release."""
    with storage.locked(key):
        holding.set()
        release.wait(60)


def _try_in_child(storage, key, timeout, queue) -> None:
    result: list = []
    _try_lock(storage, key, timeout, result)
    queue.put(result[0] if result[0] == "acquired" else "timeout")


def _child_result(ctx, storage, key, timeout=0.2) -> str:
    queue = ctx.Queue()
    p = ctx.Process(target=_try_in_child, args=(storage, key, timeout, queue))
    p.start()
    try:
        return queue.get(timeout=60)
    finally:
        p.join(60)


# -- one process ------------------------------------------------------------------------------


def test_reentrant_in_one_thread(tmp_path):
    values = ValuePickleFile(tmp_path)
    key = digest("k")
    with values.locked(key):
        with values.locked(key):
            values.save(1, key)
        values.evict(key)
    assert _child_result(FORK, values, key) == "acquired"


def test_pickled_copies_in_one_process_exclude_each_other(tmp_path):
    storage = ValuePickleFile(tmp_path, lock_timeout=0.1)
    a, b = pickle.loads(pickle.dumps(storage)), pickle.loads(pickle.dumps(storage))
    key = digest("shared")
    holding, release = threading.Event(), threading.Event()

    def hold_in_a() -> None:
        with a.locked(key):
            holding.set()
            release.wait(60)

    t = threading.Thread(target=hold_in_a)
    t.start()
    try:
        assert holding.wait(60)
        with pytest.raises(LockTimeout):
            with b.locked(key):
                pass
        with pytest.raises(LockTimeout):
            b.save("blocked", key)
        assert not b.contains(key)
    finally:
        release.set()
        t.join()
    with b.locked(key):
        b.save("free", key)
    assert a.load(key) == "free"


def test_keys_sharing_a_stripe_do_not_block_threads_of_one_process(tmp_path):
    """Threads wait only for the same key; crossed holds on two stripes do not deadlock."""
    values = ValuePickleFile(tmp_path, lock_timeout=5)
    k1, k3 = _keys_in(same=True)
    k2, k4 = _pair_in_another_stripe(k1)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def cross(first: str, second: str) -> None:
        try:
            with values.locked(first):
                barrier.wait(10)
                with values.locked(second):
                    values.save(f"v{second}", second)
                barrier.wait(10)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    # T1 holds k1 (stripe A) then takes k4 (stripe B); T2 holds k2 (stripe B) then takes k3 (A).
    threads = [threading.Thread(target=cross, args=(k1, k4)), threading.Thread(target=cross, args=(k2, k3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert values.load(k3) == f"v{k3}" and values.load(k4) == f"v{k4}"


def test_one_lock_file_made_by_the_first_lock_guards_every_key(tmp_path):
    values = ValuePickleFile(tmp_path)
    first = values.save(-1)
    made = (tmp_path / ".locks" / LOCK_FILE).stat()
    keys = [values.save(i) for i in range(300)]
    assert len({stripe(k) for k in keys}) > 250  # the keys spread over many stripes
    assert [p.name for p in (tmp_path / ".locks").iterdir()] == [LOCK_FILE]
    assert (tmp_path / ".locks" / LOCK_FILE).stat().st_ino == made.st_ino
    assert all(0 <= stripe(k) < STRIPES for k in [first, *keys])
    assert len(list(values.list())) == 301


def test_nested_stripes_release_in_reverse_order(tmp_path):
    values = ValuePickleFile(tmp_path, lock_timeout=0.1)
    k1, k2 = _keys_in(same=False)
    with values.locked(k1):
        with values.locked(k2):
            assert _child_result(FORK, values, k2) == "timeout"
        assert _child_result(FORK, values, k2) == "acquired"
        assert _child_result(FORK, values, k1) == "timeout"
    assert _child_result(FORK, values, k1) == "acquired"


# -- several processes ------------------------------------------------------------------------


def test_lock_timeout_while_another_process_holds_the_key(tmp_path):
    values = ValuePickleFile(tmp_path, lock_timeout=0.2)
    key = values.save("before", digest("contended"))
    holding, release = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=_holder, args=(values, key, holding, release))
    p.start()
    try:
        assert holding.wait(60)
        with pytest.raises(LockTimeout) as info:
            values.save("during", key)
        err = info.value
        assert isinstance(err, TimeoutError)
        assert err.key == key and err.timeout == 0.2
        assert err.lock_path == lock_path(str(tmp_path / ".locks"))
        assert key in str(err) and err.lock_path in str(err) and "0.2" in str(err)
        with pytest.raises(LockTimeout):
            values.evict(key)
        assert values.load(key) == "before"  # reads take no lock, and nothing changed
        # Keys of other stripes are free.
        other = next(k for k in (digest(i) for i in range(100)) if stripe(k) != stripe(key))
        values.save("other", other)
    finally:
        release.set()
        p.join(60)
    values.save("after", key)
    assert values.load(key) == "after"


def test_a_stripe_excludes_other_processes_for_every_key_in_it(tmp_path):
    values = ValuePickleFile(tmp_path)
    k1, k2 = _keys_in(same=True)
    with values.locked(k1):
        assert _child_result(SPAWN, values, k2) == "timeout"
    assert _child_result(SPAWN, values, k2) == "acquired"


def test_a_killed_holder_frees_the_lock_at_once(tmp_path):
    values = ValuePickleFile(tmp_path, lock_timeout=0.2)
    key = digest("victim")
    holding, release = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=_holder, args=(values, key, holding, release))
    p.start()
    assert holding.wait(60)
    with pytest.raises(LockTimeout):
        values.save(1, key)
    os.kill(p.pid, signal.SIGKILL)
    p.join(60)
    assert p.exitcode == -signal.SIGKILL
    values.save(2, key)
    assert values.load(key) == 2


def _writer(storage, key, started) -> None:
    big = [bytes(4_000_000)]
    n = 0
    while True:
        storage.save((n, big * 4), key)
        n += 1
        started.set()


def test_writer_killed_mid_write_leaves_no_partial_entry_and_no_lock(tmp_path):
    values = ValuePickleFile(tmp_path, remaining_depth=10)
    key = digest("big")
    started = SPAWN.Event()
    p = SPAWN.Process(target=_writer, args=(values, key, started))
    p.start()
    try:
        assert started.wait(60)
        # Wait for the next write to be under way: its temporary file exists.
        deadline = time.monotonic() + 30
        while not list((tmp_path / key[:2]).glob(".*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.001)  # polling for a file, not synchronizing
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(60)
    n, big = values.load(key)
    assert n >= 0 and big == [bytes(4_000_000)] * 4
    assert set(values.list()) == {key}
    for leftover in (tmp_path / key[:2]).glob(".*.tmp"):
        assert leftover.name.startswith(f".{key}.")  # a stray the listing ignores
    with values.locked(key):  # the dead writer's lock is free at once
        values.save("fresh", key)
    assert values.load(key) == "fresh"


def test_fork_child_does_not_inherit_held_locks(tmp_path):
    values = ValuePickleFile(tmp_path, lock_timeout=0.2)
    key = digest("held by parent")
    with values.locked(key):
        # The child's registry is fresh: it must not believe it shares the parent's file lock.
        assert _child_result(FORK, values, key) == "timeout"
        other = _keys_in(same=False)
        free = next(k for k in other if stripe(k) != stripe(key))
        assert _child_result(FORK, values, free) == "acquired"
    assert _child_result(FORK, values, key) == "acquired"


def _count_under_lock(storage, key, n) -> None:
    for _ in range(n):
        with storage.locked(key):
            storage.save(storage.load(key) + 1, key)


@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_unpickled_copies_lock_across_processes(tmp_path, method):
    ctx = multiprocessing.get_context(method)
    values = ValuePickleFile(tmp_path, lock_timeout=30)
    key = values.save(0, digest("counter"))
    procs = [ctx.Process(target=_count_under_lock, args=(values, key, 25)) for _ in range(3)]
    for p in procs:
        p.start()
    _count_under_lock(values, key, 25)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert values.load(key) == 100


def test_one_storage_in_two_threads_honours_the_timeout_and_reads_do_not_wait(tmp_path):
    values = ValuePickleFile(tmp_path, lock_timeout=0.1)
    key = values.save("old", digest("k"))
    holding, release = threading.Event(), threading.Event()

    def compute_once() -> None:
        with values.locked(key):
            holding.set()
            release.wait(60)
            values.save("new", key)

    t = threading.Thread(target=compute_once)
    t.start()
    try:
        assert holding.wait(60)
        with pytest.raises(LockTimeout, match=key):
            values.save("other", key)
        assert values.load(key) == "old" and values.contains(key)  # readers never wait
    finally:
        release.set()
        t.join()
    assert values.load(key) == "new"


def test_lock_files_stay_open_between_holds_but_are_bounded(tmp_path, monkeypatch):
    from fleche.storage import locks

    monkeypatch.setattr(locks, "_MAX_OPEN_LOCK_FILES", 16)

    def open_lock_files():
        return sum(
            1 for fd in os.listdir("/proc/self/fd")
            if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
        )

    store = str(tmp_path / "store")
    key = digest("kept open")
    with hold(store, key):
        pass
    assert open_lock_files() == 1  # kept for the next hold: no open/close per lock
    with hold(store, key):
        assert open_lock_files() == 1
    for i in range(300):  # every key of a store: still one descriptor
        with hold(store, digest(i)):
            pass
    assert open_lock_files() == 1
    for i in range(40):  # many stores: bounded
        with hold(str(tmp_path / f"other{i}"), key):
            pass
    assert open_lock_files() <= 16
    # A store whose file was closed while idle locks again.
    with hold(store, key):
        assert not _another_process_can_lock(store, key)
    assert _another_process_can_lock(store, key)


def _probe_lock(directory, key, results):
    """Another program's view: a plain lockf on the key's byte of the lock file."""
    import fcntl

    with open(lock_path(directory), "a") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, stripe(key), os.SEEK_SET)
        except OSError:
            results.put(False)
        else:
            results.put(True)


def _another_process_can_lock(directory, key):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=_probe_lock, args=(directory, key, results))
    p.start()
    got = results.get(timeout=60)
    p.join(60)
    return got


# -- one deadline -----------------------------------------------------------------------------


def _hold_keys(root, keys, holding, release) -> None:
    """Child process: hold every key of ``keys`` at once until told to release."""
    import contextlib

    values = ValuePickleFile(root)
    with contextlib.ExitStack() as stack:
        for key in keys:
            stack.enter_context(values.locked(key))
        holding.set()
        release.wait(60)


def test_lock_timeout_is_one_deadline_for_every_layer(tmp_path):
    """A waiter queued on the thread lock behind another waiter, while another process holds
    the file lock, still gives up within its own ``lock_timeout`` (plus a generous margin): the
    thread lock and the file lock share one deadline instead of getting one each."""
    timeout = 0.3
    values = ValuePickleFile(tmp_path, lock_timeout=timeout)
    key = digest("contended")
    holding, release = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=_hold_keys, args=(tmp_path, [key], holding, release))
    p.start()
    waited: dict[str, tuple[str, float]] = {}

    def save(name: str) -> None:
        began = time.monotonic()
        try:
            values.save("waiter", key)
            outcome = "saved"
        except LockTimeout:
            outcome = "timeout"
        waited[name] = (outcome, time.monotonic() - began)

    try:
        assert holding.wait(60)
        first = threading.Thread(target=save, args=("first",))
        first.start()
        # The key's thread lock in this process (the registry's, one per lock file and key).
        lock_file, thread_lock = locks._registry.checkout(values._lock_directory(), key)
        try:
            while thread_lock.acquire(blocking=False):  # until the first waiter holds the
                thread_lock.release()                   # thread lock and polls the file lock
        finally:
            locks._registry.checkin(lock_file, key)
        second = threading.Thread(target=save, args=("second",))
        second.start()
        first.join(30)
        second.join(30)
    finally:
        release.set()
        p.join(60)
    assert {name: outcome for name, (outcome, _) in waited.items()} == {
        "first": "timeout", "second": "timeout"
    }
    assert max(w for _, w in waited.values()) < timeout + 0.2, waited


# -- the lock file of a key does not depend on any setting ------------------------------------


def test_no_setting_can_split_the_locks_of_a_store(tmp_path):
    """Processes that open one directory with different settings take the same lock file for
    each key (a ``lock_stripes`` setting used to make them lock different files)."""
    with pytest.raises(TypeError, match="lock_stripes"):
        ValuePickleFile(tmp_path, lock_stripes=8)
    keys = [digest(("k", i)) for i in range(20)]
    holding, release = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=_hold_keys, args=(tmp_path, keys, holding, release))
    p.start()
    try:
        assert holding.wait(60)
        others = [
            ValuePickleFile(tmp_path, lock_timeout=0, serializer="cloudpickle", durable=True),
            CallPickleFile(str(tmp_path) + "/", lock_timeout=0),
        ]
        for storage in others:
            for key in keys:
                with pytest.raises(LockTimeout):
                    with storage.locked(key):
                        pass
    finally:
        release.set()
        p.join(60)


# -- a store reached through a symlink --------------------------------------------------------


def test_a_store_reached_through_a_symlink_shares_the_locks(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    direct = ValuePickleFile(real, lock_timeout=0.2)
    linked = ValuePickleFile(tmp_path / "link", lock_timeout=0.2)
    key = digest("through a link")
    holding, release, done = threading.Event(), threading.Event(), threading.Event()

    def hold_directly() -> None:
        with direct.locked(key):
            holding.set()
            release.wait(60)
        done.set()

    t = threading.Thread(target=hold_directly)
    t.start()
    try:
        assert holding.wait(60)
        with pytest.raises(LockTimeout):  # another thread of this process, through the link
            linked.save("second holder", key)
        # The attempt through the link must not have dropped this process's file lock.
        assert _child_result(SPAWN, direct, key) == "timeout"
        assert _child_result(SPAWN, linked, key) == "timeout"
    finally:
        release.set()
        t.join()
    assert done.is_set()
    assert _child_result(SPAWN, linked, key) == "acquired"


# -- lock files deleted or replaced while processes use them ----------------------------------


def test_a_deleted_lock_file_is_followed_to_the_new_one(tmp_path):
    values = ValuePickleFile(tmp_path, lock_timeout=0.3)
    key = values.save("before", digest("deleted lock"))  # this process keeps the lock file open
    lock_file = Path(lock_path(str(tmp_path / ".locks")))
    lock_file.unlink()
    holding, release = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=_hold_keys, args=(tmp_path, [key], holding, release))
    p.start()
    try:
        assert holding.wait(60)  # a new process created and locked a new lock file
        with pytest.raises(LockTimeout):
            values.save("during", key)  # locking the deleted file would exclude nobody
    finally:
        release.set()
        p.join(60)
    values.save("after", key)
    assert values.load(key) == "after" and lock_file.is_file()


def test_a_symlinked_lock_directory_is_refused(tmp_path):
    store, outside = tmp_path / "store", tmp_path / "outside"
    values = ValuePickleFile(store, lock_timeout=0.3)
    key = values.save("before", digest("planted locks"))
    outside.mkdir()
    shutil.rmtree(store / ".locks")
    (store / ".locks").symlink_to(outside, target_is_directory=True)
    for storage in (values, pickle.loads(pickle.dumps(values))):
        with pytest.raises(LockError, match="symbolic link") as info:
            storage.save("during", key)
        assert not isinstance(info.value, LockTimeout)
    assert _child_error(values, key) == "LockError"  # a new process refuses it too
    assert list(outside.iterdir()) == []  # no lock file was made outside the store
    assert values.load(key) == "before"


def test_a_lock_file_replaced_by_a_directory_is_a_clear_error(tmp_path):
    values = ValuePickleFile(tmp_path, lock_timeout=0.3)
    key = values.save("before", digest("lock dir"))
    lock_file = Path(lock_path(str(tmp_path / ".locks")))
    lock_file.unlink()
    lock_file.mkdir()
    with pytest.raises(LockError, match="is a directory") as info:
        values.save("during", key)
    assert info.value.lock_path == str(lock_file) and info.value.key == key
    assert values.load(key) == "before"
    lock_file.rmdir()
    values.save("after", key)
    assert values.load(key) == "after"


def _save_in_child(storage, key, queue) -> None:
    try:
        storage.save("from the child", key)
        queue.put("saved")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        queue.put(type(e).__name__)


def _child_error(storage, key) -> str:
    queue = SPAWN.Queue()
    p = SPAWN.Process(target=_save_in_child, args=(storage, key, queue))
    p.start()
    try:
        return queue.get(timeout=60)
    finally:
        p.join(60)


def test_posix_record_locks_where_open_file_description_locks_are_missing(tmp_path, monkeypatch):
    """The lockf fallback excludes other processes and keeps threads of this one apart by key."""
    from fleche.storage import locks

    monkeypatch.setattr(locks, "_ofd", False)
    monkeypatch.setattr(locks, "_registry", locks._Registry())  # descriptors opened from here on
    values = ValuePickleFile(tmp_path / "store", lock_timeout=0.2)
    k1, k2 = _keys_in(same=True)
    with values.locked(k1):
        assert _child_result(SPAWN, values, k1) == "timeout"
        assert _child_result(SPAWN, values, k2) == "timeout"  # the same byte
        done: list = []
        t = threading.Thread(target=_try_lock, args=(values, k2, 0.2, done))
        t.start()
        t.join(60)
        assert done == ["acquired"]  # a thread of this process waits only for the same key
        assert _child_result(SPAWN, values, k1) == "timeout"  # its release kept the byte held
        assert not locks._ofd
    assert _child_result(SPAWN, values, k1) == "acquired"
