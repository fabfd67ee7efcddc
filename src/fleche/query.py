"""Live queries: what ``cache.query(...)`` and ``f.query(...)`` return.

A :class:`QueryIterator` is a description of a query, not its result: every time it is iterated
(or counted, tabled, evicted ...) it asks the cache again, so it sees the store as it is now.
Steps such as :meth:`~QueryIterator.filter`, :meth:`~QueryIterator.sorted` or
:meth:`~QueryIterator.take` give new queries and run nothing::

    >>> from fleche.caches import memory_cache
    >>> from fleche.call import Call
    >>> cache = memory_cache()
    >>> for x in range(5):
    ...     _ = cache.save(Call("square", {"x": x}, result=x * x))
    >>> big = cache.query().filter(lambda c: c.result > 3)
    >>> big.count(), sorted(big.results())
    (3, [4, 9, 16])
    >>> _ = cache.save(Call("square", {"x": 5}, result=25))
    >>> big.count()  # run again: the new call is found
    4
    >>> cache.query(x=2).only().result
    4
"""

from __future__ import annotations

import builtins
import datetime
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .call import Call, QueryCall
from .digest import Digest
from .errors import FlecheError
from .extras import needs_extra

if TYPE_CHECKING:
    import pandas

    from .caches import BaseCache

__all__ = ["MatchCountError", "QueryIterator", "copy_calls", "start_time"]

Step = Callable[[Iterable[Call]], Iterable[Call]]


class MatchCountError(FlecheError, LookupError):
    """A query found another number of calls than the operation needs: none for
    :meth:`QueryIterator.any`, :meth:`~QueryIterator.latest` and :meth:`~QueryIterator.oldest`,
    not exactly one for :meth:`~QueryIterator.only`. ``found`` is how many it found."""

    def __init__(self, wanted: str, found: int, query: QueryIterator) -> None:
        super().__init__(f"expected {wanted} call, found {found}: {query!r}")
        self.found = found


def start_time(call: Call) -> datetime.datetime | None:
    """When ``call`` started, from its ``runtime`` metadata (as the decorator records it), as an
    aware datetime; ``None`` for a call recorded without a readable start time."""
    runtime = (call.metadata or {}).get("runtime")
    start = runtime.get("start") if isinstance(runtime, dict) else None
    if not isinstance(start, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(start)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)


_NEVER = datetime.datetime.min.replace(tzinfo=datetime.UTC)


def _by_start(call: Call) -> datetime.datetime:
    start = start_time(call)
    return _NEVER if start is None else start


def copy_calls(
    source: BaseCache,
    calls: Sequence[tuple[Digest, Callable[[], Call]]],
    other: BaseCache,
    *,
    overwrite: bool = False,
    pop: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Copy the calls ``(key, load)`` of ``source`` into ``other``; return how many were saved.

    A call ``other`` already has is skipped unless ``overwrite`` (then saved again, values
    rewritten). With ``pop`` each call is evicted from ``source`` once ``other`` has it (its
    values stay until ``source``'s gc; a read-only ``source`` refuses before anything is
    copied). A call gone from ``source`` meanwhile is skipped.
    ``progress(done, total)`` follows each call looked at. What :meth:`BaseCache.transfer` and
    :meth:`QueryIterator.transfer` share.
    """
    if pop and not source.writable:
        from .caches import ReadOnlyError  # the caches build on this module

        raise ReadOnlyError(
            f"cannot move calls out of {source!r}: it is read-only (pop=True would evict them)"
        )
    copied = 0
    for done, (key, load) in enumerate(calls, 1):
        try:
            if overwrite or not other.contains(key):
                other.save(load(), overwrite=overwrite)
                copied += 1
            if pop:
                source.evict(key)
        except KeyError:
            pass  # evicted since listed, or a value of it is gone: nothing to copy or pop
        if progress is not None:
            progress(done, len(calls))
    return copied


class QueryIterator(Iterable[Call]):
    """The calls of ``cache`` that match ``template``, found anew each time it is iterated.

    Re-iterable and live: every iteration, and every method that reads the calls, runs the
    query against the store as it is now, so calls saved or evicted since (by this or any other
    thread or process) are seen; during one pass, calls saved or evicted meanwhile may or may
    not appear, as :meth:`~fleche.caches.BaseCache.find` says. Arguments load on first access,
    results as each call is found. The order is the store's unless :meth:`sorted` sets one.
    """

    __slots__ = ("cache", "template", "_steps")

    def __init__(
        self, cache: BaseCache, template: QueryCall, steps: tuple[Step, ...] = ()
    ) -> None:
        self.cache = cache
        self.template = template
        self._steps = steps

    def __iter__(self) -> Iterator[Call]:
        calls: Iterable[Call] = self.cache.find(self.template)
        for step in self._steps:
            calls = step(calls)
        return iter(calls)

    def __repr__(self) -> str:
        steps = f" with {len(self._steps)} step(s)" if self._steps else ""
        return f"<QueryIterator {self.template!r}{steps} over {self.cache!r}>"

    def _then(self, step: Step) -> QueryIterator:
        return QueryIterator(self.cache, self.template, (*self._steps, step))

    # -- new queries ----------------------------------------------------------------------------

    def filter(self, predicate: Callable[[Call], bool]) -> QueryIterator:
        """The calls for which ``predicate(call)`` is true (a new query; nothing runs now)."""
        return self._then(lambda calls: (c for c in calls if predicate(c)))

    def take(self, n: int) -> QueryIterator:
        """At most the first ``n`` calls (a new query)."""
        _check_count("take", n)
        return self._then(lambda calls: itertools.islice(calls, n))

    def skip(self, n: int) -> QueryIterator:
        """All but the first ``n`` calls (a new query)."""
        _check_count("skip", n)
        return self._then(lambda calls: itertools.islice(calls, n, None))

    def sorted(
        self, key: Callable[[Call], Any] | None = None, *, reverse: bool = False
    ) -> QueryIterator:
        """The calls ordered by ``key(call)``, by default by start time, oldest first (calls
        without one first); a new query, which reads every call before it yields the first."""
        order = _by_start if key is None else key
        return self._then(lambda calls: builtins.sorted(calls, key=order, reverse=reverse))

    def unique(self, key: Callable[[Call], Any]) -> QueryIterator:
        """The first call of each value of ``key(call)`` (hashable), in order (a new query)."""

        def first_of_each(calls: Iterable[Call]) -> Iterator[Call]:
            seen = set()
            for call in calls:
                k = key(call)
                if k not in seen:
                    seen.add(k)
                    yield call

        return self._then(first_of_each)

    def groupby(self, key: Callable[[Call], Any]) -> dict[Any, QueryIterator]:
        """One live query per value of ``key(call)`` (hashable), in order of first appearance.

        The values are those of one pass now; each group, iterated later, runs the whole query
        again and keeps the calls whose key equals its value.
        """
        values = dict.fromkeys(key(call) for call in self)
        return {v: self.filter(lambda c, v=v: key(c) == v) for v in values}

    # -- answers --------------------------------------------------------------------------------

    def count(self) -> int:
        """How many calls match now (one pass)."""
        return sum(1 for _ in self)

    def empty(self) -> bool:
        """Whether no call matches now (stops at the first found)."""
        for _ in self:
            return False
        return True

    def any(self) -> Call:
        """One matching call, the first found; :class:`MatchCountError` if there is none."""
        for call in self:
            return call
        raise MatchCountError("at least one", 0, self)

    def only(self) -> Call:
        """The one matching call; :class:`MatchCountError` saying how many were found if there
        are none or several."""
        calls = iter(self)
        first = next(calls, None)
        if first is None:
            raise MatchCountError("exactly one", 0, self)
        more = sum(1 for _ in calls)
        if more:
            raise MatchCountError("exactly one", 1 + more, self)
        return first

    def latest(self) -> Call:
        """The call that started last (by its ``runtime`` metadata); :class:`MatchCountError`
        if no matching call has a start time."""
        return self._extreme(max)

    def oldest(self) -> Call:
        """The call that started first; :class:`MatchCountError` if none has a start time."""
        return self._extreme(min)

    def _extreme(self, pick: Callable[..., Any]) -> Call:
        timed = [(start, call) for call in self if (start := start_time(call)) is not None]
        if not timed:
            raise MatchCountError("at least one timed", 0, self)
        return pick(timed, key=lambda t: t[0])[1]  # of several that started at once, the first

    def results(self) -> list[Any]:
        """The results of the matching calls, in order."""
        return [call.result for call in self]

    def keys(self) -> list[Digest]:
        """The lookup keys of the matching calls, in order (nothing but the records is read
        for calls loaded lazily)."""
        return [call.to_lookup_key() for call in self]

    # -- changing the store ---------------------------------------------------------------------

    def evict(self) -> int:
        """Evict every matching call from the cache and return how many were evicted; their
        values stay until ``gc``. Finds the calls first, then evicts each atomically; a call
        evicted meanwhile by someone else is not counted. Refused by read-only caches."""
        evicted = 0
        for key in self.keys():
            try:
                self.cache.evict(key)
            except KeyError:
                continue
            evicted += 1
        return evicted

    def transfer(self, other: BaseCache, overwrite: bool = False, pop: bool = False) -> int:
        """Copy the matching calls with their values into ``other``; return how many were saved.

        Calls ``other`` already has are skipped unless ``overwrite``; ``pop`` evicts each call
        from this cache once ``other`` has it (a move). Finds the calls first; safe while
        others use either cache, as :meth:`~fleche.caches.BaseCache.transfer` is.
        """
        found = [(call.to_lookup_key(), lambda c=call: c) for call in self]
        return copy_calls(self.cache, found, other, overwrite=overwrite, pop=pop)

    # -- a table --------------------------------------------------------------------------------

    def table(self) -> pandas.DataFrame:
        """The matching calls as a pandas DataFrame, one row per call.

        Indexed by the shortest unique prefix of each call's key (``key``), with the columns
        ``function``, one per argument (an argument named ``function`` or ``result`` becomes
        ``argument.function``/``argument.result``), ``result``, and the metadata flattened to
        ``section.entry`` (``runtime.start``, ``runtime.wall_time``, ``runtime.host``, ...);
        ``runtime.start`` and the derived ``runtime.stop`` (start plus wall time) are UTC
        datetimes. Loads every argument and result. Needs pandas (``fleche[pandas]``).
        """
        pd = _pandas()
        calls = list(self)
        rows = [_row(call) for call in calls]
        columns = dict.fromkeys(column for row in rows for column in row) or {"function": None}
        data = {column: [row.get(column) for row in rows] for column in columns}
        frame = pd.DataFrame(data, index=pd.Index(_short_keys(self.cache, calls), name="key"))
        if "runtime.start" in frame:
            frame["runtime.start"] = pd.to_datetime(frame["runtime.start"], utc=True, format="ISO8601")
            if "runtime.wall_time" in frame:
                wall = pd.to_timedelta(pd.to_numeric(frame["runtime.wall_time"]), unit="s")
                at = frame.columns.get_loc("runtime.start") + 1
                frame.insert(at, "runtime.stop", frame["runtime.start"] + wall)
        return frame


def _row(call: Call) -> dict[str, Any]:
    row: dict[str, Any] = {"function": call.name}
    for name in call.arguments:
        row[f"argument.{name}" if name in ("function", "result") else name] = call.arguments[name]
    row["result"] = call.result
    for section, entries in (call.metadata or {}).items():
        if isinstance(entries, dict):
            row.update({f"{section}.{k}": v for k, v in entries.items()})
        else:
            row[section] = entries
    return row


def _check_count(what: str, n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{what}() needs a count of 0 or more, got {n!r}")


def _short_keys(cache: BaseCache, calls: list[Call]) -> list[str]:
    keys = [call.to_lookup_key() for call in calls]
    if not keys:
        return []
    try:
        shrunk = cache.shrink(*keys)
    except KeyError:  # a call evicted since it was found: shorten among what is there now
        from .storage.memory import CallMemory

        known = CallMemory(storage=dict.fromkeys([*cache.list(), *keys]))
        shrunk = known.shrink(*keys)
    return list(shrunk) if isinstance(shrunk, tuple) else [shrunk]


def _pandas() -> Any:
    with needs_extra("pandas", "QueryIterator.table()"):
        import pandas
    return pandas
