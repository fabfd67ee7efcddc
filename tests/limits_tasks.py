"""What the size-limit tests run in other processes: calls through a SizeLimitedCache."""

import warnings

from fleche import fleche
from fleche.limits import SizeLimitedCache


def page_result(i):
    return f"{i}:" + "x" * 4000


def sweep(store, limit, order, start, results):
    """Call ``page(i)`` for each ``i`` in ``order`` through a size-limited ``store``; put the
    calls whose result was wrong and the warnings raised in the queue ``results``."""
    limited = SizeLimitedCache(store, size_limit=limit, check_interval=0, touch_interval=0)

    @fleche(cache=limited)
    def page(i):
        return page_result(i)

    wrong = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start.wait(60)
        for i in order:
            if page(i) != page_result(i):
                wrong.append(i)
    results.put((wrong, [str(w.message) for w in caught]))


def hit(store, key):
    """Load ``key`` through a size-limited ``store`` with the default batching of uses, and end:
    the use must reach the store when the process ends."""
    limited = SizeLimitedCache(store, size_limit=10**9)
    limited.load_result(key)
