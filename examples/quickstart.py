"""fleche quickstart: decorate a function, call it twice, the second call is served from the cache.

Run: python3 examples/quickstart.py
"""

import time

from fleche import fleche, memory_cache

cache = memory_cache()
RUNS = []


@fleche(cache=cache)
def simulate(temperature: float, steps: int = 100) -> dict:
    """A stand-in for an expensive computation."""
    RUNS.append(temperature)
    time.sleep(0.05)
    return {"energy": temperature * steps, "trace": [temperature] * 3}


def sweep(temperatures: list[float]) -> float:
    start = time.perf_counter()
    for t in temperatures:
        simulate(t)
    return time.perf_counter() - start


def main() -> None:
    temperatures = [0.5, 1.0, 1.5, 2.0]
    cold = sweep(temperatures)
    warm = sweep(temperatures)
    print(f"first sweep:  {cold * 1000:7.1f} ms, {len(RUNS)} computed")
    print(f"second sweep: {warm * 1000:7.1f} ms, {len(RUNS) - len(temperatures)} computed")

    # Every call is a record: find them by argument, see when and where they ran.
    (call,) = simulate.query(temperature=1.5)
    runtime = call.metadata["runtime"]
    print(f"simulate(1.5) -> {call.result['energy']} (ran on {runtime['host']}, "
          f"{runtime['wall_time'] * 1000:.1f} ms)")
    key = simulate.digest(1.5)
    print(f"its key {key[:16]}..., short form {cache.shrink(key)}")
    print(f"{len(list(cache.list()))} calls and {len(list(cache.values.list()))} values stored")


if __name__ == "__main__":
    main()
