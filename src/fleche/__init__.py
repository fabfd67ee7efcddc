"""fleche: a persistent, content-addressed cache for Python function calls.

Results are stored under the digest of the call (function identity plus argument contents), in
storages that many threads and processes can share safely.
"""

from .call import Call, DigestedCall, QueryCall
from .digest import Digest, Indigestible, digest, register_digest_hook

__version__ = "0.1.0"

__all__ = [
    "Call",
    "Digest",
    "DigestedCall",
    "Indigestible",
    "QueryCall",
    "digest",
    "register_digest_hook",
]
