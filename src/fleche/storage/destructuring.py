"""Destructuring: store the parts of nested containers separately, and share them.

A list, tuple, dict, dataclass or attrs instance is saved as a small wrapper
(:class:`DigestedIterable`, :class:`DigestedDict` or :class:`DigestedObject`) whose elements are
the :class:`~fleche.digest.Digest` keys of the separately stored elements. Equal sub-values are
stored once, whichever containers hold them, and the wrapper's key is the digest of the whole
value (digests are Merkle trees, so the two agree).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..digest import Digest, digest, digest_mapping, digest_object, digest_sequence
from .base import SaveError, ValueStorage
from .sizes import small_pickle_size

__all__ = [
    "DestructuringMixin",
    "Digested",
    "DigestedDict",
    "DigestedIterable",
    "DigestedObject",
    "register_destructurer",
]

Intern = Callable[[Any], tuple[Any, int | float]]


class Digested:
    """Base of the stored wrappers of destructured containers.

    ``items`` hold either plain (inlined) values or :class:`Digest` references to separately
    stored ones. Subclasses know how to compute the container's key and rebuild it.
    """

    __slots__ = ()

    def references(self) -> Iterable[Any]:
        """Every element slot (inlined value or :class:`Digest`)."""
        raise NotImplementedError

    def key(self) -> Digest:
        """The digest of the container this wrapper stands for."""
        raise NotImplementedError

    def mend(self, load: Callable[[Digest], Any]) -> Any:
        """Rebuild the container, loading referenced elements with ``load``."""
        raise NotImplementedError


def _all_inline(raw: Digested) -> bool:
    """Whether no element of ``raw`` is a reference to a separately stored value."""
    return not any(isinstance(x, Digest) for x in raw.references())


def _resolve(item: Any, load: Callable[[Digest], Any]) -> Any:
    return load(item) if isinstance(item, Digest) else item


@dataclass(frozen=True, slots=True)
class DigestedIterable(Digested):
    """A destructured list or tuple (``kind``)."""

    kind: type
    items: tuple[Any, ...]

    def references(self) -> Iterable[Any]:
        return self.items

    def key(self) -> Digest:
        return digest_sequence(self.kind, [digest(x) for x in self.items])

    def mend(self, load: Callable[[Digest], Any]) -> Any:
        return self.kind(_resolve(x, load) for x in self.items)


@dataclass(frozen=True, slots=True)
class DigestedDict(Digested):
    """A destructured dict: keys kept as they are, values inlined or referenced."""

    kind: type
    items: tuple[tuple[Any, Any], ...]

    def references(self) -> Iterable[Any]:
        return (v for _, v in self.items)

    def key(self) -> Digest:
        return digest_mapping(self.kind, [(digest(k), digest(v)) for k, v in self.items])

    def mend(self, load: Callable[[Digest], Any]) -> Any:
        return self.kind((k, _resolve(v, load)) for k, v in self.items)


@dataclass(frozen=True, slots=True)
class DigestedObject(Digested):
    """A destructured dataclass or attrs instance, rebuilt through its constructor."""

    kind: type
    items: tuple[tuple[str, Any], ...]

    def references(self) -> Iterable[Any]:
        return (v for _, v in self.items)

    def key(self) -> Digest:
        return digest_object(self.kind, [(name, digest(v)) for name, v in self.items])

    def mend(self, load: Callable[[Digest], Any]) -> Any:
        return self.kind(**{_init_name(self.kind, n): _resolve(v, load) for n, v in self.items})


def _init_name(cls: type, name: str) -> str:
    for a in getattr(cls, "__attrs_attrs__", ()):
        if a.name == name:
            return getattr(a, "alias", None) or name.lstrip("_")
    return name


def _object_fields(value: Any) -> list[str] | None:
    """Field names of a dataclass/attrs instance its constructor can rebuild, else None."""
    cls = type(value)
    if dataclasses.is_dataclass(cls):
        fields = dataclasses.fields(value)
        if not all(f.init for f in fields):
            return None
        names = [f.name for f in fields]
    else:
        attrs = getattr(cls, "__attrs_attrs__", None)
        if attrs is None or not all(a.init for a in attrs):
            return None
        names = [a.name for a in attrs]
    extra = set(getattr(value, "__dict__", {})) - set(names)
    return None if extra else names


def _intern_children(intern: Intern, items: Iterable[Any]) -> tuple[list[Any], int | float]:
    results, height = [], 0
    for item in items:
        result, depth = intern(item)
        results.append(result)
        height = max(height, depth + 1)
    return results, height


def _sequence(intern: Intern, value: Any) -> tuple[Digested, int | float]:
    items, height = _intern_children(intern, value)
    return DigestedIterable(type(value), tuple(items)), height


def _mapping(intern: Intern, value: Any) -> tuple[Digested, int | float]:
    keys = list(value)
    items, height = _intern_children(intern, (value[k] for k in keys))
    return DigestedDict(type(value), tuple(zip(keys, items))), height


def _object(intern: Intern, value: Any) -> tuple[Digested, int | float]:
    names = _object_fields(value)
    assert names is not None
    items, height = _intern_children(intern, (getattr(value, n) for n in names))
    return DigestedObject(type(value), tuple(zip(names, items))), height


Destructurer = Callable[[Intern, Any], tuple[Digested, int | float]]

_DESTRUCTURERS: list[tuple[Callable[[Any], bool], Destructurer]] = [
    (lambda v: type(v) in (list, tuple), _sequence),
    (lambda v: type(v) is dict, _mapping),
    (lambda v: not isinstance(v, type) and _object_fields(v) is not None, _object),
]


def register_destructurer(pred: Callable[[Any], bool], fn: Destructurer) -> None:
    """Register a custom container destructurer.

    ``pred(value)`` returns ``True`` for values this destructurer handles. ``fn(intern, value)``
    calls ``intern(element)`` for each element (getting ``(result, depth)``), and returns
    ``(wrapper, height)``: a :class:`Digested` wrapper holding the results, and one more than the
    largest element depth. Entries are appended after the built-in ones; first match wins, so a
    handler for an entirely new container type is safe without displacing list/dict/dataclass/attrs.
    Call before any ``DestructuringMixin`` instance is used, in every process.
    """
    _DESTRUCTURERS.append((pred, fn))


def _destructurer(value: Any) -> Destructurer | None:
    for pred, fn in _DESTRUCTURERS:
        if pred(value):
            return fn
    return None


@dataclass(frozen=True)
class DestructuringMixin(ValueStorage):
    """Mixin that recursively destructures collections on save/load.

    Place before a ``ValueMixin`` in the MRO to add destructuring behavior. Lists, tuples, dicts,
    dataclasses and attrs instances are broken apart so each element is stored independently;
    on load the original structure is reassembled. Sub-trees less than ``remaining_depth`` levels
    high are kept inline in their parent instead (0, the default, stores every element
    separately); with ``remaining_depth >= 1`` a container whose elements are all inline is
    stored as the plain container, an entry without parts (what ``_raw_sub_digests`` calls a
    plain, non-destructured container). ``inline_parts`` keeps parts inline by size as well:
    a part that pickles to fewer than about that many bytes (a number, a short string, a small
    array, a small container of such) stays in its container's entry, so a list of 5000
    numbers is one entry instead of 5001, while large parts are still stored apart and shared.
    Such a part counts as a leaf (height 0) for ``remaining_depth``; 0, the default, decides by
    ``remaining_depth`` alone. A :class:`Digest` inside a value is a reference to the stored
    value it names.

    Example

    >>> from fleche.storage.base import ValueMixin
    >>> from fleche.storage.memory import MemoryBackend
    >>> @dataclass(frozen=True)
    ... class MyValueStorage(DestructuringMixin, ValueMixin, MemoryBackend):
    ...     ...
    >>> vm = MyValueStorage(storage={})
    >>> key = vm.save([1, [2, 3]])
    >>> vm.load(key) == [1, [2, 3]]
    True
    """

    remaining_depth: int = 0
    inline_parts: int = 0

    def _intern_rec(
        self, value: Any, key: Digest | None = None, *, top: bool = False,
        written: set[Digest] | None = None,
    ) -> tuple[Any, int | float]:
        """Post-order traversal: recurse to leaves, decide inline-vs-store on the way back up.

        Returns ``(result, depth)`` where result is the plain value when
        ``depth < remaining_depth`` (the element is inlined in its parent's ``Digested``
        wrapper) or a :class:`Digest` when the element was written to storage separately. Every
        node is visited exactly once. References (:class:`Digest` values) have infinite depth:
        they are never inlined and never stored again. The ``top`` node is always stored.
        """
        if isinstance(value, Digest):
            return value, math.inf
        if key is None and not top and self._small(value):
            return value, 0  # kept whole in its container, as a leaf
        destructure = _destructurer(value)
        if destructure is None:
            raw, depth = value, 0
        elif self.inline_parts and self._small_elements_only(value):
            # What destructuring would store (the plain container), without a call per element.
            raw, depth = value, 1 if value else 0
        else:
            raw, depth = destructure(functools.partial(self._intern_rec, written=written), value)
        if key is None and not top and depth < self.remaining_depth:
            return value, depth
        if key is None:
            # The top key is the value's own digest (a hook or __digest__ may differ from the
            # wrapper's); inner keys come from the children's, so nothing is digested twice.
            key = digest(value) if top or not isinstance(raw, Digested) else raw.key()
        if (self.remaining_depth or self.inline_parts) and isinstance(raw, Digested) and (
            _all_inline(raw)
        ):
            raw = value  # nothing stored apart: the plain container, an entry without parts
        if written is not None:
            # A part that occurs twice in one value is written once: a second write could wait
            # for the first's uncommitted row (one transaction on a database) under a key lock
            # another thread took meanwhile.
            if key in written:
                return key, depth
            written.add(key)
        return super().save(raw, key), depth

    def _small_elements_only(self, value: Any) -> bool:
        """Whether ``value`` is a list, tuple or dict whose elements would all stay in it
        (:meth:`_small`): a list of numbers, a dict of short lists."""
        t = type(value)
        if t is dict:
            items: Iterable[Any] = value.values()
        elif t is list or t is tuple:
            items = value
        else:
            return False
        return all(self._small(x) for x in items)

    def _small(self, value: Any) -> bool:
        """Whether ``value`` is small enough (``inline_parts``) to stay in its container."""
        return bool(self.inline_parts) and (
            small_pickle_size(value, self.inline_parts) is not None
        )

    def save(self, value: Any, key: Digest | None = None) -> Digest:
        """Store ``value`` destructured and return its key (``digest(value)`` unless given).

        Elements are stored before the containers that refer to them, each atomically, so a
        reader that finds a container also finds its elements.
        """
        if isinstance(value, Digest):
            if not self.contains(value) or (key is not None and key != self.expand(value)):
                raise SaveError(f"cannot save a reference to {value}: nothing is stored there")
            return self._normalize_key(value)
        if key is not None:
            key = self._normalize_key(key)
        result, _ = self._intern_rec(value, key, top=True, written=set())
        return result

    def load(self, key: Digest | str) -> Any:
        """Load the entry under ``key`` and reassemble any destructured structure below it."""
        raw = super().load(key)
        return raw.mend(self.load) if isinstance(raw, Digested) else raw

    def _raw_sub_digests(self, raw: Any) -> set[Digest]:
        """Direct digest children of a raw stored entry.

        A raw entry is what ``super().load`` returns, before ``mend()`` rewires sub-digests back
        into their parent container. Only ``Digested`` wrappers carry child references; scalars
        and plain (non-destructured) containers return an empty set.
        """
        if not isinstance(raw, Digested):
            return set()
        return {x for x in raw.references() if isinstance(x, Digest)}

    def child_digests(self, key: Digest | str) -> set[Digest]:
        """Direct digest children of the raw entry stored at ``key``.

        Bypasses ``mend()``, so destructured sub-references are returned as opaque keys rather
        than followed; for reference-graph traversals (GC, debugging). Overrides the
        ``ValueStorage`` default (a whole value, no parts) and reads only this one entry.

        Raises ``KeyError`` if ``key`` is not present in the underlying backend and
        ``CorruptEntryError`` if its entry is damaged.
        """
        return self._raw_sub_digests(super().load(key))

    def count_reuses(self) -> Counter[Digest]:
        """Return a counter of how many times each stored key is referenced as a sub-component.

        Scans every raw entry (O(n) loads) and tallies :class:`Digest` references found inside
        wrappers. A count of 0 means the key is not pointed to by any other stored value (a
        top-level entry); more than 1 means a sub-value shared between containers.

        Example

        >>> from fleche.storage.memory import ValueMemory
        >>> ds = ValueMemory(storage={})
        >>> shared = [2, 3]
        >>> _ = ds.save([1, shared])
        >>> _ = ds.save([4, shared])
        >>> hits = ds.count_reuses()
        >>> hits[ds.save(shared)]  # [2, 3] is referenced by both outer lists
        2
        """
        counts: Counter[Digest] = Counter()
        for key in list(self.list()):
            try:
                children = self.child_digests(key)
            except KeyError:
                continue
            counts[key] += 0
            counts.update(children)
        return counts

