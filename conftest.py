"""Skip collecting the integration modules whose optional extra is not installed."""

import importlib.util

collect_ignore = [
    path
    for path, needs in (("src/fleche/dask.py", "distributed"), ("src/fleche/ray.py", "ray"))
    if importlib.util.find_spec(needs) is None
]
