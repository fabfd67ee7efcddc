"""Store specs: one string that names a cache, the same in every process and on every host.

``fleche.open(spec)`` builds the :class:`~fleche.caches.Cache` a spec names; ``FLECHE_CACHE``
holds a spec that becomes the process-wide default cache (see :mod:`fleche.decorator`), and the
``fleche`` command line, :class:`fleche.dask.FlecheCache` and the :mod:`fleche.ray` helpers take
specs too. The forms:

================================================  =============================================
``DIR`` or ``file://DIR``                         values as pickle files in ``DIR/values``,
                                                  calls in the SQLite index ``DIR/index.sqlite``
``DIR?layout=files``                              ... calls as pickle files in ``DIR/calls``
``DIR?format=h5``                                 values as HDF5 files
``sqlite:///path.db``                             calls and values in a SQLite file (values as
                                                  pickle files in ``path.db-values`` next to it
                                                  where that directory exists)
``sqlite:///path.db?values=DIR``                  ... values in ``DIR``
``postgresql://user:pw@host/db``                  calls and values in PostgreSQL (psycopg 3)
``mysql://user:pw@host/db``                       ... in MariaDB/MySQL (pymysql)
``postgresql://user:pw@host/db?values=DIR``       calls in PostgreSQL, values in ``DIR``, which
                                                  every host must reach
``memory://`` or ``memory://NAME``                in this process's memory; one cache per spec
                                                  string and process
``s3://bucket/prefix`` (``gs://``, ``az://``)     objects: values under ``.../values``, calls
                                                  under ``.../calls`` (``s3`` extra)
``fsspec+PROTOCOL://...``                         objects on any fsspec filesystem, e.g.
                                                  ``fsspec+memory://NAME`` (fsspec's in-memory
                                                  filesystem) or ``fsspec+file:///DIR``
``postgresql://...?values=s3://bucket/prefix``    calls in PostgreSQL, values as objects
================================================  =============================================

A SQL store without ``values=`` keeps its values in the database (``SqlValues``: rows of
``fleche_values``, large values in chunks of 4 MiB), written in the transaction of the call
record that needs them.

Options, after ``?`` and joined by ``&``: ``values=DIR`` (SQL stores), ``format=pickle``
(default), ``cloudpickle`` or ``dill`` (values stored with cloudpickle or dill) or ``h5``;
``compression=zlib`` (or ``lzma``, ``bz2``: value payloads compressed; pickle formats only);
``lock_timeout=SECONDS``
(or ``none``) for the key locks of the file storages and of a SQL store's calls;
``durable=true`` for the file storages; ``layout=index`` or ``layout=files`` for a directory
(see below); ``inline_parts=BYTES``: parts of a value (elements of lists, tuples, dicts,
dataclasses) that pickle to fewer bytes stay in their container's file or row (default 2048;
0 stores every part apart, the HDF5 default, for sharing between values). Relative paths are
made absolute when the spec is parsed, ``~`` is expanded; a directory whose name contains ``?``
is written as a ``file://`` URL with ``%3F``. Other options of a SQL URL (``sslmode=require``...) stay
in the database URL. A bare ``postgresql://`` means ``postgresql+psycopg://`` and a bare
``mysql://``/``mariadb://`` means ``...+pymysql://``, the drivers of the ``sql`` extra.

Object stores take ``format=pickle|cloudpickle`` and ``lock_timeout``; their other options are
passed to the fsspec filesystem (``endpoint_url=http://host:9000``, dotted names for nested
ones: ``client_kwargs.region_name=eu-west-1``; ``true``, ``false``, ``none`` and numbers are
converted). An object store given as ``values=`` of a SQL store writes its own options with
``%3F`` and ``%26`` for ``?`` and ``&``.

A directory's calls are kept in one of two layouts. ``index`` (the default for a new store):
one SQLite file, ``DIR/index.sqlite``, holds every call record with its small values, so a miss
writes one row and a hit reads one. ``files``: one pickle (or HDF5) file per call in
``DIR/calls``. Without ``layout=``, a directory holding an index opens as ``index``, one holding
``DIR/calls`` (written by an older fleche, or with ``layout=files``) as ``files``, and a new
store on a network filesystem (NFS, SMB, ...), where SQLite cannot lock reliably, as ``files``;
``layout=index`` there is refused. Values are pickle files in ``DIR/values`` in both.

Secret keys never go into a spec (specs are printed and logged): set ``FLECHE_SECRET_KEY``. Nor
do credentials of object stores (``key``, ``secret``, ``token``, ... options are refused): they
come from the filesystem's usual configuration (``AWS_ACCESS_KEY_ID``, ``~/.aws/credentials``,
``GOOGLE_APPLICATION_CREDENTIALS``, ...).

Without ``FLECHE_CACHE``, the default store is :func:`default_spec`: pickle files in fleche's
directory of the user's cache directory (``~/.cache/fleche`` on Linux), where ``Sql()`` keeps
its default SQLite file too.

>>> import tempfile
>>> root = tempfile.mkdtemp()
>>> cache = open_store(root + "?format=cloudpickle")
>>> spec_of(cache) == root + "?format=cloudpickle"
True
>>> open_store("memory://") is open_store("memory://")
True
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from .caches import BaseCache, Cache
from .errors import SpecError
from .storage.memory import CallMemory, ValueMemory
from .storage.directory_index import INDEX_NAME, CallDirectoryIndex, DirectoryIndexBackend
from .storage.file import FileStorage
from .storage.filesystems import is_network_path
from .storage.envelope import COMPRESSIONS
from .storage.object_store import (
    CallObjectStore,
    ObjectStoreBackend,
    ValueObjectStore,
    flat_options,
    is_secret_option,
)
from .storage.pickle_file import SECRET_KEY_ENV, CallPickleFile, PickleFileBackend, ValuePickleFile

__all__ = [
    "CACHE_ENV", "StoreSpec", "as_cache", "default_spec", "mask", "open_store", "parse", "spec_of",
]

CACHE_ENV = "FLECHE_CACHE"
"""Environment variable holding the spec of the process-wide default cache."""

FORMATS = ("pickle", "cloudpickle", "dill", "h5")
_OPTIONS = ("values", "format", "compression", "lock_timeout", "durable", "layout", "inline_parts")
DEFAULT_INLINE_PARTS = 2048
"""Parts of a value smaller than about this many bytes stay in their container's entry in the
stores a spec opens (``DestructuringMixin.inline_parts``): a list of numbers is one file or row,
not one per number. HDF5 stores keep every part apart, for other HDF5 tools to read."""

LAYOUTS = ("index", "files")
"""How a store directory keeps its calls: rows of ``DIR/index.sqlite``, or files in ``DIR/calls``."""
_SQL_BACKENDS = {"sqlite": None, "postgresql": "psycopg", "mysql": "pymysql", "mariadb": "pymysql"}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^/@:?]*:)[^/@?]*@")
_OPTION_URL_PASSWORD = re.compile(r"(://[^/@:?&=#]*:)[^/@?&#]*@")
_PASSWORD_OPTION = re.compile(r"([?&](?:password|passwd)=)[^&]*", re.IGNORECASE)
_DEFAULT_LOCK_TIMEOUT = 1.0

_memory: dict[str, Cache] = {}
_memory_lock = threading.Lock()


def default_spec() -> str:
    """The spec of the default store, used where no cache is set and ``FLECHE_CACHE`` is not:
    fleche's directory in the user's cache directory (``platformdirs.user_cache_dir``, so
    ``$XDG_CACHE_HOME/fleche`` or ``~/.cache/fleche`` on Linux, ``~/Library/Caches/fleche`` on
    macOS), holding pickle files in ``calls/`` and ``values/``. Nothing is created until the
    first save."""
    import platformdirs

    return platformdirs.user_cache_dir("fleche")


def mask(spec: str) -> str:
    """``spec`` with the password of its URL, of URLs in its options and of any ``password=``
    option replaced by ``***``: how fleche prints, logs and names a spec."""
    base, separator, options = spec.partition("?")
    options = _OPTION_URL_PASSWORD.sub(r"\1***@", options)
    return _PASSWORD_OPTION.sub(r"\1***", _PASSWORD.sub(r"\1***@", base) + separator + options)


@dataclass(frozen=True)
class StoreSpec:
    """A parsed spec: where the calls and values of a store live and how they are written.

    ``kind`` is ``"directory"``, ``"sql"``, ``"objects"`` or ``"memory"``; ``calls`` is the
    directory, the database URL, the object store's URL (as a spec spells it) or the memory name;
    ``values`` the values directory or object store (``None`` for memory, and for a SQL store
    whose values are in its database); ``url_query`` the
    options left for the database or the object store's filesystem.
    Building it touches nothing; :meth:`open` creates no file and opens no connection either
    (storages do that on first use). ``str`` and ``repr`` mask the database password (see
    :func:`mask`); :meth:`reveal` gives the spec with it, to open the store elsewhere.
    """

    kind: str
    calls: str
    values: str | None = None
    format: str = "pickle"
    compression: str | None = None
    lock_timeout: float | None = _DEFAULT_LOCK_TIMEOUT
    durable: bool = False
    url_query: tuple[tuple[str, str], ...] = field(default=())
    layout: str | None = None
    """A directory's layout as the spec gives it (``"index"``, ``"files"``), ``None`` to choose
    from what the directory holds (see :meth:`resolved_layout`)."""
    inline_parts: int | None = None
    """``inline_parts=`` as the spec gives it, ``None`` for the format's default (see
    :meth:`resolved_inline_parts`)."""

    def __str__(self) -> str:
        """The canonical spec with its password masked: what fleche prints and logs."""
        return mask(self.reveal())

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
            if f.name not in ("calls", "url_query")
        )
        return f"StoreSpec({mask(self.reveal())!r}, {shown})"

    def reveal(self) -> str:
        """The canonical spec (absolute paths, default options left out), password included:
        for handing to another process that opens the store, never for printing."""
        options: dict[str, str] = {}
        if self.kind == "memory":
            return f"memory://{self.calls}"
        if self.kind == "sql" and self.values is not None and not _is_default_values(
            self.calls, self.values
        ):
            options["values"] = str(self.values)
        if self.format != "pickle":
            options["format"] = self.format
        if self.compression is not None:
            options["compression"] = self.compression
        if self.lock_timeout != _DEFAULT_LOCK_TIMEOUT:
            options["lock_timeout"] = "none" if self.lock_timeout is None else f"{self.lock_timeout:g}"
        if self.durable:
            options["durable"] = "true"
        if self.layout is not None:
            options["layout"] = self.layout
        if self.inline_parts is not None:
            options["inline_parts"] = str(self.inline_parts)
        pairs = [*self.url_query, *options.items()]
        query = urllib.parse.urlencode(pairs, safe="/~:") if pairs else ""
        return self.calls + (f"?{query}" if query else "")

    def open(self) -> Cache:
        """The cache this spec names (for ``memory://``, the one of this process; thread-safe).

        Creates nothing, but looks at what is there: a file where a store directory (or a
        directory where a SQLite file) belongs raises :class:`~fleche.errors.SpecError`.
        A store needing an extra that is not installed raises
        :class:`~fleche.extras.MissingExtraError`.
        """
        if self.kind == "memory":
            with _memory_lock:
                cache = _memory.get(self.calls)
                if cache is None:
                    cache = _memory[self.calls] = Cache(ValueMemory(), CallMemory())
                return cache
        if self.kind == "objects":
            return _object_cache(self)
        self._check_places()
        settings = {"lock_timeout": self.lock_timeout, "durable": self.durable}
        if self.kind == "directory":
            values = _value_storage(self.format, self.values or "", settings, self.compression,
                                    self.resolved_inline_parts())
            if self.resolved_layout() == "index":
                return Cache(values, CallDirectoryIndex(Path(self.calls), **settings))
            return Cache(values, _call_storage(self.format, Path(self.calls) / "calls", settings))
        from .storage.sql import Sql, SqlValues

        calls = Sql(_sql_argument(self.calls, self.url_query), lock_timeout=self.lock_timeout)
        if self.values is None:  # values in the database, on the call storage's connections
            values = SqlValues(
                calls, serializer=self.format, compression=self.compression,
                lock_timeout=self.lock_timeout, inline_parts=self.resolved_inline_parts(),
            )
        else:
            values = _value_storage(self.format, self.values, settings, self.compression,
                                    self.resolved_inline_parts())
        return Cache(values, calls)

    def _check_places(self) -> None:
        """Refuse a store whose directories, or SQLite file, are something else on disk (which
        would fail every save later with ``NotADirectoryError``)."""
        places = [Path(self.values)] if self.values and not self.values_are_objects else []
        sqlite = self.sqlite_path()
        if self.kind == "directory":
            places.append(Path(self.calls))
        elif sqlite is not None:
            if sqlite.is_dir():
                raise SpecError(str(self), f"{sqlite} is a directory, not a SQLite file")
            places.append(sqlite.parent)
        for place in places:
            there = place
            while not os.path.lexists(there) and there != there.parent:
                there = there.parent
            if not there.is_dir():
                raise SpecError(
                    str(self), f"{there} is not a directory: a store needs a directory there"
                )

    def resolved_inline_parts(self) -> int:
        """How small a part of a value must pickle to stay in its container's entry
        (``DestructuringMixin.inline_parts``): ``inline_parts=``, else :data:`DEFAULT_INLINE_PARTS`
        for the pickle formats and 0 (every part apart) for HDF5."""
        if self.inline_parts is not None:
            return self.inline_parts
        return _default_inline_parts(self.format)

    def resolved_layout(self) -> str | None:
        """The layout a directory store opens with: the spec's ``layout=``, else ``"index"``
        where ``DIR/index.sqlite`` is, ``"files"`` where ``DIR/calls`` is, ``"files"`` for a new
        store on a network filesystem, else ``"index"``; ``None`` for other kinds of store.

        Looks at the directory (a few ``stat`` calls) but creates nothing. Raises
        :class:`~fleche.errors.SpecError` for ``layout=index`` on a network filesystem.
        """
        if self.kind != "directory":
            return None
        root = Path(self.calls)
        if self.layout == "index":
            network, fstype = is_network_path(root)
            if network:
                raise SpecError(
                    str(self), f"{root} is on a network filesystem ({fstype}), where SQLite "
                    "cannot lock reliably: use layout=files there (or calls in PostgreSQL)"
                )
            return "index"
        if self.layout is not None:
            return self.layout
        if (root / INDEX_NAME).exists():
            return "index"
        if (root / "calls").is_dir():
            return "files"
        return "files" if is_network_path(root)[0] else "index"

    @property
    def values_are_objects(self) -> bool:
        """Whether the values live in an object store (an ``objects`` spec, or a SQL spec
        with ``values=s3://...``)."""
        return self.values is not None and _is_object_location(self.values)

    def sqlite_path(self) -> Path | None:
        """The SQLite file of a ``sqlite://`` spec, else ``None``."""
        if self.kind == "sql" and self.calls.startswith("sqlite"):
            return Path(self.calls.split(":///", 1)[1])
        return None

    def exists(self) -> bool:
        """Whether the store is there already (``False`` for a directory or SQLite file that
        opening would create, and for an object store with no object under its URL); server
        databases and memory always count as there. Asks the object store (one request)."""
        if self.kind == "directory":
            return Path(self.calls).is_dir()
        if self.kind == "objects":
            return _object_storage(CallObjectStore, self.calls, self.url_query, self).exists()
        path = self.sqlite_path()
        return path.is_file() if path is not None else True


def _default_inline_parts(fmt: str) -> int:
    return 0 if fmt == "h5" else DEFAULT_INLINE_PARTS


def _value_storage(
    fmt: str, location: str, settings: dict[str, Any], compression: str | None = None,
    inline_parts: int = 0,
) -> Any:
    if _is_object_location(location):
        url, _, query = location.partition("?")
        pairs = tuple(urllib.parse.parse_qsl(query, keep_blank_values=True))
        return ValueObjectStore(
            _fsspec_url(url), _storage_options(pairs), lock_timeout=settings["lock_timeout"],
            serializer=fmt, compression=compression,
        )
    root = Path(location)
    if fmt == "h5":
        from .storage.h5_file import ValueBagOfHoldingH5File

        return ValueBagOfHoldingH5File(root, inline_parts=inline_parts, **settings)
    return ValuePickleFile(
        root, serializer=fmt, compression=compression, inline_parts=inline_parts, **settings
    )


def _call_storage(fmt: str, root: Path, settings: dict[str, Any]) -> Any:
    if fmt == "h5":
        from .storage.h5_file import CallBagOfHoldingH5File

        return CallBagOfHoldingH5File(root, **settings)
    return CallPickleFile(root, **settings)


def _sql_argument(url: str, query: tuple[tuple[str, str], ...]) -> str:
    """What ``Sql`` gets: a SQLite file as a plain absolute path (so copies unpickled anywhere
    open the same file), other databases as their URL."""
    if url.startswith("sqlite") and not query:
        return url.split(":///", 1)[1]
    return url + ("?" + urllib.parse.urlencode(query) if query else "")


def _sqlite_values_default(url: str) -> str | None:
    """The values directory a ``sqlite:///path.db`` spec without ``values=`` uses, if it
    exists: ``path.db-values``, next to the database, named like SQLite's own companions
    (path.db-wal, path.db-shm). Stores made before values could live in the database keep it."""
    if not url.startswith("sqlite"):
        return None
    directory = url.split(":///", 1)[1] + "-values"
    return directory if os.path.isdir(directory) else None


def _is_default_values(url: str, values: str) -> bool:
    """Whether a spec of ``url`` without ``values=`` means the values directory ``values``."""
    return values == _sqlite_values_default(url)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _parse_options(text: str, query: str, allowed: tuple[str, ...], sql: bool) -> tuple[dict, list]:
    """fleche's options from ``query`` and, for SQL URLs, the pairs left for the database."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise SpecError(text, f"cannot read the options {query!r}: write NAME=VALUE&NAME=VALUE") from None
    options: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for name, value in pairs:
        if name == "secret_key":
            raise SpecError(
                text, f"a secret key does not belong in a spec (specs get printed and logged); "
                f"set the environment variable {SECRET_KEY_ENV} in every process instead"
            )
        if name in _OPTIONS:
            if name not in allowed:
                raise SpecError(text, f"option {name!r} does not apply to this kind of store")
            if name in options:
                raise SpecError(text, f"option {name!r} is given twice")
            options[name] = value
            continue
        close = get_close_matches(name, allowed, n=1, cutoff=0.7)
        if not sql or close:
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(
                text, f"unknown option {name!r}{hint}; options are {', '.join(allowed)}"
            )
        rest.append((name, value))  # a database driver option, e.g. sslmode=require
    return options, rest


def _common(text: str, options: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fmt = options.get("format", "pickle")
    if fmt not in FORMATS:
        raise SpecError(text, f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out["format"] = fmt
    if "compression" in options:
        compression = options["compression"]
        if compression not in COMPRESSIONS:
            raise SpecError(
                text, f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
            )
        if fmt == "h5":
            raise SpecError(
                text, "compression applies to the pickle formats; HDF5 entries stay files that "
                "HDF5 tools open as they are"
            )
        out["compression"] = compression
    if "lock_timeout" in options:
        raw = options["lock_timeout"]
        if raw.lower() == "none":
            out["lock_timeout"] = None
        else:
            try:
                out["lock_timeout"] = float(raw)
            except ValueError:
                out["lock_timeout"] = -1.0
            if not out["lock_timeout"] >= 0:
                raise SpecError(
                    text, f"lock_timeout must be a number of seconds >= 0 or none, got {raw!r}"
                )
    if "durable" in options:
        raw = options["durable"].lower()
        if raw not in ("true", "false", "1", "0", "yes", "no"):
            raise SpecError(text, f"durable must be true or false, got {options['durable']!r}")
        out["durable"] = raw in ("true", "1", "yes")
    if "inline_parts" in options:
        raw = options["inline_parts"]
        if not raw.isdigit():
            raise SpecError(text, f"inline_parts must be a number of bytes >= 0, got {raw!r}")
        out["inline_parts"] = _inline_parts_setting(fmt, int(raw))
    return out


def _inline_parts_setting(fmt: str, inline_parts: int) -> int | None:
    """``StoreSpec.inline_parts`` for a value storage's ``inline_parts``: ``None`` where it is
    the format's default, so equal stores have equal specs."""
    return None if inline_parts == _default_inline_parts(fmt) else inline_parts


def parse(spec: str | os.PathLike[str]) -> StoreSpec:
    """Parse a spec (see the module docstring) without opening anything.

    Relative paths become absolute against the current directory. Raises
    :class:`~fleche.errors.SpecError` naming what is wrong: an unknown scheme or option, a
    missing path, a secret key.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str):
        raise TypeError(f"a store spec is a str (or a path), got {type(spec).__name__}: {spec!r}")
    text = mask(spec)
    if not spec.strip():
        raise SpecError(text, "it is empty; give a directory, a database URL or memory://")
    scheme_match = _SCHEME.match(spec)
    base, _, query = spec.partition("?")
    if scheme_match is None:
        return _directory(text, base, query)
    scheme = scheme_match.group(1).lower()
    if scheme == "file":
        path = urllib.parse.unquote(base[len("file://"):])
        return _directory(text, path, query)
    if scheme in _OBJECT_SCHEMES or scheme.startswith(_FSSPEC):
        url, pairs, settings = _object_location(text, spec, whole_store=True)
        return StoreSpec("objects", url, f"{url}/values", url_query=pairs, **settings)
    if scheme == "memory":
        if query:
            raise SpecError(text, "memory:// takes no options")
        name = base[len("memory://"):]
        if "/" in name:
            raise SpecError(text, "write memory:// or memory://NAME (a name without '/')")
        return StoreSpec("memory", name)
    backend, _, driver = scheme.partition("+")
    if backend == "postgres":
        raise SpecError(text, "write postgresql:// (or postgresql+psycopg://), not postgres://")
    if backend in _SQL_BACKENDS:
        return _sql(text, scheme, backend, driver, base, query)
    raise SpecError(
        text, f"unknown scheme {scheme + '://'!r}; use a directory path, file://, sqlite://, "
        "postgresql://, mysql://, memory://, s3://, gs://, az:// or fsspec+PROTOCOL://"
    )


def _directory(text: str, path: str, query: str) -> StoreSpec:
    if not path:
        raise SpecError(text, "no directory given")
    allowed = tuple(o for o in _OPTIONS if o != "values")
    options, _ = _parse_options(text, query, allowed, sql=False)
    layout = options.get("layout")
    if layout is not None and layout not in LAYOUTS:
        raise SpecError(text, f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return StoreSpec(
        "directory", _absolute(path), _absolute(path) + "/values", layout=layout,
        **_common(text, options),
    )


def _sql(text: str, scheme: str, backend: str, driver: str, base: str, query: str) -> StoreSpec:
    allowed = tuple(o for o in _OPTIONS if o != "layout")
    options, rest = _parse_options(text, query, allowed, sql=True)
    settings = _common(text, options)
    values = options.get("values")
    if values == "":
        raise SpecError(text, "values= needs a directory")
    if values is not None and "inline_parts" in options and _is_object_location(values):
        raise SpecError(
            text, "inline_parts applies to values in files or in the database; an object "
            "store keeps each value whole in one object"
        )
    if backend == "sqlite":
        path = base.split("://", 1)[1]
        if not path.startswith("/") or path == "/":
            raise SpecError(
                text, "write sqlite:///relative/path.db or sqlite:////absolute/path.db "
                "(an in-memory SQLite database is private to one connection: use memory://)"
            )
        db = _absolute(urllib.parse.unquote(path[1:]))
        url = f"{scheme}:///{db}"
    else:
        url = f"{backend}+{driver or _SQL_BACKENDS[backend]}://{base.split('://', 1)[1]}"
    default_values = _sqlite_values_default(url)
    if values is None and default_values is None and settings["format"] == "h5":
        raise SpecError(
            text, "format=h5 keeps values as HDF5 files: give values=DIR (values in the "
            "database are pickles)"
        )
    return StoreSpec(
        "sql", url, _values_location(text, values) if values else default_values,
        url_query=tuple(rest), **settings,
    )


def open_store(spec: str | os.PathLike[str]) -> Cache:
    """The :class:`~fleche.caches.Cache` a spec names (exported as ``fleche.open``).

    Cheap: no file is created and no connection opened until the cache is used, so opening the
    same spec in many processes costs nothing; caches opened from one spec in any threads and
    processes share the same files or database. Thread-safe: ``memory://`` specs give the same
    cache object for the same spec string in every thread of a process. Raises
    :class:`~fleche.errors.SpecError` for a bad spec.
    """
    return parse(spec).open()


def as_cache(store: BaseCache | str | os.PathLike[str]) -> BaseCache:
    """``store`` itself if it is a cache, else the cache its spec names."""
    if isinstance(store, BaseCache):
        return store
    if isinstance(store, (str, os.PathLike)):
        return open_store(store)
    raise TypeError(f"expected a cache (fleche.caches.Cache) or a store spec, got {store!r}")


def spec_of(cache: BaseCache, *, reveal: bool = False) -> str | None:
    """The spec of a store equal to ``cache``, or ``None`` if no spec can say it.

    Works for caches built by hand as well as by :func:`open_store`, also after pickling. The
    database password, if any, is masked (``***``), so the spec is safe to print and names the
    store without its secret; ``reveal=True`` keeps it, for a spec that opens the store.
    """
    parsed = _spec_from_storages(cache)
    if parsed is None:
        return None
    candidates = [parsed]
    if parsed.kind == "directory":  # without layout= where the directory implies it
        candidates.insert(0, dataclasses.replace(parsed, layout=None))
    for candidate in candidates:
        try:
            equal = candidate.open() == cache
        except Exception:  # noqa: BLE001 - an extra not installed here, an odd storage
            continue
        if equal:
            return candidate.reveal() if reveal else str(candidate)
    return None


def _instance_of(storage: Any, module: str, name: str) -> bool:
    """Whether ``storage`` is a ``fleche.storage.<module>.<name>``, without importing that
    module (and its optional dependencies): if it is not imported, nothing can be one."""
    loaded = sys.modules.get(f"fleche.storage.{module}")
    return loaded is not None and isinstance(storage, vars(loaded)[name])


def _spec_from_storages(cache: BaseCache) -> StoreSpec | None:
    if not isinstance(cache, Cache):
        return None
    with _memory_lock:
        for name, known in _memory.items():
            if known is cache:
                return StoreSpec("memory", name)
    values, calls = cache.values, cache.calls
    if _instance_of(values, "sql.values", "SqlValueBackend"):
        if values.sql != calls:
            return None
        location = None
        settings = {
            "format": values.serializer, "compression": values.compression,
            "lock_timeout": values.lock_timeout,
            "inline_parts": _inline_parts_setting(values.serializer, values.inline_parts),
        }
    elif isinstance(values, ObjectStoreBackend):
        if isinstance(calls, ObjectStoreBackend):
            return _object_spec_of(values, calls)
        location = _object_location_of(values)
        if location is None:
            return None
        settings: dict[str, Any] = {"format": values.serializer, "lock_timeout": values.lock_timeout}
    else:
        compression = None
        if isinstance(values, PickleFileBackend):
            fmt, compression = values.serializer, values.compression
        elif _instance_of(values, "h5_file", "BagOfHoldingH5FileBackend"):
            fmt = "h5"
        else:
            return None
        root = values.root
        location = str(root)
        settings = {
            "format": fmt, "compression": compression, "lock_timeout": values.lock_timeout,
            "durable": values.durable,
            "inline_parts": _inline_parts_setting(fmt, values.inline_parts),
        }
        if isinstance(calls, DirectoryIndexBackend):
            if root.name != "values" or calls.root != root.parent:
                return None
            return StoreSpec("directory", str(root.parent), location, layout="index", **settings)
        if isinstance(calls, FileStorage):
            if root.name != "values" or calls.root != root.parent / "calls":
                return None
            return StoreSpec("directory", str(root.parent), location, layout="files", **settings)
    if not _instance_of(calls, "sql", "Sql") or calls.url is None:
        return None
    url = calls.url
    if "://" not in url:
        url = f"sqlite:///{url}"
    base, _, query = url.partition("?")
    pairs = tuple(urllib.parse.parse_qsl(query, keep_blank_values=True))
    return StoreSpec("sql", base, location, url_query=pairs, **settings)


# -- object stores ------------------------------------------------------------------------------

_OBJECT_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
"""Object stores a spec names by their own scheme; any other fsspec filesystem is
``fsspec+PROTOCOL://`` (so ``file://`` and ``memory://`` keep their meaning)."""
_FSSPEC = "fsspec+"
_USERINFO = re.compile(r"://[^/?#]*@")  # a URL with user:password@ in an option's value
_FSSPEC_AS_OPTION = re.compile(r"^fsspec (?=[A-Za-z][A-Za-z0-9.\-]*://)", re.IGNORECASE)
_OBJECT_OPTIONS = ("format", "lock_timeout")


def _is_object_location(location: str) -> bool:
    match = _SCHEME.match(location)
    if match is None:
        return False
    scheme = match.group(1).lower()
    return scheme in _OBJECT_SCHEMES or scheme.startswith(_FSSPEC)


def _fsspec_url(url: str) -> str:
    """The fsspec URL an object location of a spec stands for (``fsspec+`` dropped)."""
    return url[len(_FSSPEC):] if url.lower().startswith(_FSSPEC) else url


def _spelled(url: str) -> str:
    """How a spec writes the fsspec URL ``url``."""
    scheme = url.split("://", 1)[0].lower()
    return url if scheme in _OBJECT_SCHEMES else _FSSPEC + url


def _object_location(
    text: str, location: str, *, whole_store: bool
) -> tuple[str, tuple[tuple[str, str], ...], dict[str, Any]]:
    """An object store's canonical URL (as a spec spells it), its filesystem options and, for a
    whole store, fleche's settings; ``SpecError`` for credentials, a missing bucket, h5."""
    base, _, query = location.partition("?")
    scheme, _, rest = base.partition("://")
    scheme = scheme.lower()
    protocol = scheme[len(_FSSPEC):] if scheme.startswith(_FSSPEC) else scheme
    if not protocol:
        raise SpecError(text, "write fsspec+PROTOCOL://PATH, e.g. fsspec+memory://sweep")
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        raise SpecError(
            text, "credentials do not belong in a spec (specs get printed and logged); give "
            "them in the filesystem's usual configuration (environment, config files)"
        )
    rest = rest.rstrip("/")
    if protocol == "file":
        rest = _absolute(urllib.parse.unquote(rest)) if rest else ""
    if not rest:
        raise SpecError(text, f"give a location after {scheme}://, e.g. {scheme}://bucket/prefix")
    allowed = _OBJECT_OPTIONS if whole_store else ()
    options, pairs = _parse_options(text, query, allowed, sql=True)
    for name, value in pairs:
        if is_secret_option(name) or name.lower() == "secret_key" or _USERINFO.search(value):
            raise SpecError(
                text, f"option {name!r} is a credential, and credentials do not belong in a spec "
                "(specs get printed and logged); give them in the filesystem's usual "
                "configuration (environment variables, config files)"
            )
    settings = _common(text, options) if whole_store else {}
    if settings.get("format") == "h5":
        raise SpecError(
            text, "format=h5 needs files on a filesystem: object stores keep pickle entries "
            "(format=pickle or cloudpickle)"
        )
    url = f"{_FSSPEC if scheme.startswith(_FSSPEC) else ''}{protocol}://{rest}"
    return url, tuple(sorted(pairs)), settings


def _values_location(text: str, values: str) -> str:
    """What ``values=`` names, canonical: an absolute directory or an object store URL with
    its own options."""
    # An option's "+" reads as a space: "fsspec memory://" can only mean "fsspec+memory://".
    values = _FSSPEC_AS_OPTION.sub(_FSSPEC, values, count=1)
    if not _is_object_location(values):
        return _absolute(values)
    url, pairs, _ = _object_location(text, values, whole_store=False)
    return _with_query(url, pairs)


def _with_query(url: str, pairs: Any) -> str:
    return url + (f"?{urllib.parse.urlencode(pairs, safe='/~:')}" if pairs else "")


def _option_value(text: str) -> Any:
    """A filesystem option from a spec: ``true``/``false``/``none`` and numbers converted."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _storage_options(pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """Filesystem options from a spec's pairs; ``a.b=v`` gives ``{"a": {"b": v}}``."""
    options: dict[str, Any] = {}
    for name, text in pairs:
        *outer, last = name.split(".")
        target = options
        for part in outer:
            target = target.setdefault(part, {})
        target[last] = _option_value(text)
    return options


def _option_pairs(options: Any) -> list[tuple[str, str]] | None:
    """The spec pairs of a storage's filesystem options; ``None`` if a spec cannot say them (a
    credential, a value that is not text, a number, a bool or none)."""
    pairs: list[tuple[str, str]] = []
    for name, value in flat_options(options):
        if is_secret_option(name):
            return None
        if value is None or isinstance(value, bool):
            pairs.append((name, str(value).lower()))
        elif isinstance(value, (int, float, str)) and _option_value(str(value)) == value:
            pairs.append((name, str(value)))  # (a str "true" would come back as a bool)
        else:
            return None
    return pairs


def _object_storage(kind: type, url: str, pairs: tuple[tuple[str, str], ...], spec: StoreSpec) -> Any:
    return kind(
        _fsspec_url(url), _storage_options(pairs), lock_timeout=spec.lock_timeout,
        serializer=spec.format,
    )


def _object_cache(spec: StoreSpec) -> Cache:
    return Cache(
        _object_storage(ValueObjectStore, spec.values or "", spec.url_query, spec),
        _object_storage(CallObjectStore, f"{spec.calls}/calls", spec.url_query, spec),
    )


def _object_location_of(values: ObjectStoreBackend) -> str | None:
    """How ``values=`` names the object store ``values``; ``None`` if a spec cannot say it."""
    pairs = _option_pairs(values.storage_options)
    if pairs is None:
        return None
    return _with_query(_spelled(values.url), pairs)


def _object_spec_of(values: ObjectStoreBackend, calls: ObjectStoreBackend) -> StoreSpec | None:
    """The spec of the object store of ``values`` and ``calls``; ``None`` if no spec says it."""
    pairs = _option_pairs(values.storage_options)
    base = values.url.removesuffix("/values")
    if (pairs is None or values.url != f"{base}/values" or calls.url != f"{base}/calls"
            or calls.storage_options != values.storage_options):
        return None
    url = _spelled(base)
    return StoreSpec(
        "objects", url, f"{url}/values", url_query=tuple(pairs), format=values.serializer,
        lock_timeout=values.lock_timeout,
    )
