"""Settings for the whole test suite (tests and doctests, and the processes they start).

Skips collecting the integration modules whose optional extra is not installed. The suite uses
unsigned stores on purpose, so it says so (``FLECHE_SECRET_KEY=none``) and the
``UnsignedStoreWarning`` does not fill its output or its workers' logs; tests of signing and of
the warning set the variable themselves.

Nothing the suite runs may write into the user's real cache directory, where fleche's default
store lives: a decorated function without a cache of its own uses ``FLECHE_CACHE=memory://``
(as the suite always did, an in-memory cache per process), and ``XDG_CACHE_HOME`` points at a
temporary directory, so a process started without ``FLECHE_CACHE`` lands there. The tests of the
default store run subprocesses with their own ``HOME`` and ``XDG_CACHE_HOME``.
"""

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

os.environ.setdefault("FLECHE_SECRET_KEY", "none")
os.environ["FLECHE_CACHE"] = "memory://"
_CACHE_HOME = tempfile.mkdtemp(prefix="fleche-test-cache-home-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)


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
