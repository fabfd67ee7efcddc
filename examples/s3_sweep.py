"""A Dask sweep whose workers share nothing but an S3 bucket (and, optionally, PostgreSQL).

Without --store, starts a local S3 API server (moto's, ``pip install "moto[server]"``) on
127.0.0.1, points the AWS environment variables at it and uses ``s3://fleche-example/sweep``.
With --store, uses that spec as it is: an ``s3://bucket/prefix`` whose credentials come from
your AWS configuration, or ``postgresql://host/db?values=s3://bucket/prefix`` for compute-once
across hosts. Runs the sweep twice on a two-process LocalCluster and prints what each run cost
and how many calls were served from the store.

Run: python3 examples/s3_sweep.py [--store SPEC] [--postgres URL]
"""

from __future__ import annotations

import argparse
import os
import time

from dask.distributed import Client, LocalCluster

from fleche import fleche
from fleche.dask import FlecheCache


@fleche
def simulate(temperature: float, steps: int = 100_000) -> list[float]:
    """A stand-in for an expensive simulation: a slow random walk, with its trace."""
    import random

    rng = random.Random(temperature)
    position, trace = 0.0, []
    for i in range(steps):
        position += rng.gauss(0.0, temperature)
        if i % 100 == 0:
            trace.append(position)
    return trace


def sweep(spec: str, temperatures: list[float]) -> tuple[float, int, int]:
    """Seconds, hits and misses of one run on a fresh cluster: nothing but the store is kept."""
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(FlecheCache(spec))
        start = time.perf_counter()
        client.gather(client.map(simulate, temperatures))
        seconds = time.perf_counter() - start
        stats = FlecheCache.stats(client)
    return seconds, int(stats["hits"].sum()), int(stats["misses"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="a store spec (default: a local S3 server, started here)")
    parser.add_argument("--postgres", help="keep the calls in this PostgreSQL database")
    args = parser.parse_args()
    server = None
    spec = args.store
    if spec is None:
        from fleche.testing_s3 import LocalS3Server

        server = LocalS3Server()
        server.start()
        os.environ.update(server.environment())  # the workers inherit it
        bucket = server.create_bucket("fleche-example")
        spec = f"s3://{bucket}/sweep"
        if args.postgres:
            spec = f"{args.postgres}?values=s3://{bucket}/values"
    try:
        temperatures = [0.1 * i for i in range(1, 17)]
        for run in ("first", "second"):
            seconds, hits, misses = sweep(spec, temperatures)
            print(f"{run} run: {seconds:.2f} s, {hits} calls loaded, {misses} computed")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
