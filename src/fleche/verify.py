"""Checking a store entry by entry, and evicting what cannot be used.

:func:`verify` loads every call record and every stored value of a :class:`~fleche.caches.Cache`
and reports the problems: *corrupt* entries (torn, bit-flipped, unreadable, not a call record:
:class:`~fleche.errors.CorruptEntryError`) and *dangling* ones (a call whose result or argument
value is missing or unusable, a destructured container whose part is). :func:`repair` evicts
them. A cache then treats the evicted calls as misses and computes them again; values no call
needs any more are left for :meth:`~fleche.caches.Cache.gc`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .caches import Cache
from .digest import Digest
from .errors import CorruptEntryError, SignatureError
from .storage.base import ValueStorage

__all__ = ["Problem", "Report", "repair", "verify"]


@dataclass(frozen=True)
class Problem:
    """One unusable entry.

    ``kind`` is ``"corrupt"`` or ``"dangling"``; ``where`` is ``"call"`` (in the call storage) or
    ``"value"``; ``reason`` says what is wrong. ``repairable`` is false for entries refused for
    their signature: a wrong or missing ``FLECHE_SECRET_KEY`` makes every entry look like that,
    so they are never evicted wholesale.
    """

    kind: str
    where: str
    key: Digest
    reason: str
    repairable: bool = True


@dataclass
class Report:
    """What :func:`verify` looked at and found."""

    calls: int = 0
    values: int = 0
    problems: list[Problem] = field(default_factory=list)


_OK = ("ok", "")


class _ValueChecker:
    """Loads each value entry once (raw, parts not followed) and remembers its state:
    ``ok``, ``missing``, ``corrupt`` or ``broken`` (a part is not ``ok``); ``signature`` holds
    the keys refused for their signature and the containers broken only by such a part."""

    def __init__(self, values: ValueStorage) -> None:
        self.values = values
        self.state: dict[Digest, tuple[str, str]] = {}
        self.signature: set[Digest] = set()

    def __call__(self, key: Digest) -> tuple[str, str]:
        known = self.state.get(key)
        if known is not None:
            return known
        self.state[key] = _OK  # content addressing admits no cycles; this only guards recursion
        try:
            parts = self.values.child_digests(key)  # reads this entry only, not its parts
        except KeyError:
            state = ("missing", "not stored")
        except CorruptEntryError as e:
            if isinstance(e, SignatureError):
                self.signature.add(key)
            state = ("corrupt", e.reason)
        else:
            state = _OK
            for part in parts:
                part_state, _ = self(part)
                if part_state != "ok":
                    state = ("broken", f"its part {part[:12]} is {part_state}")
                    if part in self.signature:
                        self.signature.add(key)
                    break
        self.state[key] = state
        return state



def verify(cache: Cache, progress: Callable[[int, int], None] | None = None) -> Report:
    """Load every call record and value of ``cache`` (a :class:`~fleche.caches.Cache`) and
    report the unusable ones.

    Each value entry is read once. Lists the calls before the values, so a call saved while
    this runs is not reported dangling for values written after the listing (values are
    written before their record). ``progress(done, total)`` follows the entries. O(calls +
    values) reads; changes nothing, so it may run while other processes use the store (an
    entry evicted meanwhile is skipped; one saved meanwhile may or may not be checked).
    """
    calls, values = cache.calls, cache.values
    call_keys = list(calls.list())
    value_keys = list(values.list())
    total = len(call_keys) + len(value_keys)
    check = _ValueChecker(values)
    report = Report(calls=len(call_keys), values=len(value_keys))
    done = 0
    for key in call_keys:
        try:
            record = calls.load(key)
        except KeyError:
            pass  # evicted since listed
        except CorruptEntryError as e:
            report.problems.append(
                Problem("corrupt", "call", key, e.reason, not isinstance(e, SignatureError))
            )
        else:
            needed = [(f"argument {name!r}", d) for name, d in record.arguments.items()]
            if record.result is not None:
                needed.append(("result", record.result))
            inline = record.inline or {}
            for what, d in needed:
                if d in inline:
                    continue  # kept in the record itself, which loaded whole
                state, _ = check(d)
                if state != "ok":
                    # A value refused for its signature may be another key's valid entry: the
                    # call is not evicted for it either.
                    report.problems.append(Problem(
                        "dangling", "call", key, f"its {what} value {d[:12]} is {state}",
                        d not in check.signature,
                    ))
                    break
        done += 1
        if progress is not None:
            progress(done, total)
    for key in value_keys:
        state, reason = check(key)
        if state == "corrupt":
            report.problems.append(
                Problem("corrupt", "value", key, reason, key not in check.signature)
            )
        elif state == "broken":
            report.problems.append(
                Problem("dangling", "value", key, reason, key not in check.signature)
            )
        done += 1
        if progress is not None:
            progress(done, total)
    return report


def repair(cache: Cache, problems: Iterable[Problem]) -> list[Problem]:
    """Evict the entries of the repairable ``problems``; return those now gone.

    Each eviction is atomic on its own (see the storages' ``evict``); an entry already gone
    counts as repaired.
    """
    repaired = []
    for problem in problems:
        if not problem.repairable:
            continue
        storage = cache.calls if problem.where == "call" else cache.values
        with contextlib.suppress(KeyError):
            storage.evict(problem.key)
        repaired.append(problem)
    return repaired
