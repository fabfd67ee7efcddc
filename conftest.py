"""Skip collecting the integration modules whose optional extra is not installed."""

import importlib.util
import sys


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
