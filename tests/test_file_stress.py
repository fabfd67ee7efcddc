"""Many processes x many threads hammer one value storage of pickle files and one call storage
(pickle files, or the rows of a directory's index).

Small by default; ``FLECHE_STRESS=full`` runs the full size. Checks afterwards and during:

- every acknowledged write is readable and intact;
- no reader ever sees a partial entry (any corruption raises ``CorruptEntryError``) or a miss for
  a key that existed before it started reading (stable keys are seeded first, never evicted);
- a read-modify-write counter under ``locked(key)`` loses no increment.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import traceback
from typing import Any

import pytest

from fleche.call import Call
from fleche.digest import digest
from fleche.storage import CallDirectoryIndex, CallPickleFile, ValuePickleFile
from fleche.testing import FULL_SIZE as FULL  # FLECHE_STRESS=full

PROCESSES = 6 if FULL else 4
THREADS = 4
ROUNDS = 250 if FULL else 25
INCREMENTS = 20 if FULL else 3


def _task(i: int) -> int:
    return i


def _stable_value(i: int) -> Any:
    return [i, {"name": f"stable {i}", "payload": list(range(i % 9))}, (i, i * 2.5)]


def _volatile_value(i: int) -> Any:
    return f"volatile {i} " + "x" * (i * 37)


def _call(i: int, n: int, who: str) -> Call:
    return Call.from_call(_task, i).replace(result=i, metadata={"writer": {"who": who, "n": n}})


COUNTER = Call.from_call(_task, -1)


def _check_call(record: Any, i: int) -> None:
    assert record.to_lookup_key() == _call(i, 0, "").to_lookup_key()
    assert record.result == digest(i) and set(record.metadata) == {"writer"}


def _worker(
    values: ValuePickleFile,
    calls: CallPickleFile,
    start: Any,
    results: Any,
    proc: int,
) -> None:
    failures: list[str] = []
    counts = {"ops": 0, "volatile_misses": 0}
    lock = threading.Lock()
    stable_keys = [digest(_stable_value(i)) for i in range(16)]
    call_keys = [_call(i, 0, "").to_lookup_key() for i in range(8)]

    def thread(t: int) -> None:
        rng = random.Random(proc * 100 + t)
        ops = misses = 0
        try:
            for n in range(ROUNDS):
                i = rng.randrange(16)
                # Stable values: re-save (acknowledged), then read back; never missing.
                assert values.save(_stable_value(i)) == stable_keys[i]
                assert values.load(stable_keys[(i + 5) % 16]) == _stable_value((i + 5) % 16)
                assert values.contains(stable_keys[(i + 7) % 16])
                # Volatile values: saved and evicted by everyone; a load finds all or nothing.
                j = rng.randrange(6)
                key = digest(_volatile_value(j))
                action = rng.random()
                if action < 0.4:
                    values.save(_volatile_value(j))
                elif action < 0.6:
                    try:
                        values.evict(key)
                    except KeyError:
                        pass
                else:
                    try:
                        assert values.load(key) == _volatile_value(j)
                    except KeyError:
                        misses += 1
                # Call records: re-saved with new metadata, never evicted; never missing.
                c = rng.randrange(8)
                calls.save(_call(c, n, f"{proc}.{t}"))
                _check_call(calls.load(call_keys[(c + 3) % 8]), (c + 3) % 8)
                assert calls.contains(call_keys[(c + 1) % 8])
                ops += 8
                if n < INCREMENTS:
                    with calls.locked(COUNTER.to_lookup_key()):
                        record = calls.load(COUNTER.to_lookup_key())
                        count = record.metadata["counter"]["n"]
                        calls.save(COUNTER.replace(metadata={"counter": {"n": count + 1}}))
        except BaseException:  # noqa: BLE001 - reported to the parent
            with lock:
                failures.append(f"process {proc} thread {t}:\n{traceback.format_exc()}")
        with lock:
            counts["ops"] += ops
            counts["volatile_misses"] += misses

    start.wait()
    threads = [threading.Thread(target=thread, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    results.put((proc, failures, counts))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", ["files", "index"])
@pytest.mark.parametrize("method", ["spawn", "fork", "forkserver"])
def test_processes_and_threads_hammer_a_shared_store(tmp_path, method, layout):
    ctx = multiprocessing.get_context(method)
    values = ValuePickleFile(tmp_path / "values", lock_timeout=60)
    if layout == "files":
        calls = CallPickleFile(tmp_path / "calls", lock_timeout=60)
    else:
        calls = CallDirectoryIndex(tmp_path, lock_timeout=60)
    # Seed the stable keys so that any later miss is a transient one.
    for i in range(16):
        values.save(_stable_value(i))
    for i in range(8):
        calls.save(_call(i, -1, "seed"))
    calls.save(COUNTER.replace(metadata={"counter": {"n": 0}}))

    start = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(values, calls, start, results, p))
        for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    reports = [results.get(timeout=540) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    failures = [f for _, fs, _ in reports for f in fs]
    assert not failures, "\n".join(failures[:3])
    assert sum(c["ops"] for _, _, c in reports) == PROCESSES * THREADS * ROUNDS * 8

    # Everything acknowledged is there and intact; nothing stored is torn.
    for i in range(16):
        assert values.load(digest(_stable_value(i))) == _stable_value(i)
    for i in range(8):
        _check_call(calls.load(_call(i, 0, "").to_lookup_key()), i)
    for key in values.list():
        values.load(key)
    for key in calls.list():
        calls.load(key)
    counter = calls.load(COUNTER.to_lookup_key()).metadata["counter"]["n"]
    assert counter == PROCESSES * THREADS * INCREMENTS
