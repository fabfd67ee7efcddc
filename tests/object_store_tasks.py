"""Functions the object-store cluster tests run on Dask workers (importable there).

Executions are counted in a file in the worker's own working directory, which the test gives
each worker empty and apart from the others': no store is shared through it.
"""

from __future__ import annotations

import os

import numpy as np

from fleche import fleche

RUNS = "runs.log"


@fleche
def simulate(temperature):
    """A result too large to be kept inline in the call record: it goes to the value store."""
    with open(RUNS, "a") as f:
        f.write(f"{temperature}\n")
    return np.linspace(0.0, temperature, 5000)


def runs_here() -> int:
    """How many times :func:`simulate` ran in this process's working directory."""
    try:
        with open(RUNS) as f:
            return len(f.readlines())
    except FileNotFoundError:
        return 0


def work_in(directory: str) -> str:
    os.chdir(directory)
    return os.getcwd()
