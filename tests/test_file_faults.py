"""File storages under real faults: a full disk, a read-only mount, denied permissions, a root
deleted while in use, symlinks planted inside the store, entries of the wrong kind.

Mounts are real tmpfs mounts, which need root (tests skip with a reason elsewhere); permissions
are tested by a forked child that drops to an unprivileged user, since root ignores them.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fleche.call import Call
from fleche.digest import digest
from fleche.errors import CorruptEntryError, FlecheError, LockError, SaveError, WriteError
from fleche.storage import CallPickleFile, ValuePickleFile
from fleche.storage import locks
from fleche.storage.pickle_file import SECRET_KEY_ENV
from fleche.testing import assert_corrupt_entry_is_reported_and_evictable

FORK = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.delenv(SECRET_KEY_ENV, raising=False)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp")]


@contextlib.contextmanager
def _tmpfs(where: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``where`` for the block; root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        try:
            locks._registry.close_all_idle()  # our lock files on it would keep it busy
        finally:
            if subprocess.run(["umount", str(where)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(where)], check=True)


# -- a full disk ------------------------------------------------------------------------------


def _fill(directory: Path) -> None:
    """Write a file until the file system is full (ENOSPC)."""
    with open(directory / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()


def _h5_values(root):
    pytest.importorskip("h5py", reason="the h5 extra is not installed")
    from fleche.storage import ValueBagOfHoldingH5File

    return ValueBagOfHoldingH5File(root)


@pytest.mark.parametrize("make", [ValuePickleFile, _h5_values], ids=["pickle", "h5"])
def test_full_disk_raises_write_error_and_loses_nothing(tmp_path, make):
    with _tmpfs(tmp_path / "mnt", "1m") as mnt:
        values = make(mnt / "store")
        before = {values.save(i): i for i in range(20)}
        key = digest("big")
        _fill(mnt)
        with pytest.raises(WriteError) as info:
            values.save(b"x" * 200_000, key)
        err = info.value
        assert isinstance(err, SaveError) and isinstance(err, OSError)
        assert err.errno == errno.ENOSPC and err.key == key
        assert err.path == values._path(key) and err.path.startswith(f"{mnt}/store/{key[:2]}/")
        assert err.path in str(err) and "No space left on device" in str(err)
        assert _temporary_files(mnt) == []  # nothing half written left behind
        assert not values.contains(key)
        assert {k: values.load(k) for k in before} == before  # nothing stored before is lost
        (mnt / "filler").unlink()
        assert values.load(values.save(b"x" * 200_000, key)) == b"x" * 200_000


# -- a read-only file system ------------------------------------------------------------------


def test_read_only_mount_refuses_writes_clearly_and_still_reads(tmp_path):
    with _tmpfs(tmp_path / "mnt", "4m") as mnt:
        values, calls = ValuePickleFile(mnt / "values"), CallPickleFile(mnt / "calls")
        stored = {values.save(i): i for i in range(10)}
        call_key = calls.save(Call("f", {"x": 1}, result=1))
        locks._registry.close_all_idle()  # a remount read-only needs no file open for writing
        assert not [fd for fd in os.listdir("/proc/self/fd")
                    if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(mnt))]
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        for attempt in (lambda: values.save("new"), lambda: calls.save(Call("f", {"x": 2}))):
            with pytest.raises(FlecheError) as info:
                attempt()
            assert isinstance(info.value, (LockError, WriteError))
            assert "Read-only file system" in str(info.value) and str(mnt) in str(info.value)
        with pytest.raises(LockError, match="Read-only file system"):
            values.evict(next(iter(stored)))
        assert {k: values.load(k) for k in stored} == stored  # reads need no write access
        assert calls.load(call_key).name == "f" and set(values.list()) == set(stored)


# -- permission denied ------------------------------------------------------------------------


def _save_as_nobody(root: str, results) -> None:
    try:
        os.setgid(65534)
        os.setuid(65534)
        outcome = []
        for name in ("values", "open locks"):
            try:
                ValuePickleFile(f"{root}/{name}").save("written by nobody")
                outcome.append(("stored", ""))
            except FlecheError as e:
                outcome.append((type(e).__name__, str(e)))
        results.put(outcome)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put(repr(e))


def test_permission_denied_is_a_clear_error(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the writer as another user (root ignores permissions)")
    root = Path(tempfile.mkdtemp(prefix="fleche-perm-"))
    try:
        root.chmod(0o755)
        values = ValuePickleFile(root / "values")
        key = values.save("written by root")  # creates the store (mode 755: others cannot write)
        # A store whose lock directory others may use, but whose entry directories they may not.
        open_locks = ValuePickleFile(root / "open locks")
        open_locks.save("x")
        (root / "open locks" / ".locks").chmod(0o777)
        for lock_file in (root / "open locks" / ".locks").iterdir():
            lock_file.unlink()
        results = FORK.Queue()
        child = FORK.Process(target=_save_as_nobody, args=(str(root), results))
        child.start()
        outcome = results.get(timeout=60)
        child.join(60)
        assert isinstance(outcome, list), outcome
        (kind1, text1), (kind2, text2) = outcome
        assert kind1 == "LockError" and "Permission denied" in text1 and str(root) in text1
        assert kind2 == "WriteError" and "Permission denied" in text2 and str(root) in text2
        assert values.load(key) == "written by root"
        assert _temporary_files(root) == []
    finally:
        shutil.rmtree(root)


# -- the store root deleted while a process uses it -------------------------------------------


def _hold_then_report(root, key, holding, release) -> None:
    with ValuePickleFile(root).locked(key):
        holding.set()
        release.wait(60)


def test_deleted_root_recovers_at_once_and_still_locks(tmp_path):
    values = ValuePickleFile(tmp_path / "store", lock_timeout=0.2)
    for i in range(50):
        values.save(i)
    shutil.rmtree(tmp_path / "store")
    failures = []
    for i in range(50, 300):  # mostly stripes this process has not used yet
        try:
            assert values.load(values.save(i)) == i
        except Exception as e:  # noqa: BLE001 - counted
            failures.append(e)
    assert failures == []
    # The lock files are new files now; this process must not keep locking the deleted ones.
    key = digest(7)
    holding, release = SPAWN.Event(), SPAWN.Event()
    p = SPAWN.Process(target=_hold_then_report, args=(tmp_path / "store", key, holding, release))
    p.start()
    try:
        assert holding.wait(60)
        with pytest.raises(LockError):
            values.save("while held", key)
    finally:
        release.set()
        p.join(60)
    assert values.load(values.save(7)) == 7


# -- symlinks inside the store ----------------------------------------------------------------


def _planted(tmp_path: Path, key: str) -> tuple[ValuePickleFile, Path]:
    """A store whose fan-out directory for ``key`` is a symlink to a directory outside it."""
    store, outside = tmp_path / "store", tmp_path / "outside"
    values = ValuePickleFile(store)
    values.save("anchor")
    outside.mkdir()
    if (store / key[:2]).exists():
        shutil.rmtree(store / key[:2])
    (store / key[:2]).symlink_to(outside, target_is_directory=True)
    return values, outside


def test_symlinked_fan_out_directory_is_never_written_swept_or_evicted_through(tmp_path):
    key = digest("planted")
    victim = ValuePickleFile(tmp_path / "elsewhere")
    victim.save("someone else's", key)  # an entry-shaped file, reachable through the symlink
    values, outside = _planted(tmp_path, key)
    for path in (tmp_path / "elsewhere" / key[:2]).iterdir():
        shutil.copy(path, outside / path.name)
    stale = outside / f".{key}.dead.tmp"
    stale.write_bytes(b"")
    os.utime(stale, (0, 0))
    before = _files(outside)

    with pytest.raises(WriteError, match="symbolic link") as info:
        values.save("mine", key)
    assert info.value.path == f"{tmp_path}/store/{key[:2]}/{key}"
    with pytest.raises(KeyError):
        values.evict(key)
    with pytest.raises(KeyError):
        values.load(key)
    assert not values.contains(key) and key not in set(values.list())
    assert values.sweep(older_than=0) == []
    assert _files(outside) == before  # nothing outside the store was written or removed


def test_symlinked_entry_is_not_read_and_is_replaced_by_a_save(tmp_path):
    values = ValuePickleFile(tmp_path / "store")
    other = ValuePickleFile(tmp_path / "other")
    key = other.save("outside the store")
    target = Path(other._path(key))
    (tmp_path / "store" / key[:2]).mkdir(parents=True)
    Path(values._path(key)).symlink_to(target)
    with pytest.raises(KeyError):
        values.load(key)
    assert not values.contains(key) and list(values.list()) == []
    assert values.save("outside the store", key) == key  # the link is replaced, not followed
    assert not Path(values._path(key)).is_symlink()
    assert other.load(key) == "outside the store" and values.load(key) == "outside the store"


# -- entries of the wrong kind ----------------------------------------------------------------


def test_a_value_where_a_call_record_belongs_is_a_corrupt_entry(tmp_path):
    """``Cache(ValuePickleFile(d), CallPickleFile(d))`` on one directory mixes the two kinds."""
    values, calls = ValuePickleFile(tmp_path), CallPickleFile(tmp_path)
    key = values.save([1, 2, 3], digest("a list"))
    with pytest.raises(CorruptEntryError, match="holds a list, not a call record"):
        calls.load(key)
    assert_corrupt_entry_is_reported_and_evictable(
        calls, key, values._path(key), "holds a list, not a call record"
    )
