"""A slow cached function the compute-once tests run in several processes."""

import os
import time

from fleche import fleche


def make(cache, log, compute_once):
    @fleche(cache=cache, compute_once=compute_once, ignore=("log",))
    def slow(x, log):
        with open(log, "a") as f:
            f.write(f"{x} {os.getpid()}\n")
        time.sleep(0.05)  # the work being deduplicated, not synchronization
        return x * 10

    return slow


def worker(cache, log, compute_once, keys, start):
    slow = make(cache, log, compute_once)
    start.wait(60)
    return [slow(k, log) for k in keys]
