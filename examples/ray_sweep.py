"""fleche on Ray: a parameter sweep run twice; the second run loads every result from the store.

Run: python3 examples/ray_sweep.py   (everything it writes goes to a temporary directory)
"""

import os
import tempfile
import time

# A local demo needs no Ray token authentication, which would save a token to ~/.ray.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from fleche import fleche  # noqa: E402
from fleche.caches import Cache  # noqa: E402
from fleche.ray import cached_remote, runtime_env  # noqa: E402
from fleche.storage import CallPickleFile, ValuePickleFile  # noqa: E402


@fleche(version="1")
def simulate(temperature: float, steps: int = 100) -> dict:
    """A stand-in for an expensive computation."""
    time.sleep(0.3)
    return {"temperature": temperature, "energy": (temperature - 1.2) ** 2 * steps}


@fleche(version="1")
def lowest(*results: dict) -> dict:
    """Gets the simulations' values; is keyed by their call digests."""
    return min(results, key=lambda r: r["energy"])


def sweep(store: Cache, temperatures: list[float]) -> None:
    sim = cached_remote(simulate, store)
    best_of = cached_remote(lowest, store)
    hits = sum(store.contains(sim.key(t)) for t in temperatures)
    start = time.perf_counter()
    refs = [sim.remote(t) for t in temperatures]
    best = ray.get(best_of.remote(*refs))  # keyed through the refs, nothing fetched to key it
    took = time.perf_counter() - start
    print(f"{len(temperatures):2d} temperatures: {took:5.2f} s, {hits:2d} loaded from the store, "
          f"{len(temperatures) - hits:2d} computed; lowest energy at T={best['temperature']}")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fleche-ray-sweep-") as tmp:
        store = Cache(ValuePickleFile(root=f"{tmp}/values"), CallPickleFile(root=f"{tmp}/calls"))
        # runtime_env: @fleche functions called inside any task of this job use the store too.
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=f"{tmp}/ray",
                 runtime_env=runtime_env(store), log_to_driver=False)
        try:
            temperatures = [0.4, 0.6, 0.8, 1.0, 1.4, 1.6, 1.8, 2.0]
            sweep(store, temperatures)
            sweep(store, temperatures)
            sweep(store, sorted(temperatures + [1.1, 1.2, 1.3, 2.2]))
            call = store.load(simulate.digest(1.2))
            runtime = call.metadata["runtime"]
            print(f"simulate(1.2) ran in worker pid {runtime['pid']} (driver {os.getpid()}), "
                  f"{runtime['wall_time']:.2f} s; {len(list(store.list()))} calls stored")
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
