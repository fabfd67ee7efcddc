"""Objects on any fsspec filesystem: storages for clusters that share no filesystem.

``ValueObjectStore(url)`` and ``CallObjectStore(url)`` keep one object per key under an
`fsspec <https://filesystem-spec.readthedocs.io>`_ URL: ``s3://bucket/prefix`` (the ``s3`` extra
brings ``s3fs``), ``gs://bucket/prefix`` (``gcsfs``), ``az://container/prefix`` (``adlfs``),
``memory://name`` (fsspec's in-memory filesystem of this process), ``file:///path``, or any
other fsspec protocol. Each entry is the object ``<url>/<first two hex digits of the key>/<key>``
holding a pickle entry in the envelope of :mod:`fleche.storage.pickle_file`: the layout and the
bytes of a pickle-file store, so a directory store uploaded file by file is an object store.

Publishing: an object is written by one PUT of the whole entry, which object stores make
visible atomically (a multipart upload of a large entry only appears when it completes), so a
reader sees the old entry or the new one, never a part. On a local filesystem (``file://``) the
entry is written to a temporary file and renamed into place. Other filesystems get one
``pipe_file`` of the whole entry, as atomic as that filesystem makes it.

No locks: an object store has no rename and no locks, so :meth:`ObjectStoreBackend.locked`
excludes the threads of this process only, and compute-once holds at least once (two processes
missing the same key at once may both compute it; both write the same value). Use a server
database as call storage (``postgresql://host/db?values=s3://bucket/prefix``) for compute-once
across hosts.

Credentials come from the filesystem's usual configuration (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, ``~/.aws/credentials``, ``AWS_ENDPOINT_URL_S3``, instance roles); options given
as ``storage_options`` travel in pickled copies but never appear in a ``repr``. fsspec and the
filesystem's package are imported on first use only.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import secrets
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..counters import BYTES_WRITTEN
from ..digest import DIGEST_LENGTH, Digest, _mk
from ..errors import FlecheWarning, ObjectStoreError, WriteError
from .base import CallMixin, EntryUsage, StorageBackend, ValueMixin, _check_key_text
from .destructuring import DestructuringMixin
from .envelope import as_secrets, check_compression
from .pickle_file import check_serializer, open_pickle, seal_pickle, secrets_of
from .thread_safe import PerKeyLockMixin

__all__ = [
    "WHOLE",
    "CallObjectStore",
    "ObjectStoreBackend",
    "ValueObjectStore",
    "flat_options",
    "is_secret_option",
]

_ENTRY = re.compile(r"([0-9a-f]{2})/([0-9a-f]{64})")
_TEMPORARY = re.compile(r"\.[0-9a-f]{64}\.[0-9a-f]{12}\.tmp")
_SECRET_OPTION = re.compile(
    r"(?:^|_)(?:key|secret|token|password|passwd|credentials?|connection_string|sas)$",
    re.IGNORECASE,
)
_LISTING_THRESHOLD = 16
"""``contains_many`` of more keys than this lists the store once instead of asking per key."""

_PACKAGES = {  # protocol -> (package, what to install)
    "s3": ("s3fs", "'fleche[s3]'"),
    "s3a": ("s3fs", "'fleche[s3]'"),
    "gs": ("gcsfs", "gcsfs"),
    "gcs": ("gcsfs", "gcsfs"),
    "az": ("adlfs", "adlfs"),
    "abfs": ("adlfs", "adlfs"),
    "abfss": ("adlfs", "adlfs"),
}


def is_secret_option(name: str) -> bool:
    """Whether a storage option (``client_kwargs.region_name`` style names too) holds a
    credential (``key``, ``secret``, ``token``, ``password``, ``account_key``, ...)."""
    return bool(_SECRET_OPTION.search(name.rsplit(".", 1)[-1]))


class _Options(tuple):
    """Filesystem options frozen into sorted ``(name, value)`` pairs, so settings hash."""

    __slots__ = ()


def _freeze(options: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> _Options:
    """``options`` (a mapping, or pairs) as :class:`_Options`, nested mappings too; lists become
    tuples."""
    items = options.items() if isinstance(options, Mapping) else options
    return _Options(sorted((str(name), _frozen(value)) for name, value in items))


def _frozen(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _freeze(value)
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def flat_options(options: Iterable[tuple[str, Any]], prefix: str = "") -> list[tuple[str, Any]]:
    """A storage's ``storage_options`` as ``(name, value)`` pairs, nested options under dotted
    names (``client_kwargs.region_name``), as a spec writes them."""
    pairs: list[tuple[str, Any]] = []
    for name, value in options:
        if isinstance(value, _Options):
            pairs.extend(flat_options(value, f"{prefix}{name}."))
        else:
            pairs.append((prefix + name, value))
    return pairs


def _thaw(options: _Options) -> dict[str, Any]:
    """The mapping fsspec takes, nested mappings again."""
    return {name: _thaw(v) if isinstance(v, _Options) else v for name, v in options}


@contextlib.contextmanager
def _failures(where: str) -> Iterator[None]:
    """Any failure of the filesystem but a missing object, as an ``ObjectStoreError`` naming
    ``where``; ``FileNotFoundError`` passes (the caller knows what is missing)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - every filesystem and client has its own errors
        raise ObjectStoreError(where, _cause(e)) from e


class _Handle:
    """The filesystem of one storage in this process: made on first use, made again in a
    child after fork (an fsspec filesystem's event loop does not survive it); pickles empty."""

    __slots__ = ("state", "__weakref__")

    def __init__(self) -> None:
        self.state: tuple[int, Any, str] | None = None

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (type(self), ())


_warned_locks: set[str] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class ObjectStoreBackend(StorageBackend):
    """Backend keeping one object per key under the fsspec URL ``url``; no locks of its own.

    ``storage_options`` are passed to the filesystem (``{"endpoint_url": ...}``); credentials
    belong in the filesystem's usual configuration instead, but given here they work and are
    never shown in a ``repr``. ``serializer``, ``compression`` and ``secret_key`` are those of
    pickle files (see
    :class:`~fleche.storage.PickleFileBackend`): every object is checksummed, and signed when a
    key is set here or in ``FLECHE_SECRET_KEY``. ``lock_timeout`` bounds the wait for a key's
    thread lock. Equal settings are one store; a storage pickles as its settings and opens its
    filesystem again in the process it lands in.

    A failure of the filesystem raises :class:`~fleche.errors.WriteError` for a save (naming the
    object and the cause: no such bucket, access denied, the endpoint down) and
    :class:`~fleche.errors.ObjectStoreError` otherwise; a missing package raises
    ``ModuleNotFoundError`` naming what to install.
    """

    url: str
    storage_options: Mapping[str, Any] | tuple[tuple[str, Any], ...] = field(
        default=(), repr=False
    )
    lock_timeout: float | None = 1.0
    serializer: str = "pickle"
    compression: str | None = None
    secret_key: bytes | str | Sequence[bytes | str] | None = field(default=None, repr=False)
    _handle: _Handle = field(default_factory=_Handle, init=False, repr=False, compare=False)

    _atomic_writes: ClassVar[bool] = True
    """An object is published whole (one PUT, or a rename on a local filesystem): readers need
    no lock."""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or "://" not in self.url:
            raise ValueError(
                f"url must be an fsspec URL such as 's3://bucket/prefix', got {self.url!r}"
            )
        object.__setattr__(self, "url", self.url.rstrip("/"))
        object.__setattr__(self, "storage_options", _freeze(self.storage_options))
        check_serializer(self.serializer)
        check_compression(self.compression)
        object.__setattr__(self, "secret_key", as_secrets(self.secret_key) or None)
        if self.lock_timeout is not None and not (
            isinstance(self.lock_timeout, (int, float)) and self.lock_timeout >= 0
        ):
            raise ValueError(f"lock_timeout must be a number >= 0 or None, got {self.lock_timeout!r}")

    def _secrets(self) -> tuple[bytes, ...]:
        return secrets_of(self.secret_key)  # type: ignore[arg-type]

    # -- the filesystem ---------------------------------------------------------------------

    def _filesystem(self) -> tuple[Any, str]:
        """This process's fsspec filesystem and the path of ``url`` on it."""
        state = self._handle.state
        pid = os.getpid()
        if state is None or state[0] != pid:
            fs, root = _open_filesystem(self.url, _thaw(self.storage_options))  # type: ignore[arg-type]
            state = self._handle.state = (pid, fs, root)
        return state[1], state[2]

    def _location(self, key: Digest) -> str:
        return f"{self.url}/{key[:2]}/{key}"

    def _object_path(self, key: Digest) -> tuple[Any, str]:
        """The filesystem and the path on it of the object of ``key``."""
        fs, root = self._filesystem()
        return fs, f"{root}/{key[:2]}/{key}"

    # -- backend primitives -----------------------------------------------------------------

    def put(self, value: Any, key: Digest) -> Digest:
        """Publish the entry for ``value`` under ``key`` as one whole object, replacing any.

        Thread- and process-safe without locks: the last write of a key wins and a reader in
        any process sees one whole entry. :class:`~fleche.errors.WriteError` if the store
        refuses it (nothing is left behind; what was stored before is intact).
        """
        data = seal_pickle(value, key, self.serializer, self._secrets(), self.compression)
        fs, path = self._object_path(key)
        try:
            if _is_local(fs):
                _replace_local(fs, path, key, data)
            else:
                fs.pipe_file(path, data)
        except Exception as e:  # noqa: BLE001 - every filesystem has its own errors
            raise _write_error(key, self._location(key), e) from e
        BYTES_WRITTEN.add("bytes", len(data))
        return key

    def get(self, key: Digest) -> Any:
        """Read and check the entry under ``key`` (one GET; no lock).

        ``KeyError`` if there is none, :class:`~fleche.errors.CorruptEntryError` if it is torn,
        tampered with or cannot be unpickled.
        """
        fs, path = self._object_path(key)
        try:
            with _failures(self._location(key)):
                data = fs.cat_file(path)
        except FileNotFoundError:
            raise KeyError(f"nothing stored under {key}") from None
        return open_pickle(data, key, self._location(key), self._secrets())

    def _contains(self, key: Digest) -> bool:
        fs, path = self._object_path(key)
        try:
            with _failures(self._location(key)):
                return fs.info(path)["type"] == "file"
        except FileNotFoundError:
            return False

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        """The full keys of those among ``keys`` that are stored (a snapshot).

        Up to 16 keys are asked one by one (a HEAD each); more are looked up in one listing of
        the store, which costs a request per thousand objects on S3.
        """
        keys = list(keys)
        if len(keys) <= _LISTING_THRESHOLD:
            return super().contains_many(keys)
        present = set(self.list())
        found: set[Digest] = set()
        for key in keys:
            text = _check_key_text(key)
            if len(text) == DIGEST_LENGTH:
                if text in present:
                    found.add(_mk(text))
            else:
                with contextlib.suppress(KeyError):
                    found.add(self.expand(text))
        return found

    def list(self) -> Iterable[Digest]:
        """A snapshot of the stored keys: one listing of everything under ``url`` (a request
        per thousand objects on S3); other objects there are never listed."""
        fs, root = self._filesystem()
        try:
            with _failures(self.url):
                paths = fs.find(root)
        except FileNotFoundError:
            return []  # no bucket: nothing stored
        start = len(root) + 1
        keys = []
        for path in paths:
            match = _ENTRY.fullmatch(path, start) if path.startswith(root + "/") else None
            if match is not None and match.group(2).startswith(match.group(1)):
                keys.append(_mk(match.group(2)))
        return keys

    def _evict(self, key: Digest) -> None:
        if not self._contains(key):
            raise KeyError(f"nothing stored under {key}")
        fs, path = self._object_path(key)
        try:
            with _failures(self._location(key)):
                fs.rm_file(path)
        except FileNotFoundError:
            raise KeyError(f"nothing stored under {key}") from None

    def sweep(self, older_than: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove temporary files that writers killed mid-write left (local filesystems only:
        an object store never shows an unfinished PUT) older than ``older_than`` seconds."""
        fs, root = self._filesystem()
        if not _is_local(fs):
            return []
        cutoff = time.time() - older_than
        removed = []
        with _failures(self.url):
            paths = fs.find(root)
        for path in paths:
            if not _TEMPORARY.fullmatch(path.rsplit("/", 1)[-1]):
                continue
            with contextlib.suppress(FileNotFoundError):
                if fs.info(path)["mtime"] < cutoff:
                    if not dry_run:
                        fs.rm_file(path)
                    removed.append(path)
        return removed

    @contextlib.contextmanager
    def locked(self, key: Digest | str) -> Iterator[Digest]:
        """Hold ``key``'s lock among the threads of this process only: an object store has no
        locks, so other processes are not excluded and compute-once holds at least once.

        Warns (a :class:`~fleche.errors.FlecheWarning`) the first time this process takes a
        lock on each store.
        """
        _warn_at_least_once(self.url)
        with super().locked(key) as full:
            yield full

    def volume(self) -> int:
        """Bytes the objects under ``url`` take: a snapshot, from one listing of the store."""
        fs, root = self._filesystem()
        try:
            with _failures(self.url):
                return int(fs.du(root, total=True))
        except FileNotFoundError:
            return 0

    def usage(self) -> dict[Digest, EntryUsage]:
        """Every stored key with its object's size and last modification (when it was written;
        :meth:`touch` records nothing on an object store, so a size-limited cache over one evicts
        the least recently *written* calls first): one listing with details."""
        fs, root = self._filesystem()
        try:
            with _failures(self.url):
                details = fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        found: dict[Digest, EntryUsage] = {}
        start = len(root) + 1
        for path, info in details.items():
            match = _ENTRY.fullmatch(path, start) if path.startswith(root + "/") else None
            if match is not None and match.group(2).startswith(match.group(1)):
                found[_mk(match.group(2))] = EntryUsage(int(info.get("size") or 0), _mtime(info))
        return found

    def exists(self) -> bool:
        """Whether any object is under ``url`` yet (``False`` before the first save, and for a
        bucket that does not exist): a snapshot, one request."""
        fs, root = self._filesystem()
        with _failures(self.url):
            return bool(fs.exists(root))


WHOLE = 1000
"""A ``remaining_depth`` no value reaches (digests stop at Python's recursion limit): every part
of a value stays inline, in the value's one object."""


@dataclass(frozen=True)
class ValueObjectStore(PerKeyLockMixin, DestructuringMixin, ValueMixin, ObjectStoreBackend):
    """A value storage of objects on an fsspec filesystem (see the module docstring): many
    processes on many hosts may share it; saves need no lock.

    Each object is a request, tens of milliseconds on a real S3, so by default a value is kept
    whole in one object (``remaining_depth=WHOLE``: a hit reads one object, a miss writes one);
    ``remaining_depth=0`` stores every part of lists, dicts and dataclasses as an object of its
    own, shared by every value that holds it.

    >>> values = ValueObjectStore("memory://fleche-doctest/values")
    >>> key = values.save({"a": [1, 2]})
    >>> values.load(key), len(list(values.list()))
    ({'a': [1, 2]}, 1)
    """

    remaining_depth: int = WHOLE


@dataclass(frozen=True)
class CallObjectStore(PerKeyLockMixin, CallMixin, ObjectStoreBackend):
    """A call storage of objects on an fsspec filesystem; its ``locked`` excludes this
    process's threads only, so compute-once over it holds at least once.

    An intact object that holds something other than a call record loads as
    :class:`~fleche.errors.CorruptEntryError` saying what it holds, so it can be evicted.
    """

    keeps_inline_values = True


# -- helpers ----------------------------------------------------------------------------------


def _open_filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path of ``url`` on it.

    Listings are never cached: another process may add or remove an object at any time.
    """
    protocol = url.split("://", 1)[0].lower()
    package, extra = _PACKAGES.get(protocol, ("fsspec", "'fleche[s3]'"))
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ModuleNotFoundError(
            f"the object store {url} needs fsspec: pip install 'fleche[s3]'", name="fsspec"
        ) from None
    try:
        fs, root = url_to_fs(url, **{"use_listings_cache": False, **options})
    except ImportError:
        raise ModuleNotFoundError(
            f"the object store {url} needs {package}: pip install {extra}", name=package
        ) from None
    except Exception as e:  # noqa: BLE001 - an unknown protocol, a bad option
        raise ObjectStoreError(url, f"cannot open its filesystem: {_cause(e)}") from e
    return fs, root.rstrip("/")


def _is_local(fs: Any) -> bool:
    """Whether ``fs`` writes files on this host, where a write is not atomic but a rename is."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _replace_local(fs: Any, path: str, key: str, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it into place."""
    directory = path.rsplit("/", 1)[0]
    temporary = f"{directory}/.{key}.{secrets.token_hex(6)}.tmp"
    fs.makedirs(directory, exist_ok=True)
    try:
        fs.pipe_file(temporary, data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _write_error(key: str, location: str, e: Exception) -> WriteError:
    errno = e.errno if isinstance(e, OSError) else None
    if isinstance(e, FileNotFoundError):
        reason = f"its bucket or container does not exist (create it first): {_cause(e)}"
    elif isinstance(e, PermissionError):
        reason = f"access denied (check the credentials and the bucket's policy): {_cause(e)}"
    else:
        reason = _cause(e)
    return WriteError(key, location, errno, reason)


def _warn_at_least_once(url: str) -> None:
    """Warn, once per process and store, that its locks do not reach other processes."""
    if url in _warned_locks:
        return
    with _warned_lock:
        if url in _warned_locks:
            return
        _warned_locks.add(url)
    warnings.warn(
        f"locks of the object store {url} exclude the threads of this process only, so "
        "compute-once on it holds at least once: two processes missing the same call at once "
        "may both compute it. For compute-once across processes keep the calls in a server "
        f"database: postgresql://HOST/DB?values={url}",
        FlecheWarning, stacklevel=4,
    )


def _mtime(info: Mapping[str, Any]) -> float:
    """When an object was last written, from an fsspec listing's details: S3 and Azure give
    ``LastModified``/``last_modified`` (a datetime), local and memory filesystems ``mtime`` or
    ``created``; 0 where none is given (such entries count as the oldest)."""
    for name in ("LastModified", "last_modified", "mtime", "created", "updated"):
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        try:
            return datetime.datetime.fromisoformat(str(value)).timestamp()
        except ValueError:
            continue
    return 0.0
