"""HDF5 entries written by ``bagofholding``, checked and optionally signed, and the value and
call storages on them.

Each entry is one HDF5 file, ``root/<first two hex digits>/<key>.h5``, written by
:class:`bagofholding.H5Bag`: the stored object's structure becomes groups under ``/object``, numpy
arrays become datasets with their dtype and shape, and every node's attrs say what it holds. So a
stored file opens with plain ``h5py`` (or HDFView, ``h5ls``) and shows the data. Its groups track
creation order, so a dict stored as a group comes back with its keys in insertion order (entries
written before fleche did this load them in name order).

The file's first 512 bytes are an HDF5 *user block*, which HDF5 tools skip (``h5py`` reports it
as ``userblock_size``). It holds the envelope of :mod:`fleche.storage.envelope` (magic
``b"FLCH"``) over the HDF5 bytes after it: a BLAKE2b checksum and, with a secret key
(``secret_key=`` or ``FLECHE_SECRET_KEY``), an HMAC-SHA256 binding the bytes to the key. Both are
checked on the bytes read from the entry before HDF5 opens it, and HDF5 must then open the very
file that was checked (same inode, unchanged), so a torn, bit-flipped, tampered or moved entry
raises :class:`~fleche.errors.CorruptEntryError` (:class:`~fleche.errors.SignatureError` for
signatures) before bagofholding loads, imports or calls anything from it. Entries written before
fleche checked HDF5 files (no user block) still load while no secret key is set; with a key set
they are unsigned and refused, as unsigned pickle entries are.

Writes go through :class:`~fleche.storage.file.FileStorage`: bagofholding writes a scratch file,
whose bytes go, behind the user block, into a fresh temporary file that a rename moves into
place, under the same per-key inter-process locks as the pickle storages. So an entry costs one
more write and read of its bytes than the bag alone, and a load reads the file twice (to check
it, then through HDF5, from the page cache). No HDF5 file is ever opened for writing by two
processes, or reopened for writing at all.

libhdf5's own file locking (``flock``, on by default, ``HDF5_USE_FILE_LOCKING``) is left as it is.
Checked on ext4 with HDF5 2.0: a process holding an entry open for reading neither blocks a writer
(which writes a new inode and renames it over the path) nor other readers; it keeps reading the
old, complete file. HDF5's lock would only refuse opening a file *in place* for writing while
another process reads it, which this storage never does. On file systems without ``flock``
support (some NFS mounts) libhdf5 fails to open files unless ``HDF5_USE_FILE_LOCKING=FALSE`` is
set in the environment; our locks do not depend on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..extras import needs_extra

with needs_extra("h5", "HDF5 storage (format=h5)"):
    import h5py
    import numpy as np
    from bagofholding import H5Bag
    from bagofholding.exceptions import BagMismatchError

from ..call import DigestedCall
from ..digest import Digest
from ..errors import CorruptEntryError, SaveError, SignatureError
from .base import CallMixin, Intent, ValueMixin
from .destructuring import DestructuringMixin, DigestedDict, DigestedIterable
from .envelope import Envelope, as_secrets, environment_secrets
from .file import FileStorage, _read_all
from .locks import InterProcessLockMixin
from .thread_safe import PerKeyLockMixin

__all__ = ["BagOfHoldingH5FileBackend", "CallBagOfHoldingH5File", "ValueBagOfHoldingH5File"]

_VALIDATORS = ("exact", "semantic-patch", "semantic-minor", "semantic-major", "none")

ENVELOPE = Envelope(b"FLCH", what="fleche HDF5 entry")
USER_BLOCK = 512
"""Bytes before the HDF5 data in an entry file: the envelope header, then zeros."""
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_READ_ATTEMPTS = 5


class _Replaced(Exception):
    """The entry file HDF5 opened is not the one whose bytes were checked: read it again."""


class _Unstorable(Exception):
    """bagofholding refused a value; ``put`` turns this into a :class:`SaveError` with the key."""


@dataclass(frozen=True)
class BagOfHoldingH5FileBackend(FileStorage):
    """File storage whose entries are HDF5 files written and read by ``bagofholding``.

    ``version_validator`` says how closely the versions of the packages recorded in an entry (e.g.
    numpy's, for an array) must match the installed ones for it to load: one of
    bagofholding's ``"exact"``, ``"semantic-patch"``, ``"semantic-minor"``, ``"semantic-major"``
    or ``"none"`` (the default, like the pickle storages: load whatever still loads). An entry
    refused by it reads as a :class:`~fleche.errors.CorruptEntryError`.

    Every entry carries a checksum; with ``secret_key`` (bytes, str, or several to rotate keys:
    sign with the first, accept any) or ``FLECHE_SECRET_KEY`` set, an HMAC too, and unsigned or
    tampered entries raise :class:`~fleche.errors.SignatureError` before anything is loaded (see
    the module docstring). A key given as a field travels inside pickled copies of the storage;
    the environment variable does not.

    Loading an entry may import and call what it names, as unpickling does: share a root only
    with writers you trust, or set a secret key. libhdf5 serializes all HDF5 work of one process (h5py holds a global
    lock), so threads of one process read and write entries one at a time.
    """

    version_validator: str = "none"
    secret_key: bytes | str | Sequence[bytes | str] | None = field(default=None, repr=False)

    _entry_suffix: ClassVar[str] = ".h5"
    _writes_scratch: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.version_validator not in _VALIDATORS:
            raise ValueError(
                f"version_validator must be one of {', '.join(map(repr, _VALIDATORS))}, "
                f"got {self.version_validator!r}"
            )
        object.__setattr__(self, "secret_key", as_secrets(self.secret_key) or None)

    def _secrets(self) -> tuple[bytes, ...]:
        """Keys to sign with (the first) and to accept (any); empty when unsigned."""
        if self.secret_key:
            return self.secret_key  # type: ignore[return-value]
        return environment_secrets()

    def put(self, value: Any, key: Digest) -> Digest:
        """Write ``value`` under ``key`` atomically; :class:`SaveError` if bagofholding cannot
        store it, with nothing left on disk."""
        try:
            return super().put(value, key)
        except _Unstorable as e:
            kind = type(value)
            cause = e.__cause__
            raise SaveError(
                f"cannot store a value of type {kind.__module__}.{kind.__qualname__} under {key} "
                f"in HDF5 with bagofholding: {type(cause).__name__}: {cause}"
            ) from cause

    def get(self, key: Digest) -> Any:
        for _ in range(_READ_ATTEMPTS):
            try:
                return super().get(key)
            except _Replaced:
                continue  # replaced by a newer entry between the check and HDF5's open
        # Writers kept replacing it: read once more holding the key's lock, which every writer
        # takes, so nothing can replace it this time (unless a writer ignores the lock).
        with self._operation_context(key, intent=Intent.WRITE):
            try:
                return super().get(key)
            except _Replaced:
                pass
        raise CorruptEntryError(
            key, self._path(key),
            f"changed on every one of {_READ_ATTEMPTS + 1} attempts to read it, the last under its lock",
        )

    def _encode(self, value: Any, key: Digest, scratch: str) -> bytes:
        try:
            with _creation_order():
                H5Bag.save(value, scratch)
        except OSError as e:
            if e.errno is not None:  # the file system's doing (full disk, permissions)
                raise
            raise _Unstorable() from e
        except Exception as e:  # noqa: BLE001 - bagofholding, h5py and pickling raise many kinds
            raise _Unstorable() from e
        fd = os.open(scratch, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            payload = _read_all(fd)
        finally:
            os.close(fd)
        header = ENVELOPE.header(payload, key, self._secrets(), location=self._path(key))
        return b"".join((header.ljust(USER_BLOCK, b"\0"), payload))

    def _decode(self, data: bytes, key: Digest, path: str, fd: int) -> Any:
        secrets = self._secrets()
        if data[: len(_HDF5_SIGNATURE)] == _HDF5_SIGNATURE:  # written before entries had a header
            if secrets:
                raise SignatureError(
                    key, path, "unsigned entry refused: this storage has a secret key (an HDF5 "
                    "file without fleche's user block, written before fleche signed them)"
                )
        else:
            view = memoryview(data)
            end = ENVELOPE.header_size(view)
            ENVELOPE.check(view[:end], view[USER_BLOCK:], key, path, secrets)
            if any(view[end:USER_BLOCK]):
                raise CorruptEntryError(key, path, "damaged user block: bytes after the header")
        return self._load_bag(path, key, os.fstat(fd))

    def _load_bag(self, path: str, key: Digest, checked: os.stat_result) -> Any:
        with contextlib.ExitStack() as stack:
            try:
                # Held open while loading: a concurrent replace or evict cannot change what we read.
                bag = stack.enter_context(H5Bag(path))
            except FileNotFoundError:
                raise _Replaced() from None  # evicted or replaced since it was checked
            except BagMismatchError as e:
                raise CorruptEntryError(
                    key, path, f"written by an incompatible bagofholding: {e}"
                ) from e
            except Exception as e:  # noqa: BLE001 - libhdf5 reports damage as OSError and more
                raise CorruptEntryError(
                    key, path, f"not a readable HDF5 bag: {type(e).__name__}: {e}"
                ) from e
            opened = bag.file.id.get_vfd_handle()
            if not _unchanged(checked, os.fstat(opened)):
                raise _Replaced()
            try:
                value = bag.load(version_validator=self.version_validator)
                if isinstance(value, np.generic):
                    value = _as_stored_array(bag, value)
            except (ImportError, BagMismatchError) as e:
                raise CorruptEntryError(
                    key, path, f"intact but cannot be loaded here: {type(e).__name__}: {e}"
                ) from e
            except Exception as e:  # noqa: BLE001 - a damaged file fails in arbitrary ways
                raise CorruptEntryError(
                    key, path, f"damaged or not a fleche entry: {type(e).__name__}: {e}"
                ) from e
            if not _unchanged(checked, os.fstat(opened)):
                raise _Replaced()
            return value


_creation_order_lock = threading.Lock()
_creation_order_users = 0
_creation_order_before = False


@contextlib.contextmanager
def _creation_order() -> Iterator[None]:
    """Have the HDF5 groups created meanwhile in this process list members in creation order.

    bagofholding writes a dict with string keys as a group with a member per key, and reads the
    members in the order the group lists them: by name, unless the group tracks creation order
    (h5py's ``track_order``). Tracking it brings dicts back in insertion order; entries written
    before it load in name order, as they always did. h5py has the default as one setting per
    process, so it is switched on while any thread of this process saves an entry and restored
    after the last one; groups other code creates meanwhile track their creation order too.
    """
    global _creation_order_users, _creation_order_before
    config = h5py.get_config()
    with _creation_order_lock:
        if _creation_order_users == 0:
            _creation_order_before = config.track_order
            config.track_order = True
        _creation_order_users += 1
    try:
        yield
    finally:
        with _creation_order_lock:
            _creation_order_users -= 1
            if _creation_order_users == 0:
                config.track_order = _creation_order_before


def _unchanged(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of one file, not written in between."""
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) == (
        b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns, b.st_ctime_ns
    )


def _as_stored_array(bag: H5Bag, value: Any) -> Any:
    """``value`` as the 0-d array it was stored as, if it was: bagofholding loads a 0-d array as
    a numpy scalar (in native byte order)."""
    meta = bag[H5Bag.storage_root]
    if not (meta.module == "numpy" and meta.qualname == "ndarray"):
        return value
    stored = bag.file[H5Bag.storage_root].dtype
    same = stored.kind == value.dtype.kind and stored.itemsize == value.dtype.itemsize
    return np.asarray(value, dtype=stored if same else value.dtype)


@dataclass(frozen=True)
class ValueBagOfHoldingH5File(
    PerKeyLockMixin, InterProcessLockMixin, DestructuringMixin, ValueMixin, BagOfHoldingH5FileBackend
):
    """A destructuring value storage of HDF5 files, safe to share between threads and processes.

    Lists, tuples, dicts and dataclasses are stored element by element (see
    :class:`~fleche.storage.destructuring.DestructuringMixin`), so each array or data frame gets
    a file of its own that other HDF5 tools can open. A plain list, tuple or dict whose elements
    are all stored separately is kept as ``("fleche.destructured/1", <JSON of its kind and the
    element keys>)``: bagofholding spends about seven HDF5 nodes on each key otherwise, which
    makes such a file some ten times slower to write and read. (A plain tuple that starts with
    that tag, kept whole with ``remaining_depth >= 1``, is stored as a wrapper instead.)

    >>> import tempfile, numpy as np
    >>> values = ValueBagOfHoldingH5File(tempfile.mkdtemp())
    >>> values.load(values.save({"a": np.arange(3)}))
    {'a': array([0, 1, 2])}
    """

    def put(self, value: Any, key: Digest) -> Digest:
        return super().put(_references_to_tuple(value), key)

    def get(self, key: Digest) -> Any:
        stored = super().get(key)
        if type(stored) is tuple and _tagged(stored):
            try:
                return _references_from_tuple(stored)
            except (TypeError, ValueError, KeyError, IndexError) as e:
                raise CorruptEntryError(
                    key, self._path(key), f"unreadable container: {type(e).__name__}: {e}"
                ) from e
        return stored


_REFERENCES_TAG = "fleche.destructured/1"
_KINDS: dict[str, type] = {"list": list, "tuple": tuple, "dict": dict}


def _tagged(value: tuple) -> bool:
    """Whether the tuple ``value`` starts with the stand-in's tag (compared only with a str: an
    array's ``==`` is elementwise)."""
    return bool(value) and type(value[0]) is str and value[0] == _REFERENCES_TAG


def _references_to_tuple(value: Any) -> Any:
    """A compact stand-in for a destructured plain container of references, else ``value``.

    A plain tuple stored whole (``remaining_depth >= 1``) that starts with the stand-in's tag
    is kept as a wrapper, so it is never read back as a stand-in."""
    cls = type(value)
    if cls is tuple and _tagged(value):
        return DigestedIterable(tuple, value)
    if cls is DigestedIterable and value.kind in (list, tuple):
        if all(type(x) is Digest for x in value.items):
            items: list[Any] = list(value.items)
        else:
            return value
    elif cls is DigestedDict and value.kind is dict:
        if all(type(k) is str and type(v) is Digest for k, v in value.items):
            items = [[k, v] for k, v in value.items]
        else:
            return value
    else:
        return value
    return (_REFERENCES_TAG, json.dumps({"kind": value.kind.__name__, "items": items}))


def _references_from_tuple(stored: tuple[str, str]) -> DigestedIterable | DigestedDict:
    document = json.loads(stored[1])
    kind = _KINDS[document["kind"]]
    if kind is dict:
        return DigestedDict(dict, tuple((str(k), Digest(v)) for k, v in document["items"]))
    return DigestedIterable(kind, tuple(Digest(x) for x in document["items"]))


@dataclass(frozen=True)
class CallBagOfHoldingH5File(
    PerKeyLockMixin, InterProcessLockMixin, CallMixin, BagOfHoldingH5FileBackend
):
    """A call storage of HDF5 files, safe to share between threads and processes.

    Each record is one file holding one string dataset, ``/object``: the record as a JSON
    document (``{"fleche_call": 1, "name": ..., "arguments": {...}, "result": ..., ...}``),
    readable by any HDF5 tool. bagofholding's structural form of a record takes some forty HDF5
    nodes, about 25 times slower to write and read; it is kept only for records whose metadata
    JSON would not bring back exactly (tuples, non-string keys, NaN), and loads all the same.
    """

    def put(self, value: DigestedCall, key: Digest) -> Digest:
        return super().put(_call_to_json(value), key)

    def get(self, key: Digest) -> DigestedCall:
        stored = super().get(key)
        if not isinstance(stored, str):
            return stored  # bagofholding's structural form, or not a record: CallMixin.load checks
        try:
            return _call_from_json(stored)
        except (TypeError, ValueError, KeyError) as e:
            raise CorruptEntryError(
                key, self._path(key), f"not a fleche call record: {type(e).__name__}: {e}"
            ) from e


_CALL_FORMAT = 1
_CALL_FIELDS = ("name", "module", "version", "code_digest", "arguments", "result", "metadata")


def _call_to_json(call: DigestedCall) -> str | DigestedCall:
    """The record as a JSON document, or the record itself where JSON would not bring it back."""
    document = {"fleche_call": _CALL_FORMAT, **{f: getattr(call, f) for f in _CALL_FIELDS}}
    document["arguments"] = dict(call.arguments)
    try:
        text = json.dumps(document, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError):
        return call
    try:
        back = _call_from_json(text)
    except (TypeError, ValueError):
        return call
    # Equality tells tuples from lists and 1 from "1"; the argument check keeps odd records whole.
    exact = back == call and all(type(v) is Digest for v in call.arguments.values())
    return text if exact else call


def _call_from_json(text: Any) -> DigestedCall:
    document = json.loads(text)
    if not isinstance(document, dict) or document.get("fleche_call") != _CALL_FORMAT:
        raise ValueError(f"no call record of format {_CALL_FORMAT} in {str(text)[:60]!r}")
    result = document["result"]
    return DigestedCall(
        name=document["name"],
        arguments={k: Digest(v) for k, v in document["arguments"].items()},
        metadata=document["metadata"],
        module=document["module"],
        version=document["version"],
        code_digest=document["code_digest"],
        result=None if result is None else Digest(result),
    )
