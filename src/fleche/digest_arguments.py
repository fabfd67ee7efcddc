"""Arguments given by the digest of a stored value: ``f(fleche.D("ab12"))``.

A value the cache holds (an argument or result of some stored call, as ``fleche ls`` and
``fleche show`` print their keys) can be passed to a decorated function by its key or a unique
prefix of it. The value is loaded from the function's cache and passed in its place before the
call, so the function sees the value and the call is keyed by the value's own digest, exactly
as if it had been passed itself. Only top-level arguments are replaced (a ``D`` inside a list is
not looked at).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .caches import _value_key_text
from .errors import AmbiguousDigestError

if TYPE_CHECKING:
    from .caches import BaseCache

__all__ = ["D", "by_value"]


@dataclass(frozen=True)
class D:
    """The stored value whose key is ``key`` or starts with it (4+ hex characters).

    ``ValueError``/``TypeError`` at once for something that cannot be a key; a prefix no stored
    value has, or several have, raises ``KeyError`` / :class:`~fleche.errors.AmbiguousDigestError`
    naming the prefix and the argument when the call is made.
    """

    key: str

    def __post_init__(self) -> None:
        _value_key_text(self.key)

    def __repr__(self) -> str:
        return f"D({self.key!r})"


def by_value(
    cache: Callable[[], BaseCache], signature: inspect.Signature, args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with every :class:`D` replaced by the value it names, loaded
    from ``cache()`` (asked only if there is a ``D``); the same objects if there is none."""
    if D not in map(type, args) and (not kwargs or D not in map(type, kwargs.values())):
        return args, kwargs  # the decorator's hit path: keep it short
    store = cache()
    loaded = tuple(
        _load(store, a, lambda i=i: _positional_name(signature, i)) if type(a) is D else a
        for i, a in enumerate(args)
    )
    named = {n: _load(store, v, lambda n=n: n) if type(v) is D else v for n, v in kwargs.items()}
    return loaded, named


def _load(store: BaseCache, given: D, name: Callable[[], str]) -> Any:
    try:
        return store.load_value(given.key)
    except AmbiguousDigestError as e:
        raise AmbiguousDigestError(f"argument {name()!r} given as {given!r}: {e}") from None
    except KeyError:
        raise KeyError(
            f"argument {name()!r} given as {given!r}: no value stored under {given.key!r} "
            f"in {store!r}"
        ) from None


def _positional_name(signature: inspect.Signature, i: int) -> str:
    params = list(signature.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if i < len(positional):
        return positional[i].name
    rest = [p.name for p in params if p.kind is p.VAR_POSITIONAL]
    return f"{rest[0]}[{i - len(positional)}]" if rest else f"#{i}"
