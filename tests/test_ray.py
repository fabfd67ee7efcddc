"""fleche.ray on a local Ray instance with real worker processes."""

import dataclasses
import os
import pathlib
import shutil
import tempfile

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'fleche[ray]')")
from ray.util.queue import Queue  # noqa: E402

import dask_tasks  # noqa: E402
import ray_tasks as tasks  # noqa: E402
from fleche import FlecheWarning, fleche  # noqa: E402
from fleche._tasks import Upstream  # noqa: E402
from fleche.caches import Cache  # noqa: E402
from fleche.ray import cached_remote, key_of, remote, runtime_env  # noqa: E402
from fleche.storage import CallPickleFile, LockTimeout, ValuePickleFile  # noqa: E402

HOME_RAY = pathlib.Path.home() / ".ray"
SETTINGS = {
    # Ray 2.60 enables token authentication and saves a token to ~/.ray/auth_token; a local test
    # cluster needs none (https://docs.ray.io/en/latest/ray-security/token-auth.html).
    "RAY_AUTH_MODE": "disabled",
    # Worker processes import fleche and the task modules from this tree.
    "PYTHONPATH": os.pathsep.join(
        [str(pathlib.Path(__file__).parents[1] / "src"), str(pathlib.Path(__file__).parent),
         os.environ.get("PYTHONPATH", "")]
    ),
}


def file_cache(path):
    return Cache(ValuePickleFile(root=path / "values"), CallPickleFile(root=path / "calls"))


@pytest.fixture(scope="module")
def hook_store(tmp_path_factory):
    """A local Ray instance whose workers all have this store as their default cache."""
    had_home_ray = HOME_RAY.exists()
    saved = {name: os.environ.get(name) for name in SETTINGS}
    os.environ.update(SETTINGS)
    # Ray's session directory holds unix sockets, whose paths must stay short.
    temp = tempfile.mkdtemp(prefix="fleche-ray-")
    store = file_cache(tmp_path_factory.mktemp("hook-store"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp,
                 runtime_env=runtime_env(store), log_to_driver=False)
        yield store
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert HOME_RAY.exists() == had_home_ray, "Ray wrote to ~/.ray"


@pytest.fixture
def store(hook_store, tmp_path):
    return file_cache(tmp_path)


@pytest.fixture
def log(tmp_path):
    return str(tmp_path / "runs.log")


def test_second_run_is_served_from_the_store(store, log):
    square = cached_remote(tasks.square, store)
    assert square.key(3, log) == tasks.square.digest(3, log)  # the key @fleche gives
    first = ray.get([square.remote(i, log) for i in range(6)])
    assert sorted(tasks.runs(log)) == sorted(f"square:{i}" for i in range(6))
    second = ray.get([square.remote(i, log) for i in range(6)])
    assert second == first == [{"x": i, "square": i * i} for i in range(6)]
    assert len(tasks.runs(log)) == 6  # the bodies did not run again
    # The store is an ordinary cache: the driver reads what the workers wrote, with metadata.
    call = store.load(tasks.square.digest(5, log))
    assert call.result == {"x": 5, "square": 25}
    assert call.metadata["runtime"]["pid"] != os.getpid()
    assert call.metadata["function"]["module"] == "dask_tasks"  # where square is defined


def test_plain_functions_get_the_decorator_key(store):
    add = remote(store, num_cpus=1)(tasks.plain_add)
    assert add.key(2, 3) == fleche(tasks.plain_add).digest(2, 3)
    assert ray.get(add.remote(2, 3)) == 5
    assert store.load_result(add.key(2, 3)) == 5
    assert ray.get(add.options(num_cpus=0.5).remote(2, 3)) == 5


def test_chain_of_three_cached_tasks_keyed_through_refs(store, log):
    inc = cached_remote(tasks.inc, store)

    def chain(start):
        a = inc.remote(start, log)
        b = inc.remote(a, log)
        return a, b, inc.remote(b, log)

    a, b, c = chain(1)
    # Keys downstream name the upstream call, not its value: known before anything ran.
    assert key_of(a) == tasks.inc.digest(1, log)
    assert key_of(b) == tasks.inc.digest(Upstream(key_of(a)), log)
    assert key_of(c) == tasks.inc.digest(Upstream(key_of(b)), log)
    assert ray.get(c) == 4
    assert tasks.runs(log) == ["inc:1", "inc:2", "inc:3"]
    a2, b2, c2 = chain(1)  # fresh refs, same keys: all three are hits
    assert (key_of(a2), key_of(b2), key_of(c2)) == (key_of(a), key_of(b), key_of(c))
    assert ray.get([a2, b2, c2]) == [2, 3, 4]
    assert len(tasks.runs(log)) == 3
    assert ray.get(chain(10)[2]) == 13
    assert tasks.runs(log)[3:] == ["inc:10", "inc:11", "inc:12"]
    # Nested refs reach the function as refs and key by their calls too.
    total = cached_remote(tasks.total, store)
    assert ray.get(total.remote([a, b, c], log)) == 9
    assert ray.get(total.remote(list(chain(1)), log)) == 9
    assert tasks.runs(log)[6:] == ["total:2+3+4"]


def test_refs_from_elsewhere_are_keyed_by_value_on_the_worker(store, log):
    inc = cached_remote(tasks.inc, store)
    foreign = ray.put(5)
    assert inc.key(foreign, log) is None
    out = inc.remote(foreign, log)
    assert key_of(out) is None
    assert ray.get(out) == 6
    assert store.load_result(tasks.inc.digest(5, log)) == 6
    assert ray.get(inc.remote(ray.put(5), log)) == 6
    assert ray.get(inc.remote(5, log)) == 6
    assert ray.get(cached_remote(tasks.total, store).remote([foreign, ray.put(1)], log)) == 6
    assert tasks.runs(log) == ["inc:5", "total:5+1"]


def test_exceptions_are_not_cached(store, log):
    fails = cached_remote(tasks.fails, store)
    for _ in range(2):
        with pytest.raises(ValueError, match="bad input 4"):
            ray.get(fails.remote(4, log))
    assert tasks.runs(log) == ["fails:4", "fails:4"]
    assert not store.contains(tasks.fails.digest(4, log))


def test_arguments_without_digest_run_uncached(store, log):
    kind = cached_remote(tasks.kind, store)
    for _ in range(2):
        with pytest.warns(FlecheWarning, match="ran uncached"):
            ref = kind.remote(object(), log)
        assert ray.get(ref) == "object"
    assert tasks.runs(log) == ["kind:object", "kind:object"]
    with pytest.raises(TypeError):
        kind.remote(1, log, 2)


def test_setup_hook_makes_the_store_every_workers_default(hook_store, log):
    assert ray.get([tasks.call_square.remote(7, log) for _ in range(4)])[0] == {"x": 7, "square": 49}
    assert 1 <= len(tasks.runs(log)) <= 2  # concurrent misses on two workers may both run
    assert hook_store.load_result(tasks.square.digest(7, log)) == {"x": 7, "square": 49}
    before = len(tasks.runs(log))
    assert ray.get(tasks.call_square.remote(7, log)) == {"x": 7, "square": 49}
    assert len(tasks.runs(log)) == before


def test_storages_passed_as_arguments_and_put(store, tmp_path):
    values = ValuePickleFile(root=tmp_path / "shared")
    key = ray.get(tasks.save_value.remote(ray.put(values), {"a": [1, 2]}))
    assert ray.get(tasks.load_value.remote(values, key)) == {"a": [1, 2]} == values.load(key)
    # A worker holding the key's lock excludes the driver through the same lock files.
    held, release = Queue(), Queue()
    holder = tasks.hold_lock.remote(values, key, held, release)
    assert held.get(timeout=60) == "held"
    with pytest.raises(LockTimeout):
        with dataclasses.replace(values, lock_timeout=0.2).locked(key):
            pass
    release.put("go")
    assert ray.get(holder) == "released"
    with dataclasses.replace(values, lock_timeout=10).locked(key):
        pass


def test_a_dask_run_finds_the_ray_runs_results(store, log):
    from distributed import Client, LocalCluster

    from fleche.dask import FlecheCache

    square = cached_remote(dask_tasks.square, store)
    from_ray = ray.get([square.remote(i, log) for i in range(4)])
    assert len(tasks.runs(log)) == 4
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None,
                      worker_dashboard_address=None) as cluster, Client(cluster) as client:
        client.register_plugin(FlecheCache(store))
        from_dask = client.gather(client.map(dask_tasks.square, range(6), log=log))
    assert from_dask[:4] == from_ray
    assert sorted(tasks.runs(log)[4:]) == ["square:4", "square:5"]
    # ... and the other way round.
    assert ray.get([square.remote(i, log) for i in range(6)]) == from_dask
    assert len(tasks.runs(log)) == 6


def test_wrong_arguments_are_refused():
    with pytest.raises(TypeError, match="cache"):
        cached_remote(tasks.inc, 42)
    with pytest.raises(ValueError, match="num_returns"):
        cached_remote(tasks.inc, num_returns=2)
    with pytest.raises(ValueError, match="worker_process_setup_hook"):
        runtime_env(file_cache(pathlib.Path("x")), worker_process_setup_hook="m.f")


def test_a_failing_store_never_fails_a_cached_task(hook_store, log):
    """Lookups on the driver and on the workers and saves on the workers that raise (a disk or
    a database gone) leave the tasks their results."""
    import errno

    from fleche.storage import ValueMemory
    from tests_support import FaultyCallMemory

    broken = Cache(ValueMemory(), FaultyCallMemory())
    for kind in ("read", "write"):
        broken.calls.faults[kind] = OSError(errno.EIO, "Input/output error")
    inc = cached_remote(tasks.inc, broken)
    with pytest.warns(FlecheWarning, match="Input/output error"):
        direct = inc.remote(1, log)  # the driver's lookup fails
    keyed_there = inc.remote(ray.put(2), log)  # keyed and looked up on the worker
    assert ray.get([direct, keyed_there]) == [2, 3]
    assert sorted(tasks.runs(log)) == ["inc:1", "inc:2"]


def test_partials_run_as_cached_tasks(store):
    import functools

    triple = cached_remote(functools.partial(tasks.scaled, factor=3), store)
    assert "scaled" in repr(triple)
    assert ray.get(triple.remote(2)) == 6
    assert store.load_result(triple.key(2)) == 6


def test_tasks_apply_meta_isolate_and_expire_as_direct_calls_do(store, log):
    where = cached_remote(tasks.where, store)
    ran_in = ray.get(where.remote(1, log))
    assert ran_in != os.getcwd() and not os.path.exists(ran_in)  # a fresh directory, removed
    assert store.load(where.key(1, log)).metadata["tag"] == {"answer": 42}
    stale = cached_remote(tasks.stale, store)
    ray.get(stale.remote(1, log))
    ray.get(stale.remote(1, log))  # expire=0: the stored call is too old at once
    assert tasks.runs(log).count("stale:1") == 2


def test_a_corrupt_entry_is_recomputed_and_repaired_on_the_worker(store, log):
    inc = cached_remote(tasks.inc, store)
    key = inc.key(7, log)
    ray.get(inc.remote(7, log))
    (entry,) = (path for path in (store.calls.root).rglob(f"{key}*") if path.is_file())
    entry.write_bytes(entry.read_bytes()[:-3] + b"xyz")
    assert ray.get(inc.remote(7, log)) == 8
    assert tasks.runs(log).count("inc:7") == 2
    assert store.load_result(key) == 8  # repaired


def test_async_functions_are_refused_with_the_reason():
    with pytest.raises(TypeError, match="async function"):
        cached_remote(tasks.later)
