"""fleche.dask on a real LocalCluster with worker processes."""

import pickle

import dask
import numpy as np
import pytest
from dask import delayed

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
from distributed import Client, Event, LocalCluster  # noqa: E402

import dask_tasks as tasks  # noqa: E402
from fleche.caches import Cache  # noqa: E402
from fleche.dask import CachingOptimizer, FlecheCache, cached  # noqa: E402
from fleche.storage import CallPickleFile, ValuePickleFile  # noqa: E402
from fleche.testing import flip_a_byte  # noqa: E402


@pytest.fixture
def client(cluster):
    with Client(cluster) as client:
        yield client
        for name in list(client.run(lambda dask_worker: list(dask_worker.plugins)).values())[0]:
            if name.startswith("fleche-"):
                client.unregister_worker_plugin(name)


def file_cache(path):
    return Cache(ValuePickleFile(root=path / "values"), CallPickleFile(root=path / "calls"))


def plugins(client):
    return client.run(lambda dask_worker: sorted(n for n in dask_worker.plugins if "fleche" in n))


def test_plugin_registration_is_idempotent(client, tmp_path):
    store = file_cache(tmp_path)
    plugin = FlecheCache(store)
    assert plugin.name == FlecheCache(pickle.loads(pickle.dumps(store))).name
    assert plugin.name != FlecheCache(file_cache(tmp_path / "other")).name
    client.register_plugin(plugin)
    client.register_plugin(FlecheCache(store))
    assert all(names == [plugin.name] for names in plugins(client).values())
    with pytest.raises(TypeError, match="cache"):
        FlecheCache(42)


def test_second_run_is_served_from_the_store(client, tmp_path):
    store, log = file_cache(tmp_path), str(tmp_path / "runs.log")
    client.register_plugin(FlecheCache(store))
    first = client.gather(client.map(tasks.square, range(8), log=log))
    assert sorted(tasks.runs(log)) == sorted(f"square:{i}" for i in range(8))
    second = client.gather(client.map(tasks.square, range(8), log=log, pure=False))
    assert second == first == [{"x": i, "square": i * i} for i in range(8)]
    assert len(tasks.runs(log)) == 8  # the bodies did not run again
    # Through delayed too, and nested @fleche calls inside a task.
    assert dask.compute(delayed(tasks.square)(3, log))[0] == {"x": 3, "square": 9}
    assert client.submit(tasks.total_of_squares, 10, log).result() == 285
    assert client.submit(tasks.total_of_squares, 10, log, pure=False).result() == 285
    assert sorted(tasks.runs(log)).count("total:10") == 1
    assert len(tasks.runs(log)) == 8 + 1 + 2  # squares of 8 and 9 were new
    # The store is an ordinary cache: the client can read what the workers wrote.
    assert store.load_result(tasks.square.digest(5, log)) == {"x": 5, "square": 25}

    stats = FlecheCache.stats(client)
    assert set(stats.columns) >= {"worker", "plugin", "hits", "misses", "saves",
                                  "bytes_written", "load_seconds", "save_seconds"}
    assert stats["hits"].sum() >= 8 + 1 + 8
    assert stats["saves"].sum() == len(tasks.runs(log))
    assert stats["bytes_written"].sum() > 0


def test_exceptions_are_not_cached(client, tmp_path):
    log = str(tmp_path / "runs.log")
    client.register_plugin(FlecheCache(file_cache(tmp_path)))
    for _ in range(2):
        with pytest.raises(ValueError, match="bad input 4"):
            client.submit(tasks.fails, 4, log, pure=False).result()
    assert tasks.runs(log) == ["fails:4", "fails:4"]


def test_saving_a_large_result_leaves_the_event_loop_free(client, tmp_path):
    from fleche.dask import FlecheCache as Plugin

    gated = tasks.GatedCache(file_cache(tmp_path), saving="saving-big", release="release-big")
    client.register_plugin(Plugin(gated))
    future = client.submit(tasks.big_array, 12_500_000)  # 100 MB of float64
    assert Event("saving-big", client=client).wait(60)
    # The save is under way (blocked in the task's thread); the worker still answers.
    assert set(client.run(lambda: "alive").values()) == {"alive"}
    Event("release-big", client=client).set()
    result = future.result()
    assert result.nbytes == 100_000_000 and result[-1] == 7.0
    key = tasks.big_array.digest(12_500_000)
    assert np.array_equal(file_cache(tmp_path).load_result(key), result)


def test_cached_graph_is_culled_in_a_new_session(cluster, tmp_path):
    store, log = file_cache(tmp_path), str(tmp_path / "runs.log")

    def build():
        a = delayed(tasks.plain_inc)(1, log)
        b = delayed(tasks.plain_inc)(a, log)
        c = delayed(tasks.plain_inc)(10, log)
        return delayed(tasks.plain_add)(b, c, log)

    with Client(cluster):
        assert build().compute() == 14
        uncached_runs = len(tasks.runs(log))
        # min_seconds=0: every task is stored, not only the output (the default rule).
        assert cached(build(), store=store, min_seconds=0).compute() == 14
        assert len(tasks.runs(log)) == 2 * uncached_runs
    with Client(cluster):  # a new session: fresh delayed keys
        again = cached(build(), store=store, min_seconds=0)
        graph = dict(again.__dask_graph__())
        assert len(graph) == 1  # only the load of the final result is left
        assert again.compute() == 14
        assert len(tasks.runs(log)) == 2 * uncached_runs
        # A changed input reuses the unchanged branch and recomputes the rest.
        changed = delayed(tasks.plain_add)(delayed(tasks.plain_inc)(delayed(tasks.plain_inc)(1, log), log),
                                           delayed(tasks.plain_inc)(20, log), log)
        assert cached(changed, store=store, min_seconds=0).compute() == 24
        assert sorted(tasks.runs(log)[2 * uncached_runs:]) == ["add:3+21", "inc:20"]


def test_caching_optimizer_through_dask_config(client, tmp_path):
    store, log = file_cache(tmp_path), str(tmp_path / "runs.log")
    with dask.config.set(delayed_optimize=CachingOptimizer(store)):
        for _ in range(2):
            total = delayed(tasks.plain_add)(delayed(tasks.plain_inc)(5, log), 1, log)
            assert total.compute() == 7
    assert sorted(tasks.runs(log)) == ["add:6+1", "inc:5"]


def test_storages_passed_into_delayed_tasks(client, tmp_path):
    values = ValuePickleFile(root=tmp_path / "values")
    workers = list(client.scheduler_info()["workers"])
    key = client.submit(tasks.save_value, values, {"a": [1, 2]}, workers=workers[:1]).result()
    loaded = client.submit(tasks.load_value, values, key, workers=workers[1:]).result()
    assert loaded == {"a": [1, 2]} and values.load(key) == loaded
    cache = file_cache(tmp_path)
    out = delayed(tasks.load_value)(values, delayed(tasks.save_value)(values, (3, 4))).compute()
    assert out == (3, 4)
    assert cache.values.load(values.save((3, 4))) == (3, 4)


def test_worker_restarted_mid_run(client, tmp_path):
    store, log = file_cache(tmp_path), str(tmp_path / "runs.log")
    client.register_plugin(FlecheCache(store))
    futures = client.map(tasks.square, range(40), log=log)
    victim = list(client.scheduler_info()["workers"])[0]
    client.restart_workers([victim])
    results = client.gather(futures)
    assert results == [{"x": i, "square": i * i} for i in range(40)]
    # The restarted worker got the plugin again, and every stored entry is whole.
    assert all(names for names in plugins(client).values())
    for key in store.list():
        store.load(key)
    assert client.gather(client.map(tasks.square, range(40), log=log, pure=False)) == results


def test_a_corrupt_store_is_recomputed_and_repaired_on_the_workers(client, tmp_path):
    """Damaged entries (a call record, a result value) read as misses through every worker's
    StatsCache: the tasks return the right results and the entries are whole again."""
    log = str(tmp_path / "runs.log")
    store = Cache(
        ValuePickleFile(root=tmp_path / "values"), CallPickleFile(root=tmp_path / "calls"),
        inline_bytes=0,  # results in the value storage, so a value can be damaged on its own
    )
    client.register_plugin(FlecheCache(store))
    expected = [{"x": i, "square": i * i} for i in range(6)]
    assert client.gather(client.map(tasks.square, range(6), log=log)) == expected
    record = tasks.square.digest(1, log)
    value = store.calls.load(tasks.square.digest(2, log)).result
    flip_a_byte(store.calls._path(record))
    flip_a_byte(store.values._path(value))
    again = client.gather(client.map(tasks.square, range(6), log=log, pure=False))
    assert again == expected
    assert sorted(tasks.runs(log)[6:]) == ["square:1", "square:2"]  # only the damaged ones
    for i in range(6):
        assert store.load_result(tasks.square.digest(i, log)) == expected[i]  # repaired
    assert client.gather(client.map(tasks.square, range(6), log=log, pure=False)) == expected
    assert len(tasks.runs(log)) == 8
    stats = FlecheCache.stats(client)
    assert stats["errors"].sum() == 0 and stats["saves"].sum() == 8


def test_plugin_names_are_idempotent_and_reach_workers_that_join_later(tmp_path):
    """Names carry no secret (tests/test_secrets.py) and still make one plugin per store."""
    import fleche

    spec = str(tmp_path / "store")
    signed = Cache(ValuePickleFile(root=tmp_path / "v", secret_key="k"),
                   CallPickleFile(root=tmp_path / "c", secret_key="k"))
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
        worker_dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        client.register_plugin(FlecheCache(spec))
        client.register_plugin(FlecheCache(fleche.open(spec)))  # the same store: no second one
        client.register_plugin(FlecheCache(f"file://{spec}"))
        client.register_plugin(FlecheCache(signed))
        client.register_plugin(FlecheCache(pickle.loads(pickle.dumps(signed))))
        cluster.scale(2)
        client.wait_for_workers(2, timeout=60)
        names = plugins(client)
        assert len(names) == 2
        expected = sorted([FlecheCache(spec).name, FlecheCache(signed).name])
        assert all(found == expected for found in names.values())
