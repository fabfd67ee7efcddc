"""Decorator options and helpers: ``meta=``, ``isolate=True``, ``fleche.rerun`` and
``fleche.bind``."""

import asyncio
import multiprocessing
import os
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

import fleche
import option_tasks
from fleche.caches import ReadOnlyCache, memory_cache
from fleche.errors import FlecheWarning


# -- meta= -----------------------------------------------------------------------------------------


def git_section(call):
    return {"commit": "abc123", "argument_names": sorted(call.arguments)}


def test_meta_providers_add_sections_to_each_call_s_metadata():
    cache = memory_cache()
    seen = []

    def result_size(call):
        seen.append(call)
        return {"length": len(call.result)}

    @fleche.fleche(cache=cache, meta={"git": git_section, "size": result_size})
    def letters(n, sep="-"):
        return sep.join("abcdefgh"[:n])

    assert letters(3) == "a-b-c"
    metadata = cache.load(letters.digest(3)).metadata
    assert metadata["git"] == {"commit": "abc123", "argument_names": ["n", "sep"]}
    assert metadata["size"] == {"length": 5}
    assert metadata["runtime"]["wall_time"] >= 0 and metadata["function"]["module"]
    assert seen[0].arguments == {"n": 3, "sep": "-"} and seen[0].result == "a-b-c"
    letters(3)
    assert len(seen) == 1  # providers run when a call is computed and saved, not on a hit
    assert letters.query().table()["git.commit"].tolist() == ["abc123"]


def test_a_sequence_of_providers_is_named_after_each_function():
    cache = memory_cache()

    @fleche.fleche(cache=cache, meta=[git_section])
    def one(x):
        return x

    one(1)
    assert cache.load(one.digest(1)).metadata["git_section"]["commit"] == "abc123"


def test_a_failing_provider_costs_its_section_and_a_warning():
    cache = memory_cache()

    def broken(call):
        raise RuntimeError("no repository here")

    def not_a_dict(call):
        return ["a", "list"]

    @fleche.fleche(cache=cache, meta={"git": broken, "odd": not_a_dict, "ok": git_section})
    def one(x):
        return x

    with pytest.warns(FlecheWarning) as caught:
        assert one(1) == 1
    messages = " | ".join(str(w.message) for w in caught)
    assert "'git'" in messages and "RuntimeError: no repository here" in messages
    assert "'odd'" in messages and "dict" in messages
    metadata = cache.load(one.digest(1)).metadata
    assert "git" not in metadata and "odd" not in metadata and metadata["ok"]["commit"] == "abc123"


def test_bad_meta_options_are_refused_when_decorating():
    with pytest.raises(ValueError, match="runtime"):
        fleche.fleche(meta={"runtime": git_section})(lambda x: x)
    with pytest.raises(TypeError, match="callable"):
        fleche.fleche(meta={"git": "abc"})(lambda x: x)
    with pytest.raises(TypeError, match="meta="):
        fleche.fleche(meta=42)(lambda x: x)


# -- isolate=True ----------------------------------------------------------------------------------


def test_isolate_runs_the_call_in_a_fresh_directory_removed_afterwards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = memory_cache()

    @fleche.fleche(cache=cache, isolate=True)
    def writes(name):
        Path(name).write_text("scratch")
        assert sorted(os.listdir()) == [name]  # a fresh, empty directory
        return os.getcwd()

    inside = writes("out.txt")
    assert inside != str(tmp_path) and not os.path.exists(inside)
    assert os.getcwd() == str(tmp_path) and os.listdir(tmp_path) == []
    assert writes("out.txt") == inside  # a hit: the body did not run, no directory made
    assert writes("other.txt") != inside


def test_isolate_restores_the_directory_when_the_call_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []

    @fleche.fleche(cache=memory_cache(), isolate=True)
    def fails():
        seen.append(os.getcwd())
        Path("partial").write_text("x")
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        fails()
    assert os.getcwd() == str(tmp_path) and not os.path.exists(seen[0])


def test_nested_isolated_calls_each_get_their_own_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = memory_cache()

    @fleche.fleche(cache=cache, isolate=True)
    def inner():
        return os.getcwd()

    @fleche.fleche(cache=cache, isolate=True)
    def outer():
        mine = os.getcwd()
        theirs = inner()
        return mine, theirs, os.getcwd()

    mine, theirs, after = outer()
    assert mine != theirs and after == mine and os.getcwd() == str(tmp_path)


def test_isolated_calls_in_many_threads_never_share_a_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = []

    @fleche.fleche(cache=memory_cache(), isolate=True)
    def work(i):
        here = os.getcwd()
        Path("mine").write_text(str(i))
        if Path("mine").read_text() != str(i) or os.listdir() != ["mine"] or os.getcwd() != here:
            problems.append(i)
        return here

    with ThreadPoolExecutor(max_workers=4) as pool:
        places = list(pool.map(work, range(40)))
    assert problems == [] and len(set(places)) == 40
    assert os.getcwd() == str(tmp_path) and os.listdir(tmp_path) == []


def test_isolate_is_refused_for_async_functions():
    async def coro():
        return 1

    with pytest.raises(ValueError, match="isolate"):
        fleche.fleche(isolate=True)(coro)


# -- rerun -----------------------------------------------------------------------------------------


class Counter:
    def __digest__(self):  # captured by the functions below: their key leaves it out
        return "counter"

    def __init__(self):
        self.runs = []
        self.lock = threading.Lock()

    def add(self, name):
        with self.lock:
            self.runs.append(name)
            return len(self.runs)


def pipeline(cache):
    counter = Counter()

    @fleche.fleche(cache=cache)
    def load(x):
        return (x, counter.add("load"))

    @fleche.fleche(cache=cache)
    def fit(x):
        a, b = load(x), load(x + 1)
        return (a, b, counter.add("fit"))

    return load, fit, counter


def test_rerun_recomputes_every_call_inside_and_replaces_the_entries():
    cache = memory_cache()
    load, fit, counter = pipeline(cache)
    first = fit(1)
    assert fit(1) == first and counter.runs == ["load", "load", "fit"]
    with fleche.rerun():
        again = fit(1)
        assert fit(1) == again  # each call is recomputed once per block, then loaded
        assert load(1) == again[0]
    assert counter.runs == ["load", "load", "fit"] * 2
    assert again != first and fit(1) == again  # the entries were replaced
    assert cache.load_result(load.digest(2)) == again[1]


def test_rerun_of_some_functions_only():
    cache = memory_cache()
    load, fit, counter = pipeline(cache)
    fit(1)
    with fleche.rerun(fit):
        fit(1)
    assert counter.runs == ["load", "load", "fit", "fit"]  # load: hits
    with fleche.rerun(load):
        fit(1)  # fit is a hit, so load is not even called
        load(5)
    assert counter.runs == ["load", "load", "fit", "fit", "load"]
    with pytest.raises(TypeError, match="decorated"):
        fleche.rerun(lambda x: x)


def test_rerun_of_one_call_through_the_namespace():
    cache = memory_cache()
    load, fit, counter = pipeline(cache)
    fit(1)
    fit.fleche.rerun(1)
    assert counter.runs == ["load", "load", "fit"] * 2
    fit.rerun(1)
    assert len(counter.runs) == 9


def test_rerun_reaches_executor_threads_and_async_tasks():
    cache = memory_cache()
    load, fit, counter = pipeline(cache)
    load(1), load(2)

    async def both():
        return await asyncio.to_thread(load, 1), await asyncio.to_thread(load, 2)

    with fleche.rerun(), ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(load, [1, 2]))
    assert counter.runs == ["load"] * 4
    with fleche.rerun():
        asyncio.run(both())
    assert counter.runs == ["load"] * 6


def test_rerun_over_a_read_only_cache_computes_without_saving():
    inner = memory_cache()
    load, _, counter = pipeline(inner)
    stored = load(1)
    load_ro = fleche.fleche(cache=ReadOnlyCache(inner))(load.__wrapped__)
    with fleche.rerun():
        fresh = load_ro(1)
        assert load_ro(1) != fresh  # not stored: computed each time
    assert inner.load_result(load.digest(1)) == stored


# -- fleche.bind -----------------------------------------------------------------------------------


def spawn_pool():
    return ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))


def test_a_bound_function_runs_with_its_cache_in_a_spawn_pool(tmp_path):
    store = fleche.open(str(tmp_path / "store"))
    bound = fleche.bind(store, option_tasks.outer)
    with spawn_pool() as pool:
        assert list(pool.map(bound, range(4))) == [10, 20, 30, 40]
        assert pool.submit(bound, 10).result() == 110
        pids = {pid for pid, _ in pool.map(fleche.bind(store, option_tasks.where), range(4))}
        assert os.getpid() not in pids
        assert {c for _, c in pool.map(fleche.bind(store, option_tasks.where), range(4))} == {store}
    for x in (0, 1, 2, 3, 10):  # nested calls inside the bound function went there too
        assert store.load_result(option_tasks.outer.digest(x)) == (x + 1) * 10
        assert store.load_result(option_tasks.inner.digest(x)) == x + 1


def test_the_namespace_binds_and_specs_work(tmp_path):
    bound = option_tasks.inner.fleche.bind(str(tmp_path / "store"))
    with spawn_pool() as pool:
        assert list(pool.map(bound, [5, 6])) == [6, 7]
    assert fleche.open(str(tmp_path / "store")).load_result(option_tasks.inner.digest(6)) == 7


def test_a_bound_function_pickles_with_its_cache(tmp_path):
    store = fleche.open(str(tmp_path / "store"))
    bound = fleche.bind(store)(option_tasks.inner)
    copy = pickle.loads(pickle.dumps(bound))
    assert copy.cache == store and copy.__wrapped__ is option_tasks.inner
    assert copy(1) == 2 and store.contains(option_tasks.inner.digest(1))
    assert copy.__name__ == "inner" and "bound" in repr(copy)
    assert pickle.loads(pickle.dumps(option_tasks.bound_here)) is option_tasks.bound_here
    assert option_tasks.bound_here(3) == -3
    assert fleche.open("memory://option-tasks").contains(option_tasks.bound_here.__wrapped__.digest(3))


def test_binding_checks_its_arguments():
    with pytest.raises(TypeError, match="cache"):
        fleche.bind(42, option_tasks.inner)
    with pytest.raises(TypeError, match="callable"):
        fleche.bind(memory_cache(), 42)


def test_a_bound_async_function():
    cache = memory_cache()

    @fleche.fleche
    async def double(x):
        return 2 * x

    assert asyncio.run(fleche.bind(cache, double)(4)) == 8 and cache.contains(double.digest(4))
