"""Pickle files in a checked, optionally signed envelope, and the value and call storages on them.

Every entry file is a pickled payload in the envelope of :mod:`fleche.storage.envelope` (magic
``b"FLCP"``): a torn, truncated or bit-flipped file is detected before anything is unpickled, and
a signed entry cannot be altered, or moved to another key, without the secret. The envelope's
flags say which serializer wrote the payload and how it is compressed, so any storage reads any
entry whatever its own settings.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..digest import Digest
from ..errors import CorruptEntryError, SaveError
from .base import CallMixin, ValueMixin
from .destructuring import DestructuringMixin
from .envelope import (
    SECRET_KEY_ENV,
    Envelope,
    as_secrets,
    check_compression,
    environment_secrets,
)
from .envelope import _checksum  # noqa: F401 - tests forge entries with it
from .file import FileStorage
from .locks import InterProcessLockMixin
from .thread_safe import PerKeyLockMixin

__all__ = ["CallPickleFile", "PickleFileBackend", "SECRET_KEY_ENV", "ValuePickleFile"]

ENVELOPE = Envelope(b"FLCP", what="fleche pickle entry")
_CLOUDPICKLE = 0x02
"""Envelope flag: the payload was written by cloudpickle (plain pickle reads it back)."""
_DILL = 0x04
"""Envelope flag: the payload was written by dill (read back with dill)."""
_PROTOCOL = 5
_SERIALIZERS = ("pickle", "cloudpickle", "dill")
_FLAGS = {"pickle": 0, "cloudpickle": _CLOUDPICKLE, "dill": _DILL}


def _dill() -> Any:
    """The ``dill`` module; ``ModuleNotFoundError`` naming the extra where it is missing."""
    try:
        import dill
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "serializer='dill' needs dill: pip install 'fleche[dill]'", name="dill"
        ) from None
    return dill


@dataclass(frozen=True)
class PickleFileBackend(FileStorage):
    """File storage whose entries are pickles behind a checked, optionally signed header.

    ``serializer`` is ``"pickle"``, ``"cloudpickle"`` (for lambdas and classes defined
    interactively) or ``"dill"`` (the ``dill`` extra: also generators' frames, closures over
    modules, ...); every kind of entry loads whatever the setting (a dill entry where dill is
    installed). ``compression`` (``None``, ``"zlib"``, ``"lzma"`` or ``"bz2"``) compresses each
    payload that shrinks by it; any storage reads a compressed entry, whatever its own setting.
    Loading a pickle runs code,
    so a directory others can write to is a way into every process reading it: give
    ``secret_key`` (bytes, str, or several to rotate keys: entries are signed with the first and
    accepted with any), or set ``FLECHE_SECRET_KEY`` (comma-separated) in every process, and
    unsigned or tampered entries are refused with :class:`~fleche.errors.SignatureError` before
    anything is unpickled. A key given as a field travels inside pickled copies of the storage;
    the environment variable does not.
    """

    serializer: str = "pickle"
    compression: str | None = None
    secret_key: bytes | str | Sequence[bytes | str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_serializer(self.serializer)
        check_compression(self.compression)
        object.__setattr__(self, "secret_key", as_secrets(self.secret_key) or None)

    def _secrets(self) -> tuple[bytes, ...]:
        """Keys to sign with (the first) and to accept (any); empty when unsigned."""
        return secrets_of(self.secret_key)  # type: ignore[arg-type]

    # -- FileStorage hooks ----------------------------------------------------------------------

    def _encode(self, value: Any, key: Digest, scratch: str) -> bytes:
        return seal_pickle(
            value, key, self.serializer, self._secrets(), self.compression, self._path(key)
        )

    def _decode(self, data: bytes, key: Digest, path: str, fd: int) -> Any:
        return open_pickle(data, key, path, self._secrets())


# -- the entry format, shared with the object storages ------------------------------------------


def check_serializer(serializer: str) -> None:
    """Refuse a ``serializer`` setting fleche does not know, and ``"dill"`` without dill."""
    if serializer not in _SERIALIZERS:
        raise ValueError(
            f"serializer must be one of {', '.join(map(repr, _SERIALIZERS))}, got {serializer!r}"
        )
    if serializer == "dill":
        _dill()


def secrets_of(secret_key: tuple[bytes, ...] | None) -> tuple[bytes, ...]:
    """The keys to sign with (the first) and accept (any): a storage's ``secret_key`` setting
    (as :func:`~fleche.storage.envelope.as_secrets` made it), else ``FLECHE_SECRET_KEY``."""
    return secret_key if secret_key else environment_secrets()


def seal_pickle(
    value: Any,
    key: Digest,
    serializer: str,
    secrets: Sequence[bytes],
    compression: str | None = None,
    location: str | None = None,
) -> bytes:
    """The bytes of a pickle entry holding ``value`` under ``key``, signed with ``secrets[0]``
    if given, compressed with ``compression`` where that shrinks it; ``location`` is where it
    will live (whether an unsigned entry warns). :class:`~fleche.errors.SaveError` if
    ``serializer`` cannot pickle the value."""
    header, payload = seal_pickle_parts(value, key, serializer, secrets, compression, location)
    return header + bytes(payload)


def seal_pickle_parts(
    value: Any,
    key: Digest,
    serializer: str,
    secrets: Sequence[bytes],
    compression: str | None = None,
    location: str | None = None,
) -> tuple[bytes, bytes | memoryview]:
    """:func:`seal_pickle`'s entry as its header and its payload apart, the payload not copied
    again: for storages that keep large payloads in pieces (``SqlValues``)."""
    try:
        if serializer == "cloudpickle":
            import cloudpickle

            payload = cloudpickle.dumps(value, protocol=_PROTOCOL)
        elif serializer == "dill":
            payload = _dill().dumps(value, protocol=_PROTOCOL)
        else:
            payload = pickle.dumps(value, protocol=_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - pickling raises many kinds
        kind = type(value)
        raise SaveError(
            f"cannot store a value of type {kind.__module__}.{kind.__qualname__} under {key} "
            f"with {serializer}: {type(e).__name__}: {e}"
            + (" (serializer='cloudpickle' handles lambdas and local classes)"
               if serializer == "pickle" else "")
        ) from e
    return ENVELOPE.seal_parts(payload, key, secrets, _FLAGS[serializer], compression, location)


def open_pickle(data: bytes, key: Digest, location: str, secrets: Sequence[bytes]) -> Any:
    """The value in the pickle entry ``data`` of ``key``, checked (and decompressed) before
    anything is unpickled: :class:`~fleche.errors.CorruptEntryError` (or ``SignatureError``)
    naming ``location``."""
    flags, payload = ENVELOPE.open(data, key, location, secrets)
    return _unpickled(flags, payload, key, location)


def open_pickle_parts(
    header: bytes | memoryview,
    payload: bytes | memoryview,
    key: Digest,
    location: str,
    secrets: Sequence[bytes],
) -> Any:
    """:func:`open_pickle` for an entry whose header and payload are stored apart (see
    :func:`seal_pickle_parts`); raises as it does."""
    flags, payload = ENVELOPE.open_parts(header, payload, key, location, secrets)
    return _unpickled(flags, payload, key, location)


def _unpickled(flags: int, payload: bytes | memoryview, key: Digest, location: str) -> Any:
    """The value in a checked ``payload`` written with the serializer ``flags`` name."""
    loads = _dill().loads if flags & _DILL else pickle.loads  # no dill: not corrupt, says so
    try:
        return loads(payload)
    except Exception as e:  # noqa: BLE001 - unpickling runs arbitrary code
        raise CorruptEntryError(
            key, location, f"intact but cannot be unpickled here: {type(e).__name__}: {e}"
        ) from e


@dataclass(frozen=True)
class ValuePickleFile(
    PerKeyLockMixin, InterProcessLockMixin, DestructuringMixin, ValueMixin, PickleFileBackend
):
    """A destructuring value storage of pickle files, safe to share between threads and processes.

    >>> import tempfile
    >>> values = ValuePickleFile(tempfile.mkdtemp())
    >>> values.load(values.save({"a": [1, 2]}))
    {'a': [1, 2]}
    """


@dataclass(frozen=True)
class CallPickleFile(PerKeyLockMixin, InterProcessLockMixin, CallMixin, PickleFileBackend):
    """A call storage of pickle files, safe to share between threads and processes.

    An intact entry that holds something other than a call record (a value stored in the same
    directory) loads as :class:`~fleche.errors.CorruptEntryError` saying what it holds, so it
    can be evicted.
    """

    keeps_inline_values = True

