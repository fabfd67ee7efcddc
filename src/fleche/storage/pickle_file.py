"""Pickle files with a checked header, optionally signed, and the value and call storages on them.

Every entry file is a 32-byte header, an optional 32-byte HMAC, and the pickled payload::

    magic b"FLCP" | version u8 | flags u8 | reserved u16 | payload length u64 | checksum 16 bytes

The checksum (BLAKE2b-128) covers the header's first 16 bytes, the HMAC and the payload, so a
torn, truncated or bit-flipped file is detected before anything is unpickled. The HMAC-SHA256
covers the entry's key, the header's first 16 bytes and the payload, so a signed entry cannot be
altered, or moved to another key, without the secret.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..digest import Digest
from ..errors import CorruptEntryError, SaveError, SignatureError
from .base import CallMixin, ValueMixin
from .destructuring import DestructuringMixin
from .file import FileStorage
from .locks import InterProcessLockMixin
from .thread_safe import PerKeyLockMixin

__all__ = ["CallPickleFile", "PickleFileBackend", "SECRET_KEY_ENV", "ValuePickleFile"]

SECRET_KEY_ENV = "FLECHE_SECRET_KEY"
"""Environment variable with comma-separated secret keys, used when ``secret_key`` is not set."""

MAGIC = b"FLCP"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">4sBBHQ16s")
_PREFIX = 16  # magic, version, flags, reserved, length: the part the checksum and HMAC cover
_MAC_SIZE = 32
_SIGNED = 0x01
_CLOUDPICKLE = 0x02
_PROTOCOL = 5
_SERIALIZERS = ("pickle", "cloudpickle")
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _checksum(prefix: bytes, mac: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(prefix, digest_size=16)
    h.update(mac)
    h.update(payload)
    return h.digest()


def _mac(secret: bytes, key: str, prefix: bytes, payload: bytes | memoryview) -> bytes:
    m = hmac.new(secret, b"fleche-entry\0" + key.encode("ascii") + b"\0", hashlib.sha256)
    m.update(prefix)
    m.update(payload)
    return m.digest()


def _as_secrets(value: Any) -> tuple[bytes, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        value = [value]
    out = tuple(v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value)
    if not all(out):
        raise ValueError("secret keys must not be empty")
    return out


@functools.lru_cache(maxsize=8)
def _env_secrets(text: str) -> tuple[bytes, ...]:
    return tuple(part.strip().encode("utf-8") for part in text.split(",") if part.strip())


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
        object.__setattr__(self, "secret_key", _as_secrets(self.secret_key) or None)

    def _secrets(self) -> tuple[bytes, ...]:
        """Keys to sign with (the first) and to accept (any); empty when unsigned."""
        if self.secret_key:
            return self.secret_key  # type: ignore[return-value]
        env = os.environ.get(SECRET_KEY_ENV)
        return _env_secrets(env) if env else ()

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
        secrets_ = self._secrets()
        flags = (_SIGNED if secrets_ else 0) | (_CLOUDPICKLE if self.serializer == "cloudpickle" else 0)
        prefix = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, 0, len(payload), b"")[:_PREFIX]
        mac = _mac(secrets_[0], key, prefix, payload) if secrets_ else b""
        return b"".join((prefix, _checksum(prefix, mac, payload), mac, payload))

    def _decode(self, data: bytes, key: Digest, path: str) -> Any:
        if len(data) < _HEADER.size:
            raise CorruptEntryError(
                key, path, f"truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte header"
            )
        magic, version, flags, _, length, checksum = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise CorruptEntryError(key, path, f"not a fleche pickle entry (magic {magic!r})")
        if version != FORMAT_VERSION:
            raise CorruptEntryError(
                key, path, f"format version {version} is not one this fleche reads ({FORMAT_VERSION})"
            )
        mac_end = _HEADER.size + (_MAC_SIZE if flags & _SIGNED else 0)
        if len(data) != mac_end + length:
            raise CorruptEntryError(
                key, path,
                f"torn file: {len(data)} bytes where the header announces {mac_end + length}",
            )
        view = memoryview(data)
        prefix, mac, payload = data[:_PREFIX], view[_HEADER.size:mac_end], view[mac_end:]
        if not hmac.compare_digest(_checksum(prefix, mac, payload), checksum):
            raise CorruptEntryError(key, path, "checksum mismatch: the file is torn or bit-flipped")
        secrets_ = self._secrets()
        if secrets_:
            if not flags & _SIGNED:
                raise SignatureError(
                    key, path, "unsigned entry refused: this storage has a secret key"
                )
            if not any(
                hmac.compare_digest(_mac(s, key, prefix, payload), mac) for s in secrets_
            ):
                raise SignatureError(
                    key, path,
                    f"signature matches none of the storage's {len(secrets_)} secret key(s): "
                    "tampered, moved from another key, or signed with another key",
                )
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
