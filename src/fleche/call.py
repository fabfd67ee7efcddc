"""Call records: what was called, with which arguments, and what came back.

A :class:`Call` holds the values themselves; a :class:`DigestedCall` is the same record with every
argument and the result replaced by its :class:`~fleche.digest.Digest` (this is what call storages
keep); a :class:`QueryCall` is a template that matches stored calls.

Both kinds of record share one lookup key, which depends on the function's identity and the
arguments only::

    >>> def add(a, b=2):
    ...     return a + b
    >>> call = Call.from_call(add, 1)
    >>> call.arguments
    {'a': 1, 'b': 2}
    >>> call.to_lookup_key() == call.digest().to_lookup_key()
    True
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .digest import Digest, _h, callable_name, digest

if TYPE_CHECKING:
    from .caches import BaseCache

__all__ = [
    "Call",
    "DigestedCall",
    "FetchedCall",
    "KnownArguments",
    "LazyArguments",
    "Metadata",
    "QueryCall",
    "lookup_key",
    "with_lookup_key",
]

CallT = TypeVar("CallT", bound="Call")

Metadata = Mapping[str, Mapping[str, Any]]
"""Metadata of a call: named sections (e.g. ``"runtime"``) of JSON-compatible entries."""


def _argument_digests(arguments: Mapping[str, Any]) -> dict[str, Digest]:
    if isinstance(arguments, (KnownArguments, LazyArguments)):  # no values to load or digest
        return dict(arguments.digests)
    return {name: digest(value) for name, value in arguments.items()}


@functools.lru_cache(maxsize=4096)
def _identity_digests(
    name: str, module: str | None, version: str | None, code_digest: str | None
) -> str:
    """The digests of the identity's parts, joined: what every lookup key of it starts with."""
    return "".join(digest(part) for part in ("fleche.call", name, module, version, code_digest))


_name_digest = functools.lru_cache(maxsize=4096)(digest)


def lookup_key(
    name: str,
    module: str | None,
    version: str | None,
    code_digest: str | None,
    argument_digests: Mapping[str, Digest],
) -> Digest:
    """The lookup key of a call from its identity and its arguments' digests.

    Equal to ``digest(("fleche.call", name, module, version, code_digest, arguments))``; the
    identity part is digested once per function, which keeps the decorator's hit path short.
    """
    # digest_sequence(tuple, ...) of the identity's digests and digest_mapping(dict, ...) of the
    # arguments', spelled out: on the path of every hit.
    pairs = sorted([_name_digest(k) + d for k, d in argument_digests.items()])
    arguments = _h(b"dict", "".join(pairs))
    return _h(b"tuple", _identity_digests(name, module, version, code_digest) + arguments)


_KEY = "_lookup_key"
"""Where a record remembers its lookup key (in its ``__dict__``, outside the dataclass fields)."""
_KEYLESS = frozenset({"metadata", "result", "inline"})
"""The fields a lookup key does not depend on."""


def with_lookup_key(call: CallT, key: Digest) -> CallT:
    """``call``, remembering ``key`` as its lookup key: for the code that just made ``call`` and
    computed its key from the same identity and argument digests (the decorator, a cache's
    save), so no step after it digests again. Only for a record no one changes afterwards."""
    call.__dict__[_KEY] = key
    return call


def _lookup_key(call: Call | DigestedCall) -> Digest:
    return lookup_key(
        call.name, call.module, call.version, call.code_digest, _argument_digests(call.arguments)
    )


class KnownArguments(Mapping[str, Any]):
    """Argument values together with their digests, so nothing is digested twice."""

    def __init__(self, values: Mapping[str, Any], digests: Mapping[str, Digest]) -> None:
        self._values = values
        self.digests = digests

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return repr(dict(self._values))


class LazyArguments(Mapping[str, Any]):
    """Arguments of a loaded call: each value is loaded on first access, then kept.

    ``digests`` maps each name to the stored value's key, so the call's lookup key and record
    need no loading at all.
    """

    def __init__(self, digests: Mapping[str, Digest], load: Callable[[Digest], Any]) -> None:
        self.digests = dict(digests)
        self._load = load
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            self._loaded[name] = self._load(self.digests[name])
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.digests)

    def __len__(self) -> int:
        return len(self.digests)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{n!r}: {self._loaded[n]!r}" if n in self._loaded else f"{n!r}: <{d[:8]}>"
            for n, d in self.digests.items()
        )
        return "{" + shown + "}"


@dataclass(frozen=True)
class Call:
    """One function call: its identity, its arguments by parameter name, and its result.

    ``arguments`` maps each parameter name to its value, in signature order; ``metadata`` maps a
    section name to a dict of JSON-compatible entries (when and where the call ran, ...).
    ``module``, ``version`` and ``code_digest`` take part in the lookup key when set; ``metadata``
    and ``result`` never do.
    """

    name: str
    arguments: Mapping[str, Any]
    metadata: Metadata | None = None
    module: str | None = None
    version: str | None = None
    code_digest: str | None = None
    result: Any = None

    @classmethod
    def from_call(cls, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Call:
        """Bind ``args``/``kwargs`` to ``func``'s signature, defaults applied; name and module
        as :func:`~fleche.digest.callable_name` gives them (``__mp_main__`` read as ``__main__``).

        Raises ``TypeError`` if the arguments do not fit the signature, exactly as calling
        ``func`` would.
        """
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        name, module = callable_name(func)
        return cls(name=name, arguments=dict(bound.arguments), module=module)

    def to_lookup_key(self) -> Digest:
        """The key under which this call is stored: a digest of name, module, version, code digest
        and arguments; metadata and result are not part of it. Digested anew on each call,
        unless the record was handed its key by :func:`with_lookup_key` (which :meth:`digest`
        and :meth:`replace` of other fields keep): arguments may be mutable values."""
        known = self.__dict__.get(_KEY)
        return _lookup_key(self) if known is None else known

    def digest(self) -> DigestedCall:
        """This call as a record: every argument and the result replaced by its digest."""
        # Made as replace() makes records (a frozen dataclass's __init__ sets each field with
        # object.__setattr__): this is on the path of every save.
        record = object.__new__(DigestedCall)
        record.__dict__.update(
            name=self.name,
            arguments=_argument_digests(self.arguments),
            metadata=self.metadata,
            module=self.module,
            version=self.version,
            code_digest=self.code_digest,
            result=digest(self.result),
            inline=None,
        )
        known = self.__dict__.get(_KEY)
        if known is not None:  # a digest stands in for its value: the same lookup key
            record.__dict__[_KEY] = known
        return record

    def __getstate__(self) -> dict[str, Any]:
        # The remembered lookup key is not part of the record: stored records stay as they were.
        state = self.__dict__
        if _KEY in state:
            state = {k: v for k, v in state.items() if k != _KEY}
        return state

    def stash(self, cache: BaseCache) -> DigestedCall:
        """Store this call's argument and result values in ``cache`` (not the call itself) and
        return its :class:`DigestedCall`, which :meth:`DigestedCall.fetch` turns back into the
        call; see :meth:`~fleche.caches.BaseCache.stash`."""
        return cache.stash(self)

    def replace(self, **changes: Any) -> Call:
        """A copy with the given fields changed (records are immutable)."""
        fields = self.__dict__
        keyless = True
        for name in changes:
            if name not in fields:
                unknown = sorted(changes.keys() - fields.keys())
                raise TypeError(f"{type(self).__name__} has no field(s) {unknown}")
            if name not in _KEYLESS:
                keyless = False
        # Copying the instance dict is several times faster than dataclasses.replace, which
        # matters on the decorator's miss path; records have no __post_init__ to re-run.
        new = object.__new__(type(self))
        state = new.__dict__
        state.update(fields)
        state.update(changes)
        if not keyless:
            state.pop(_KEY, None)
        return new


@dataclass(frozen=True)
class DigestedCall(Call):
    """A call record whose arguments and result are :class:`Digest` keys of stored values.

    This is what a call storage keeps. It has the same lookup key as the :class:`Call` it came
    from, because a digest stands in for the value it names.
    """

    arguments: Mapping[str, Digest] = field(default_factory=dict)
    result: Digest | None = None
    inline: Mapping[Digest, Any] | None = field(default=None, compare=False, repr=False)
    """Small argument and result values kept in the record itself, by digest.

    A cache stores small values here when its call storage keeps them (``keeps_inline_values``),
    so a hit reads one entry; they are not part of the record's identity or equality.
    """

    def digest(self) -> DigestedCall:
        return self

    def value(self, key: Digest, load: Callable[[Digest], Any]) -> Any:
        """The value ``key`` names: from ``inline`` if it is there, else ``load(key)``."""
        inline = self.inline
        if inline is not None and key in inline:
            return inline[key]
        return load(key)

    def fetch(self, cache: BaseCache) -> FetchedCall:
        """This call with its values from ``cache``, each loaded on first access (arguments one
        by one, the result when first read); a value the cache lacks raises ``KeyError`` then.
        The inverse of :meth:`Call.stash`."""
        return FetchedCall(self, lambda key: self.value(key, cache.load_value))


class FetchedCall(Call):
    """A :class:`Call` whose argument and result values load from a cache on first access
    (what :meth:`DigestedCall.fetch` gives); each value is loaded once, then kept. Equal to the
    plain call with the same values; :meth:`replace` gives a plain :class:`Call`."""

    def __init__(self, record: DigestedCall, load: Callable[[Digest], Any]) -> None:
        for name in ("name", "metadata", "module", "version", "code_digest"):
            object.__setattr__(self, name, getattr(record, name))
        object.__setattr__(self, "arguments", LazyArguments(record.arguments, load))
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "_load", load)

    @property
    def result(self) -> Any:  # type: ignore[override]
        """The result, loaded on first access."""
        known = self.__dict__
        if "_result" not in known:
            object.__setattr__(self, "_result", self._load(self._record.result))
        return known["_result"]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Call) or isinstance(other, DigestedCall):
            return NotImplemented
        fields = ("name", "arguments", "metadata", "module", "version", "code_digest", "result")
        return all(getattr(self, f) == getattr(other, f) for f in fields)

    __hash__ = None  # type: ignore[assignment]  # as a Call's: its arguments are a mapping

    def to_lookup_key(self) -> Digest:
        return self._record.to_lookup_key()

    def digest(self) -> DigestedCall:
        return self._record.replace(inline=None)

    def replace(self, **changes: Any) -> Call:
        fields = {n: getattr(self, n) for n in ("name", "metadata", "module", "version", "code_digest")}
        plain = Call(arguments=dict(self.arguments), result=self.result, **fields)
        return plain.replace(**changes)


@dataclass(frozen=True)
class QueryCall:
    """A template for finding stored calls; every field left ``None`` is a wildcard.

    ``arguments`` need only name the parameters to match; argument, result and metadata values
    match by digest equality and may be given as the value itself or as its :class:`Digest`.
    ``metadata`` maps a section name to the entries that must match in it; an empty dict only
    asks that the section exists.
    """

    name: str | None = None
    arguments: Mapping[str, Any] | None = None
    metadata: Metadata | None = None
    module: str | None = None
    version: str | None = None
    code_digest: str | None = None
    result: Any = None

    @classmethod
    def from_call(cls, func: Callable[..., Any], *args: Any, **kwargs: Any) -> QueryCall:
        """A template for the stored calls of ``func`` with these arguments: they bind to the
        signature as in a call, but defaults are not filled in, so every argument not given is
        a wildcard. Name and module are ``func``'s; for a ``@fleche`` function, also its
        version and code digest, as its calls are keyed (arguments it ignores are left out).

        ``TypeError`` if the arguments do not fit the signature (too many, unknown names).
        """
        from .decorator import namespace_of  # the decorator builds on this module

        namespace = namespace_of(func)
        if namespace is not None:
            return namespace.template(*args, **kwargs)
        name, module = callable_name(func)
        bound = inspect.signature(func).bind_partial(*args, **kwargs)
        return cls(name=name, module=module, arguments=dict(bound.arguments))

    def matches(self, call: Call) -> bool:
        """Whether ``call`` (digested or not) fits this template."""
        for attr in ("name", "module", "version", "code_digest"):
            want = getattr(self, attr)
            if want is not None and want != getattr(call, attr):
                return False
        if self.result is not None and digest(self.result) != digest(call.result):
            return False
        if self.arguments is not None:
            stored = _argument_digests(call.arguments)
            for name, value in self.arguments.items():
                if name not in stored or digest(value) != stored[name]:
                    return False
        if self.metadata is not None:
            stored = call.metadata or {}
            for section, entries in self.metadata.items():
                if section not in stored:
                    return False
                have = stored[section]
                for key, value in (entries or {}).items():
                    if key not in have or digest(value) != digest(have[key]):
                        return False
        return True
