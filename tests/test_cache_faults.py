"""The cache never turns a working call into a failing one: a decorated call returns what the
function returns, with a ``FlecheWarning`` naming the cause, whatever the store does: a full
disk, a read-only mount, denied permissions, a lock file replaced by a directory, the store's
root deleted under a running process, a database that went away, or any ``OSError``. Only the
function's own exceptions reach the caller.

Faults are real where the machine allows (tmpfs mounts, bind mounts, dropped capabilities,
dropped databases); these tests skip with the reason where it does not.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid

import pytest

import fleche
from fleche._tasks import ComputeAndSave
from fleche.call import Call
from fleche.caches import Cache
from fleche.storage import ValueMemory
from fleche.storage.locks import lock_path
from fleche.testing import flip_a_byte
from fault_tasks import cached, expected, make, warnings_of
from faults import UNPRIVILEGED, Child, fill, read_only_view, tmpfs
from tests_support import FaultyCallMemory


# -- any OSError from a storage ----------------------------------------------------------------

FAULTS = [
    OSError(errno.EIO, "Input/output error"),
    PermissionError(errno.EACCES, "Permission denied"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
]


@pytest.mark.parametrize("compute_once", [False, True])
@pytest.mark.parametrize("intent", ["read", "write", "read and write"])
@pytest.mark.parametrize("fault", FAULTS, ids=lambda e: type(e).__name__)
def test_a_failing_storage_never_fails_a_call(fault, intent, compute_once):
    calls = FaultyCallMemory()
    f, ran = cached(Cache(ValueMemory(), calls), compute_once)
    assert f(1) == expected(1)
    for kind in intent.split(" and "):
        calls.faults[kind] = fault
    for x in (1, 2):  # stored before, and a miss
        result, caught = warnings_of(f, x)
        assert result == expected(x)
        assert all(fault.strerror in message for message in caught), caught
        assert caught or (x == 1 and "read" not in intent)
    assert ran == [1, 1, 2] if "read" in intent else ran == [1, 2]
    calls.faults.clear()
    assert f(1) == expected(1) and f.contains(1)  # what was stored before is still there


@pytest.mark.parametrize("fault", [KeyboardInterrupt(), SystemExit(3)], ids=type)
def test_interrupts_from_a_storage_are_never_swallowed(fault):
    calls = FaultyCallMemory()
    f, ran = cached(Cache(ValueMemory(), calls))
    calls.faults["read"] = fault
    with pytest.raises(type(fault)):
        f(1)
    calls.faults.clear()
    calls.faults["write"] = fault
    with pytest.raises(type(fault)):
        f(1)
    assert ran == [1]


_TO_RAISE: list = []


@pytest.mark.parametrize("raised", [ValueError("bad input"), KeyboardInterrupt(), SystemExit(2)],
                         ids=type)
def test_the_functions_own_errors_propagate_unchanged_and_uncached(raised):
    calls = FaultyCallMemory()
    runs = []
    _TO_RAISE[:] = [raised]  # a global: a captured exception would have no digest

    @fleche.fleche(cache=Cache(ValueMemory(), calls))
    def boom(x):
        runs.append(x)
        raise _TO_RAISE[0]

    calls.faults["write"] = OSError(errno.EIO, "Input/output error")
    with pytest.raises(type(raised)) as info:
        boom(1)
    assert info.value is raised
    calls.faults.clear()
    with pytest.raises(type(raised)):
        boom(1)
    assert runs == [1, 1] and not boom.contains(1)


# -- real faults ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pickle files", "sqlite"])
def test_a_full_disk(kind, tmp_path):
    if kind == "sqlite":
        pytest.importorskip("sqlalchemy")
    with tmpfs(tmp_path / "disk") as disk:
        # SQLite: the values live elsewhere, so it is the database that finds the disk full.
        spec = str(disk / "store") if kind == "pickle files" else (
            f"sqlite:///{disk}/calls.db?values={tmp_path}/values")
        f, ran = cached(fleche.open(spec))
        for x in range(3):
            f(x)
        filler = fill(disk)
        for x in range(1000, 1005):
            result, caught = warnings_of(f, x)
            assert result == expected(x)
            assert any("No space left" in m or "full" in m for m in caught), caught
        del ran[:]
        assert [f(x) for x in range(3)] == [expected(x) for x in range(3)]
        assert ran == []  # nothing stored before was lost
        filler.unlink()
        f(2000)
        assert f.contains(2000)  # room again: cached again
        fleche.open(spec).close()


@pytest.mark.parametrize("compute_once", [False, True])
def test_a_read_only_mount(compute_once, tmp_path):
    store = tmp_path / "store"
    f, _ = cached(fleche.open(str(store)))
    f(0), f(1)
    victim = fleche.open(str(store)).calls.load(f.digest(1)).result
    flip_a_byte(fleche.open(str(store)).values._path(victim))
    before = sorted(p.relative_to(store) for p in store.rglob("*") if ".locks" not in p.parts)
    with read_only_view(store, tmp_path / "view") as view:
        g, ran = cached(fleche.open(str(view)), compute_once)
        assert g(0) == expected(0) and ran == []  # a hit
        for x in (1, 2):  # a corrupt entry that cannot be discarded, and a miss
            result, caught = warnings_of(g, x)
            assert result == expected(x)
            assert any("Read-only file system" in m for m in caught), caught
        assert ran == [1, 2]
    after = sorted(p.relative_to(store) for p in store.rglob("*") if ".locks" not in p.parts)
    assert after == before


@pytest.mark.parametrize("layout", ["index", "files"])
def test_permission_denied(layout, tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop the capabilities that ignore modes")
    if os.geteuid() != 0:
        pytest.skip("without root, chmod alone denies; this test drops root's capabilities")
    store = tmp_path / "store"
    spec = f"{store}?layout={layout}"
    f, _ = make(spec)  # the function the child calls
    f(0)
    for path in [store, *store.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        with Child(spec, prefix=UNPRIVILEGED) as child:
            report = child.run(0, 3)  # a hit and two misses that cannot be saved
        assert report["errors"] == [] and report["wrong"] == []
        assert report["ran"] == [1, 2]
        assert any("Permission denied" in m for m in report["warnings"]), report
        (store / ("calls" if layout == "files" else "index.sqlite")).chmod(0o000)  # unreadable
        with Child(spec, "--compute-once", prefix=UNPRIVILEGED) as child:
            report = child.run(0, 2)
        assert report["errors"] == [] and report["wrong"] == [] and report["ran"] == [0, 1]
        assert any("Permission denied" in m for m in report["warnings"]), report
    finally:
        for path in [store, *store.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    g, ran = make(spec)
    assert g(0) == expected(0) and ran == []  # nothing was lost


@pytest.mark.parametrize("compute_once", [False, True])
def test_a_lock_file_replaced_by_a_directory(compute_once, tmp_path):
    cache = fleche.open(str(tmp_path / "store"))
    f, ran = cached(cache, compute_once)
    for storage in (cache.calls, cache.values):
        os.makedirs(lock_path(storage._lock_directory()))
    result, caught = warnings_of(f, 5)
    assert result == expected(5) and ran == [5]
    assert any("directory" in m for m in caught), caught


def test_the_store_root_deleted_while_a_process_loops(tmp_path):
    root = tmp_path / "store"
    with Child(str(root)) as child:
        first = child.run(0, 50)
        assert first["errors"] == [] and first["cached"] == 50
        child.send(50, 300)  # the child loops while the root goes
        shutil.rmtree(root, ignore_errors=True)  # the child may write meanwhile
        during = child.result()
        assert during["errors"] == [] and during["wrong"] == []
        shutil.rmtree(root)
        root.mkdir()  # the root is back (empty, as after a remount)
        after = child.run(300, 550)
    assert after["errors"] == [] and after["wrong"] == []
    assert after["cached"] == 250  # cached again once the root is back, without a restart


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_a_database_that_went_away(server, tmp_path):
    sa = pytest.importorskip("sqlalchemy")
    base = os.environ.get(
        "FLECHE_TEST_POSTGRES_URL" if server == "postgresql" else "FLECHE_TEST_MARIADB_URL")
    if not base:
        pytest.skip(f"no {server} server: set FLECHE_TEST_{server.upper()[:8]}_URL")
    name = f"fleche_gone_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(sa.engine.make_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
        cache = fleche.open(f"{url}?values={tmp_path}/values")
        f, ran = cached(cache)
        f(1)
        with admin.connect() as connection:
            force = " WITH (FORCE)" if server == "postgresql" else ""
            connection.exec_driver_sql(f"DROP DATABASE {name}{force}")
        for x in (1, 2):
            result, caught = warnings_of(f, x)
            assert result == expected(x) and caught
        assert ran == [1, 1, 2]
        cache.close()
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()


# -- on workers ---------------------------------------------------------------------------------


def test_compute_and_save_returns_and_logs_on_a_read_only_store(tmp_path, caplog):
    (tmp_path / "store").mkdir()
    with read_only_view(tmp_path / "store", tmp_path / "view") as view:
        run = ComputeAndSave(fleche.open(str(view)), Call("triple", {"x": 3}), lambda x: x * 3000)
        with caplog.at_level(logging.WARNING, logger="fleche.tasks"):
            assert run(3) == 9000
    assert "result" in caplog.text and "Read-only file system" in caplog.text, caplog.text
    boom = ComputeAndSave(fleche.open(str(tmp_path / "x")), Call("boom", {}), _raise)
    with pytest.raises(ZeroDivisionError):
        boom()


def _raise():
    return 1 / 0


def test_dask_workers_return_results_over_a_read_only_store(tmp_path):
    pytest.importorskip("distributed")
    import dask
    from distributed import Client, LocalCluster

    from fleche.dask import FlecheCache
    from fleche.dask import cached as dask_cached

    import cli_tasks

    (tmp_path / "store").mkdir()
    with read_only_view(tmp_path / "store", tmp_path / "view") as view, LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
        worker_dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        client.register_plugin(FlecheCache(str(view)))
        assert client.gather(client.map(cli_tasks.square, [2, 3])) == [4, 9]  # the plugin path
        total = dask.delayed(sum)([dask.delayed(pow)(2, 10), 5])
        assert dask_cached(total, store=fleche.open(str(view))).compute() == 1029  # cached()
