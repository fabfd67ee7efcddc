"""Abstract storage layers: key management, backends, value and call storages.

A concrete storage is a frozen dataclass composed of mixins, most specific first::

    PerKeyLockMixin, DestructuringMixin, ValueMixin, <Backend>     # a value storage
    PerKeyLockMixin, CallMixin, <Backend>                          # a call storage

The backend supplies the primitives (``put``, ``get``, ``list``, ``_evict``, ``_contains``);
``ValueMixin``/``CallMixin`` turn them into the domain operations; mixins in front wrap every
operation through :meth:`OperationContext._operation_context`.
"""

from __future__ import annotations

import abc
import bisect
import contextlib
import enum
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar, overload

from ..call import Call, DigestedCall, QueryCall
from ..errors import AmbiguousDigestError, CorruptEntryError, LockTimeout, SaveError
from ..digest import DIGEST_LENGTH, MIN_PREFIX_LENGTH, Digest, _mk, digest

__all__ = [
    "AmbiguousDigestError",
    "CallMixin",
    "CallStorage",
    "CorruptEntryError",
    "EntryUsage",
    "Intent",
    "KeyManagement",
    "LockTimeout",
    "OperationContext",
    "SaveError",
    "StorageBackend",
    "ValueMixin",
    "ValueStorage",
]

T = TypeVar("T")


class Intent(enum.StrEnum):
    """Describes the kind of operation being performed on storage.

    Mixins may use this to choose between exclusive and shared locks.
    """

    WRITE = "write"
    """The operation may change the entry (save, evict); the default."""
    READ = "read"
    """The operation only looks (load, contains, expand); mixins guarding against torn writes
    may skip exclusive locks for it when the backend's writes are atomic."""


class EntryUsage(NamedTuple):
    """What one stored entry costs and when it was last used (see ``KeyManagement.usage``)."""

    size: int
    """Bytes the entry takes where the storage keeps it (a file's size, a row's record and
    values, the pickled size of an object kept in memory)."""
    used: float
    """When the entry was last saved or touched, in seconds since the epoch; 0.0 where the
    storage cannot tell."""


_NO_CONTEXT = contextlib.nullcontext()  # reusable and reentrant: the base hook costs nothing


class OperationContext(abc.ABC):  # noqa: B024 - a hook base, deliberately without abstract methods
    """Minimal base that exposes the :meth:`_operation_context` hook.

    Both :class:`KeyManagement` (storage layer) and ``BaseCache`` (cache layer) inherit from this
    class so that the same thread-safety mixins (``SerializingMixin``, ``PerKeyLockMixin``) can
    attach to either layer without duplication. The settings those mixins read are declared
    here, so every layer has them.
    """

    lock_timeout: float | None = None
    """Seconds a locking mixin waits for a key's lock before raising ``LockTimeout``; ``None``
    waits for ever. Storages with locks that can be held long (files, databases) make it a
    setting (a dataclass field) with a finite default."""

    _atomic_writes: ClassVar[bool] = False
    """Whether every write replaces an entry in one atomic step (a dict assignment, an
    ``os.replace``, a transaction), so a reader sees a whole entry without taking a lock."""

    _key_lock_excludes_threads: ClassVar[bool] = False
    """Whether a layer of this class's ``_operation_context`` already excludes every thread of
    this process on a key (the per-process key locks of ``InterProcessLockMixin``), so
    ``PerKeyLockMixin`` takes no thread lock of its own on top of it."""

    def _operation_context(
        self, key: Digest | str, *, intent: Intent = Intent.WRITE
    ) -> contextlib.AbstractContextManager[None]:
        """Context manager entered around every operation on ``key``.

        The base implementation is a no-op. Override in a mixin to inject any resource scoped to
        the operation: a threading lock, a SQLAlchemy session, an open file handle. Receiving
        ``key`` lets implementations choose between one global resource and per-key resources;
        ``intent`` says whether the operation writes. Chain with ``super()`` so every mixin in the
        MRO wraps the operation::

            @contextlib.contextmanager
            def _operation_context(self, key, *, intent=Intent.WRITE):
                with self._lock:
                    with super()._operation_context(key, intent=intent):
                        yield
        """
        return _NO_CONTEXT


def _check_key_text(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a key must be a str or Digest, got {type(key).__name__}: {key!r}")
    if isinstance(key, Digest):
        return key
    try:
        return Digest(key)
    except ValueError:
        raise ValueError(
            f"invalid key {key!r}: keys are lowercase hex digests of up to {DIGEST_LENGTH} "
            f"characters (prefixes of at least {MIN_PREFIX_LENGTH})"
        ) from None


class KeyManagement(OperationContext):
    """Abstract base providing key-management helpers for any keyed storage.

    Subclasses implement :meth:`list`, :meth:`_evict` and :meth:`_contains`; :meth:`evict`,
    :meth:`contains`, :meth:`expand` and :meth:`shrink` are implemented here once. Every public
    operation enters :meth:`_operation_context` around the work it does, so mixins can inject an
    operation-scoped resource without overriding every method.

    Wherever a key is taken, a unique prefix of at least four characters (a *short digest*)
    works too.
    """

    @abc.abstractmethod
    def list(self) -> Iterable[Digest]:
        """Every stored key (a snapshot; entries may come and go while you iterate)."""

    @abc.abstractmethod
    def _evict(self, key: Digest) -> None:
        """Remove ``key``; raise ``KeyError`` if it is not stored."""

    @abc.abstractmethod
    def _contains(self, key: Digest) -> bool:
        """Whether the full key ``key`` is stored."""

    def evict(self, key: Digest | str) -> None:
        """Removes the entry corresponding to the key from the storage.

        Raises ``KeyError`` if nothing is stored under ``key``. Atomic with respect to other
        operations on the same key in every thread and process that shares the storage's locks.
        """
        key = self._normalize_key(key)
        with self._operation_context(key):
            self._evict(key)

    @contextlib.contextmanager
    def locked(self, key: Digest | str) -> Iterator[Digest]:
        """Hold ``key``'s write lock for a compound section (read-modify-write, compute-once).

        Yields the full key. Excludes every operation that takes the same lock: the same key's
        writes and ``locked`` sections in other threads and, for storages with inter-process
        locks, in other processes. Reentrant for the holding thread, so the section may save and
        evict ``key`` itself. What it excludes depends on the mixins; a storage without locking
        mixins excludes nothing.
        """
        key = self._normalize_key(key)
        with self._operation_context(key):
            yield key

    def contains(self, key: Digest | str) -> bool:
        """Whether an entry is stored under ``key`` (full or short); a snapshot that another
        thread or process may change at once."""
        try:
            key = self._normalize_key(key)
        except KeyError:
            return False
        with self._operation_context(key, intent=Intent.READ):
            return self._contains(key)

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        """The full keys of those among ``keys`` (full or short) that are stored.

        A snapshot, like :meth:`contains`; a short key no stored key starts with is left out.
        Note for implementers: this default asks :meth:`contains` key by key; a backend that can
        answer for many keys at once (one SQL query, one listing) overrides it.
        """
        found: set[Digest] = set()
        for key in keys:
            try:
                full = self._normalize_key(key)
            except KeyError:
                continue
            if self.contains(full):
                found.add(full)
        return found

    def expand(self, key: Digest | str) -> Digest:
        """Expands a short-hand digest to the full length one.

        A full-length key is returned as it is, stored or not. A prefix must have at least four
        characters; raises ``KeyError`` if no stored key starts with it and
        :class:`AmbiguousDigestError` if several do. Lists the storage (O(n)) for prefixes.
        """
        text = _check_key_text(key)
        if len(text) == DIGEST_LENGTH:
            return _mk(text)
        if len(text) < MIN_PREFIX_LENGTH:
            raise ValueError(
                f"short digest {text!r} is too short: give at least {MIN_PREFIX_LENGTH} characters"
            )
        with self._operation_context(text, intent=Intent.READ):
            matches = [k for k in self.list() if k.startswith(text)]
        return _unique_match(text, matches)

    @overload
    def shrink(self, key: Digest | str, /) -> Digest: ...
    @overload
    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> tuple[Digest, ...]: ...

    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> Digest | tuple[Digest, ...]:
        """Find the shortest substring(s) that unambiguously reference each key.

        With a single key, returns one :class:`Digest`; with several, a tuple in the same order.
        Raises ``KeyError`` for a key that is not stored (its prefix could not be expanded
        again). The batched form lists the storage once instead of per key, which matters where
        listing is expensive. Never shorter than four characters. A snapshot: a key stored later
        may make a returned prefix ambiguous, one evicted meanwhile may still be shrunk.
        """
        full = [self._normalize_key(k) for k in (key, *keys)]
        with self._operation_context(full[0], intent=Intent.READ):  # one listing for all keys
            sorted_all = sorted(self.list())
        shrunk = tuple(self._shrink_one(_stored_in(k, sorted_all), sorted_all) for k in full)
        return shrunk if keys else shrunk[0]

    def _shrink_one(self, key: Digest | str, sorted_all: Sequence[str]) -> Digest:
        """Shortest prefix of ``key`` that no other key in ``sorted_all`` shares."""
        i = bisect.bisect_left(sorted_all, key)
        common = 0
        for j in (i - 1, i, i + 1):
            if 0 <= j < len(sorted_all) and sorted_all[j] != key:
                common = max(common, _common_prefix(key, sorted_all[j]))
        return _mk(key[: max(MIN_PREFIX_LENGTH, common + 1)])

    def sweep(self, older_than: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Remove what writers killed mid-write left behind (older than ``older_than`` seconds)
        and return where it was; never touches entries, so it is safe while others write.

        Note for implementers: this default has nothing to sweep and returns ``[]``; storages
        whose writes leave temporary files (``FileStorage``) override it.
        """
        return []

    def close(self) -> None:
        """Release what this handle holds open in this process (connections, file handles).

        The storage stays usable: the next operation opens what it needs again. Other handles
        and other processes are not affected. Note for implementers: this default has nothing
        to close.
        """

    def volume(self) -> int | None:
        """Bytes the storage takes where it keeps its entries (its files, its database), or
        ``None`` where it cannot say; a snapshot, which other threads and processes change.

        Note for implementers: this default cannot say (``None``); storages that can override
        it, stating what they count.
        """
        return None

    def usage(self) -> dict[Digest, EntryUsage]:
        """Every stored key with the bytes its entry takes and when it was last saved or
        touched (see :meth:`touch`): a snapshot of one listing, O(entries); entries saved or
        evicted meanwhile may or may not be in it. What a
        :class:`~fleche.limits.SizeLimitedCache` keeps within its budget.

        Note for implementers: this default cannot say and raises ``NotImplementedError``;
        storages that can be size-limited override it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot say how many bytes its entries take or when they "
            "were used, so it cannot be size-limited"
        )

    def touch(self, keys: Iterable[Digest | str], when: float | None = None) -> None:
        """Record that the entries under ``keys`` were used at ``when`` (seconds since the
        epoch, default now), so :meth:`usage` says so; keys not stored are skipped, and a use
        recorded later than ``when`` is kept. Changes no entry: safe at any time, from any
        thread and process; two processes touching one key at once both succeed.

        Note for implementers: this default records nothing (every entry counts as used when
        it was saved, where the storage knows that).
        """

    def _full_keys(self, keys: Iterable[Digest | str]) -> list[Digest]:
        """``keys`` as full keys, leaving out short ones no stored key starts with."""
        full = []
        for key in keys:
            try:
                full.append(self._normalize_key(key))
            except KeyError:
                continue
        return full

    def _normalize_key(self, key: Digest | str) -> Digest:
        """Expand a short digest prefix to a full key, or wrap a full key as Digest.

        Raises ``TypeError``/``ValueError`` for something that is not a digest, before any
        storage is touched.
        """
        if type(key) is Digest and len(key) == DIGEST_LENGTH:
            return key
        text = _check_key_text(key)
        return _mk(text) if len(text) == DIGEST_LENGTH else self.expand(text)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _stored_in(key: Digest, sorted_keys: Sequence[str]) -> Digest:
    """``key``, if the sorted listing ``sorted_keys`` holds it; else ``KeyError``."""
    i = bisect.bisect_left(sorted_keys, key)
    if i == len(sorted_keys) or sorted_keys[i] != key:
        raise KeyError(f"nothing stored under {key}: only stored keys can be shrunk")
    return key


def _unique_match(prefix: str, matches: Sequence[str]) -> Digest:
    if not matches:
        raise KeyError(f"no stored key starts with {prefix!r}")
    if len(matches) > 1:
        ordered = sorted(matches)
        needed = max(_common_prefix(a, b) for a, b in zip(ordered, ordered[1:])) + 1
        raise AmbiguousDigestError(
            f"short digest {prefix!r} matches {len(matches)} stored keys; "
            f"give at least {needed} characters to tell them apart"
        )
    return _mk(matches[0])


class StorageBackend(KeyManagement):
    """Primitive backend interface for key-value storage.

    Backends implement the low-level ``put``/``get``/``_evict``/``list`` operations on full keys,
    without locking; higher-level classes (:class:`ValueMixin`, :class:`CallMixin`) add the
    domain logic and enter the operation context.
    """

    @abc.abstractmethod
    def put(self, value: Any, key: Digest) -> Digest:
        """Store ``value`` under ``key``, replacing any entry; return ``key``."""

    @abc.abstractmethod
    def get(self, key: Digest) -> Any:
        """Return the value stored under ``key``; raise ``KeyError`` if there is none."""

    def _location(self, key: Digest) -> str:
        """Where the entry ``key`` lives, as errors name it (a file storage: its path).

        Note for implementers: this default names the storage itself."""
        return repr(self)

    def _contains(self, key: Digest) -> bool:
        """Note for implementers: this default reads the whole entry; override it with a cheap
        existence check."""
        try:
            self.get(key)
        except KeyError:
            return False
        return True


class ValueStorage(KeyManagement):
    """Abstract domain interface for value storage: values stored under their content digest."""

    @abc.abstractmethod
    def save(self, value: Any, key: Digest | None = None) -> Digest:
        """Store ``value`` under ``key`` (default: ``digest(value)``) and return the key."""

    @abc.abstractmethod
    def load(self, key: Digest | str) -> Any:
        """Return the value stored under ``key`` (full or short); ``KeyError`` if absent."""

    def child_digests(self, key: Digest | str) -> set[Digest]:
        """The keys of the separately stored parts that the entry under ``key`` refers to.

        Reads the entry itself, not its parts: ``KeyError`` if it is not stored,
        ``CorruptEntryError`` if it is damaged; what :meth:`~fleche.caches.Cache.gc` and
        :func:`~fleche.verify.verify` follow. A snapshot, like :meth:`load`. Note for
        implementers: this default is for storages that keep every value whole: it loads the
        value (to check it) and reports no parts; storages that store parts separately
        (``DestructuringMixin``) override it.
        """
        self.load(key)
        return set()


class ValueMixin(ValueStorage, StorageBackend):
    """Bridges :class:`ValueStorage` with :class:`StorageBackend` primitives.

    Implements ``save`` and ``load`` using ``put`` and ``get``. Concrete classes inherit from
    this and a :class:`StorageBackend` implementation to get a fully functional value storage.
    """

    def save(self, value: Any, key: Digest | None = None) -> Digest:
        """Store ``value`` and return its key (``digest(value)`` unless given).

        Atomic per key: concurrent saves of the same key in threads or processes sharing the
        storage's locks are serialized and a reader sees one whole value or the other.
        """
        key = digest(value) if key is None else self._normalize_key(key)
        with self._operation_context(key):
            return self.put(value, key)

    def load(self, key: Digest | str) -> Any:
        """Return the value stored under ``key`` (full or short); ``KeyError`` if absent.

        Never returns a partially written value, whatever other threads or processes write.
        """
        key = self._normalize_key(key)
        with self._operation_context(key, intent=Intent.READ):
            return self.get(key)


def start_text(call: Call) -> str:
    """The ``start`` of a call's ``runtime`` metadata as text (ISO 8601, so it sorts by time),
    ``""`` for a call recorded without one: what "newest" orders calls by."""
    runtime = (call.metadata or {}).get("runtime")
    return str(runtime.get("start", "")) if isinstance(runtime, dict) else ""


def newest_first(calls: Iterable[tuple[Digest, Call]], limit: int) -> list[Digest]:
    """The keys of the ``limit`` calls among ``(key, call)`` pairs started last, newest first;
    ties keep the pairs' order, calls without a start come last."""
    if limit < 0:
        raise ValueError(f"limit must be 0 or more, got {limit}")
    return [key for key, _ in heapq.nlargest(limit, calls, key=lambda kc: start_text(kc[1]))]


class CallStorage(KeyManagement):
    """Abstract domain interface for call storage: :class:`DigestedCall` records by lookup key."""

    keeps_inline_values: bool = False
    """Whether a saved record's ``inline`` values come back on load (pickled whole, not by
    reference), so a cache may keep small values in the record instead of the value storage."""

    @abc.abstractmethod
    def save(self, call: DigestedCall) -> Digest:
        """Store ``call`` under its lookup key, replacing an earlier record; return the key."""

    @abc.abstractmethod
    def load(self, key: Digest | str) -> DigestedCall:
        """Return the record stored under ``key`` (full or short); ``KeyError`` if absent."""

    @abc.abstractmethod
    def query(self, template: QueryCall) -> Iterable[DigestedCall]:
        """Every stored call that matches ``template``."""

    def save_together(self, key: Digest, values: ValueStorage, write: Callable[[], T]) -> T:
        """Run ``write``, which stores the values of the call ``key`` in ``values`` and then its
        record here (what ``Cache.save`` does), and return what it returns.

        A storage that can write both in one transaction overrides this, so the values and the
        record commit together or not at all in every process, and it may run ``write`` again
        after a transient conflict (so ``write`` must be repeatable). Note for implementers:
        this default runs ``write`` once, as it is: each value and the record are written by
        their own operations, values first, so a reader never finds the record without its
        values, and values written before a failure stay until ``gc``.
        """
        return write()

    def counts_volume_of(self, values: ValueStorage) -> bool:
        """Whether this storage's :meth:`volume` already counts what ``values`` keeps (values
        in the same database), so a cache of both counts those bytes once.

        Note for implementers: this default says no: the two storages keep their entries in
        different places.
        """
        return False

    def newest(self, limit: int) -> list[Digest]:
        """The keys of the ``limit`` calls started last (their ``runtime`` metadata's
        ``start``), newest first; calls without a start come last, unreadable records are
        left out. A snapshot: calls saved or evicted meanwhile may or may not count.

        Note for implementers: this default reads every record (O(entries), through
        :meth:`query`, record by record past a damaged one); a storage that keeps the start in
        an index overrides it.
        """
        try:
            return newest_first(((c.to_lookup_key(), c) for c in self.query(QueryCall())), limit)
        except CorruptEntryError:
            return newest_first(self._readable_records(), limit)

    def _readable_records(self) -> Iterator[tuple[Digest, DigestedCall]]:
        for key in list(self.list()):
            try:
                yield key, self.load(key)
            except (KeyError, CorruptEntryError):  # evicted since listed, or damaged
                continue

    def transform(
        self, func: Callable[[DigestedCall], DigestedCall] | None = None
    ) -> None:
        """Applies a transformation function to all DigestedCall objects in the storage.

        ``func`` takes a :class:`DigestedCall` and returns the transformed one; ``None`` keeps
        each call as it is, which re-derives every key (useful after the key scheme changed).
        A re-keyed call is saved under its new key before the old key is evicted, so no reader
        ever finds it missing. Not atomic as a whole: calls saved concurrently may be missed.
        """
        for key in list(self.list()):
            try:
                call = self.load(key)
            except KeyError:
                continue  # evicted since we listed
            new = func(call) if func is not None else call
            new_key = self.save(new)
            if new_key != key:
                with contextlib.suppress(KeyError):
                    self.evict(key)


class CallMixin(CallStorage, StorageBackend):
    """Bridges :class:`CallStorage` with :class:`StorageBackend` primitives.

    Implements ``save``, ``load`` and ``query`` using ``put`` and ``get``, deriving the storage
    key from the call's lookup key. ``transform`` is inherited from :class:`CallStorage`.
    """

    def save(self, call: DigestedCall | Call) -> Digest:
        """Store the record under its lookup key and return the key.

        A plain :class:`Call` is digested first. Atomic per key: a reader in any thread or process
        sees the old record or the new one, never neither.
        """
        if not isinstance(call, Call):
            raise TypeError(f"a call storage saves Call records, got {type(call).__name__}")
        record = call.digest()
        key = record.to_lookup_key()
        with self._operation_context(key):
            return self.put(record, key)

    def load(self, key: Digest | str) -> DigestedCall:
        """Return the record stored under ``key``; ``KeyError`` if absent.

        ``CorruptEntryError`` if the entry is damaged, or intact but not a call record (a value
        written there by a value storage on the same directory, a planted file).
        """
        key = self._normalize_key(key)
        with self._operation_context(key, intent=Intent.READ):
            record = self.get(key)
        if not isinstance(record, DigestedCall):
            raise _not_a_call_record(record, key, self._location(key))
        return record

    def query(self, template: QueryCall) -> Iterator[DigestedCall]:
        """Find cached calls that 'match' the template.

        Returns all calls where the given arguments, results or metadata match exactly the stored
        ones; values may be given either as they are or as :class:`Digest`; ``None`` fields are
        wildcards. Loads every stored call (O(n)); calls saved or evicted while it runs may or may
        not be seen.
        """
        for key in list(self.list()):
            try:
                call = self.load(key)
            except KeyError:
                continue
            if template.matches(call):
                yield call


def _not_a_call_record(value: Any, key: str, location: str) -> CorruptEntryError:
    """The error for an intact entry that holds something other than a call record (a value
    written there by a value storage on the same directory, a planted file)."""
    from .destructuring import Digested  # builds on this module

    kind = value.kind if isinstance(value, Digested) else type(value)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return CorruptEntryError(key, location, f"holds {article} {name}, not a call record")
