"""Caches: a value storage and a call storage working as one.

A :class:`Cache` stores a call's argument and result values in its value storage and the call's
:class:`~fleche.call.DigestedCall` record in its call storage, values first, so whoever finds a
record also finds its values. :class:`CacheStack` layers caches (a worker-local memory cache over
a shared disk or database one); :class:`ReadOnlyCache` protects a cache from writes.

Caches inherit :class:`~fleche.storage.OperationContext`, so the storage thread-safety mixins
attach to them as well::

    @dataclass(frozen=True)
    class LockedCache(PerKeyLockMixin, Cache): ...
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .call import Call, DigestedCall, LazyArguments, QueryCall, with_lookup_key
from .digest import DIGEST_LENGTH, MIN_PREFIX_LENGTH, Digest, Indigestible, _mk, digest
from .errors import CorruptEntryError, FlecheError, FlecheWarning, LockTimeout, SaveError
from .query import QueryIterator, copy_calls
from .storage.base import (
    CallStorage,
    Intent,
    OperationContext,
    ValueStorage,
    _check_key_text,
    _unique_match,
    newest_first,
)
from .storage.file import FileStorage
from .storage.memory import CallMemory, ValueMemory
from .storage.sizes import small_pickle_size
from .usage import StoreUsage
from .storage.object_store import ObjectStoreBackend

__all__ = [
    "BaseCache",
    "Cache",
    "CacheStack",
    "CacheWrapper",
    "ReadOnlyCache",
    "ReadOnlyError",
    "evict_each",
    "memory_cache",
]


class ReadOnlyError(FlecheError, PermissionError):
    """A write (save, evict, gc) was attempted on a read-only cache."""


class BaseCache(OperationContext):
    """The cache layer: stores whole calls (record plus values) and finds them again.

    Every operation that the decorator, :mod:`fleche.dask`, :mod:`fleche.ray`, the CLI and
    :mod:`fleche.verify` rely on is declared here, abstract or with a default that says what it
    does; every wrapper forwards or refuses each one explicitly. :class:`ReadOnlyCache` refuses
    the writes (``save``, ``evict``, ``discard``, ``locked``, ``gc``, ``touch``, ``clear``) with
    :class:`ReadOnlyError`, and :attr:`writable` tells callers so beforehand.

    Keys are call lookup keys; wherever a key is taken, a unique prefix of at least four
    characters works too. What an operation guarantees across threads and processes is what the
    storages underneath guarantee (see :class:`Cache`).
    """

    writable: bool = True
    """Whether saves and evictions are allowed (the decorator skips saving when not)."""

    @abc.abstractmethod
    def save(self, call: Call, *, overwrite: bool = False) -> Digest:
        """Store the call with its argument and result values; return its lookup key.

        Values already stored are kept as they are unless ``overwrite``, which writes them
        again (how the decorator repairs a corrupt entry). A reader in any thread or process
        never finds the record without its values.
        """

    @abc.abstractmethod
    def load(self, key: Digest | str) -> Call:
        """The stored call with its values; ``KeyError`` if the record or a value is missing,
        ``CorruptEntryError`` if one is damaged. Never returns a partly written call."""

    @abc.abstractmethod
    def load_result(self, key: Digest | str) -> Any:
        """Only the stored result of the call under ``key``: the decorator's lookup.

        ``KeyError`` if absent, ``CorruptEntryError`` (naming the damaged entry's key) if the
        record or the result is damaged. Safe while other threads and processes write.
        """

    @abc.abstractmethod
    def contains(self, key: Digest | str) -> bool:
        """Whether a call record is stored under ``key``: a snapshot that another thread or
        process may change at once."""

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        """The full keys of those among ``keys`` whose call records are stored (a snapshot).

        Note for implementers: this default asks :meth:`contains` and :meth:`expand` key by key;
        caches over storages that answer in one query override it.
        """
        found: set[Digest] = set()
        for key in keys:
            with contextlib.suppress(KeyError):
                if self.contains(key):
                    found.add(self.expand(key))
        return found

    def newest(self, limit: int) -> list[Digest]:
        """The keys of the ``limit`` calls started last (``runtime`` metadata ``start``), newest
        first; calls without a start come last (a snapshot, as :meth:`find`).

        Note for implementers: this default reads every call (O(entries)); :class:`Cache` asks
        its call storage, which may keep an index.
        """
        return newest_first(((c.to_lookup_key(), c) for c in self.find(QueryCall())), limit)

    @abc.abstractmethod
    def evict(self, key: Digest | str) -> None:
        """Remove the call record under ``key`` (values stay until :meth:`gc`); ``KeyError`` if
        it is not stored. Atomic per key, like the call storage's ``evict``."""

    @abc.abstractmethod
    def discard(self, key: Digest | str) -> None:
        """Remove the entry ``key``, a call record or a value, wherever this cache keeps it;
        nothing if it is not there. How a corrupt entry is cleared before it is written again;
        each removal is atomic, like the storages' ``evict``."""

    @abc.abstractmethod
    def expand(self, key: Digest | str) -> Digest:
        """The full call key a unique prefix stands for; ``KeyError`` if no stored key starts
        with it, ``AmbiguousDigestError`` if several do (a snapshot)."""

    @abc.abstractmethod
    def list(self) -> Iterable[Digest]:
        """Every stored call key (a snapshot; calls may come and go while you iterate)."""

    @abc.abstractmethod
    def find(self, template: QueryCall) -> Iterator[Call]:
        """One pass over the stored calls matching ``template``, results loaded, arguments
        loaded on first access; calls saved or evicted meanwhile may or may not appear.

        What :meth:`query` runs each time its :class:`~fleche.query.QueryIterator` is read.
        """

    def query(self, template: QueryCall | None = None, **arguments: Any) -> QueryIterator:
        """The stored calls matching ``template`` and the given argument values (by value or
        :class:`Digest`), as a live :class:`~fleche.query.QueryIterator`: each iteration runs
        :meth:`find` again against the store as it is then. Its ``evict``/``transfer`` act
        through this cache (so a read-only one refuses them). Not overridden by wrappers: they
        forward :meth:`find`.
        """
        return QueryIterator(self, self._template(template, arguments))

    def filter(self, template: QueryCall) -> BaseCache:
        """A read-only view of this cache that holds only the calls matching ``template``.

        The view is a cache (:class:`~fleche.filtered.FilteredCache`): ``load``, ``contains``,
        ``list``, ``query``, ``load_value`` and ``transfer`` see the matching calls only, as
        this cache has them at each operation; writes raise :class:`ReadOnlyError`.
        """
        from .filtered import FilteredCache  # the view is a wrapper: it builds on this module

        return FilteredCache(self, template)

    def expand_value(self, key: Digest | str) -> Digest:
        """The full key of the stored argument or result value a prefix (4+ characters) stands
        for; a full key is returned as it is. ``KeyError`` if no value's key starts with it,
        :class:`~fleche.errors.AmbiguousDigestError` if several do (a snapshot).

        Note for implementers: this default looks through every call :meth:`find` gives
        (O(calls), loading results); caches over a value storage ask it instead.
        """
        text = _value_key_text(key)
        if len(text) == DIGEST_LENGTH:
            return _mk(text)
        return _unique_match(text, sorted(self._values_in_calls(text)))

    def load_value(self, key: Digest | str) -> Any:
        """The stored argument or result value under ``key`` (full, or a unique prefix of 4+
        characters): what ``fleche.D(key)`` passes to a call. ``KeyError`` if there is none,
        :class:`~fleche.errors.AmbiguousDigestError` if a prefix matches several; never a value
        half written by another thread or process.

        Note for implementers: this default looks through every call :meth:`find` gives
        (O(calls)); caches over a value storage load from it.
        """
        text = _value_key_text(key)
        found = self._values_in_calls(text)
        return found[_unique_match(text, sorted(found))]()

    def _values_in_calls(self, prefix: str) -> dict[Digest, Callable[[], Any]]:
        """Loaders of the argument and result values of stored calls whose key starts with
        ``prefix``."""
        found: dict[Digest, Callable[[], Any]] = {}
        for call in self.find(QueryCall()):
            record = call.digest()
            for name, key in record.arguments.items():
                if key.startswith(prefix):
                    found.setdefault(key, lambda c=call, n=name: c.arguments[n])
            if record.result is not None and record.result.startswith(prefix):
                found.setdefault(record.result, lambda c=call: c.result)
        return found

    @abc.abstractmethod
    def stash(self, call: Call) -> DigestedCall:
        """Store the call's argument and result values, not its record; return the record.

        The returned :class:`DigestedCall` names each value by its key, so it can be sent
        anywhere and turned back into the call with ``record.fetch(cache)``; the call itself is
        not a cached call (not found by :meth:`contains` or :meth:`query`). Values already
        stored are kept; each is written atomically, as :meth:`save` writes them. ``TypeError``
        for a :class:`DigestedCall`, whose values are digests already.
        """

    @abc.abstractmethod
    def locked(self, key: Digest | str) -> contextlib.AbstractContextManager[Digest]:
        """Hold the call key's lock for a compound section: the decorator's compute-once.

        Yields the full key. Excludes the same key's writes and ``locked`` sections in other
        threads and, where the storages lock across processes, in other processes; reentrant
        for the holder, so the section may save the call itself. Raises ``LockTimeout`` after
        the storages' ``lock_timeout``.
        """

    @abc.abstractmethod
    def gc(
        self, dry_run: bool = False, *, progress: Callable[[int, int], None] | None = None
    ) -> set[Digest]:
        """Remove the values no stored call needs and return the keys actually removed
        (``dry_run``: the keys it would remove, removing nothing). ``progress(done, total)``
        is called as the call records are read (the long part), from the calling thread."""

    def clear(self) -> int:
        """Evict every stored call, then remove every value no call needs (:meth:`gc`);
        return how many calls were evicted.

        Each eviction is atomic; calls saved meanwhile may stay, with their values. Note for
        implementers: this default is built on :meth:`list`, :meth:`evict` and :meth:`gc`;
        wrappers forward it, read-only caches refuse it.
        """
        evicted = evict_each(self.evict, list(self.list()))
        self.gc()
        return len(evicted)

    @abc.abstractmethod
    def volume(self) -> int | None:
        """Bytes the store takes where it keeps its entries (its files, its database), or
        ``None`` where a storage cannot say (see ``KeyManagement.volume``); a snapshot, which
        other threads and processes change. Walks file storages (O(entries))."""

    @abc.abstractmethod
    def usage(self) -> StoreUsage:
        """Every stored call record and value with the bytes it takes and when it was last
        saved or used (:meth:`touch`): one listing of each storage (O(entries), no entry is
        read); a snapshot. What a :class:`~fleche.limits.SizeLimitedCache` keeps within its
        budget; ``NotImplementedError`` for a storage that cannot say."""

    @abc.abstractmethod
    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        """Record that the calls under ``keys`` were used at ``when`` (seconds since the
        epoch, default now), so :meth:`usage` shows it; calls not stored are skipped. Changes
        no entry: safe from any thread and process at any time. Storages that record no use
        ignore it (see ``KeyManagement.touch``)."""

    @abc.abstractmethod
    def needed_values(self, keys: Iterable[Digest | str]) -> dict[Digest, frozenset[Digest]]:
        """For each stored call among ``keys``, the keys of the values it refers to at any
        depth (its arguments and result, and the parts of destructured ones); calls not stored
        are left out, and so is nothing else: a key may name a value kept inline or gone.

        Reads each record and each destructured value once (O(calls + values)); values never
        change under their key, so a process remembers the parts it read. A snapshot. A
        damaged record or value raises ``CorruptEntryError`` (which values it needs cannot be
        known).
        """

    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> Digest | tuple[Digest, ...]:
        """Shortest unique prefixes of stored call keys (see ``KeyManagement.shrink``).

        ``KeyError`` for a key that is not stored. A snapshot. Note for implementers: this
        default lists every call (O(n)); caches over one call storage ask it instead.
        """
        full = [self.expand(k) for k in (key, *keys)]
        return CallMemory(storage=dict.fromkeys(self.list())).shrink(full[0], *full[1:])

    def transfer(
        self,
        other: BaseCache,
        *,
        overwrite: bool = False,
        pop: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Copy every call and its values into ``other``, skipping calls it already has.

        Returns the number of calls copied. ``overwrite`` saves calls ``other`` has again
        (rewriting their values); ``pop`` evicts each call from this cache once ``other`` has
        it, a move (values stay until :meth:`gc`; a read-only cache refuses it).
        ``progress(done, total)`` is called after each call looked at, copied or not. Safe to
        run while others use either cache; calls saved meanwhile may or may not be copied. A
        corrupt entry raises ``CorruptEntryError`` and stops the copy; what was copied stays,
        so running it again resumes. Built on :meth:`list`, :meth:`load`, :meth:`evict` and
        ``other``'s :meth:`contains` and :meth:`save`.
        """
        calls = [(key, lambda k=key: self.load(k)) for key in self.list()]
        return copy_calls(self, calls, other, overwrite=overwrite, pop=pop, progress=progress)

    @abc.abstractmethod
    def redigest(self) -> int:
        """Store every call again under the keys the current :func:`~fleche.digest.digest`
        gives (after an upgrade changed how some type digests); return how many calls moved.

        A call whose key changed is saved under its new key before the old record is evicted,
        so a reader never misses it; its values are saved under their new keys (the old entries
        stay until :meth:`gc`). Loads every value (O(calls + values)); not atomic as a whole:
        calls saved meanwhile keep their keys, which are current anyway. A call whose value is
        gone is left as it is; ``Indigestible`` names a value that has no digest any more.
        """

    def close(self) -> None:
        """Release what this cache holds open in this process (connections, file handles).

        The cache stays usable: the next operation opens what it needs again. Note for
        implementers: this default has nothing to close; caches over storages close them.
        """

    @staticmethod
    def _template(template: QueryCall | None, arguments: dict[str, Any]) -> QueryCall:
        template = template or QueryCall()
        if arguments:
            merged = {**(template.arguments or {}), **arguments}
            template = dataclasses.replace(template, arguments=merged)
        return template


def evict_each(evict: Callable[[Digest], None], keys: Iterable[Digest]) -> set[Digest]:
    """Call ``evict(key)`` for each key; return the keys it evicted (those another thread or
    process removed first raise ``KeyError`` and are left out)."""
    evicted: set[Digest] = set()
    for key in keys:
        try:
            evict(key)
        except KeyError:
            continue
        evicted.add(key)
    return evicted


def _ALWAYS() -> bool:
    """For ``Cache._store_value``: check values already stored for lost parts."""
    return True


def _values_of(record: DigestedCall) -> list[Digest]:
    return [*record.arguments.values(), record.result]


def _value_key_text(key: Any) -> str:
    text = _check_key_text(key)
    if len(text) < MIN_PREFIX_LENGTH:
        raise ValueError(
            f"short digest {text!r} is too short: give at least {MIN_PREFIX_LENGTH} characters"
        )
    return text


@dataclass(frozen=True)
class Cache(BaseCache):
    """A value storage and a call storage used together.

    Pickles as its two storages, so a cache can be shipped to worker processes; what it
    guarantees across threads and processes is what its storages guarantee. Every operation
    enters :meth:`_operation_context`, so the storage mixins attach to a cache too.

    >>> cache = Cache(ValueMemory(), CallMemory())
    >>> key = cache.save(Call("square", {"x": 3}, result=9))
    >>> cache.load_result(key)
    9
    """

    values: ValueStorage
    calls: CallStorage
    inline_bytes: int = 2048
    """Arguments and results smaller than about this many bytes are kept in the call record
    itself when the call storage supports it (``keeps_inline_values``), so a hit reads one entry
    and a miss writes one; 0 keeps every value in the value storage."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.values, FileStorage)
            and isinstance(self.calls, FileStorage)
            and os.path.realpath(self.values.root) == os.path.realpath(self.calls.root)
        ):
            raise ValueError(
                f"the value storage and the call storage of a Cache cannot share the same "
                f"directory ({self.calls.root}): each would read the other's entries as its own. "
                "Give each a directory of its own, e.g. DIR/values and DIR/calls "
                "(what fleche.open(DIR) does)"
            )
        if (
            isinstance(self.values, ObjectStoreBackend)
            and isinstance(self.calls, ObjectStoreBackend)
            and self.values.url == self.calls.url
        ):
            raise ValueError(
                f"the value storage and the call storage of a Cache cannot share the same object "
                f"store location ({self.calls.url}): each would read the other's entries as its "
                "own. Give each a prefix of its own, e.g. URL/values and URL/calls "
                "(what fleche.open(URL) does)"
            )

    def save(self, call: Call, *, overwrite: bool = False) -> Digest:
        """Store the values, then the record; return the call's lookup key.

        A reader in any thread or process never finds the record without its values. Values
        already stored are not written again (their key is their content) unless ``overwrite``,
        which rewrites them, e.g. to repair a corrupt entry. Saving a call whose record is
        stored already also writes again any value that lost a part (a destructured container
        whose element is gone), so a call that read as a miss for it is a hit afterwards. If a
        value cannot be stored, the record is not written and ``SaveError`` names the argument
        (or the result) it was and the cause; values already written stay until :meth:`gc`,
        unless the call storage writes values and record in one transaction
        (``CallStorage.save_together``: ``Sql`` with ``SqlValues`` on it), which then
        commits neither.
        """
        record = call.digest()
        key = record.to_lookup_key()
        if record is not call:  # made here: the call storage need not digest it again
            with_lookup_key(record, key)
        limit = self.inline_bytes if self.calls.keeps_inline_values else 0
        arguments = call.arguments
        stored: list[bool] = []

        def stored_again() -> bool:  # asked only for values already stored, at most once
            if not stored:
                stored.append(self.calls.contains(key))
            return stored[0]

        def write() -> None:  # repeatable: the call storage may run it again (save_together)
            inline: dict[Digest, Any] = {}
            stored.clear()
            # A value whose key is inline already (an argument repeated) is not read again: a
            # loaded call's arguments load on access.
            for name, value_key in record.arguments.items():
                if value_key not in inline:
                    self._store_value(
                        name, arguments[name], value_key, limit, inline, overwrite, stored_again
                    )
            if record.result not in inline:
                self._store_value(
                    None, call.result, record.result, limit, inline, overwrite, stored_again
                )
            self.calls.save(record.replace(inline=inline) if inline else record)

        with self._operation_context(key):
            self.calls.save_together(key, self.values, write)
        return key

    def _store_value(
        self, argument: str | None, value: Any, key: Digest, limit: int, inline: dict,
        overwrite: bool, stored_again: Callable[[], bool],
    ) -> None:
        """Keep ``value`` (the argument named so, or the result for ``None``) in ``inline`` if
        it is small enough, else in the value storage unless it is there and complete."""
        if limit and small_pickle_size(value, limit) is not None:
            inline[key] = value
        elif (
            overwrite
            or not self.values.contains(key)
            or (stored_again() and not self._complete(key))
        ):
            try:
                self.values.save(value, key)
            except LockTimeout:
                raise
            except (SaveError, OSError) as e:  # unstorable, or a disk full, read-only, denied
                kind = type(value)
                cause = str(e) if isinstance(e, SaveError) else f"{type(e).__name__}: {e}"
                what = "result" if argument is None else f"argument {argument!r}"
                raise SaveError(
                    f"the {what} (a {kind.__module__}.{kind.__qualname__}) cannot be stored: "
                    f"{cause}"
                ) from e

    def _complete(self, key: Digest) -> bool:
        """Whether the value ``key`` and every part it refers to, at any depth, are stored and
        readable."""
        try:
            self._reachable([key], skip_missing=False)
        except (KeyError, CorruptEntryError):
            return False
        return True

    def _reachable(
        self,
        roots: Iterable[Digest],
        *,
        skip_missing: bool,
        parts: dict[Digest, frozenset[Digest]] | None = None,
        among: set[Digest] | None = None,
    ) -> set[Digest]:
        """The values ``roots`` are or refer to, at any depth (each entry read once).

        A value not stored raises ``KeyError`` unless ``skip_missing``; a damaged one raises
        ``CorruptEntryError`` (its parts cannot be known). ``parts`` remembers what values were
        read to refer to, and is asked first (so a value gone since is not noticed: not for
        checks of completeness). With ``among`` (the values listed as stored), only those are
        read: any other is kept inline in a record or was not stored when listed.
        """
        pending, seen = list(roots), set()
        while pending:
            part = pending.pop()
            if part in seen:
                continue
            seen.add(part)
            if among is not None and part not in among:
                continue
            known = None if parts is None else parts.get(part)
            if known is not None:
                pending.extend(known)
                continue
            try:
                children = self.values.child_digests(part)
            except KeyError:
                if not skip_missing:
                    raise
                continue
            if parts is not None:
                parts[part] = frozenset(children)
            pending.extend(children)
        return seen

    @contextlib.contextmanager
    def locked(self, key: Digest | str) -> Iterator[Digest]:
        """Hold the call key's lock in the call storage (see ``KeyManagement.locked``): the
        compute-once section of the decorator. Saving the same call inside it is allowed."""
        key = self.calls._normalize_key(key)
        with self._operation_context(key), self.calls.locked(key) as full:
            yield full

    def discard(self, key: Digest | str) -> None:
        """Remove the entry ``key`` from whichever storage holds it (a call record or a value);
        used to clear a corrupt entry. Does nothing if neither has it."""
        with self._operation_context(key):
            for storage in (self.calls, self.values):
                with contextlib.suppress(KeyError):
                    storage.evict(key)

    def load(self, key: Digest | str) -> Call:
        """The stored call: result loaded now, arguments loaded on first access."""
        key = self.calls._normalize_key(key)
        with self._operation_context(key, intent=Intent.READ):
            record = self.calls.load(key)
            return self._loaded(record)

    def value_of(self, record: DigestedCall, key: Digest) -> Any:
        """The argument or result value ``key`` of ``record``, from the record or the values."""
        return record.value(key, self.values.load)

    def _loaded(self, record: DigestedCall) -> Call:
        return Call(
            name=record.name,
            arguments=LazyArguments(record.arguments, lambda d: record.value(d, self.values.load)),
            metadata=record.metadata,
            module=record.module,
            version=record.version,
            code_digest=record.code_digest,
            result=record.value(record.result, self.values.load),
        )

    def load_result(self, key: Digest | str) -> Any:
        """The stored result only: one record read (and one value read unless it is inline)."""
        key = self.calls._normalize_key(key)
        with self._operation_context(key, intent=Intent.READ):
            record = self.calls.load(key)
            return record.value(record.result, self.values.load)

    def contains(self, key: Digest | str) -> bool:
        try:
            key = self.calls._normalize_key(key)
        except KeyError:
            return False
        with self._operation_context(key, intent=Intent.READ):
            return self.calls.contains(key)

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        """The stored ones among ``keys``: one batch question to the call storage."""
        return self.calls.contains_many(keys)

    def newest(self, limit: int) -> list[Digest]:
        """The call storage's :meth:`~fleche.storage.base.CallStorage.newest`: as cheap as it
        is there (an index, or one pass over the records)."""
        return self.calls.newest(limit)

    def evict(self, key: Digest | str) -> None:
        key = self.calls._normalize_key(key)
        with self._operation_context(key):
            self.calls.evict(key)

    def expand(self, key: Digest | str) -> Digest:
        text = _check_key_text(key)
        with self._operation_context(text, intent=Intent.READ):
            return self.calls.expand(text)

    def list(self) -> Iterable[Digest]:
        return self.calls.list()

    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> Digest | tuple[Digest, ...]:
        """Shortest unique prefixes of stored call keys, from the call storage (``KeyError`` for
        a key it does not hold)."""
        full = [self.calls._normalize_key(k) for k in (key, *keys)]
        with self._operation_context(full[0], intent=Intent.READ):
            return self.calls.shrink(full[0], *full[1:])

    def find(self, template: QueryCall) -> Iterator[Call]:
        """Stored calls matching the template, arguments loaded lazily. O(n) for storages that
        cannot filter themselves; calls saved or evicted meanwhile may or may not appear.

        A call whose record or result cannot be read (damaged, not a call record) is skipped
        with a ``FlecheWarning`` naming it; ``fleche verify --repair`` removes it.
        """
        for key, record in self.records(template):
            try:
                if isinstance(record, CorruptEntryError):
                    raise record
                yield self._loaded(record)
            except KeyError:
                continue  # result value gone (evicted or gc'd concurrently)
            except CorruptEntryError as e:
                warnings.warn(
                    f"query skipped the call {key}, which cannot be read: {e} (run: fleche "
                    "verify --repair)", FlecheWarning, stacklevel=2,
                )

    def records(
        self, template: QueryCall | None = None
    ) -> Iterator[tuple[Digest, DigestedCall | CorruptEntryError]]:
        """``(key, record)`` of every stored call record matching ``template`` (values not
        loaded); in place of a record that cannot be read, the ``CorruptEntryError`` saying why.

        Asks the call storage's ``query`` (in the database, for ``Sql``) and, past a damaged
        entry, goes on record by record, so one bad entry hides no other. A snapshot, like
        :meth:`query`.
        """
        template = template or QueryCall()
        seen: set[Digest] = set()
        try:
            for record in self.calls.query(template):
                key = record.to_lookup_key()
                seen.add(key)
                yield key, record
            return
        except CorruptEntryError:
            pass
        for key in list(self.calls.list()):
            if key in seen:
                continue
            try:
                record = self.calls.load(key)
            except KeyError:
                continue  # evicted since listed
            except CorruptEntryError as e:
                yield key, e
                continue
            if template.matches(record):
                yield key, record

    def expand_value(self, key: Digest | str) -> Digest:
        """The full key of a stored value (see :meth:`BaseCache.expand_value`), from the value
        storage and, for a prefix, the values kept inline in call records (which lists the
        call records: O(calls) where they keep inline values)."""
        text = _value_key_text(key)
        if len(text) == DIGEST_LENGTH:
            return _mk(text)
        with self._operation_context(text, intent=Intent.READ):
            return _unique_match(text, sorted(self._stored_values(text)))

    def load_value(self, key: Digest | str) -> Any:
        """The stored value under ``key`` (see :meth:`BaseCache.load_value`): from the value
        storage, or from a call record that keeps it inline. A full key held by the value
        storage is one read; a prefix, or a value kept only inline, lists the call records
        too (O(calls) where they keep inline values)."""
        text = _value_key_text(key)
        with self._operation_context(text, intent=Intent.READ):
            found = self._stored_values(text)
            return found[_unique_match(text, sorted(found))]()

    def _stored_values(self, text: str) -> dict[Digest, Callable[[], Any]]:
        """Loaders of the values whose key starts with ``text``: in the value storage, then
        inline in call records (for a full key only if the value storage lacks it)."""
        found: dict[Digest, Callable[[], Any]] = {}
        full = len(text) == DIGEST_LENGTH
        with contextlib.suppress(KeyError):
            key = _mk(text) if full else self.values.expand(text)
            if not full or self.values.contains(key):
                found[key] = lambda: self.values.load(key)
        if self.calls.keeps_inline_values and not (full and found):
            for record in self.calls.query(QueryCall()):
                for k, value in (record.inline or {}).items():
                    if k.startswith(text):
                        found.setdefault(k, lambda v=value: v)
        return found

    def stash(self, call: Call) -> DigestedCall:
        """Store the call's values in the value storage (never inline: no record carries them)
        and return its record; see :meth:`BaseCache.stash`. ``SaveError`` names a value that
        cannot be stored."""
        if isinstance(call, DigestedCall):
            raise TypeError(
                "a DigestedCall holds the digests of its values, not the values: stash the Call"
            )
        record = call.digest()
        arguments = call.arguments
        with self._operation_context(record.to_lookup_key()):
            for name, value_key in record.arguments.items():
                self._store_value(name, arguments[name], value_key, 0, {}, False, _ALWAYS)
            self._store_value(None, call.result, record.result, 0, {}, False, _ALWAYS)
        return record

    def redigest(self) -> int:
        """Re-key every record with the current digest (see :meth:`BaseCache.redigest`): the
        call storage's ``transform`` saves each record under its new key before evicting the
        old one; a value whose key changed is saved under the new key (kept inline if it was)."""
        before = set(self.calls.list())
        self.calls.transform(self._redigested)
        return len(set(self.calls.list()) - before)

    def _redigested(self, record: DigestedCall) -> DigestedCall:
        inline = record.inline or {}
        fresh_inline: dict[Digest, Any] = {}

        def fresh(key: Digest, what: str) -> Digest:
            value = record.value(key, self.values.load)
            try:
                new = digest(value)
            except Indigestible as e:
                raise Indigestible(
                    f"cannot re-key the call {record.name} ({record.to_lookup_key()}): its {what} "
                    f"has no digest now: {e}"
                ) from e
            if key in inline:
                fresh_inline[new] = value
            elif new != key and not self.values.contains(new):
                self.values.save(value, new)
            return new

        try:
            arguments = {n: fresh(d, f"argument {n!r}") for n, d in record.arguments.items()}
            result = fresh(record.result, "result")
        except KeyError:
            return record  # a value is gone: the record stays as it is (fleche verify finds it)
        return record.replace(arguments=arguments, result=result, inline=fresh_inline or None)

    def gc(
        self, dry_run: bool = False, *, progress: Callable[[int, int], None] | None = None
    ) -> set[Digest]:
        """Remove values that no stored call refers to, directly or as a part; return the keys
        it removed (``dry_run``: those it would remove).

        A value that another process removed first (a concurrent gc) is not reported. File
        storages also lose temporary files that writers killed mid-write left behind (older
        than an hour). Lists the values first and the calls after, so a value is kept if any
        call stored before gc finished reading the calls needs it. A call being saved while gc
        runs may lose a value it just wrote; it then reads as a miss and is recomputed. A
        damaged call record or value raises ``CorruptEntryError`` before anything is removed
        (which values it needs cannot be known): run ``fleche verify --repair`` first.
        O(calls + values).
        """
        candidates = set(self.values.list())
        total = len(list(self.calls.list()))
        roots = []
        try:
            for done, record in enumerate(self.calls.query(QueryCall()), 1):  # in batches
                roots += _values_of(record)
                if progress is not None:
                    progress(min(done, total), total)
        except CorruptEntryError as e:
            raise _stops_gc(e) from e
        try:
            # Values kept inline in their records are not in the value storage: not read.
            reachable = self._reachable(roots, skip_missing=True, among=candidates)
        except CorruptEntryError as e:
            raise _stops_gc(e) from e
        garbage = candidates - reachable
        if dry_run:
            return garbage
        evicted = evict_each(self.values.evict, garbage)
        self.values.sweep()
        self.calls.sweep()
        return evicted

    def close(self) -> None:
        """Close both storages (see ``KeyManagement.close``); the cache stays usable."""
        self.values.close()
        self.calls.close()

    def volume(self) -> int | None:
        """The bytes both storages report, or ``None`` if either cannot say; a database
        keeping both the calls and the values counts once."""
        if self.calls.counts_volume_of(self.values):
            return self.calls.volume()
        parts = (self.values.volume(), self.calls.volume())
        return None if None in parts else sum(parts)  # type: ignore[arg-type]

    def usage(self) -> StoreUsage:
        """The call storage's and the value storage's listings with sizes and uses (see
        ``KeyManagement.usage``)."""
        return StoreUsage(calls=self.calls.usage(), values=self.values.usage())

    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        """Record the use in the call storage (see ``KeyManagement.touch``)."""
        self.calls.touch(keys, when)

    def needed_values(self, keys: Iterable[Digest | str]) -> dict[Digest, frozenset[Digest]]:
        """The values each call's record names, and their parts, from the value storage (see
        :meth:`BaseCache.needed_values`)."""
        parts = _parts_seen(self.values)
        needed: dict[Digest, frozenset[Digest]] = {}
        for key in keys:
            try:
                full = self.calls._normalize_key(key)
                record = self.calls.load(full)
            except KeyError:
                continue
            except CorruptEntryError as e:
                raise _stops(e, "cannot tell which values it needs") from e
            inline = record.inline or {}
            roots = [k for k in _values_of(record) if k is not None and k not in inline]
            try:
                needed[full] = frozenset(self._reachable(roots, skip_missing=True, parts=parts))
            except CorruptEntryError as e:
                raise _stops(e, "cannot tell which values it needs") from e
        return needed


def _stops_gc(e: CorruptEntryError) -> CorruptEntryError:
    """``e``, of the same class, saying that gc removed nothing because of it."""
    return _stops(e, "gc removed nothing, since it cannot tell which values this entry needs")


def _stops(e: CorruptEntryError, what: str) -> CorruptEntryError:
    """``e``, of the same class, saying what it stopped: ``what``, then the remedy."""
    return type(e)(e.key, e.location, f"{e.reason}; {what}: run fleche verify --repair first")


_PARTS: weakref.WeakKeyDictionary[Any, dict[Digest, frozenset[Digest]]] = (
    weakref.WeakKeyDictionary()
)
"""The parts of the values each value storage was seen to hold in this process: values never
change under their key, so :meth:`Cache.needed_values` reads each destructured value once."""
_PARTS_KEPT = 200_000
"""Values whose parts are remembered per storage; past it, the memory starts over."""


def _parts_seen(values: Any) -> dict[Digest, frozenset[Digest]] | None:
    """The parts remembered for the storage ``values`` (``None`` for one that cannot be a
    weak dictionary's key)."""
    try:
        seen = _PARTS.get(values)
        if seen is None:
            seen = _PARTS[values] = {}
    except TypeError:
        return None
    if len(seen) > _PARTS_KEPT:
        seen.clear()
    return seen


def memory_cache() -> Cache:
    """A new cache in this process's memory."""
    return Cache(ValueMemory(), CallMemory())


@dataclass(frozen=True)
class CacheStack(BaseCache):
    """Caches tried in order: reads fall through, hits are copied back up.

    ``layers[0]`` is the fastest. A read tries each layer in order and saves a hit found in a
    lower layer into every writable layer above it; a damaged entry in a layer raises
    ``CorruptEntryError`` rather than falling through, so the decorator repairs it. A save goes
    to the first layer and, with ``write_through=True`` (the default), to every other writable
    layer too; with ``write_through=False`` lower layers only receive what :meth:`flush` copies
    down. Writes (``evict``, ``discard``, ``locked``, ``gc``) act on every writable layer and
    raise :class:`ReadOnlyError` when there is none. Guarantees are those of the layers.
    """

    layers: Sequence[BaseCache]
    write_through: bool = True

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a CacheStack needs at least one layer")
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def writable(self) -> bool:  # type: ignore[override]
        """Whether any layer accepts writes."""
        return any(layer.writable for layer in self.layers)

    def _writable_layers(self, what: str) -> list[BaseCache]:
        layers = [layer for layer in self.layers if layer.writable]
        if not layers:
            raise ReadOnlyError(f"cannot {what}: no layer of this CacheStack is writable (read-only)")
        return layers

    def save(self, call: Call, *, overwrite: bool = False) -> Digest:
        targets = self.layers if self.write_through else self.layers[:1]
        keys = [layer.save(call, overwrite=overwrite) for layer in targets if layer.writable]
        if not keys:
            raise ReadOnlyError("cannot save: no layer of this CacheStack accepts it (read-only)")
        return keys[0]

    def _find(self, key: Digest | str) -> tuple[int, Call]:
        for i, layer in enumerate(self.layers):
            try:
                return i, layer.load(key)
            except KeyError:
                continue
        raise KeyError(f"no call stored under {key} in any layer")

    def load(self, key: Digest | str) -> Call:
        """Load from the first layer that has the call; copy it into the layers above."""
        i, call = self._find(key)
        for layer in self.layers[:i]:
            if layer.writable:
                layer.save(call)
        return call

    def load_result(self, key: Digest | str) -> Any:
        try:
            return self.layers[0].load_result(key)
        except KeyError:
            return self.load(key).result

    def contains(self, key: Digest | str) -> bool:
        return any(layer.contains(key) for layer in self.layers)

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        """Keys stored in any layer: one batch question per layer, for what the layers above
        did not have."""
        wanted = list(keys)
        found: set[Digest] = set()
        for layer in self.layers:
            found |= layer.contains_many(k for k in wanted if k not in found)
        return found

    def newest(self, limit: int) -> list[Digest]:
        """The newest of each layer's ``limit`` newest calls: loads at most ``limit`` records
        per layer beyond what the layers' own ``newest`` read."""
        candidates = dict.fromkeys(k for layer in self.layers for k in layer.newest(limit))
        found = []
        for key in candidates:
            with contextlib.suppress(KeyError, CorruptEntryError):
                found.append((key, self._record(key)))
        return newest_first(found, limit)

    def _record(self, key: Digest) -> Call:
        for layer in self.layers:
            with contextlib.suppress(KeyError):
                return layer.load(key)
        raise KeyError(key)

    def evict(self, key: Digest | str) -> None:
        """Evict from every writable layer that has the call; ``KeyError`` if none had it."""
        found = False
        for layer in self._writable_layers(f"evict {key}"):
            try:
                layer.evict(key)
                found = True
            except KeyError:
                continue
        if not found:
            raise KeyError(f"no call stored under {key} in any layer")

    def discard(self, key: Digest | str) -> None:
        """Discard the entry from every writable layer (see :meth:`BaseCache.discard`)."""
        for layer in self._writable_layers(f"discard {key}"):
            layer.discard(key)

    @contextlib.contextmanager
    def locked(self, key: Digest | str) -> Iterator[Digest]:
        """Hold the key's lock in every writable layer, taken top to bottom (the same order in
        every thread and process, so two holders never wait for each other crosswise)."""
        layers = self._writable_layers(f"lock {key}")
        with contextlib.ExitStack() as stack:
            full = [stack.enter_context(layer.locked(key)) for layer in layers]
            yield full[0]

    def expand(self, key: Digest | str) -> Digest:
        matches = set()
        for layer in self.layers:
            with contextlib.suppress(KeyError):
                matches.add(layer.expand(key))
        return _unique_match(str(key), sorted(matches))

    def list(self) -> Iterable[Digest]:
        seen: dict[Digest, None] = {}
        for layer in self.layers:
            seen.update(dict.fromkeys(layer.list()))
        return list(seen)

    def find(self, template: QueryCall) -> Iterator[Call]:
        """The matching calls of every layer, each once (from the first layer that has it)."""
        seen = set()
        for layer in self.layers:
            for call in layer.find(template):
                key = call.to_lookup_key()
                if key not in seen:
                    seen.add(key)
                    yield call

    def expand_value(self, key: Digest | str) -> Digest:
        """The full key a value prefix stands for among the values of every layer."""
        matches = set()
        for layer in self.layers:
            with contextlib.suppress(KeyError):
                matches.add(layer.expand_value(key))
        return _unique_match(str(key), sorted(matches))

    def load_value(self, key: Digest | str) -> Any:
        """The value from the first layer that has it (a prefix is expanded over all layers
        first, so it is never taken for another layer's value)."""
        full = self.expand_value(key)
        for layer in self.layers:
            with contextlib.suppress(KeyError):
                return layer.load_value(full)
        raise KeyError(f"no value stored under {key} in any layer")

    def stash(self, call: Call) -> DigestedCall:
        """Stash the values in the first layer and, with ``write_through``, every other
        writable layer (as :meth:`save` writes); :class:`ReadOnlyError` if no layer takes them."""
        targets = self.layers if self.write_through else self.layers[:1]
        records = [layer.stash(call) for layer in targets if layer.writable]
        if not records:
            raise ReadOnlyError("cannot stash: no layer of this CacheStack accepts it (read-only)")
        return records[0]

    def redigest(self) -> int:
        """Re-key every writable layer; the calls moved in all of them together."""
        return sum(layer.redigest() for layer in self._writable_layers("re-key calls"))

    def gc(
        self, dry_run: bool = False, *, progress: Callable[[int, int], None] | None = None
    ) -> set[Digest]:
        """Collect garbage in every writable layer; the union of the keys each removed
        (``progress`` is told of each layer's calls in turn)."""
        removed: set[Digest] = set()
        for layer in self._writable_layers("collect garbage"):
            removed |= layer.gc(dry_run=dry_run, progress=progress)
        return removed

    def close(self) -> None:
        """Close every layer."""
        for layer in self.layers:
            layer.close()

    def volume(self) -> int | None:
        """The bytes of every layer together, or ``None`` if one cannot say."""
        volumes = [layer.volume() for layer in self.layers]
        return None if None in volumes else sum(volumes)  # type: ignore[arg-type]

    def usage(self) -> StoreUsage:
        """The entries of every layer (an entry in several counts each copy's bytes)."""
        return StoreUsage.merged(layer.usage() for layer in self.layers)

    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        """Record the use in every writable layer (:class:`ReadOnlyError` if none is)."""
        keys = list(keys)
        for layer in self._writable_layers("record uses"):
            layer.touch(keys, when)

    def needed_values(self, keys: Iterable[Digest | str]) -> dict[Digest, frozenset[Digest]]:
        """The values each call needs in any layer."""
        keys = list(keys)
        needed: dict[Digest, frozenset[Digest]] = {}
        for layer in self.layers:
            for key, values in layer.needed_values(keys).items():
                needed[key] = needed.get(key, frozenset()) | values
        return needed

    def flush(self) -> int:
        """Copy what the first layer has into every lower writable layer; return the number
        copied."""
        first = self.layers[0]
        return sum(first.transfer(layer) for layer in self.layers[1:] if layer.writable)


@dataclass(frozen=True)
class CacheWrapper(BaseCache):
    """Forwards every operation :class:`BaseCache` declares to ``cache``; subclasses override
    what they change.

    Only the declared operations are forwarded: the wrapped cache's own attributes (a
    :class:`Cache`'s ``values`` and ``calls``) are reached through ``wrapper.cache``.
    :meth:`query` and :meth:`filter` are not forwarded but built on the wrapper itself (over
    the forwarded :meth:`find`), so what they find and evict passes through the wrapper.
    """

    cache: BaseCache

    @property
    def writable(self) -> bool:  # type: ignore[override]
        return self.cache.writable

    def save(self, call: Call, *, overwrite: bool = False) -> Digest:
        return self.cache.save(call, overwrite=overwrite)

    def load(self, key: Digest | str) -> Call:
        return self.cache.load(key)

    def load_result(self, key: Digest | str) -> Any:
        return self.cache.load_result(key)

    def contains(self, key: Digest | str) -> bool:
        return self.cache.contains(key)

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        return self.cache.contains_many(keys)

    def newest(self, limit: int) -> list[Digest]:
        return self.cache.newest(limit)

    def evict(self, key: Digest | str) -> None:
        self.cache.evict(key)

    def discard(self, key: Digest | str) -> None:
        self.cache.discard(key)

    def expand(self, key: Digest | str) -> Digest:
        return self.cache.expand(key)

    def list(self) -> Iterable[Digest]:
        return self.cache.list()

    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> Digest | tuple[Digest, ...]:
        return self.cache.shrink(key, *keys)

    def find(self, template: QueryCall) -> Iterator[Call]:
        return self.cache.find(template)

    def expand_value(self, key: Digest | str) -> Digest:
        return self.cache.expand_value(key)

    def load_value(self, key: Digest | str) -> Any:
        return self.cache.load_value(key)

    def stash(self, call: Call) -> DigestedCall:
        return self.cache.stash(call)

    def redigest(self) -> int:
        return self.cache.redigest()

    def locked(self, key: Digest | str) -> contextlib.AbstractContextManager[Digest]:
        return self.cache.locked(key)

    def gc(
        self, dry_run: bool = False, *, progress: Callable[[int, int], None] | None = None
    ) -> set[Digest]:
        return self.cache.gc(dry_run=dry_run, progress=progress)

    def transfer(
        self,
        other: BaseCache,
        *,
        overwrite: bool = False,
        pop: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        return self.cache.transfer(other, overwrite=overwrite, pop=pop, progress=progress)

    def close(self) -> None:
        self.cache.close()

    def clear(self) -> int:
        return self.cache.clear()

    def volume(self) -> int | None:
        return self.cache.volume()

    def usage(self) -> StoreUsage:
        return self.cache.usage()

    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        self.cache.touch(keys, when)

    def needed_values(self, keys: Iterable[Digest | str]) -> dict[Digest, frozenset[Digest]]:
        return self.cache.needed_values(keys)


@dataclass(frozen=True)
class ReadOnlyCache(CacheWrapper):
    """A view of ``cache`` that loads, queries and copies out (``transfer``) but refuses every
    write: ``save``, ``stash``, ``evict``, ``discard``, ``locked``, ``gc`` (also a dry run),
    ``redigest``, ``clear``, ``touch`` and ``transfer(pop=True)`` raise :class:`ReadOnlyError`
    (``volume``, ``usage`` and ``needed_values`` only read), and :attr:`writable`
    is false, so the decorator computes a miss (or a corrupt entry) without saving and never
    waits for a lock."""

    @property
    def writable(self) -> bool:  # type: ignore[override]
        return False

    def _refuse(self, what: str) -> ReadOnlyError:
        return ReadOnlyError(f"cannot {what}: this cache is read-only ({self.cache!r})")

    def save(self, call: Call, *, overwrite: bool = False) -> Digest:
        raise self._refuse(f"save a call of {call.name}")

    def evict(self, key: Digest | str) -> None:
        raise self._refuse(f"evict {key}")

    def discard(self, key: Digest | str) -> None:
        raise self._refuse(f"discard {key}")

    def locked(self, key: Digest | str) -> contextlib.AbstractContextManager[Digest]:
        raise self._refuse(f"lock {key} (its lock guards writes)")

    def gc(
        self, dry_run: bool = False, *, progress: Callable[[int, int], None] | None = None
    ) -> set[Digest]:
        raise self._refuse("collect garbage")

    def stash(self, call: Call) -> DigestedCall:
        raise self._refuse(f"stash the values of a call of {call.name}")

    def redigest(self) -> int:
        raise self._refuse("re-key calls")

    def clear(self) -> int:
        raise self._refuse("clear it")

    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        raise self._refuse("record uses of calls")

    def transfer(
        self,
        other: BaseCache,
        *,
        overwrite: bool = False,
        pop: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Copy out into ``other`` (see :meth:`BaseCache.transfer`); ``pop``, which would
        evict here, raises :class:`ReadOnlyError` before anything is copied."""
        if pop:
            raise self._refuse("move calls out (transfer with pop=True evicts them)")
        return super().transfer(other, overwrite=overwrite, progress=progress)
