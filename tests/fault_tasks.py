"""What the fault tests run in child processes: a cached function over a store spec, called on
command from the parent, reporting what it returned, ran and was warned about.

``python -m fault_tasks SPEC [--compute-once]`` reads commands from standard input, one a line,
``A B`` (call ``f(x)`` for ``x`` in ``range(A, B)``), and answers each with one JSON line:
``{"wrong": [...], "errors": [...], "ran": [...], "cached": n, "warnings": [...]}``. A call
that raises or returns a wrong value is a failure of the cache; ``cached`` counts the calls of
the batch stored afterwards.
"""

from __future__ import annotations

import json
import sys
import warnings

import fleche
from fleche import FlecheWarning


def make(spec: str, compute_once: bool = False):
    """``f`` over the store ``spec`` and the list of arguments its body ran with."""
    return cached(fleche.open(spec), compute_once)


def cached(cache, compute_once: bool = False):
    """``f`` over ``cache`` and the list of arguments its body ran with."""
    ran: list[int] = []

    @fleche.fleche(cache=cache, compute_once=compute_once)
    def f(x: int) -> str:
        ran.append(x)
        return expected(x)

    return f, ran


def warnings_of(call, *args):
    """What ``call(*args)`` returned and the FlecheWarning messages it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(*args)
    return result, [str(w.message) for w in caught if issubclass(w.category, FlecheWarning)]


def expected(x: int) -> str:
    """The result of ``f(x)``: long enough to be a value file of its own."""
    return f"{x}:" + "v" * 3000


def _stored(f, x: int) -> bool:
    """Whether ``f(x)`` is stored, as this process can see: a store it may not read holds
    nothing for it (``contains`` raises the ``OSError`` there, unlike a call)."""
    try:
        return f.contains(x)
    except OSError:
        return False


def batch(f, ran: list[int], start: int, stop: int) -> dict:
    wrong, errors = [], []
    del ran[:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in range(start, stop):
            try:
                if f(x) != expected(x):
                    wrong.append(x)
            except Exception as e:  # noqa: BLE001 - what the cache must never do
                errors.append(f"{x}: {type(e).__name__}: {e}")
    cached = sum(_stored(f, x) for x in range(start, stop))
    return {
        "wrong": wrong, "errors": errors, "ran": list(ran), "cached": cached,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, FlecheWarning)],
    }


def main() -> None:
    spec = sys.argv[1]
    f, ran = make(spec, compute_once="--compute-once" in sys.argv)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        start, stop = map(int, line.split())
        print(json.dumps(batch(f, ran, start, stop)), flush=True)


if __name__ == "__main__":
    import fault_tasks  # this module under its own name, so keys are the parent's keys

    fault_tasks.main()
