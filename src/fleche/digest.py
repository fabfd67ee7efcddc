"""Stable content digests.

:func:`digest` maps a value to a :class:`Digest`, a SHA-256 hex string that depends only on the
value's content: it is the same in every process, on every machine and under every
``PYTHONHASHSEED``. Containers digest as a Merkle tree of their elements' digests, and a
:class:`Digest` digests to itself, so a stored key can stand in for the value it names::

    >>> digest([1, 2]) == digest([Digest(digest(1)), 2])
    True
    >>> len({digest(1), digest(1.0), digest(True)})
    3

Values that have no well-defined content raise :class:`Indigestible`. Add types with
:func:`register_digest_hook` or by defining ``__digest__()`` on a class.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import functools
import hashlib
import math
import pathlib
import re
import struct
import sys
import types
from collections.abc import Callable
from typing import Any

__all__ = [
    "DIGEST_LENGTH",
    "MIN_PREFIX_LENGTH",
    "Digest",
    "Indigestible",
    "code_digest",
    "digest",
    "digest_object",
    "digest_sequence",
    "digest_mapping",
    "register_digest_hook",
]

DIGEST_LENGTH = 64
"""Number of hex characters in a full digest (SHA-256)."""

MIN_PREFIX_LENGTH = 4
"""Shortest prefix accepted as a short digest."""

_HEX_RE = re.compile(r"[0-9a-f]{1,64}")


class Indigestible(TypeError):
    """Raised when a value has no stable content digest."""


class Digest(str):
    """A lowercase hex SHA-256 digest, or a prefix of one (a *short digest*).

    Full digests have :data:`DIGEST_LENGTH` characters; storages accept unique prefixes of at
    least :data:`MIN_PREFIX_LENGTH` characters wherever they take a key.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> Digest:
        if type(value) is cls:
            return value  # type: ignore[return-value]
        if not isinstance(value, str) or not _HEX_RE.fullmatch(value):
            raise ValueError(
                f"not a digest: {value!r} (expected 1 to {DIGEST_LENGTH} lowercase hex characters)"
            )
        return str.__new__(cls, value)

    @property
    def is_full(self) -> bool:
        """Whether this is a full-length digest rather than a prefix."""
        return len(self) == DIGEST_LENGTH

    def __repr__(self) -> str:
        return f"Digest({str.__repr__(self)})"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Stored digests were valid when written; unpickling skips the validation (hot path).
        return (_mk, (str(self),))


def _mk(hexstr: str) -> Digest:
    """Wrap a hex string known to be valid, skipping validation (hot path)."""
    return str.__new__(Digest, hexstr)


def _h(tag: bytes, payload: bytes | str) -> Digest:
    # Tags are fixed ASCII words without ':', so tag + ':' + payload is prefix-free.
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    return _mk(hashlib.sha256(tag + b":" + payload).hexdigest())


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None)}:{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


# -- containers (shared with destructuring so a destructured value keeps its key) ---------------


def digest_sequence(cls: type, item_digests: Any) -> Digest:
    """Digest of a list or tuple (``cls``) from the digests of its items, in order."""
    tag = b"tuple" if cls is tuple else b"list" if cls is list else b"seq:" + _qualified(cls).encode()
    return _h(tag, "".join(item_digests))


def digest_mapping(cls: type, pair_digests: Any) -> Digest:
    """Digest of a dict (``cls``) from ``(key digest, value digest)`` pairs, in any order."""
    tag = b"dict" if cls is dict else b"map:" + _qualified(cls).encode()
    return _h(tag, "".join(sorted(k + v for k, v in pair_digests)))


def digest_object(cls: type, field_digests: Any) -> Digest:
    """Digest of a dataclass or attrs instance from its class and ``(name, value digest)`` pairs."""
    return _h(b"object", _qualified(cls) + "".join(f"|{name}={d}" for name, d in field_digests))


# -- exact-type encoders ------------------------------------------------------------------------


def _float_bytes(v: float) -> bytes:
    return b"nan" if math.isnan(v) else struct.pack(">d", v)


def _int(v: int) -> Digest:
    return _h(b"int", v.to_bytes(v.bit_length() // 8 + 1, "big", signed=True))


def _set(v: set | frozenset) -> Digest:
    tag = b"frozenset" if isinstance(v, frozenset) else b"set"
    return _h(tag, "".join(sorted(digest(x) for x in v)))


def _range(v: range) -> Digest:
    return _h(b"range", _int(v.start) + _int(v.stop) + _int(v.step))


def _timedelta(v: datetime.timedelta) -> Digest:
    return _h(b"timedelta", f"{v.days},{v.seconds},{v.microseconds}")


def _path(v: pathlib.PurePath) -> Digest:
    return _h(b"path", f"{type(v).__name__}:{v}")


def _function(v: Any) -> Digest:
    name = _qualified(v)
    if "<lambda>" in name or "<locals>" in name:
        # Module and qualified name do not identify lambdas and local functions: add their code
        # and captured values so two different ones never share a digest.
        cells = tuple(c.cell_contents for c in (v.__closure__ or ()) if _cell_filled(c))
        return _h(b"localfunc", name + code_digest(v) + digest(cells))
    return _h(b"func", name)


def _cell_filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _builtin(v: Any) -> Digest:
    owner = getattr(v, "__self__", None)
    if owner is None or isinstance(owner, types.ModuleType):
        return _h(b"func", _qualified(v))
    return _h(b"method", _qualified(v) + digest(owner))


def _method(v: types.MethodType) -> Digest:
    return _h(b"method", digest(v.__func__) + digest(v.__self__))


def _partial(v: functools.partial) -> Digest:
    return _h(b"partial", digest(v.func) + digest(v.args) + digest(v.keywords))


def _class(v: type) -> Digest:
    return _h(b"class", _qualified(v))


_EXACT: dict[type, Callable[[Any], Digest]] = {
    type(None): lambda v: _h(b"none", b""),
    bool: lambda v: _h(b"bool", b"1" if v else b"0"),
    int: _int,
    float: lambda v: _h(b"float", _float_bytes(v)),
    complex: lambda v: _h(b"complex", _float_bytes(v.real) + _float_bytes(v.imag)),
    str: lambda v: _h(b"str", v),
    bytes: lambda v: _h(b"bytes", v),
    bytearray: lambda v: _h(b"bytearray", bytes(v)),
    tuple: lambda v: digest_sequence(tuple, [digest(x) for x in v]),
    list: lambda v: digest_sequence(list, [digest(x) for x in v]),
    dict: lambda v: digest_mapping(dict, [(digest(k), digest(x)) for k, x in v.items()]),
    set: _set,
    frozenset: _set,
    range: _range,
    Digest: lambda v: v,
    datetime.datetime: lambda v: _h(b"datetime", v.isoformat()),
    datetime.date: lambda v: _h(b"date", v.isoformat()),
    datetime.time: lambda v: _h(b"time", v.isoformat()),
    datetime.timedelta: _timedelta,
    types.FunctionType: _function,
    types.BuiltinFunctionType: _builtin,
    types.MethodType: _method,
    functools.partial: _partial,
    type: _class,
    enum.EnumType: _class,
}
for _p in (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath):
    _EXACT[_p] = _path

# Builtin bases a subclass may digest through, tagged with the subclass's identity.
_SUBCLASSABLE = (
    str, int, float, complex, bytes, bytearray, tuple, list, dict, set, frozenset,
    datetime.datetime, datetime.date, datetime.time, datetime.timedelta,
)

_HOOKS: dict[type, Callable[[Any], Any]] = {}
_RESOLVED: dict[type, Callable[[Any], Digest]] = {}


def register_digest_hook(type_: type, fn: Callable[[Any], Any]) -> None:
    """Digest instances of ``type_`` (and its subclasses) as ``digest(fn(value))``.

    ``fn`` returns any digestible stand-in for the value's content (or a :class:`Digest`); the
    type's identity is mixed in, so two types with equal stand-ins still digest differently.
    A hook takes precedence over every built-in rule. Register hooks at import time, before the
    first digest is taken, so every process uses the same rules.
    """
    if not isinstance(type_, type):
        raise TypeError(f"register_digest_hook needs a type, got {type_!r}")
    if not callable(fn):
        raise TypeError(f"register_digest_hook needs a callable, got {fn!r}")
    _HOOKS[type_] = fn
    _RESOLVED.clear()


def digest(value: Any, /) -> Digest:
    """Return the stable content digest of ``value``.

    Pure and thread-safe; equal content gives an equal digest in every process and on every
    machine. Raises :class:`Indigestible` for values without a defined content.
    """
    t = type(value)
    if _HOOKS:
        fn = _RESOLVED.get(t) or _resolve(t)
    else:
        fn = _EXACT.get(t) or _RESOLVED.get(t) or _resolve(t)
    return fn(value)


def _resolve(t: type) -> Callable[[Any], Digest]:
    fn = _find_encoder(t)
    _RESOLVED[t] = fn
    return fn


def _find_encoder(t: type) -> Callable[[Any], Digest]:
    for base in t.__mro__:
        hook = _HOOKS.get(base)
        if hook is not None:
            return functools.partial(_hooked, hook, _qualified(t))
    if t in _EXACT:
        return _EXACT[t]
    if callable(getattr(t, "__digest__", None)):
        return _custom
    if issubclass(t, enum.Enum):
        return lambda v: _h(b"enum", f"{_qualified(type(v))}.{v.name}")
    if dataclasses.is_dataclass(t):
        return _dataclass
    if getattr(t, "__attrs_attrs__", None) is not None:
        return _attrs
    if issubclass(t, type):
        return _class
    special = _third_party_encoder(t)
    if special is not None:
        return special
    for base in _SUBCLASSABLE:
        if issubclass(t, base):
            inner = _EXACT[base]
            return lambda v: _h(b"sub", _qualified(type(v)) + inner(v))
    if issubclass(t, pathlib.PurePath):
        return _path
    if isinstance(t, type) and issubclass(t, (types.FunctionType, types.BuiltinFunctionType)):
        return _function
    return _indigestible


def _hooked(hook: Callable[[Any], Any], name: str, value: Any) -> Digest:
    return _h(b"hook", name + digest(hook(value)))


def _custom(value: Any) -> Digest:
    return _h(b"custom", _qualified(type(value)) + digest(value.__digest__()))


def _dataclass(value: Any) -> Digest:
    return digest_object(
        type(value), [(f.name, digest(getattr(value, f.name))) for f in dataclasses.fields(value)]
    )


def _attrs(value: Any) -> Digest:
    return digest_object(
        type(value), [(a.name, digest(getattr(value, a.name))) for a in type(value).__attrs_attrs__]
    )


def _indigestible(value: Any) -> Digest:
    raise Indigestible(
        f"cannot digest a value of type {_qualified(type(value))}: define __digest__() on the "
        "class or register a hook with fleche.digest.register_digest_hook"
    )


# -- numpy and pandas (only when already imported by the caller) --------------------------------


def _third_party_encoder(t: type) -> Callable[[Any], Digest] | None:
    np = sys.modules.get("numpy")
    if np is not None:
        if issubclass(t, np.ndarray):
            return _ndarray
        if issubclass(t, np.generic):
            return lambda v: _h(b"npscalar", v.dtype.str.encode() + b"|" + v.tobytes())
        if issubclass(t, np.dtype):
            return lambda v: _h(b"dtype", str(v.descr if v.fields else v.str))
    pd = sys.modules.get("pandas")
    if pd is not None:
        if issubclass(t, pd.Series):
            return _series
        if issubclass(t, pd.DataFrame):
            return _dataframe
        if issubclass(t, pd.Index):
            return _index
    return None


def _ndarray(a: Any) -> Digest:
    np = sys.modules["numpy"]
    dtype = a.dtype
    header = f"{type(a).__name__}|{dtype.descr if dtype.fields else dtype.str}|{a.shape}|".encode()
    if dtype.hasobject:
        return _h(b"ndarray-obj", header + "".join(digest(x) for x in a.reshape(-1).tolist()).encode())
    flat = np.ascontiguousarray(a).reshape(-1)
    h = hashlib.sha256(b"ndarray:" + header)
    h.update(flat.view(np.uint8) if dtype.itemsize else b"")
    return _mk(h.hexdigest())


def _pandas_values(obj: Any) -> Digest:
    """Digest of a pandas object's values, whatever their dtype."""
    values = obj.to_numpy() if hasattr(obj, "to_numpy") else obj
    try:
        return digest(values)
    except Indigestible:
        pd = sys.modules["pandas"]
        hashed = pd.util.hash_array(values.astype(object), categorize=False)
        return _h(b"pdhash", hashed.tobytes())


def _index(ix: Any) -> Digest:
    return _h(
        b"pd.Index",
        f"{type(ix).__name__}|{ix.dtype}|" + digest(list(ix.names)) + _pandas_values(ix),
    )


def _series(s: Any) -> Digest:
    return _h(
        b"pd.Series", f"{s.dtype}|" + digest(s.name) + _index(s.index) + _pandas_values(s)
    )


def _dataframe(df: Any) -> Digest:
    columns = "".join(
        f"{df.dtypes.iloc[i]}|" + _pandas_values(df.iloc[:, i]) for i in range(df.shape[1])
    )
    return _h(b"pd.DataFrame", _index(df.columns) + _index(df.index) + columns)


# -- code ---------------------------------------------------------------------------------------


def code_digest(func: Callable[..., Any]) -> Digest:
    """Digest of a function's code: bytecode, constants and names, not line numbers or docstring.

    Editing a function's body changes this digest; moving it within its file does not. Bytecode
    differs between Python versions, so the digest does too.
    """
    func = getattr(func, "__func__", func)
    code = getattr(func, "__code__", None)
    if code is None:
        raise Indigestible(f"{_qualified(func)} has no Python code to digest")
    return _code(code, getattr(func, "__doc__", None))


def _code(code: types.CodeType, doc: str | None = None) -> Digest:
    consts = list(code.co_consts)
    if doc is not None and consts and consts[0] == doc:
        consts = consts[1:]
    parts = tuple(_code(c) if isinstance(c, types.CodeType) else c for c in consts)
    return digest(
        (
            code.co_code,
            parts,
            code.co_names,
            code.co_varnames,
            code.co_freevars,
            code.co_cellvars,
            code.co_argcount,
            code.co_posonlyargcount,
            code.co_kwonlyargcount,
            code.co_flags,
        )
    )
