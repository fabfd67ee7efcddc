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

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .digest import Digest, digest

__all__ = ["Call", "DigestedCall", "LazyArguments", "Metadata", "QueryCall"]

Metadata = Mapping[str, Mapping[str, Any]]
"""Metadata of a call: named sections (e.g. ``"runtime"``) of JSON-compatible entries."""


def _argument_digests(arguments: Mapping[str, Any]) -> dict[str, Digest]:
    known = getattr(arguments, "digests", None)
    if known is not None:  # LazyArguments: no need to load the values to digest them
        return dict(known)
    return {name: digest(value) for name, value in arguments.items()}


def _lookup_key(call: Call | DigestedCall) -> Digest:
    arguments = _argument_digests(call.arguments)
    return digest(("fleche.call", call.name, call.module, call.version, call.code_digest, arguments))


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
        """Bind ``args``/``kwargs`` to ``func``'s signature, defaults applied.

        Raises ``TypeError`` if the arguments do not fit the signature, exactly as calling
        ``func`` would.
        """
        bound = inspect.signature(func).bind(*args, **kwargs)
        bound.apply_defaults()
        return cls(
            name=getattr(func, "__qualname__", getattr(func, "__name__", repr(func))),
            arguments=dict(bound.arguments),
            module=getattr(func, "__module__", None),
        )

    def to_lookup_key(self) -> Digest:
        """The key under which this call is stored: a digest of name, module, version, code digest
        and arguments; metadata and result are not part of it."""
        return _lookup_key(self)

    def digest(self) -> DigestedCall:
        """This call as a record: every argument and the result replaced by its digest."""
        return DigestedCall(
            name=self.name,
            arguments=_argument_digests(self.arguments),
            metadata=self.metadata,
            module=self.module,
            version=self.version,
            code_digest=self.code_digest,
            result=digest(self.result),
        )

    def replace(self, **changes: Any) -> Call:
        """A copy with the given fields changed (records are immutable)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DigestedCall(Call):
    """A call record whose arguments and result are :class:`Digest` keys of stored values.

    This is what a call storage keeps. It has the same lookup key as the :class:`Call` it came
    from, because a digest stands in for the value it names.
    """

    arguments: Mapping[str, Digest] = field(default_factory=dict)
    result: Digest | None = None

    def digest(self) -> DigestedCall:
        return self


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
