"""Live queries over stores the decorator wrote: tables (pandas), other processes' saves seen
by the same query, and the steps through ``f.query``. The query operations every cache has are
in the cache contract (:class:`fleche.testing.CacheTests`)."""

import multiprocessing
import pickle

import pytest

import cli_tasks as tasks
import fleche
from fleche import fleche as cached
from fleche.caches import Cache, memory_cache
from fleche.storage import CallPickleFile, ValuePickleFile
from tests_support import cache_on

pd = pytest.importorskip("pandas")


@pytest.fixture(params=["memory", "pickle", "sqlite"])
def store(request, tmp_path):
    return cache_on(request.param, tmp_path)


def test_table_of_a_decorated_function(store):
    with fleche.cache(store):
        for t in (0.5, 1.5):
            tasks.simulate(t)
        table = tasks.simulate.query().sorted(lambda c: c.arguments["temperature"]).table()
    assert list(table.columns) == [
        "function", "temperature", "label", "steps", "result", "runtime.start", "runtime.stop",
        "runtime.wall_time", "runtime.host", "runtime.pid", "function.version",
        "function.module",
    ]
    assert list(table["temperature"]) == [0.5, 1.5] and set(table["label"]) == {"run"}
    assert list(table["function"]) == ["simulate"] * 2
    assert list(table["function.version"]) == ["2"] * 2
    assert table["result"].iloc[1]["temperature"] == 1.5  # the result itself, loaded
    assert isinstance(table["runtime.start"].dtype, pd.DatetimeTZDtype)
    assert isinstance(table["runtime.stop"].dtype, pd.DatetimeTZDtype)
    assert (table["runtime.stop"] >= table["runtime.start"]).all()
    assert table.index.name == "key"
    keys = [tasks.simulate.digest(t) for t in (0.5, 1.5)]
    assert [store.expand(short) for short in table.index] == keys
    assert all(len(short) < len(key) for short, key in zip(table.index, keys))


def test_table_of_several_functions(store):
    with fleche.cache(store):
        tasks.square(3)
        tasks.simulate(1.0)
    table = store.query().sorted(lambda c: c.name).table()
    assert list(table["function"]) == ["simulate", "square"]
    assert table["x"].isna().tolist() == [True, False] and table["x"].iloc[1] == 3
    assert table["temperature"].isna().tolist() == [False, True]


def test_table_renames_arguments_that_clash_with_its_columns():
    cache = memory_cache()

    @cached(cache=cache)
    def odd(function, result):
        return function + result

    odd(1, 2)
    table = odd.query().table()
    assert list(table.columns[:4]) == ["function", "argument.function", "argument.result", "result"]
    row = table.iloc[0]
    assert (row["argument.function"], row["argument.result"], row["result"]) == (1, 2, 3)


def test_empty_table():
    table = memory_cache().query().table()
    assert table.empty and table.index.name == "key"


def _square_in_child(pickled_cache, xs):
    with fleche.cache(pickle.loads(pickled_cache)):
        return [tasks.square(x) for x in xs]


def test_a_query_sees_what_other_processes_saved_since(tmp_path):
    store = Cache(ValuePickleFile(root=tmp_path / "values"), CallPickleFile(root=tmp_path / "calls"))
    with fleche.cache(store):
        tasks.square(1)
        squares = tasks.square.query()
        big = squares.filter(lambda c: c.result > 4)
    assert squares.count() == 1 and big.empty()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_square_in_child, (pickle.dumps(store), [2, 3, 4])) == [4, 9, 16]
    assert squares.count() == 4 and sorted(big.results()) == [9, 16]  # the same queries, again
    assert squares.latest().metadata["runtime"]["pid"] != __import__("os").getpid()
    assert big.evict() == 2 and squares.count() == 2


def test_query_steps_through_the_decorated_function(store):
    with fleche.cache(store):
        for x in range(6):
            tasks.square(x)
        squares = tasks.square.query()
        assert squares.sorted(lambda c: c.result).take(3).results() == [0, 1, 4]
        by_parity = squares.groupby(lambda c: c.arguments["x"] % 2)
        assert sorted(by_parity) == [0, 1]
        assert sorted(by_parity[1].results()) == [1, 9, 25]
        assert tasks.square.query(4).only().result == 16
        target = memory_cache()
        assert by_parity[0].transfer(target, pop=True) == 3
        assert sorted(c.result for c in target.query()) == [0, 4, 16]
        assert sorted(squares.results()) == [1, 9, 25]
        assert tasks.square(4) == 16  # popped: computed again, stored again
        assert squares.count() == 4


def test_table_without_pandas_names_the_extra(monkeypatch):
    cache = memory_cache()
    monkeypatch.setitem(__import__("sys").modules, "pandas", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fleche\[pandas\]'"):
        cache.query().table()
