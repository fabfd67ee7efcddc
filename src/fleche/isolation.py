"""``@fleche(isolate=True)``: each computed call runs in a fresh temporary working directory.

The directory is made empty before the call, is the working directory while the body runs and
is removed afterwards with everything the call left in it; the previous working directory is
restored, also when the call raises. Only computed calls are isolated: a hit runs nothing.

The working directory belongs to the process, not to a thread, so while an isolated call runs,
every thread of the process sees its directory as the working directory. Isolated calls of one
process therefore run one at a time (a process-wide reentrant lock, so an isolated call may call
another, which gets a directory of its own and restores the first one), and code in other
threads that uses relative paths meanwhile resolves them in the isolated directory: give
absolute paths to work that runs beside isolated calls. Separate processes are independent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator

from .errors import FlecheWarning

__all__ = ["isolated_directory"]

_LOCK = threading.RLock()


@contextlib.contextmanager
def isolated_directory(name: str) -> Iterator[str]:
    """Run the block in a new empty directory (its path is given), removed afterwards; the
    previous working directory is restored even on error. One block at a time per process (see
    the module docstring); a directory that cannot be removed is a warning, not an error."""
    with _LOCK:
        previous = os.getcwd()
        place = tempfile.mkdtemp(prefix="fleche-isolated-")
        try:
            os.chdir(place)
            yield place
        finally:
            os.chdir(previous)
            try:
                shutil.rmtree(place)
            except OSError as e:
                warnings.warn(f"{name}: cannot remove its isolated directory {place}: {e}",
                              FlecheWarning, stacklevel=3)
