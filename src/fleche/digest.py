"""Stable content digests.

:func:`digest` maps a value to a :class:`Digest`, a SHA-256 hex string that depends only on the
value's content: it is the same in every process, on every machine and under every
``PYTHONHASHSEED``. Containers digest as a Merkle tree of their elements' digests, and a
:class:`Digest` digests to itself, so a stored key can stand in for the value it names::

    >>> digest([1, 2]) == digest([Digest(digest(1)), 2])
    True
    >>> len({digest(1), digest(1.0), digest(True)})
    3

Equal values digest equal and values of different types never do: ``1``, ``1.0``, ``True``,
``Decimal("1")`` and ``Fraction(1)`` all differ. Built in are ``None``, ``bool``, ``int``,
``float``, ``complex``, ``str``, ``bytes``, ``bytearray``, ``tuple``, ``list``, ``dict``,
``set``, ``frozenset``, ``range``, ``slice``; ``decimal.Decimal`` by its exact text, so
``Decimal("1.0")`` and ``Decimal("1.00")`` (equal numbers that compute and print differently:
times 3 they give ``3.0`` and ``3.00``) digest apart; ``fractions.Fraction`` in lowest terms;
``uuid.UUID``; ``datetime`` dates, times, datetimes and timedeltas, an aware time or datetime with
its fold and its tzinfo (a ``datetime.timezone`` by offset and name, a ``zoneinfo.ZoneInfo`` by
key; other tzinfo classes need a hook); ``pathlib`` paths by their text (not the file's
content); enum members; modules by name; compiled regular expressions; loggers by name; classes
by module and qualified name; functions (below); dataclass and attrs instances by class and
fields; numpy arrays, scalars and dtypes, pandas Series, DataFrame and Index. A subclass of a
builtin type digests as that type with the subclass's identity mixed in.

What a function's digest covers
-------------------------------
A function whose module and qualified name identify it (one defined at the top level of a
module or in a class body) digests *by reference*, by that name alone: editing its body does
not change its digest (``@fleche(hash_code=True)`` keys a decorated function by what it computes
instead). Any other function (a lambda, a function defined inside another function, and so
every closure) digests *by value*, over everything that decides what it computes:

- its code: bytecode, constants (nested code objects included), the names it uses, its
  parameters and flags; not its line numbers, file name or docstring;
- the value in each of its closure cells;
- its defaults and its keyword-only defaults;
- the globals its code reads (``LOAD_GLOBAL``, in nested code too), each by its digest: a module
  by name, a function or class by its own digest (by reference when its name identifies it, so
  that function's body is not followed), any other value by content. Names its module does not
  define (builtins) are left out;
- its module and qualified name.

A function reached again while its own digest is being taken (recursion through a closure cell
or a global) stands in as a back-reference. A bound method digests as its function and the
object it is bound to, a ``functools.partial`` as its function, arguments and keywords, and a
``@fleche``-decorated function as the function it wraps (:func:`digest_as`). The module name
``__mp_main__``, under which ``multiprocessing`` spawn and forkserver workers import the main
script, is read as ``__main__`` (:func:`module_name`), so one script has one name in every
process.

Values that have no well-defined content raise :class:`Indigestible`, and so do values that
contain themselves (a reference cycle), values nested too deeply to digest, and values whose
``__digest__()`` or hook raises (the error is the ``__cause__``); the message names the cause.
Add types with :func:`register_digest_hook`, by defining ``__digest__()`` on a class, or, from an
installed distribution, through the entry-point group ``fleche.digest_hooks``
(:data:`ENTRY_POINT_GROUP`).
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import hashlib
import logging
import math
import pathlib
import re
import struct
import sys
import threading
import types
import uuid
import warnings
import weakref
import zoneinfo
from collections.abc import Callable, Iterable
from typing import Any

from .errors import FlecheWarning

__all__ = [
    "DIGEST_LENGTH",
    "ENTRY_POINT_GROUP",
    "MIN_PREFIX_LENGTH",
    "Digest",
    "Indigestible",
    "callable_digest",
    "callable_name",
    "callable_references",
    "code_digest",
    "digest",
    "digest_as",
    "digest_object",
    "digest_sequence",
    "digest_mapping",
    "digests_by_name",
    "function_digest",
    "module_name",
    "register_digest_hook",
]

DIGEST_LENGTH = 64
"""Number of hex characters in a full digest (SHA-256)."""

MIN_PREFIX_LENGTH = 4
"""Shortest prefix accepted as a short digest."""

ENTRY_POINT_GROUP = "fleche.digest_hooks"
"""Entry-point group through which installed distributions register digest hooks.

Each entry point names a function that takes one argument, :func:`register_digest_hook`, and
calls it for the types it teaches fleche; in ``pyproject.toml``::

    [project.entry-points."fleche.digest_hooks"]
    mylib = "mylib._fleche:register"

They are loaded once per process, before the first digest of a type that is not built in; one
that fails to load gives a :class:`~fleche.errors.FlecheWarning` naming it.
"""

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


_new_str = str.__new__
_sha256 = hashlib.sha256


def _h(tag: bytes, payload: bytes | str) -> Digest:
    # Tags are fixed ASCII words without ':', so tag + ':' + payload is prefix-free. (_mk
    # inlined: every node of every digested value comes through here.)
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    return _new_str(Digest, _sha256(tag + b":" + payload).hexdigest())


def module_name(obj: Any) -> str | None:
    """The name of the module ``obj`` (a function or class) was defined in, ``__mp_main__`` read
    as ``__main__``: multiprocessing spawn and forkserver workers import the main script under
    that name, and one script must have one name in every process."""
    return _main(getattr(obj, "__module__", None))


def _main(name: str | None) -> str | None:
    return "__main__" if name == "__mp_main__" else name


def _qualified(obj: Any) -> str:
    return f"{module_name(obj)}:{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


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
    return _h(tag, "".join(sorted(_digest(x) for x in v)))


def _range(v: range) -> Digest:
    return _h(b"range", _int(v.start) + _int(v.stop) + _int(v.step))


def _slice(v: slice) -> Digest:
    return _h(b"slice", _digest(v.start) + _digest(v.stop) + _digest(v.step))


def _timedelta(v: datetime.timedelta) -> Digest:
    return _h(b"timedelta", f"{v.days},{v.seconds},{v.microseconds}")


def _wall_clock(tag: bytes, v: datetime.datetime | datetime.time) -> Digest:
    """A datetime or time: its wall-clock reading, its fold and its tzinfo.

    Naive and UTC ones keep the digest they always had (``isoformat`` alone, fold 0).
    """
    tz = v.tzinfo
    if tz is None or tz is datetime.timezone.utc:
        plain = _h(tag, v.isoformat())
        return _h(tag + b"-fold", plain) if v.fold else plain
    return _h(tag + b"-tz", f"{v.replace(tzinfo=None).isoformat()}|{v.fold}|{_digest(tz)}")


def _timezone(v: datetime.timezone) -> Digest:
    return _h(b"timezone", f"{v.utcoffset(None)}|{v.tzname(None)}")


def _zoneinfo(v: zoneinfo.ZoneInfo) -> Digest:
    if v.key is None:
        raise Indigestible(f"cannot digest {v!r}: a ZoneInfo read from a file has no key")
    return _h(b"zoneinfo", v.key)


def _path(v: pathlib.PurePath) -> Digest:
    return _h(b"path", f"{type(v).__name__}:{v}")


def _enum(v: enum.Enum) -> Digest:
    if v.name is None:  # a flag combination without a name: its value identifies it
        return _h(b"enum-value", _qualified(type(v)) + _digest(v.value))
    return _h(b"enum", f"{_qualified(type(v))}.{v.name}")


def _builtin(v: Any) -> Digest:
    owner = getattr(v, "__self__", None)
    if owner is None or isinstance(owner, types.ModuleType):
        return _h(b"func", _qualified(v))
    return _h(b"method", _qualified(v) + _digest(owner))


def _method(v: types.MethodType) -> Digest:
    return _h(b"method", _digest(v.__func__) + _digest(v.__self__))


def _partial(v: functools.partial) -> Digest:
    return _h(b"partial", _digest(v.func) + _digest(v.args) + _digest(v.keywords))


def _class(v: type) -> Digest:
    return _h(b"class", _qualified(v))


_NONE = _h(b"none", b"")

_SHORT_STRS: dict[str, Digest] = {}
"""Digests of the short strings digested lately (dict keys and field names recur in every
result), at most :data:`_SHORT_STRS_MAX`; emptied when full. Thread-safe: single dict steps."""
_SHORT_STRS_MAX = 4096


def _str(v: str) -> Digest:
    if type(v) is not str:  # a subclass (through its base's encoder) may compare differently
        return _h(b"str", v)
    known = _SHORT_STRS.get(v)
    if known is None:
        known = _h(b"str", v)
        if len(v) <= 64:
            if len(_SHORT_STRS) >= _SHORT_STRS_MAX:
                _SHORT_STRS.clear()
            _SHORT_STRS[v] = known
    return known

_LRU_CACHE_WRAPPER = type(functools.lru_cache()(len))

_EXACT: dict[type, Callable[[Any], Digest]] = {
    type(None): lambda v: _NONE,
    bool: lambda v: _h(b"bool", b"1" if v else b"0"),
    int: _int,
    float: lambda v: _h(b"float", _float_bytes(v)),
    complex: lambda v: _h(b"complex", _float_bytes(v.real) + _float_bytes(v.imag)),
    str: _str,
    bytes: lambda v: _h(b"bytes", v),
    bytearray: lambda v: _h(b"bytearray", bytes(v)),
    # digest_sequence and digest_mapping for the builtin classes, spelled out (the hot path)
    tuple: lambda v: _h(b"tuple", "".join([_digest(x) for x in v])),
    list: lambda v: _h(b"list", "".join([_digest(x) for x in v])),
    dict: lambda v: _h(b"dict", "".join(sorted([_digest(k) + _digest(x) for k, x in v.items()]))),
    set: _set,
    frozenset: _set,
    range: _range,
    slice: _slice,
    Digest: lambda v: v,
    decimal.Decimal: lambda v: _h(b"decimal", str(v)),  # exact: sign, digits and exponent
    fractions.Fraction: lambda v: _h(b"fraction", f"{v.numerator}/{v.denominator}"),
    uuid.UUID: lambda v: _h(b"uuid", v.bytes),
    datetime.datetime: functools.partial(_wall_clock, b"datetime"),
    datetime.date: lambda v: _h(b"date", v.isoformat()),
    datetime.time: functools.partial(_wall_clock, b"time"),
    datetime.timedelta: _timedelta,
    datetime.timezone: _timezone,
    zoneinfo.ZoneInfo: _zoneinfo,
    types.ModuleType: lambda v: _h(b"module", _main(v.__name__) or ""),
    re.Pattern: lambda v: _h(b"pattern", _digest(v.pattern) + _int(v.flags)),
    types.FunctionType: lambda v: _function(v),
    types.BuiltinFunctionType: _builtin,
    types.MethodType: _method,
    functools.partial: _partial,
    _LRU_CACHE_WRAPPER: lambda v: _h(b"lru_cache", _digest(v.__wrapped__)),
    type: _class,
    enum.EnumType: _class,
}
for _p in (pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath):
    _EXACT[_p] = _path

# Builtin bases a subclass may digest through, tagged with the subclass's identity.
_SUBCLASSABLE = (
    str, int, float, complex, bytes, bytearray, tuple, list, dict, set, frozenset,
    datetime.datetime, datetime.date, datetime.time, datetime.timedelta, decimal.Decimal,
    fractions.Fraction, uuid.UUID,
)

_HOOKS: dict[type, Callable[[Any], Any]] = {}
_RESOLVED: dict[type, Callable[[Any], Digest]] = {}


def register_digest_hook(type_: type, fn: Callable[[Any], Any]) -> None:
    """Digest instances of ``type_`` (and its subclasses) as ``digest(fn(value))``.

    ``fn`` returns any digestible stand-in for the value's content (or a :class:`Digest`); the
    type's identity is mixed in, so two types with equal stand-ins still digest differently.
    A hook takes precedence over every built-in rule; an exception it raises makes the digest
    raise :class:`Indigestible`. Register hooks at import time, before the first digest is
    taken, so every process uses the same rules; installed libraries register theirs through
    the entry-point group :data:`ENTRY_POINT_GROUP`.
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
    machine. Raises :class:`Indigestible`, naming the cause, for values without a defined
    content, values that contain themselves or are nested too deeply, and values whose
    ``__digest__()`` or hook raises.
    """
    return _guarded(_digest, value)


def _guarded(fn: Callable[..., Digest], value: Any, *args: Any) -> Digest:
    """``fn(value, *args)``, any failure of it raised as :class:`Indigestible` naming the cause."""
    try:
        return fn(value, *args)
    except Indigestible:
        raise
    except RecursionError:
        pass  # diagnosed below, once the stack has unwound
    except Exception as e:
        raise Indigestible(
            f"digesting a {_qualified(type(value))} raised {type(e).__name__}: {e}"
        ) from e
    raise Indigestible(f"cannot digest a {_qualified(type(value))}: {_recursion_cause(value)}")


def _digest(value: Any) -> Digest:
    # The recursive core: encoders call this, and only digest() turns failures into Indigestible.
    t = type(value)
    if _HOOKS:
        fn = _RESOLVED.get(t) or _resolve(t)
    else:
        fn = _EXACT.get(t) or _RESOLVED.get(t) or _resolve(t)
    return fn(value)


def _encoder(t: type) -> Callable[[Any], Digest]:
    if not _HOOKS and t in _EXACT:
        return _EXACT[t]
    return _RESOLVED.get(t) or _resolve(t)


def _resolve(t: type) -> Callable[[Any], Digest]:
    if _entry_points != "loaded" and t not in _EXACT:
        _load_entry_point_hooks()
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
        return _enum
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
    if issubclass(t, logging.Logger):
        return lambda v: _h(b"logger", v.name)
    if issubclass(t, (types.FunctionType, types.BuiltinFunctionType)):
        return _function
    return _indigestible


def _hooked(hook: Callable[[Any], Any], name: str, value: Any) -> Digest:
    try:
        stand_in = hook(value)
    except RecursionError:
        raise
    except Exception as e:
        raise Indigestible(
            f"cannot digest a {name}: its digest hook {_qualified(hook)} raised "
            f"{type(e).__name__}: {e}"
        ) from e
    return _h(b"hook", name + _digest(stand_in))


def _custom(value: Any) -> Digest:
    name = _qualified(type(value))
    try:
        stand_in = value.__digest__()
    except RecursionError:
        raise
    except Exception as e:
        raise Indigestible(
            f"cannot digest a {name}: its __digest__() raised {type(e).__name__}: {e}"
        ) from e
    return _h(b"custom", name + _digest(stand_in))


def _dataclass(value: Any) -> Digest:
    return digest_object(
        type(value), [(f.name, _digest(getattr(value, f.name))) for f in dataclasses.fields(value)]
    )


def _attrs(value: Any) -> Digest:
    return digest_object(
        type(value), [(a.name, _digest(getattr(value, a.name))) for a in type(value).__attrs_attrs__]
    )


def _indigestible(value: Any) -> Digest:
    raise Indigestible(
        f"cannot digest a value of type {_qualified(type(value))}: define __digest__() on the "
        "class or register a hook with fleche.digest.register_digest_hook"
    )


# -- cycles and depth: why a digest ran out of stack --------------------------------------------

_END = object()
_WALK_LIMIT = 1_000_000  # values visited before giving up on finding a cycle


def _recursion_cause(value: Any) -> str:
    """Why digesting ``value`` exhausted the stack: a reference cycle (named by the types along
    it) or plain depth. Walks what the digest would visit, iteratively."""
    path: list[Any] = []  # the values being walked into; pending[i + 1] iterates path[i]'s parts
    on_path: set[int] = set()
    pending = [iter((value,))]
    deepest, visited = 0, 0
    while pending and visited < _WALK_LIMIT:
        part = next(pending[-1], _END)
        if part is _END:
            pending.pop()
            if path:
                on_path.discard(id(path.pop()))
            continue
        if id(part) in on_path:
            start = next(i for i, v in enumerate(path) if v is part)
            shape = " -> ".join(type(v).__name__ for v in [*path[start:], part])
            return f"it contains itself, a reference cycle ({shape})"
        visited += 1
        try:
            parts = _parts(part)
        except Exception as e:
            return f"digesting a {_qualified(type(part))} in it raised {type(e).__name__}: {e}"
        path.append(part)
        on_path.add(id(part))
        pending.append(iter(parts))
        deepest = max(deepest, len(path))
    return (
        f"it is nested too deeply to digest ({deepest} levels; Python's recursion limit is "
        f"{sys.getrecursionlimit()})"
    )


def _parts(value: Any) -> Iterable[Any]:
    """What digesting ``value`` digests in turn (hook and ``__digest__`` results included)."""
    if isinstance(value, (str, bytes, bytearray, int, float, complex, range)):
        return ()
    if isinstance(value, dict):
        return [x for pair in value.items() for x in pair]
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    t = type(value)
    for base in t.__mro__:
        if base in _HOOKS:
            return (_HOOKS[base](value),)
    encoder = _encoder(t)
    if encoder is _custom:
        return (value.__digest__(),)
    if encoder is _dataclass:
        return [getattr(value, f.name) for f in dataclasses.fields(value)]
    if encoder is _attrs:
        return [getattr(value, a.name) for a in t.__attrs_attrs__]
    if isinstance(value, functools.partial):
        return (value.func, value.args, value.keywords)
    if isinstance(value, types.MethodType):
        return (value.__func__, value.__self__)
    if isinstance(value, slice):
        return (value.start, value.stop, value.step)
    return ()


# -- entry-point hooks --------------------------------------------------------------------------

_entry_points_lock = threading.RLock()
_entry_points = "unloaded"  # then "loading" (by the thread holding the lock), then "loaded"


def _load_entry_point_hooks() -> None:
    """Run every :data:`ENTRY_POINT_GROUP` entry point once; other threads wait until done."""
    global _entry_points
    with _entry_points_lock:
        if _entry_points != "unloaded":
            return  # loaded, or being loaded by this very thread (a hook that digests)
        _entry_points = "loading"
        try:
            from importlib.metadata import entry_points

            for point in entry_points(group=ENTRY_POINT_GROUP):
                try:
                    point.load()(register_digest_hook)
                except Exception as e:
                    warnings.warn(
                        f"digest hooks of entry point {point.name!r} ({point.value}) in group "
                        f"{ENTRY_POINT_GROUP} not loaded: {type(e).__name__}: {e}",
                        FlecheWarning,
                        stacklevel=2,
                    )
        finally:
            _entry_points = "loaded"


# -- functions ----------------------------------------------------------------------------------

_STAND_INS: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()
_CODE_FACTS: weakref.WeakKeyDictionary[types.CodeType, tuple[Digest, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)
_IN_PROGRESS = threading.local()  # .stack: the functions whose digest this thread is taking
_EMPTY_CELL = _h(b"empty-cell", b"")
_GLOBALS_NOT_READ = _h(b"globals-not-read", b"")


def digest_as(func: Callable[..., Any], stand_in: Any) -> None:
    """Digest the function ``func`` as ``stand_in`` from now on, in this process.

    ``@fleche`` registers each wrapper it makes with the function it wraps, so a decorated
    function digests, and keys the calls it is an argument of, exactly as the plain function.
    Holds ``func`` weakly; thread-safe.
    """
    if not isinstance(func, types.FunctionType):
        raise TypeError(f"digest_as needs a Python function, got {func!r}")
    _STAND_INS[func] = stand_in


def _names_identify(func: types.FunctionType) -> bool:
    """Whether a function's module and qualified name identify it: true for one defined at the
    top level of a module or in a class body, false for lambdas and for functions defined inside
    other functions (every closure among them), which digest by value."""
    qualname = func.__qualname__
    return "<lambda>" not in qualname and "<locals>" not in qualname


def _function(v: types.FunctionType) -> Digest:
    stand_in = _STAND_INS.get(v)
    if stand_in is not None:
        return _digest(stand_in)
    if _names_identify(v):
        return _h(b"func", _qualified(v))
    return function_digest(v)


def function_digest(func: types.FunctionType, *, reads_globals: bool = True) -> Digest:
    """Digest of what the Python function ``func`` computes, whatever its name.

    Covers its code, closure cells, defaults, keyword-only defaults, module and qualified name
    and, with ``reads_globals``, the globals its code reads (the module docstring says how each
    is digested), as they are at the time of the call: a changed global or cell changes it.
    The code's part is computed once per code object. Thread-safe; raises :class:`Indigestible`
    naming the captured value, default or global that has no digest.
    """
    stack = _IN_PROGRESS.__dict__.setdefault("stack", [])
    for depth, outer in enumerate(reversed(stack), 1):
        if outer is func:
            return _h(b"recursion", str(depth))
    stack.append(func)
    try:
        return _function_value(func, reads_globals)
    finally:
        stack.pop()


def _function_value(func: types.FunctionType, reads_globals: bool) -> Digest:
    code = func.__code__
    code_part, global_names = _code_facts(code, func.__doc__)
    cells = [
        _captured(func, name, cell) for name, cell in zip(code.co_freevars, func.__closure__ or ())
    ]
    defaults = _named_part(func, "its defaults", func.__defaults__)
    kwdefaults = _named_part(func, "its keyword-only defaults", func.__kwdefaults__)
    if reads_globals:
        namespace = func.__globals__
        pairs = [
            (_h(b"str", name), _named_part(func, f"the global {name!r} it reads", namespace[name]))
            for name in global_names
            if name in namespace
        ]
        read = digest_mapping(dict, pairs)
    else:
        read = _GLOBALS_NOT_READ
    return _h(
        b"function",
        _h(b"str", _qualified(func)) + code_part + digest_sequence(tuple, cells) + defaults
        + kwdefaults + read,
    )


def _captured(func: types.FunctionType, name: str, cell: types.CellType) -> Digest:
    value = _cell_contents(cell)
    if value is _END:
        return _EMPTY_CELL
    return _named_part(func, f"the variable {name!r} it captures", value)


def _cell_contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return _END


def _named_part(owner: Any, what: str, value: Any) -> Digest:
    """``_digest(value)``; an :class:`Indigestible` names ``what`` of ``owner`` failed."""
    try:
        return _digest(value)
    except Indigestible as e:
        raise Indigestible(f"{owner.__qualname__}: cannot digest {what}: {e}") from e


def _code_facts(code: types.CodeType, doc: str | None) -> tuple[Digest, tuple[str, ...]]:
    facts = _CODE_FACTS.get(code)
    if facts is None:
        facts = (_code(code, doc), tuple(sorted(_globals_read(code))))
        _CODE_FACTS[code] = facts
    return facts


def _globals_read(code: types.CodeType) -> set[str]:
    import dis

    # LOAD_NAME: a class body inside the function looks names up in the globals too.
    loads = ("LOAD_GLOBAL", "LOAD_NAME")
    names = {i.argval for i in dis.get_instructions(code) if i.opname in loads}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _globals_read(const)
    return names


# -- callables as @fleche keys them -------------------------------------------------------------


def callable_name(obj: Callable[..., Any]) -> tuple[str, str | None]:
    """The name and module under which ``@fleche`` records the calls of ``obj``.

    A function, builtin or class gives its qualified name and module; a bound method its
    function's; a ``functools.partial`` ``partial(<name>)`` and its function's module; any other
    callable object its class's.
    """
    if isinstance(obj, functools.partial):
        name, module = callable_name(obj.func)
        return f"partial({name})", module
    if isinstance(obj, types.MethodType):
        return callable_name(obj.__func__)
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type)):
        return obj.__qualname__, module_name(obj)
    return type(obj).__qualname__, module_name(type(obj))


def digests_by_name(obj: Callable[..., Any]) -> bool:
    """Whether :func:`callable_digest` of ``obj`` (without ``hash_code``) is its name alone, so
    never changes while the process runs: a function whose name identifies it, a builtin function
    of a module, a class."""
    if isinstance(obj, types.FunctionType):
        return obj not in _STAND_INS and _names_identify(obj)
    if isinstance(obj, types.BuiltinFunctionType):
        return obj.__self__ is None or isinstance(obj.__self__, types.ModuleType)
    return isinstance(obj, type)


def callable_digest(obj: Callable[..., Any], *, hash_code: bool = False) -> Digest:
    """Digest of what calling ``obj`` computes, as ``@fleche`` keys its calls.

    A function whose name identifies it digests by that name, unless ``hash_code``: then by
    :func:`function_digest`, globals included. Any other function digests by
    :func:`function_digest`, globals included only with ``hash_code``. A ``functools.partial``
    digests as its function and bound arguments, a bound method as its function and the state of
    its object, and any other callable object by its class and state (its own digest if its type
    has one, else ``__getstate__()``), with ``hash_code`` also its class's ``__call__``. State
    may change between calls: :func:`callable_references` tells when to take it again. Raises
    :class:`Indigestible`, naming the part that has no digest, and nothing else.
    """
    return _guarded(_callable_digest, obj, hash_code)


def _callable_digest(obj: Callable[..., Any], hash_code: bool) -> Digest:
    # Mirrors callable_references, which lists what each branch reads.
    if isinstance(obj, types.FunctionType):
        stand_in = _STAND_INS.get(obj)
        if stand_in is not None:
            return _callable_digest(stand_in, hash_code)
        if hash_code or not _names_identify(obj):
            return function_digest(obj, reads_globals=hash_code)
        return _h(b"func", _qualified(obj))
    if isinstance(obj, functools.partial):
        inner = _callable_digest(obj.func, hash_code)
        bound = _named_part(type(obj), "its bound arguments", (obj.args, obj.keywords))
        return _h(b"partial", inner + bound)
    if isinstance(obj, types.MethodType):
        return _h(b"method", _callable_digest(obj.__func__, hash_code) + _state(obj.__self__))
    if isinstance(obj, (type, types.BuiltinFunctionType)):
        return _digest(obj)
    call = type(obj).__call__
    code = function_digest(call) if hash_code and isinstance(call, types.FunctionType) else ""
    return _h(b"instance", _state(obj) + code)


def callable_references(obj: Callable[..., Any], *, hash_code: bool = False) -> tuple[Any, ...]:
    """The objects :func:`callable_digest` of ``obj`` reads directly, for telling cheaply whether
    it may have changed: while each is the same object as before, the digest is the same unless
    one of them was changed in place.

    For a function: its code, defaults, keyword-only defaults, the contents of its closure cells
    and, with ``hash_code``, the globals its code reads; for a partial, its function, arguments
    and keywords and what its function reads; for an object, its class and the parts of its
    ``__getstate__()``. Empty for a callable that digests by name.
    """
    if isinstance(obj, types.FunctionType):
        stand_in = _STAND_INS.get(obj)
        if stand_in is not None:
            return (stand_in, *callable_references(stand_in, hash_code=hash_code))
        if not hash_code and _names_identify(obj):
            return ()
        refs = [obj.__code__, obj.__defaults__, obj.__kwdefaults__]
        refs += [_cell_contents(cell) for cell in obj.__closure__ or ()]
        if hash_code:
            namespace = obj.__globals__
            names = _code_facts(obj.__code__, obj.__doc__)[1]
            refs += [namespace.get(name, _END) for name in names]
        return tuple(refs)
    if isinstance(obj, functools.partial):
        inner = callable_references(obj.func, hash_code=hash_code)
        return (obj.func, obj.args, obj.keywords, *inner)
    if isinstance(obj, types.MethodType):
        inner = callable_references(obj.__func__, hash_code=hash_code)
        return (obj.__func__, *inner, *_state_references(obj.__self__))
    if isinstance(obj, (type, types.BuiltinFunctionType)):
        return (obj,)
    return _state_references(obj)


def _state_references(obj: Any) -> tuple[Any, ...]:
    if isinstance(obj, (type, types.ModuleType)):
        return (obj,)
    try:
        state = obj.__getstate__()
    except Exception:
        return (object(),)  # never the same again: the digest is taken anew, and says why
    parts = state if isinstance(state, tuple) else (state,)
    flat: list[Any] = [type(obj)]
    for part in parts:
        if isinstance(part, dict):
            flat.extend(x for pair in part.items() for x in pair)
        else:
            flat.append(part)
    return tuple(flat)


def _state(obj: Any) -> Digest:
    """``obj``'s digest if its type has a digest rule, else its class and ``__getstate__()``."""
    if _encoder(type(obj)) is not _indigestible:
        return _digest(obj)
    try:
        return _h(b"state", _qualified(type(obj)) + _digest(obj.__getstate__()))
    except Indigestible as e:
        raise Indigestible(f"cannot digest the state of a {_qualified(type(obj))}: {e}") from e


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
        return _h(b"ndarray-obj", header + "".join(_digest(x) for x in a.reshape(-1).tolist()).encode())
    flat = np.ascontiguousarray(a).reshape(-1)
    h = hashlib.sha256(b"ndarray:" + header)
    h.update(flat.view(np.uint8) if dtype.itemsize else b"")
    return _mk(h.hexdigest())


def _pandas_values(obj: Any) -> Digest:
    """Digest of a pandas object's values, whatever their dtype."""
    values = obj.to_numpy() if hasattr(obj, "to_numpy") else obj
    try:
        return _digest(values)
    except Indigestible:
        pd = sys.modules["pandas"]
        hashed = pd.util.hash_array(values.astype(object), categorize=False)
        return _h(b"pdhash", hashed.tobytes())


def _index(ix: Any) -> Digest:
    return _h(
        b"pd.Index",
        f"{type(ix).__name__}|{ix.dtype}|" + _digest(list(ix.names)) + _pandas_values(ix),
    )


def _series(s: Any) -> Digest:
    return _h(
        b"pd.Series", f"{s.dtype}|" + _digest(s.name) + _index(s.index) + _pandas_values(s)
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
    return _digest(
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
