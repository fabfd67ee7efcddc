"""``async def`` functions: awaited, stored, loaded, with the rules of plain functions, and the
event loop kept free while the store works."""

import asyncio
import inspect
import threading
import warnings
from dataclasses import dataclass, field

import pytest

import fleche
from fleche.caches import CacheWrapper, memory_cache
from fleche.errors import FlecheWarning
from fleche.storage import CallPickleFile, ValuePickleFile


def counting(cache, **options):
    runs = []

    @fleche.fleche(cache=cache, **options)
    async def double(x):
        runs.append(x)
        await asyncio.sleep(0)
        return 2 * x

    return double, runs


def test_an_async_function_is_awaited_and_stored():
    cache = memory_cache()
    double, runs = counting(cache)
    assert inspect.iscoroutinefunction(double)
    assert asyncio.run(double(4)) == 8
    assert asyncio.run(double(4)) == 8 and runs == [4]  # the second call loads
    assert cache.load_result(double.digest(4)) == 8 and double.contains(4)
    record = cache.load(double.digest(4))
    assert record.metadata["runtime"]["wall_time"] >= 0


def test_concurrent_tasks_without_compute_once_may_all_compute():
    double, runs = counting(memory_cache())

    async def main():
        return await asyncio.gather(*(double(1) for _ in range(5)))

    assert asyncio.run(main()) == [2] * 5
    assert runs == [1] * 5  # five misses at once: each computed, as with threads


@pytest.mark.parametrize("store", ["memory", "files"])
def test_compute_once_across_concurrent_tasks(store, tmp_path):
    if store == "memory":
        cache = memory_cache()
    else:
        cache = fleche.caches.Cache(ValuePickleFile(tmp_path / "v", lock_timeout=30),
                                    CallPickleFile(tmp_path / "c", lock_timeout=30))
    gate = asyncio.Event
    runs = []

    async def main():
        opened = gate()

        @fleche.fleche(cache=cache, compute_once=True, ignore=("gate",))
        async def slow(x, gate):
            runs.append(x)
            await gate.wait()  # the loop must stay free for the task that opens the gate
            return x + 1

        async def open_when_computing():
            while not runs:
                await asyncio.sleep(0)
            opened.set()

        results = await asyncio.gather(*(slow(7, opened) for _ in range(6)), open_when_computing())
        return results[:-1]

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [8] * 6
    assert runs == [7]


@dataclass(frozen=True)
class GatedCache(CacheWrapper):
    """Loads wait for ``gate``: a slow store, which must not hold up the event loop."""

    gate: threading.Event = field(default_factory=threading.Event, compare=False)

    def load_result(self, key):
        if not self.gate.wait(30):
            raise AssertionError("the gate was never opened: the event loop was blocked")
        return self.cache.load_result(key)


def test_a_slow_store_does_not_block_the_event_loop():
    cache = GatedCache(memory_cache())
    double, runs = counting(cache)

    async def main():
        async def opener():
            await asyncio.sleep(0)
            cache.gate.set()  # runs only if the lookup left the loop free
            return "opened"

        return await asyncio.gather(double(3), opener())

    assert asyncio.run(asyncio.wait_for(main(), 60)) == [6, "opened"]


def test_errors_propagate_and_are_not_cached():
    cache = memory_cache()
    runs = []

    @fleche.fleche(cache=cache)
    async def fails(x):
        runs.append(x)
        raise ValueError(f"bad {x}")

    for _ in range(2):
        with pytest.raises(ValueError, match="bad 1"):
            asyncio.run(fails(1))
    assert runs == [1, 1] and not fails.contains(1)


def test_bad_arguments_raise_the_function_s_own_error():
    double, runs = counting(memory_cache())
    with pytest.raises(TypeError):
        asyncio.run(double(1, 2))
    assert runs == []


def test_an_argument_without_a_digest_runs_uncached_with_a_warning():
    double, runs = counting(memory_cache())
    lock = threading.Lock()
    with pytest.warns(FlecheWarning, match="argument 'x'"):
        with pytest.raises(TypeError):  # the function runs: 2 * lock fails in its body
            asyncio.run(double(lock))
    assert runs == [lock]


def test_an_unstorable_result_is_returned_with_a_warning(tmp_path):
    cache = fleche.open(str(tmp_path))

    @fleche.fleche(cache=cache)
    async def make_lock(x):
        return threading.Lock()

    with pytest.warns(FlecheWarning, match="not cached"):
        got = asyncio.run(make_lock(1))
    assert isinstance(got, type(threading.Lock())) and not make_lock.contains(1)


def test_the_active_cache_of_the_task_is_used():
    mine = memory_cache()
    double, runs = counting(None)

    async def main():
        with fleche.cache(mine):
            return await double(5)

    assert asyncio.run(main()) == 10 and mine.contains(double.digest(5))


def test_refresh_of_an_async_function_is_awaited():
    cache = memory_cache()
    double, runs = counting(cache)
    asyncio.run(double(2))
    assert asyncio.run(double.refresh(2)) == 4 and runs == [2, 2]


def test_async_generators_are_refused():
    async def numbers():
        yield 1

    with pytest.raises(TypeError, match="async generator"):
        fleche.fleche(numbers)


def test_no_warning_for_a_plain_hit():
    double, runs = counting(memory_cache())
    asyncio.run(double(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert asyncio.run(double(1)) == 2
