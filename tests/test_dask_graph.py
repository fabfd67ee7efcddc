"""Whole-graph caching of every Dask collection, on a real LocalCluster and on threads."""

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from dask import delayed

distributed = pytest.importorskip("distributed", reason="the dask extra is not installed")
pytest.importorskip("pyarrow", reason="dask.dataframe needs pyarrow (the dask extra)")
import dask.array as da  # noqa: E402
import dask.bag as db  # noqa: E402
import dask.dataframe as dd  # noqa: E402
from distributed import Client  # noqa: E402

import dask_tasks as tasks  # noqa: E402
import fleche  # noqa: E402
from fleche.caches import Cache  # noqa: E402
from fleche.dask import cached  # noqa: E402
from fleche.storage import CallPickleFile, ValuePickleFile  # noqa: E402

KINDS = ["array", "frame", "bag", "delayed"]
TESTS = Path(__file__).parent
FRESH_PROCESS = "import sys, dask_tasks; dask_tasks.compute_in_fresh_process(*sys.argv[1:])"


@pytest.fixture(params=["distributed", "threads"])
def scheduler(request, cluster):
    """The scheduler a test computes on: the cluster (a default client) or local threads."""
    if request.param == "distributed":
        with Client(cluster):
            yield cluster.scheduler_address
    else:
        with dask.config.set(scheduler="threads"):
            yield "threads"


def file_cache(path):
    return Cache(ValuePickleFile(root=path / "values"), CallPickleFile(root=path / "calls"))


def assert_same(a, b):
    """Equal values of the same type, bit for bit for arrays and frames."""
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    elif isinstance(a, pd.Series):
        pd.testing.assert_series_equal(a, b, check_exact=True)
    else:
        assert a == b


def in_fresh_process(kinds, log, root, scheduler):
    """The pipelines built and computed through the store by a new Python process."""
    out = root / "results.pickle"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, ",".join(kinds), log, str(root / "store"),
         scheduler, str(out)],
        check=True, env=env, timeout=180,
    )
    with open(out, "rb") as f:
        return pickle.load(f)


def test_pipelines_are_served_warm_in_a_fresh_process(scheduler, settle, tmp_path):
    """Array, dataframe, bag and delayed pipelines: cold here, then rebuilt in a new process
    (new names where dask makes them random) and served from the store, no task body run."""
    log, store = str(tmp_path / "runs.log"), file_cache(tmp_path / "store")
    plain, uncached_runs = {}, {}
    for kind in KINDS:
        before = len(tasks.runs(log))
        plain[kind] = tasks.build(kind, log).compute()
        settle()  # the cached graph keeps the plain one's key names
        uncached_runs[kind] = len(tasks.runs(log)) - before
        assert uncached_runs[kind] > 0
        cold = cached(tasks.build(kind, log), store=store).compute()
        settle()
        assert_same(cold, plain[kind])
        assert len(tasks.runs(log)) - before == 2 * uncached_runs[kind]  # cold: ran once more
    runs = len(tasks.runs(log))
    warm = in_fresh_process(KINDS, log, tmp_path, scheduler)
    for kind in KINDS:
        assert_same(warm[kind], plain[kind])
    assert len(tasks.runs(log)) == runs  # warm: no task body ran


def new_runs(log, since):
    return sorted(tasks.runs(log)[since:])


def _scheduler_keys(dask_scheduler):
    return [str(key) for key in dask_scheduler.tasks]


def wait_until_forgotten(client, known, timeout=60.0):
    """Wait until the scheduler knows no task but those in ``known`` (what other tests left on
    the shared cluster): a graph submitted while it still knows a key of the same name keeps the
    old task (dask warns "Detected different `run_spec`"), which would run a stage again
    instead of loading it."""
    deadline = time.monotonic() + timeout
    while left := set(client.run_on_scheduler(_scheduler_keys)) - known:
        assert time.monotonic() < deadline, f"the scheduler kept tasks of a finished compute: {left}"
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["array", "frame", "bag"])
def test_a_changed_stage_recomputes_only_its_part(kind, cluster, tmp_path):
    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")

    def run(**changes):
        # min_seconds=0: every task is stored, not only the outputs; optimize_graph=False:
        # every stage is a task of its own (dask would fuse the array and bag stages).
        collection = tasks.build(kind, log, **changes)
        result = cached(collection, store=store, min_seconds=0, optimize_graph=False).compute()
        wait_until_forgotten(client, known)
        return result

    with Client(cluster) as client:
        known = set(client.run_on_scheduler(_scheduler_keys))
        run()
        first = len(tasks.runs(log))
        per_stage = first // 2
        changed = run(offset=5)  # the last stage changed: only it runs, on loaded inputs
        assert new_runs(log, first) == ["offset:5"] * per_stage
        since = len(tasks.runs(log))
        both = run(factor=3)  # the first stage changed: both stages run
        assert new_runs(log, since) == sorted(["scale:3", "offset:1"] * per_stage)
        plain_log = str(tmp_path / "plain.log")
        assert_same(changed, tasks.build(kind, plain_log, offset=5).compute())
        assert_same(both, tasks.build(kind, plain_log, factor=3).compute())


@pytest.fixture
def settle(scheduler):
    """Call after a compute: on the cluster, waits until the scheduler forgot its tasks (see
    :func:`wait_until_forgotten`); on threads, nothing to wait for."""
    if scheduler == "threads":
        return lambda: None
    client = distributed.default_client()
    known = set(client.run_on_scheduler(_scheduler_keys))
    return lambda: wait_until_forgotten(client, known)


def test_a_changed_input_recomputes_only_the_chunks_it_reaches(settle, tmp_path):
    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")
    meta = np.empty((0, 0), dtype=np.int64)

    def pipeline(values):  # keyed by content: each build embeds a new array object
        x = da.from_array(values, chunks=4)
        return x.map_blocks(tasks.scale, 2, log, meta=meta).sum(axis=1)

    values = tasks.input_array()
    first = cached(pipeline(values.copy()), store=store, min_seconds=0).compute()
    settle()
    assert tasks.runs(log) == ["scale:2"] * 4
    again = cached(pipeline(values.copy()), store=store, min_seconds=0).compute()
    settle()
    assert_same(again, first) and len(tasks.runs(log)) == 4  # equal content: loaded
    values[0, 0] = 100  # in chunk (0, 0) only
    changed = cached(pipeline(values), store=store, min_seconds=0).compute()
    assert tasks.runs(log) == ["scale:2"] * 5
    assert_same(changed, pipeline(values).compute())


def test_exceptions_are_never_cached(cluster, tmp_path):
    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")
    meta = np.empty((0, 0), dtype=np.int64)
    with Client(cluster) as client:
        known = set(client.run_on_scheduler(_scheduler_keys))
        for attempt in range(2):
            x = da.from_array(tasks.input_array(), chunks=4)
            checked = x.map_blocks(tasks.fail_block, 5, log, meta=meta)  # 5 is in chunk (0, 1)
            with pytest.raises(ValueError, match="bad value 5 in a block"):
                cached(checked.sum(), store=store, min_seconds=0).compute()
            # Until the scheduler forgets the erred task, a resubmitted graph with the same
            # keys gets dask's remembered error back without running anything.
            wait_until_forgotten(client, known)
            assert tasks.runs(log).count("fail:raised") == attempt + 1  # ran again
    stored = [call for call in store.query() if call.name == "fail_block"]
    assert all(5 not in call.result for call in stored)  # only the blocks that passed


def test_which_results_are_stored(tmp_path):
    """Outputs always; tasks whose runtime x uses reaches min_seconds; select's choices."""
    log = str(tmp_path / "runs.log")
    outputs = len(list(flatten_keys(tasks.build("array", log))))
    assert outputs == 2  # the two chunks of the sum along axis 0

    def entries(name, **rule):
        store = file_cache(tmp_path / name)
        with dask.config.set(scheduler="threads"):
            cached(tasks.build("array", log), store=store, **rule).compute()
        return [call.metadata["dask"]["task"] for call in store.query()]

    assert entries("outputs", min_seconds=None) == ["sum-aggregate"] * 2
    assert sorted(entries("default")) == ["sum-aggregate"] * 2  # no task here takes 0.1 s
    chosen = entries("select", select=lambda key, task: True if "offset" in str(key) else None)
    assert sorted(chosen) == ["add_offset"] * 4 + ["sum-aggregate"] * 2
    vetoed = entries("veto", select=lambda key, task: False)
    assert vetoed == []
    # Tasks only: the data nodes and aliases of the graph never become entries. Stages dask
    # fuses into one task (scale into add_offset, matmul and transpose into chunk_sum) are one
    # entry, unless optimize_graph=False keeps every stage a task.
    everything = entries("all", min_seconds=0)
    assert sorted(set(everything)) == [
        "add_offset", "chunk_sum", "chunk_sum-aggregate", "sum", "sum-aggregate"
    ]
    assert everything.count("add_offset") == 4
    unfused = entries("unfused", min_seconds=0, optimize_graph=False)
    assert sorted(set(unfused)) == sorted(set(everything) | {"matmul", "scale", "transpose"})
    assert unfused.count("scale") == 4


def flatten_keys(collection):
    from dask.core import flatten

    return flatten(collection.__dask_keys__())


def test_min_seconds_stores_slow_intermediates(tmp_path):
    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")

    def pipeline(last):
        slow = delayed(tasks.busy_inc)(1, 0.3, log)  # at least 0.3 s of work: stored
        fast = delayed(tasks.plain_inc)(slow, log)  # microseconds: not stored
        return delayed(tasks.plain_add)(fast, last, log)

    with dask.config.set(scheduler="threads"):
        assert cached(pipeline(1), store=store, min_seconds=0.2).compute() == 4
        assert len(list(store.list())) == 2  # the slow task and the output
        assert cached(pipeline(2), store=store, min_seconds=0.2).compute() == 5
    assert tasks.runs(log) == ["busy:1", "inc:2", "add:3+1", "inc:2", "add:3+2"]


def test_embedded_data_is_digested_once_per_graph(tmp_path):
    store = file_cache(tmp_path / "store")
    payload = tasks.CountedPayload("x" * 1000)
    parts = [delayed(tasks.payload_size)(payload, i) for i in range(5)]
    before = tasks.CountedPayload.digests
    total = cached(delayed(sum)(parts), store=store)
    assert tasks.CountedPayload.digests - before == 1  # five tasks, one digest
    with dask.config.set(scheduler="threads"):
        assert total.compute() == 5 * 1000 + 10


def test_dataframe_inputs_are_keyed_by_content(tmp_path):
    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")
    meta = tasks.input_frame().head(0)

    def pipeline(frame):
        return dd.from_pandas(frame, npartitions=3).map_partitions(
            tasks.scale_partition, 2, log, meta=meta).x.sum()

    with dask.config.set(scheduler="threads"):
        first = cached(pipeline(tasks.input_frame()), store=store).compute()
        again = cached(pipeline(tasks.input_frame()), store=store).compute()
        changed_frame = tasks.input_frame()
        changed_frame.loc[0, "x"] = 1000
        changed = cached(pipeline(changed_frame), store=store).compute()
    assert again == first and changed == first + 2000
    assert tasks.runs(log) == ["scale:2"] * 6  # the equal frame loaded, the changed one not


def test_read_inputs_are_keyed_by_path_unless_source_state_says_more(tmp_path):
    from fleche.dask import file_state

    path = tmp_path / "data.parquet"
    log = str(tmp_path / "runs.log")

    def write(factor):
        frame = tasks.input_frame()[["x", "key"]]
        frame["x"] *= factor
        frame.to_parquet(path, index=False)
        st = os.stat(path)  # a modification time surely later than the previous one
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + factor * 10**9))

    def total(store, **options):
        frame = dd.read_parquet(path)
        frame = frame.map_partitions(tasks.scale_partition, 1, log, meta=frame._meta)
        return cached(frame.x.sum(), store=store, **options).compute()

    by_path, by_state = file_cache(tmp_path / "path"), file_cache(tmp_path / "state")
    by_version = file_cache(tmp_path / "version")
    with dask.config.set(scheduler="threads"):
        write(1)
        original = total(by_path)
        assert total(by_state, source_state=file_state) == original
        assert total(by_version, source_state=lambda task: "v1") == original
        runs = len(tasks.runs(log))
        assert total(by_state, source_state=file_state) == original  # unchanged file: loaded
        assert len(tasks.runs(log)) == runs
        write(2)
        assert total(by_path) == original  # keyed by its path only: the stale result
        assert total(by_state, source_state=file_state) == 2 * original
        assert total(by_version, source_state=lambda task: "v1") == original
        assert total(by_version, source_state=lambda task: "v2") == 2 * original


def test_the_caching_switch_covers_compute_and_persist(scheduler, tmp_path):
    from distributed import get_client

    from fleche.dask import caching

    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")
    plain = {kind: tasks.build(kind, str(tmp_path / "plain.log")).compute() for kind in KINDS}
    with caching(store, min_seconds=0):
        for kind in KINDS:  # cold, through x.compute()
            assert_same(tasks.build(kind, log).compute(), plain[kind])
        cold = len(tasks.runs(log))
        for kind in KINDS:  # warm, rebuilt: every entry point loads
            assert_same(tasks.build(kind, log).compute(), plain[kind])
            assert_same(dask.compute(tasks.build(kind, log))[0], plain[kind])
            assert_same(tasks.build(kind, log).persist().compute(), plain[kind])
            assert_same(dask.persist(tasks.build(kind, log))[0].compute(), plain[kind])
            if scheduler != "threads":
                client = get_client()
                assert_same(client.compute(tasks.build(kind, log)).result(), plain[kind])
                assert_same(client.persist(tasks.build(kind, log)).compute(), plain[kind])
        assert len(tasks.runs(log)) == cold
    tasks.build("delayed", log).compute()  # the switch is off again
    assert len(tasks.runs(log)) == cold + 8


def test_a_dask_config_setting_is_the_same_switch(tmp_path):
    log = str(tmp_path / "runs.log")
    with dask.config.set({"scheduler": "threads", "fleche.dask.store": str(tmp_path / "store"),
                          "fleche.dask.min-seconds": None}):
        first = tasks.build("bag", log).compute()
        runs = len(tasks.runs(log))
        assert tasks.build("bag", log).compute() == first
        assert len(tasks.runs(log)) == runs
    assert len(list(fleche.open(str(tmp_path / "store")).list())) == 1  # only the output


def test_mixed_collections_keep_their_types(tmp_path):
    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")
    array = tasks.build("array", log)
    frame = dd.from_pandas(tasks.input_frame(), npartitions=2)
    items = db.from_sequence(range(6), npartitions=2).map(tasks.scale, 3, log)
    of_array = delayed(np.max)(array)  # a delayed task on an array
    collections = (array, frame, items, of_array)
    with dask.config.set(scheduler="threads"):
        plain = dask.compute(*collections)
        for _ in range(2):
            out = cached(*collections, store=store)
            assert [type(c) for c in out] == [type(c) for c in collections]
            for got, want in zip(dask.compute(*out), plain):
                assert_same(got, want)


def test_rewriting_twice_changes_nothing(tmp_path):
    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")
    once = cached(tasks.build("array", log), store=store, min_seconds=0)
    twice = cached(once, store=store, min_seconds=0)
    with dask.config.set(scheduler="threads"):
        assert_same(twice.compute(), once.compute())
    entries = len(list(store.list()))
    again = file_cache(tmp_path / "again")
    with dask.config.set(scheduler="threads"):
        cached(tasks.build("array", log), store=again, min_seconds=0).compute()
    assert len(list(again.list())) == entries  # no task was saved twice under two keys


def test_tasks_without_a_content_key_run_uncached(tmp_path):
    import threading

    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")
    lock = threading.Lock()  # no digest, no deterministic token

    def pipeline():
        upstream = delayed(tasks.plain_add)(delayed(tasks.plain_inc)(1, log), 0, log)
        return delayed(tasks.plain_inc)(delayed(tasks.locked_identity)(upstream, lock, log), log)

    with dask.config.set(scheduler="threads"):
        for _ in range(2):
            assert cached(pipeline(), store=store, min_seconds=0).compute() == 3
    # The task with the lock and everything downstream ran twice; upstream was stored.
    assert tasks.runs(log) == ["inc:1", "add:2+0", "identity", "inc:2", "identity", "inc:2"]


def test_hash_code_recomputes_what_an_edited_function_computed(tmp_path, monkeypatch):
    import importlib

    module = tmp_path / "edited_stage.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    by_name, by_code = file_cache(tmp_path / "name"), file_cache(tmp_path / "code")

    def results():
        stage = importlib.import_module("edited_stage")
        importlib.reload(stage)
        items = db.from_sequence([1, 2], npartitions=1).map(stage.step)  # passed to bag's map
        both = delayed(stage.step)(10), items.sum()  # and a task's own function
        with dask.config.set(scheduler="threads"):
            return (dask.compute(*cached(*both, store=by_name)),
                    dask.compute(*cached(*both, store=by_code, hash_code=True)))

    module.write_text("def step(x):\n    return x + 1\n")
    assert results() == ((11, 5), (11, 5))
    module.write_text("def step(x):\n    return x + 100\n")
    assert results() == ((11, 5), (110, 203))  # keyed by name only, the old results stay


SQL_URLS = {"postgresql": "FLECHE_TEST_POSTGRES_URL", "mariadb": "FLECHE_TEST_MARIADB_URL"}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "mariadb"])
def test_sql_stores_answer_in_one_batch_the_same(kind, tmp_path):
    pytest.importorskip("sqlalchemy", reason="the sql extra is not installed")
    if kind == "sqlite":
        spec = f"sqlite:///{tmp_path / 'calls.db'}"
    elif os.environ.get(SQL_URLS[kind]):
        spec = f"{os.environ[SQL_URLS[kind]]}?values={tmp_path / 'values'}"
    else:
        pytest.skip(f"no {kind} database to test with")
    import fleche
    from fleche.storage.sql.schema import schema

    log = str(tmp_path / "runs.log")
    try:
        with dask.config.set(scheduler="threads"):
            first = cached(tasks.build("bag", log), store=spec, min_seconds=0).compute()
            runs = len(tasks.runs(log))
            assert cached(tasks.build("bag", log), store=spec, min_seconds=0).compute() == first
        assert len(tasks.runs(log)) == runs
    finally:
        calls = fleche.open(spec).calls
        calls.list()  # connects
        schema.drop_all(calls.engine)
        calls.engine.dispose()


def test_bad_options_are_named(tmp_path):
    from fleche.dask import caching

    collection = tasks.build("delayed", str(tmp_path / "runs.log"))
    with pytest.raises(TypeError, match="cache or a store spec"):
        cached(collection, store=42)
    with pytest.raises(ValueError, match="min_seconds must be a number >= 0"):
        cached(collection, store=str(tmp_path), min_seconds=-1)
    with pytest.raises(TypeError, match="select must be a callable"):
        caching(str(tmp_path), select="outputs")
    with pytest.raises(TypeError, match="source_state must be a callable"):
        caching(str(tmp_path), source_state="v1")
    assert dask.config.get("fleche.dask.store", None) is None  # nothing was switched on


def test_a_large_partition_is_one_stored_value(tmp_path):
    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")

    def pipeline():
        return db.from_sequence(range(2000), npartitions=2).map(tasks.scale, 2, log)

    with dask.config.set(scheduler="threads"):
        first = cached(pipeline(), store=store).compute()
        assert cached(pipeline(), store=store).compute() == first == [2 * i for i in range(2000)]
    assert len(list(store.list())) == 2  # the two partitions
    # Not one value per item (the value storage destructures lists): one per partition, and
    # one for the arguments of each partition's task.
    assert len(list(store.values.list())) <= 4
    assert tasks.runs(log).count("scale:2") == 2000


def test_fused_and_unfused_graphs_share_results(tmp_path):
    store, log = file_cache(tmp_path / "store"), str(tmp_path / "runs.log")
    with dask.config.set(scheduler="threads"):
        unfused = cached(tasks.build("array", log), store=store, min_seconds=0,
                         optimize_graph=False).compute()
        entries, runs = len(list(store.list())), len(tasks.runs(log))
        fused = cached(tasks.build("array", log), store=store, min_seconds=0).compute()
    assert_same(fused, unfused)
    assert (len(list(store.list())), len(tasks.runs(log))) == (entries, runs)
