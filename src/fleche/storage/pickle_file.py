"""Pickle files in a checked, optionally signed envelope, and the value and call storages on them.

Every entry file is a pickled payload in the envelope of :mod:`fleche.storage.envelope` (magic
``b"FLCP"``): a torn, truncated or bit-flipped file is detected before anything is unpickled, and
a signed entry cannot be altered, or moved to another key, without the secret.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..digest import Digest
from ..errors import CorruptEntryError, SaveError
from .base import CallMixin, ValueMixin
from .destructuring import DestructuringMixin
from .envelope import SECRET_KEY_ENV, Envelope, as_secrets, environment_secrets
from .envelope import _checksum  # noqa: F401 - tests forge entries with it
from .file import FileStorage
from .locks import InterProcessLockMixin
from .thread_safe import PerKeyLockMixin

__all__ = ["CallPickleFile", "PickleFileBackend", "SECRET_KEY_ENV", "ValuePickleFile"]

ENVELOPE = Envelope(b"FLCP", what="fleche pickle entry")
_CLOUDPICKLE = 0x02
"""Envelope flag: the payload was written by cloudpickle (plain pickle reads it back)."""
_PROTOCOL = 5
_SERIALIZERS = ("pickle", "cloudpickle")
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class PickleFileBackend(FileStorage):
    """File storage whose entries are pickles behind a checked, optionally signed header.

    ``serializer`` is ``"pickle"`` or ``"cloudpickle"`` (for lambdas and classes defined
    interactively); either kind of entry loads whatever the setting. Loading a pickle runs code,
    so a directory others can write to is a way into every process reading it: give
    ``secret_key`` (bytes, str, or several to rotate keys: entries are signed with the first and
    accepted with any), or set ``FLECHE_SECRET_KEY`` (comma-separated) in every process, and
    unsigned or tampered entries are refused with :class:`~fleche.errors.SignatureError` before
    anything is unpickled. A key given as a field travels inside pickled copies of the storage;
    the environment variable does not.
    """

    serializer: str = "pickle"
    secret_key: bytes | str | Sequence[bytes | str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.serializer not in _SERIALIZERS:
            raise ValueError(
                f"serializer must be one of {', '.join(map(repr, _SERIALIZERS))}, "
                f"got {self.serializer!r}"
            )
        object.__setattr__(self, "secret_key", as_secrets(self.secret_key) or None)

    def _secrets(self) -> tuple[bytes, ...]:
        """Keys to sign with (the first) and to accept (any); empty when unsigned."""
        if self.secret_key:
            return self.secret_key  # type: ignore[return-value]
        return environment_secrets()

    # -- encoding -------------------------------------------------------------------------------

    def _encode(self, value: Any, key: Digest) -> bytes:
        try:
            if self.serializer == "cloudpickle":
                import cloudpickle

                payload = cloudpickle.dumps(value, protocol=_PROTOCOL)
            else:
                payload = pickle.dumps(value, protocol=_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - pickling raises many kinds
            kind = type(value)
            raise SaveError(
                f"cannot store a value of type {kind.__module__}.{kind.__qualname__} under {key} "
                f"with {self.serializer}: {type(e).__name__}: {e}"
                + (" (serializer='cloudpickle' handles lambdas and local classes)"
                   if self.serializer == "pickle" else "")
            ) from e
        flags = _CLOUDPICKLE if self.serializer == "cloudpickle" else 0
        return ENVELOPE.seal(payload, key, self._secrets(), flags)

    def _decode(self, data: bytes, key: Digest, path: str) -> Any:
        _, payload = ENVELOPE.open(data, key, path, self._secrets())
        try:
            return pickle.loads(payload)
        except Exception as e:  # noqa: BLE001 - unpickling runs arbitrary code
            raise CorruptEntryError(
                key, path, f"intact but cannot be unpickled here: {type(e).__name__}: {e}"
            ) from e

    # -- FileStorage hooks ----------------------------------------------------------------------

    def put(self, value: Any, key: Digest) -> Digest:
        # Encode before touching the disk, so an unpicklable value leaves nothing behind.
        return super().put(self._encode(value, key), key)

    def _write_file(self, value: bytes, tmp_path: str) -> int:
        # os.open/os.write: no buffering layer, no isatty and seek calls on a file written once.
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o666)
        try:
            view = memoryview(value)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        return len(value)

    def _read_file(self, path: str, key: Digest) -> Any:
        return self._decode(_read_all(path), key, path)


def _read_all(path: str) -> bytes:
    # os.open/os.read instead of open(): a third of the cost on the hit path. Entries are never
    # written in place, so the size fstat reports is the size to read.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        if len(data) < size:  # very large files come in several reads
            parts = [data]
            while size > (got := sum(map(len, parts))):
                chunk = os.read(fd, size - got)
                if not chunk:
                    break
                parts.append(chunk)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


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
    """A call storage of pickle files, safe to share between threads and processes."""

    keeps_inline_values = True
