"""The envelope every stored payload travels in: a checked header and an optional signature.

One format for every backend (pickle files, HDF5 user blocks, SQL BLOBs, objects), so every
store detects damage and tampering the same way::

    magic 4 bytes | version u8 | flags u8 | reserved u16 | payload length u64 | checksum 16 bytes
    [HMAC-SHA256 32 bytes, when flags has SIGNED] | payload

The checksum (BLAKE2b-128) covers the header's first 16 bytes, the HMAC and the payload, so a
torn, truncated or bit-flipped entry is detected before anything in it is unpickled. The HMAC
covers the entry's key, the header's first 16 bytes and the payload, so a signed entry cannot be
altered, or moved to another key, without the secret. Each backend has its own ``magic``, so an
entry of one kind is never read as another.

A payload may be compressed (``compression="zlib"``, ``"lzma"`` or ``"bz2"``, from the standard
library): the flag bits :data:`COMPRESSION_BITS` say how, so every reader decompresses it,
whatever its own setting. The checksum and HMAC cover the bytes as stored (compressed), so
nothing is decompressed before it is checked.

Secret keys come from a storage's ``secret_key`` setting or from ``FLECHE_SECRET_KEY``
(comma-separated): entries are signed with the first key and accepted with any, so keys can be
rotated. ``FLECHE_SECRET_KEY=none`` says that this process uses unsigned stores on purpose;
otherwise the first unsigned entry of a shared store that a process reads or writes gives an
:class:`~fleche.errors.UnsignedStoreWarning`, once per process. A store is shared unless its
entries lie in a directory that only this process's user (and root) can change: the directory
and every one above it owned by one of them and writable by no one else (sticky directories
such as ``/tmp`` excepted). There, whoever could plant an entry could run code as the user
anyway, so a private store, such as the default one in the user's cache directory, does not
warn. Server databases are always shared.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import hmac
import lzma
import os
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CorruptEntryError, SignatureError, UnsignedStoreWarning

__all__ = [
    "COMPRESSIONS",
    "COMPRESSION_BITS",
    "SECRET_KEY_ENV",
    "NO_KEY",
    "SIGNED",
    "Envelope",
    "as_secrets",
    "check_compression",
    "environment_secrets",
]

SECRET_KEY_ENV = "FLECHE_SECRET_KEY"
"""Environment variable with comma-separated secret keys, used where ``secret_key`` is not set;
``none`` means no key, on purpose (no :class:`~fleche.errors.UnsignedStoreWarning`)."""

NO_KEY = "none"
"""The value of ``FLECHE_SECRET_KEY`` that opts out of signing without a warning."""

SIGNED = 0x01
"""Flag bit: the entry carries an HMAC. Bits other than it and :data:`COMPRESSION_BITS` are the
backend's own (see ``Envelope``)."""

COMPRESSION_BITS = 0x30
"""Flag bits saying how the payload is compressed: 0 not at all, else one of
:data:`COMPRESSIONS` (``0x10`` zlib, ``0x20`` lzma, ``0x30`` bz2)."""

_CODECS: dict[str, tuple[int, Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "zlib": (0x10, zlib.compress, zlib.decompress),
    "lzma": (0x20, lzma.compress, lzma.decompress),
    "bz2": (0x30, bz2.compress, bz2.decompress),
}
_BY_BITS = {bits: (name, decompress) for name, (bits, _, decompress) in _CODECS.items()}

COMPRESSIONS = tuple(_CODECS)
"""The compressions a payload may be stored with (all from the standard library)."""


def check_compression(compression: str | None) -> str | None:
    """``compression`` if it is ``None`` or one of :data:`COMPRESSIONS`; else ``ValueError``
    naming the choices."""
    if compression is not None and compression not in _CODECS:
        raise ValueError(
            f"compression must be None or one of {', '.join(map(repr, COMPRESSIONS))}, "
            f"got {compression!r}"
        )
    return compression

_HEADER = struct.Struct(">4sBBHQ16s")
_PREFIX = 16  # magic, version, flags, reserved, length: the part the checksum and HMAC cover
_MAC_SIZE = 32

HEADER_SIZE = _HEADER.size
"""Bytes of an envelope header without its HMAC."""


def as_secrets(value: bytes | str | Sequence[bytes | str] | None) -> tuple[bytes, ...]:
    """A ``secret_key`` setting as a tuple of byte strings (empty when unset)."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        value = [value]
    out = tuple(v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value)
    if not all(out):
        raise ValueError("secret keys must not be empty")
    return out


@functools.lru_cache(maxsize=8)
def _parse_environment(text: str) -> tuple[bytes, ...]:
    if text.strip().lower() == NO_KEY:
        return ()
    return tuple(part.strip().encode("utf-8") for part in text.split(",") if part.strip())


def environment_secrets() -> tuple[bytes, ...]:
    """The keys ``FLECHE_SECRET_KEY`` holds now (empty when unset or ``none``)."""
    text = os.environ.get(SECRET_KEY_ENV)
    return _parse_environment(text) if text else ()


_warned_unsigned = False
_warned_lock = threading.Lock()


def _private(location: str | None) -> bool:
    """Whether ``location`` (a path, or a path followed by words: "db.sqlite table x") lies in
    a directory that only this user (and root) can change: see :func:`_private_directory`."""
    if not location or not location.startswith("/") or not hasattr(os, "getuid"):
        return False
    return _private_directory(os.path.dirname(location))


@functools.lru_cache(maxsize=1024)
def _private_directory(directory: str) -> bool:
    """Whether no one but this user and root can change what ``directory`` holds: it and
    every existing directory above it is owned by one of them and writable by no one else,
    unless sticky (as ``/tmp`` is: others cannot replace what it holds). Remembered per
    process, since every unsigned read asks."""
    uid = os.getuid()
    while True:
        try:
            info = os.stat(directory)
        except FileNotFoundError:
            info = None  # not created yet: what exists above decides
        except OSError:
            return False
        if info is not None:
            if info.st_uid not in (uid, 0):
                return False
            if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
                return False
        parent = os.path.dirname(directory)
        if parent == directory:
            return True
        directory = parent


def _unsigned(what: str, where: str, location: str | None = None) -> None:
    """Warn, the first time in this process, that ``what`` is read or written unsigned at
    ``where``, unless ``FLECHE_SECRET_KEY=none`` says so on purpose or the entry's
    ``location`` is private to this user (see the module docstring)."""
    global _warned_unsigned
    if _warned_unsigned or _private(location):
        return
    text = os.environ.get(SECRET_KEY_ENV, "")
    with _warned_lock:
        if _warned_unsigned or text.strip().lower() == NO_KEY:
            return
        _warned_unsigned = True
    warnings.warn(
        f"unsigned entries are read and written in this process (first: a {what} at {where}): "
        "whoever can write to the store can run code in every process that loads from it. Set "
        f"{SECRET_KEY_ENV} to the same secret in every process to sign and check entries, or "
        f"{SECRET_KEY_ENV}={NO_KEY} to use unsigned stores without this warning",
        UnsignedStoreWarning, stacklevel=4,
    )


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


@dataclass(frozen=True)
class Envelope:
    """The envelope format of one kind of entry, named by its 4-byte ``magic``.

    ``flags`` bits other than :data:`SIGNED` and :data:`COMPRESSION_BITS` are the backend's
    (say, which serializer wrote the payload); the envelope carries and checks them but gives
    them no meaning. :meth:`seal` compresses on request and :meth:`open` decompresses whatever
    was compressed. Thread- and
    process-safe; sealing or checking without ``secrets`` warns once per process (see
    :class:`~fleche.errors.UnsignedStoreWarning`).
    """

    magic: bytes
    version: int = 1
    what: str = "fleche entry"
    """How errors name this kind of entry ("pickle entry", "inline values")."""

    def __post_init__(self) -> None:
        if len(self.magic) != 4:
            raise ValueError(f"an envelope magic has 4 bytes, got {self.magic!r}")

    def header(
        self, payload: bytes | memoryview, key: str, secrets: Sequence[bytes] = (), flags: int = 0,
        location: str | None = None,
    ) -> bytes:
        """The header (and HMAC, signed with ``secrets[0]`` if any) that goes before
        ``payload``; for backends that keep the header apart from the payload. ``location``
        (where the entry will live) decides whether an unsigned entry warns."""
        flags = (flags & ~SIGNED) | (SIGNED if secrets else 0)
        if not secrets:
            _unsigned(self.what, f"the entry {key}", location)
        prefix = _HEADER.pack(self.magic, self.version, flags, 0, len(payload), b"")[:_PREFIX]
        mac = _mac(secrets[0], key, prefix, payload) if secrets else b""
        return b"".join((prefix, _checksum(prefix, mac, payload), mac))

    def seal(
        self,
        payload: bytes | memoryview,
        key: str,
        secrets: Sequence[bytes] = (),
        flags: int = 0,
        compression: str | None = None,
        location: str | None = None,
    ) -> bytes:
        """``payload`` in its envelope: header, HMAC if signed, payload, compressed with
        ``compression`` (one of :data:`COMPRESSIONS`) where that makes it smaller. ``location``
        (where the entry will live) decides whether an unsigned entry warns."""
        header, payload = self.seal_parts(payload, key, secrets, flags, compression, location)
        return header + bytes(payload)

    def seal_parts(
        self,
        payload: bytes | memoryview,
        key: str,
        secrets: Sequence[bytes] = (),
        flags: int = 0,
        compression: str | None = None,
        location: str | None = None,
    ) -> tuple[bytes, bytes | memoryview]:
        """What :meth:`seal` makes, as the header and the payload apart (the payload itself
        where it is not compressed, not a copy): for backends that store them apart."""
        flags &= ~COMPRESSION_BITS
        if compression is not None:
            bits, compress, _ = _CODECS[compression]
            packed = compress(bytes(payload))
            if len(packed) < len(payload):
                payload, flags = packed, flags | bits
        return self.header(payload, key, secrets, flags, location), payload

    def header_size(self, data: bytes | memoryview) -> int:
        """How many bytes of ``data`` (which starts with a header) the header and HMAC take."""
        if len(data) < _HEADER.size:
            return _HEADER.size
        flags = data[5]
        return _HEADER.size + (_MAC_SIZE if flags & SIGNED else 0)

    def open(
        self,
        data: bytes | memoryview,
        key: str,
        location: str,
        secrets: Sequence[bytes] = (),
    ) -> tuple[int, memoryview | bytes]:
        """Check the whole entry ``data`` and return its flags and payload, decompressed if it
        was stored compressed.

        Raises :class:`~fleche.errors.CorruptEntryError` for a torn, truncated, bit-flipped or
        foreign entry and :class:`~fleche.errors.SignatureError` when ``secrets`` are given and
        the entry is unsigned or signed with none of them. Nothing is interpreted (or
        decompressed) before that.
        """
        view = memoryview(data)
        end = self.header_size(view)
        return self.open_parts(view[:end], view[end:], key, location, secrets)

    def open_parts(
        self,
        header: bytes | memoryview,
        payload: bytes | memoryview,
        key: str,
        location: str,
        secrets: Sequence[bytes] = (),
    ) -> tuple[int, memoryview | bytes]:
        """:meth:`open` for an entry whose header and payload are stored apart (see
        :meth:`seal_parts`); raises as :meth:`open` does."""
        flags = self.check(header, payload, key, location, secrets)
        if not flags & COMPRESSION_BITS:
            return flags, payload
        name, decompress = _BY_BITS[flags & COMPRESSION_BITS]
        try:
            return flags, decompress(payload)
        except Exception as e:  # noqa: BLE001 - each codec raises its own kinds
            raise CorruptEntryError(
                key, location, f"checked, but its {name} data cannot be decompressed: "
                f"{type(e).__name__}: {e}"
            ) from e

    def check(
        self,
        header: bytes | memoryview,
        payload: bytes | memoryview,
        key: str,
        location: str,
        secrets: Sequence[bytes] = (),
    ) -> int:
        """Check ``payload`` against its ``header`` (as :meth:`header` made it); return the flags.

        Raises as :meth:`open` does.
        """
        header = bytes(header)
        if len(header) < _HEADER.size:
            raise CorruptEntryError(
                key, location,
                f"truncated: {len(header) + len(payload)} bytes, shorter than the "
                f"{_HEADER.size}-byte header",
            )
        magic, version, flags, _, length, checksum = _HEADER.unpack_from(header)
        if magic != self.magic:
            raise CorruptEntryError(key, location, f"not a {self.what} (magic {magic!r})")
        if version != self.version:
            raise CorruptEntryError(
                key, location,
                f"format version {version} is not one this fleche reads ({self.version})",
            )
        mac_end = _HEADER.size + (_MAC_SIZE if flags & SIGNED else 0)
        if len(header) != mac_end or len(payload) != length:
            raise CorruptEntryError(
                key, location,
                f"torn entry: {len(header) + len(payload)} bytes where the header announces "
                f"{mac_end + length}",
            )
        prefix, mac = header[:_PREFIX], header[_HEADER.size:mac_end]
        if not hmac.compare_digest(_checksum(prefix, mac, payload), checksum):
            raise CorruptEntryError(key, location, "checksum mismatch: the entry is torn or bit-flipped")
        if not secrets:
            _unsigned(self.what, location, location)
        elif not flags & SIGNED:
            raise SignatureError(
                key, location, "unsigned entry refused: this storage has a secret key"
            )
        elif not any(hmac.compare_digest(_mac(s, key, prefix, payload), mac) for s in secrets):
            raise SignatureError(
                key, location,
                f"signature matches none of the storage's {len(secrets)} secret key(s): "
                "tampered, moved from another key, or signed with another key",
            )
        return flags

