"""fleche: a persistent, content-addressed cache for Python function calls.

Results are stored under the digest of the call (function identity plus argument contents), in
storages that many threads and processes can share safely::

    from fleche import fleche

    @fleche
    def simulate(temperature, steps=100):
        ...

Without a cache of their own, decorated functions use the default store in the user's cache
directory (``~/.cache/fleche`` on Linux), so a script's results outlive it; ``fleche info``
shows it. ``fleche.open(spec)`` opens a store named by one string (``"/shared/store"``,
``"sqlite:///calls.db"``, ``"postgresql://host/db?values=/shared/values"``; see
:mod:`fleche.spec`), and the environment variable ``FLECHE_CACHE`` makes one the default of
every process it is set in. The ``fleche`` command (:mod:`fleche.cli`) looks inside stores.
"""

import types
from typing import Any

from . import digest
from .binding import bind
from .caches import BaseCache, Cache, CacheStack, ReadOnlyCache, memory_cache
from .call import Call, DigestedCall, QueryCall
from .decorator import active_cache, cache, fleche, get_default_cache, set_default_cache
from .digest import Digest, Indigestible, register_digest_hook
from .digest_arguments import D
from .errors import FlecheError, FlecheWarning
from .query import MatchCountError, QueryIterator
from .reruns import rerun
from .spec import open_store as open  # noqa: A004,F401 - fleche.open(spec); not in __all__ on purpose


class _CallableDigestModule(types.ModuleType):
    """The module :mod:`fleche.digest`, which may also be called as its function.

    ``fleche.digest`` is the module, whichever way it was imported (so ``fleche.digest.Digest``
    and ``fleche.digest.register_digest_hook`` work), and ``fleche.digest(value)`` or ``from
    fleche import digest; digest(value)`` still give a value's digest, as documented.
    """

    def __call__(self, value: Any, /) -> Digest:
        """The stable content digest of ``value`` (see :func:`fleche.digest.digest`)."""
        return self.digest(value)


digest.__class__ = _CallableDigestModule

__version__ = "0.1.0"

__all__ = [
    "BaseCache",
    "Cache",
    "CacheStack",
    "Call",
    "D",
    "Digest",
    "DigestedCall",
    "FlecheError",
    "FlecheWarning",
    "Indigestible",
    "MatchCountError",
    "QueryCall",
    "QueryIterator",
    "ReadOnlyCache",
    "active_cache",
    "bind",
    "cache",
    "digest",
    "fleche",
    "get_default_cache",
    "memory_cache",
    "register_digest_hook",
    "rerun",
    "set_default_cache",
]
