"""Settings for the whole test suite (tests and doctests, and the processes they start).

Skips collecting the integration modules whose optional extra is not installed. The suite uses
unsigned stores on purpose, so it says so (``FLECHE_SECRET_KEY=none``) and the
``UnsignedStoreWarning`` does not fill its output or its workers' logs; tests of signing and of
the warning set the variable themselves.
"""

import importlib.util
import os
import sys

os.environ.setdefault("FLECHE_SECRET_KEY", "none")


def _missing(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is None
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


collect_ignore = [
    path
    for path, needs in (("src/fleche/dask.py", "distributed"), ("src/fleche/ray.py", "ray"))
    if _missing(needs)
]
