"""compute_once: processes racing on the same keys compute each key once."""

import multiprocessing

import pytest

import compute_once_tasks as tasks
from fleche.caches import Cache
from fleche.storage import CallDirectoryIndex, CallPickleFile, ValuePickleFile

LAYOUTS = ["files", "index"]


def _calls(layout, tmp_path, lock_timeout):
    if layout == "files":
        return CallPickleFile(root=tmp_path / "c", lock_timeout=lock_timeout)
    return CallDirectoryIndex(root=tmp_path, lock_timeout=lock_timeout)


def run_race(tmp_path, compute_once, layout, processes=4, keys=12):
    cache = Cache(ValuePickleFile(root=tmp_path / "v"), _calls(layout, tmp_path, 30))
    log = str(tmp_path / "runs.log")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(processes) as pool:
        pending = [
            pool.apply_async(tasks.worker, (cache, log, compute_once, list(range(keys)), start))
            for _ in range(processes)
        ]
        start.set()
        results = [p.get(120) for p in pending]
    assert all(r == [k * 10 for k in range(keys)] for r in results)
    with open(log) as f:
        return [int(line.split()[0]) for line in f]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_racing_processes_compute_each_key_once(tmp_path, layout):
    runs = run_race(tmp_path, compute_once=True, layout=layout)
    assert sorted(runs) == list(range(12))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_compute_once_races_may_repeat_work(tmp_path, layout):
    runs = run_race(tmp_path, compute_once=False, layout=layout)
    assert set(runs) == set(range(12)) and len(runs) >= 12


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_waiter_gives_up_after_the_lock_timeout(tmp_path, layout):
    from fleche import FlecheWarning, fleche

    cache = Cache(ValuePickleFile(root=tmp_path / "v"), _calls(layout, tmp_path, 0.2))

    @fleche(cache=cache, compute_once=True)
    def f(x):
        return x + 1

    key = f.digest(1)
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(cache, key, ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.warns(FlecheWarning) as warned:
            assert f(1) == 2  # computed rather than hanging on the held lock
        messages = [str(w.message) for w in warned]
        assert any("without waiting" in m for m in messages)
        assert any("stayed locked" in m for m in messages)  # and not saved: still held
    finally:
        release.set()
        p.join(60)
    assert f(1) == 2


def _hold(cache, key, ready, release):
    with cache.locked(key):
        ready.set()
        release.wait(60)
