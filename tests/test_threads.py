"""``with fleche.cache(c):`` reaches the tasks of thread pools submitted inside the block."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import fleche
from fleche.caches import memory_cache


@fleche.fleche
def square(x):
    return x * x


def where_am_i(_=None):
    return fleche.cache()


def test_map_and_submit_inside_a_block_use_its_cache():
    mine = memory_cache()
    with fleche.cache(mine), ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(square, range(5))) == [0, 1, 4, 9, 16]
        assert pool.submit(square, 10).result() == 100
        assert set(pool.map(where_am_i, range(4))) == {mine}
    assert all(mine.contains(square.digest(x)) for x in (0, 1, 2, 3, 4, 10))
    assert not fleche.cache().contains(square.digest(10))  # not the cache used outside


def test_a_pool_made_before_the_block_follows_where_tasks_are_submitted():
    first, second = memory_cache(), memory_cache()
    with ThreadPoolExecutor(max_workers=1) as pool:
        outside = pool.submit(where_am_i).result()
        with fleche.cache(first):
            assert pool.submit(where_am_i).result() is first
            with fleche.cache(second):
                assert pool.submit(square, 7).result() == 49
            assert pool.submit(where_am_i).result() is first
        assert pool.submit(where_am_i).result() is outside
    assert second.contains(square.digest(7)) and not first.contains(square.digest(7))


def test_a_task_submitted_outside_any_block_keeps_its_thread_s_own_cache():
    own, mine = memory_cache(), memory_cache()
    with ThreadPoolExecutor(max_workers=1, initializer=fleche.cache, initargs=(own,)) as pool:
        assert pool.submit(where_am_i).result() is own
        with fleche.cache(mine):
            assert pool.submit(where_am_i).result() is mine
        assert pool.submit(where_am_i).result() is own


def test_threads_sharing_one_pool_each_get_their_own_cache():
    caches = [memory_cache() for _ in range(4)]
    seen: dict[int, set] = {}
    ready = threading.Barrier(len(caches))
    with ThreadPoolExecutor(max_workers=3) as pool:

        def submitter(i):
            with fleche.cache(caches[i]):
                ready.wait()  # all four blocks are active at once
                seen[i] = {f.result() for f in [pool.submit(where_am_i) for _ in range(20)]}
                pool.submit(square, 100 + i).result()

        threads = [threading.Thread(target=submitter, args=(i,)) for i in range(len(caches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert seen == {i: {c} for i, c in enumerate(caches)}
    for i, c in enumerate(caches):
        assert c.contains(square.digest(100 + i)) and not c.contains(square.digest(101 + i))


def test_run_in_executor_and_to_thread_inside_a_block():
    mine = memory_cache()

    async def main():
        loop = asyncio.get_running_loop()
        with fleche.cache(mine):
            a = await loop.run_in_executor(None, square, 5)
            b = await asyncio.to_thread(square, 6)
        return a, b

    assert asyncio.run(main()) == (25, 36)
    assert mine.contains(square.digest(5)) and mine.contains(square.digest(6))


def test_a_plain_thread_still_has_its_own_context():
    mine = memory_cache()
    seen = {}
    with fleche.cache(mine):
        t = threading.Thread(target=lambda: seen.setdefault("other", fleche.cache()))
        t.start()
        t.join()
    assert seen["other"] is not mine
