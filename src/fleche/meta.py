"""Metadata providers: what ``@fleche(meta=...)`` records with each call besides its runtime.

A provider is a callable that takes the :class:`~fleche.call.Call` just computed (its
``arguments`` and ``result`` filled in) and returns a dict, stored as one section of the call's
metadata, next to ``runtime`` and ``function``::

    def git(call):
        return {"commit": subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()}

    @fleche(meta={"git": git})          # section "git"; or meta=[git]: named after the function
    def simulate(temperature): ...

Providers run once per computed call, just before it is saved (never on a hit), in the thread
that saves it. A provider that raises, or returns something other than a dict, costs its
section and a :class:`~fleche.errors.FlecheWarning`, never the call. Sections end up in
``cache.load(key).metadata``, ``f.query().table()`` (as ``section.entry`` columns) and
``fleche show``; a SQL call storage needs JSON values (str, int, float, bool, None, lists and
dicts of them), else the call is not cached and the save's warning says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .call import Call
from .errors import FlecheWarning

__all__ = ["RESERVED", "Provider", "collect", "providers"]

Provider = Callable[[Call], Mapping[str, Any]]
"""Takes the computed call, returns one metadata section."""

RESERVED = frozenset({"runtime", "function"})
"""Sections fleche writes itself."""


def providers(meta: Mapping[str, Provider] | Iterable[Provider] | None) -> dict[str, Provider]:
    """``meta=`` as a dict of section name to provider (a sequence of providers is named after
    each one's ``__name__``); ``TypeError`` or ``ValueError`` naming what is wrong. Checked
    once, when decorating."""
    if meta is None:
        return {}
    if isinstance(meta, Mapping):
        named = dict(meta)
    elif isinstance(meta, Iterable) and not isinstance(meta, (str, bytes)):
        named = {}
        for provider in meta:
            if not callable(provider):
                raise TypeError(f"meta= takes callables, got {provider!r}")
            try:
                named[provider.__name__] = provider
            except AttributeError:
                raise TypeError(
                    f"meta= provider {provider!r} has no __name__ to name its section: "
                    "give it one with meta={'section': provider}"
                ) from None
    else:
        raise TypeError(
            f"meta= takes a dict of section name to provider, or a list of providers; got {meta!r}"
        )
    for section, provider in named.items():
        if not isinstance(section, str) or not section:
            raise TypeError(f"meta= section names are non-empty str, got {section!r}")
        if section in RESERVED:
            raise ValueError(f"meta= section {section!r} is fleche's own; choose another name")
        if not callable(provider):
            raise TypeError(f"meta= section {section!r} needs a callable provider, got {provider!r}")
    return named


def collect(named: Mapping[str, Provider], call: Call, function: str) -> dict[str, Any]:
    """The sections the providers give for ``call``; each failure is a warning naming the
    function, the section and the cause, and leaves that section out. Runs in the calling
    thread; providers called from several threads at once must be thread-safe themselves."""
    sections: dict[str, Any] = {}
    for section, provider in named.items():
        try:
            got = provider(call)
        except Exception as e:  # noqa: BLE001 - a provider never fails the call
            warnings.warn(f"{function}: metadata section {section!r} left out, its provider "
                          f"raised {type(e).__name__}: {e}", FlecheWarning, stacklevel=4)
            continue
        if not isinstance(got, Mapping):
            warnings.warn(f"{function}: metadata section {section!r} left out, its provider "
                          f"returned {type(got).__name__}, not a dict", FlecheWarning, stacklevel=4)
            continue
        sections[section] = dict(got)
    return sections
