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
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .call import Call, DigestedCall, LazyArguments, QueryCall
from .digest import Digest
from .errors import FlecheError
from .storage.base import CallStorage, Intent, OperationContext, ValueStorage, _unique_match
from .storage.memory import CallMemory, ValueMemory

__all__ = [
    "BaseCache",
    "Cache",
    "CacheStack",
    "CacheWrapper",
    "ReadOnlyCache",
    "ReadOnlyError",
    "memory_cache",
]


class ReadOnlyError(FlecheError, PermissionError):
    """A write (save, evict, gc) was attempted on a read-only cache."""


class BaseCache(OperationContext):
    """The cache layer: stores whole calls (record plus values) and finds them again.

    Keys are call lookup keys; wherever a key is taken, a unique prefix of at least four
    characters works too.
    """

    writable: bool = True
    """Whether saves and evictions are allowed (the decorator skips saving when not)."""

    @abc.abstractmethod
    def save(self, call: Call) -> Digest:
        """Store the call with its argument and result values; return its lookup key."""

    @abc.abstractmethod
    def load(self, key: Digest | str) -> Call:
        """The stored call with its values; ``KeyError`` if the record or a value is missing."""

    @abc.abstractmethod
    def load_result(self, key: Digest | str) -> Any:
        """Only the stored result of the call under ``key``; ``KeyError`` if absent."""

    @abc.abstractmethod
    def contains(self, key: Digest | str) -> bool:
        """Whether a call record is stored under ``key``."""

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

    @abc.abstractmethod
    def evict(self, key: Digest | str) -> None:
        """Remove the call record under ``key`` (values stay until :meth:`gc`)."""

    @abc.abstractmethod
    def expand(self, key: Digest | str) -> Digest:
        """The full call key a unique prefix stands for."""

    @abc.abstractmethod
    def list(self) -> Iterable[Digest]:
        """Every stored call key (a snapshot)."""

    @abc.abstractmethod
    def query(self, template: QueryCall | None = None, **arguments: Any) -> Iterator[Call]:
        """Stored calls matching ``template`` and the given argument values, values loaded."""

    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> Digest | tuple[Digest, ...]:
        """Shortest unique prefixes of call keys (see ``KeyManagement.shrink``)."""
        return self._calls_view().shrink(key, *keys)

    def _calls_view(self) -> Any:
        raise NotImplementedError

    @staticmethod
    def _template(template: QueryCall | None, arguments: dict[str, Any]) -> QueryCall:
        template = template or QueryCall()
        if arguments:
            merged = {**(template.arguments or {}), **arguments}
            template = dataclasses.replace(template, arguments=merged)
        return template


def _values_of(record: DigestedCall) -> list[Digest]:
    return [*record.arguments.values(), record.result]


def _fits(value: Any, budget: int) -> int | None:
    """Roughly how many bytes ``value`` pickles to, if it is a plain value under ``budget``."""
    t = type(value)
    if value is None or t is bool or t is float or t is complex:
        return 9
    if t is int:
        return value.bit_length() // 8 + 9 if value.bit_length() < 8 * budget else None
    if t is str or t is bytes:
        return len(value) + 9 if len(value) < budget else None
    if t in (tuple, list, set, frozenset):
        total = 4
        for item in value:
            size = _fits(item, budget - total)
            if size is None:
                return None
            total += size
        return total if total < budget else None
    if t is dict:
        total = 4
        for k, item in value.items():
            ks = _fits(k, budget - total)
            vs = None if ks is None else _fits(item, budget - total - ks)
            if vs is None:
                return None
            total += ks + vs
        return total if total < budget else None
    # numpy arrays and scalars only: pandas objects have nbytes too, but not always numpy dtypes
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        return None if value.dtype.hasobject or value.nbytes >= budget else value.nbytes + 128
    return None


@dataclass(frozen=True)
class Cache(BaseCache):
    """A value storage and a call storage used together.

    Pickles as its two storages, so a cache can be shipped to worker processes; what it
    guarantees across processes is what its storages guarantee.

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

    def save(self, call: Call, *, overwrite: bool = False) -> Digest:
        """Store the values, then the record; return the call's lookup key.

        A reader in any thread or process never finds the record without its values. Values
        already stored are not written again (their key is their content) unless ``overwrite``,
        which rewrites them, e.g. to repair a corrupt entry. If a value cannot be stored
        (``SaveError``), the record is not written; values already written stay until :meth:`gc`.
        """
        record = call.digest()
        key = record.to_lookup_key()
        limit = self.inline_bytes if self.calls.keeps_inline_values else 0
        inline: dict[Digest, Any] = {}
        arguments = call.arguments
        with self._operation_context(key):
            for name, value_key in record.arguments.items():
                self._store_value(lambda n=name: arguments[n], value_key, limit, inline, overwrite)
            self._store_value(lambda: call.result, record.result, limit, inline, overwrite)
            self.calls.save(record.replace(inline=inline or None) if inline else record)
        return key

    def _store_value(
        self, get: Any, key: Digest, limit: int, inline: dict, overwrite: bool
    ) -> None:
        if key in inline:
            return
        value = get()
        if limit and _fits(value, limit) is not None:
            inline[key] = value
        elif overwrite or not self.values.contains(key):
            self.values.save(value, key)

    def locked(self, key: Digest | str) -> contextlib.AbstractContextManager[Digest]:
        """Hold the call key's lock in the call storage (see ``KeyManagement.locked``): the
        compute-once section of the decorator. Saving the same call inside it is allowed."""
        return self.calls.locked(key)

    def discard(self, key: Digest | str) -> None:
        """Remove the entry ``key`` from whichever storage holds it (a call record or a value);
        used to clear a corrupt entry. Does nothing if neither has it."""
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
        return self.calls.contains(key)

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        """The stored ones among ``keys``: one batch question to the call storage."""
        return self.calls.contains_many(keys)

    def evict(self, key: Digest | str) -> None:
        key = self.calls._normalize_key(key)
        with self._operation_context(key):
            self.calls.evict(key)

    def expand(self, key: Digest | str) -> Digest:
        return self.calls.expand(key)

    def list(self) -> Iterable[Digest]:
        return self.calls.list()

    def _calls_view(self) -> CallStorage:
        return self.calls

    def query(self, template: QueryCall | None = None, **arguments: Any) -> Iterator[Call]:
        """Stored calls matching the template, arguments loaded lazily. O(n) for storages that
        cannot filter themselves; calls saved or evicted meanwhile may or may not appear."""
        for record in self.calls.query(self._template(template, arguments)):
            try:
                yield self._loaded(record)
            except KeyError:
                continue  # result value gone (evicted or gc'd concurrently)

    def transfer(
        self, other: BaseCache, *, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """Copy every call and its values into ``other``, skipping calls it already has.

        Returns the number of calls copied. ``progress(done, total)`` is called after each call
        looked at, copied or not. Safe to run while others use either cache; calls saved
        meanwhile may or may not be copied. A corrupt entry raises ``CorruptEntryError`` and
        stops the copy; what was copied stays, so running it again resumes.
        """
        copied = 0
        keys = list(self.calls.list())
        for done, key in enumerate(keys, 1):
            if not other.contains(key):
                try:
                    other.save(self.load(key))
                    copied += 1
                except KeyError:
                    pass
            if progress is not None:
                progress(done, len(keys))
        return copied

    def gc(self, dry_run: bool = False) -> list[Digest]:
        """Remove values that no stored call refers to, directly or as a part; return their keys.

        File storages also lose temporary files that writers killed mid-write left behind
        (older than an hour). Lists the values first and the calls after, so a value is kept if
        any call stored before gc finished reading the calls needs it. A call being saved while gc runs may lose
        a value it just wrote; it then reads as a miss and is recomputed. O(calls + values).
        """
        candidates = set(self.values.list())
        reachable: set[Digest] = set()
        pending = [d for key in list(self.calls.list()) for d in self._record_values(key)]
        children = getattr(self.values, "child_digests", None)
        while pending:
            key = pending.pop()
            if key in reachable:
                continue
            reachable.add(key)
            if children is not None:
                with contextlib.suppress(KeyError):
                    pending.extend(children(key))
        garbage = sorted(candidates - reachable)
        if not dry_run:
            for key in garbage:
                with contextlib.suppress(KeyError):
                    self.values.evict(key)
            for storage in (self.values, self.calls):
                sweep = getattr(storage, "sweep", None)  # file storages: writers' leftovers
                if sweep is not None:
                    sweep()
        return garbage

    def _record_values(self, key: Digest) -> list[Digest]:
        try:
            return _values_of(self.calls.load(key))
        except KeyError:
            return []


def memory_cache() -> Cache:
    """A new cache in this process's memory."""
    return Cache(ValueMemory(), CallMemory())


@dataclass(frozen=True)
class CacheStack(BaseCache):
    """Caches tried in order: reads fall through, hits are copied back up.

    ``layers[0]`` is the fastest. A read tries each layer in order and saves a hit found in a
    lower layer into every layer above it. A save goes to the first layer and, with
    ``write_through=True`` (the default), to every other layer too; with ``write_through=False``
    lower layers only receive what :meth:`flush` copies down.
    """

    layers: Sequence[BaseCache]
    write_through: bool = True

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a CacheStack needs at least one layer")
        object.__setattr__(self, "layers", tuple(self.layers))

    def save(self, call: Call) -> Digest:
        targets = self.layers if self.write_through else self.layers[:1]
        keys = [layer.save(call) for layer in targets if layer.writable]
        if not keys:
            raise ReadOnlyError("no layer of this CacheStack accepts writes")
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

    def evict(self, key: Digest | str) -> None:
        """Evict from every layer that has the call; ``KeyError`` if none had it."""
        found = False
        for layer in self.layers:
            try:
                layer.evict(key)
                found = True
            except KeyError:
                continue
        if not found:
            raise KeyError(f"no call stored under {key} in any layer")

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

    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> Digest | tuple[Digest, ...]:
        view = CallMemory(storage=dict.fromkeys(self.list()))
        return view.shrink(self.expand(key), *(self.expand(k) for k in keys))

    def query(self, template: QueryCall | None = None, **arguments: Any) -> Iterator[Call]:
        seen = set()
        for layer in self.layers:
            for call in layer.query(template, **arguments):
                key = call.to_lookup_key()
                if key not in seen:
                    seen.add(key)
                    yield call

    def flush(self) -> int:
        """Copy what the first layer has into every lower layer; return the number copied."""
        first = self.layers[0]
        if not isinstance(first, Cache):
            raise TypeError("flush needs a Cache as the first layer")
        return sum(first.transfer(layer) for layer in self.layers[1:] if layer.writable)


@dataclass(frozen=True)
class CacheWrapper(BaseCache):
    """Forwards every operation to ``cache``; subclasses override what they change.

    Attributes the wrapper does not define (``values``, ``calls``, ``gc``, ``transfer``...) are
    looked up on the wrapped cache.
    """

    cache: BaseCache

    @property
    def writable(self) -> bool:  # type: ignore[override]
        return self.cache.writable

    def save(self, call: Call) -> Digest:
        return self.cache.save(call)

    def load(self, key: Digest | str) -> Call:
        return self.cache.load(key)

    def load_result(self, key: Digest | str) -> Any:
        return self.cache.load_result(key)

    def contains(self, key: Digest | str) -> bool:
        return self.cache.contains(key)

    def contains_many(self, keys: Iterable[Digest | str]) -> set[Digest]:
        return self.cache.contains_many(keys)

    def evict(self, key: Digest | str) -> None:
        self.cache.evict(key)

    def expand(self, key: Digest | str) -> Digest:
        return self.cache.expand(key)

    def list(self) -> Iterable[Digest]:
        return self.cache.list()

    def shrink(self, key: Digest | str, /, *keys: Digest | str) -> Digest | tuple[Digest, ...]:
        return self.cache.shrink(key, *keys)

    def query(self, template: QueryCall | None = None, **arguments: Any) -> Iterator[Call]:
        return self.cache.query(template, **arguments)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "cache":  # not during unpickling, not private
            raise AttributeError(name)
        return getattr(self.cache, name)


@dataclass(frozen=True)
class ReadOnlyCache(CacheWrapper):
    """A view of ``cache`` that loads and queries but refuses to save, evict or collect."""

    @property
    def writable(self) -> bool:  # type: ignore[override]
        return False

    def _refuse(self, what: str) -> ReadOnlyError:
        return ReadOnlyError(f"cannot {what}: this cache is read-only ({self.cache!r})")

    def save(self, call: Call) -> Digest:
        raise self._refuse(f"save a call of {call.name}")

    def evict(self, key: Digest | str) -> None:
        raise self._refuse(f"evict {key}")

    def gc(self, dry_run: bool = False) -> list[Digest]:
        raise self._refuse("collect garbage")

    def transfer(self, other: BaseCache, **options: Any) -> int:
        return self.cache.transfer(other, **options)  # reads only from this cache
