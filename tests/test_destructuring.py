"""Destructuring value storages: parts stored once, structures rebuilt, references followed."""

import dataclasses
from dataclasses import dataclass

import attrs
import pytest

from fleche.digest import digest
from fleche.storage import SaveError, ValueMemory, register_destructurer
from fleche.storage.destructuring import DigestedDict, DigestedIterable, DigestedObject


@dataclass
class Sample:
    name: str
    values: list


@dataclass
class Derived:
    x: int
    twice: int = dataclasses.field(init=False)

    def __post_init__(self):
        self.twice = 2 * self.x


@attrs.define
class AttrsSample:
    a: int
    _b: list


def test_every_part_is_stored_under_its_own_digest():
    values = ValueMemory()
    key = values.save([1, [2, 3]])
    assert key == digest([1, [2, 3]])
    assert set(values.storage) == {digest(v) for v in (1, 2, 3, [2, 3], [1, [2, 3]])}
    raw = values.storage[key]
    assert isinstance(raw, DigestedIterable)
    assert values.child_digests(key) == {digest(1), digest([2, 3])}
    assert values.child_digests(digest(1)) == set()
    with pytest.raises(KeyError):
        values.child_digests(digest("absent"))


@pytest.mark.parametrize(
    "value",
    [
        {"a": (1, 2), "b": [{"c": None}], 3: "three"},
        Sample("s", [1, 2, [3]]),
        AttrsSample(1, [2]),
        Derived(4),
        ([], (), {}),
    ],
)
def test_round_trip_keeps_types(value):
    values = ValueMemory()
    loaded = values.load(values.save(value))
    assert loaded == value and type(loaded) is type(value)


def test_objects_are_destructured_into_fields():
    values = ValueMemory()
    key = values.save(Sample("s", [1]))
    assert isinstance(values.storage[key], DigestedObject)
    assert isinstance(values.storage[values.save({"k": 1})], DigestedDict)
    # A dataclass with init=False fields is stored whole (its constructor cannot rebuild it).
    assert values.storage[values.save(Derived(2))] == Derived(2)


def test_shared_parts_are_stored_once_and_counted():
    values = ValueMemory()
    shared = [2, 3]
    a, b = values.save([1, shared]), values.save({"x": shared})
    counts = values.count_reuses()
    assert counts[digest(shared)] == 2
    assert counts[a] == 0 and counts[b] == 0
    assert counts[digest(2)] == 1


def test_remaining_depth_inlines_small_subtrees():
    values = ValueMemory(remaining_depth=1)
    key = values.save([1, [2, 3]])
    # Leaves are inlined; the inner list and the outer list are entries.
    assert set(values.storage) == {key, digest([2, 3])}
    assert values.load(key) == [1, [2, 3]]
    deep = ValueMemory(remaining_depth=5)
    assert len(deep.storage) == 0
    k = deep.save([1, [2, 3]])
    assert list(deep.storage) == [k] and deep.load(k) == [1, [2, 3]]


def test_digest_inside_a_value_is_a_reference():
    values = ValueMemory()
    inner = values.save([1, 2])
    outer = values.save({"ref": inner, "n": 3})
    assert outer == digest({"ref": [1, 2], "n": 3})
    assert values.load(outer) == {"ref": [1, 2], "n": 3}
    assert values.save(inner) == inner
    with pytest.raises(SaveError, match="nothing is stored"):
        values.save(digest("not stored"))


def test_custom_destructurer():
    class Bag:
        def __init__(self, *items):
            self.items = list(items)

        def __eq__(self, other):
            return isinstance(other, Bag) and self.items == other.items

        def __digest__(self):
            return ("bag", self.items)

    def destructure(intern, bag):
        results = [intern(x) for x in bag.items]
        return (
            DigestedIterable(lambda items: Bag(*items), tuple(r for r, _ in results)),
            1 + max((d for _, d in results), default=0),
        )

    register_destructurer(lambda v: isinstance(v, Bag), destructure)
    values = ValueMemory()
    key = values.save(Bag([1], 2))
    assert key == digest(Bag([1], 2))
    assert values.load(key) == Bag([1], 2)
    assert digest([1]) in values.child_digests(key)


@pytest.mark.parametrize(
    "value", [[1, 2, 3], (1, "a", None), {"a": 1, "b": [2, 3]}, Sample("s", [1, 2])]
)
def test_a_container_of_inline_elements_is_stored_plain(value):
    """With remaining_depth >= 1, a container none of whose elements is stored apart is kept
    as the plain container: an entry without parts (issue 16 A)."""
    values = ValueMemory(remaining_depth=5)
    key = values.save(value)
    assert values.storage[key] == value and type(values.storage[key]) is type(value)
    assert values.child_digests(key) == set()
    assert values.count_reuses() == {key: 0}
    assert values.load(key) == value


def test_only_containers_with_stored_parts_keep_a_wrapper():
    values = ValueMemory(remaining_depth=1)
    key = values.save([[1, 2], [3, 4]])
    raw = values.storage[key]
    assert isinstance(raw, DigestedIterable) and values.child_digests(key) == {
        digest([1, 2]), digest([3, 4])
    }
    assert values.storage[digest([1, 2])] == [1, 2]  # leaves inline: the plain list
    assert values.load(key) == [[1, 2], [3, 4]]


def test_references_keep_their_wrapper_and_depth_zero_is_unchanged():
    values = ValueMemory(remaining_depth=1)
    inner = values.save([1, 2])
    outer = values.save({"ref": inner})
    assert isinstance(values.storage[outer], DigestedDict)
    assert values.child_digests(outer) == {inner}
    every = ValueMemory()  # remaining_depth=0: every element apart, empty containers wrapped
    assert isinstance(every.storage[every.save([])], DigestedIterable)
    assert isinstance(every.storage[every.save([1])], DigestedIterable)


@dataclass(frozen=True)
class _CountingValueMemory(ValueMemory):
    """A memory value storage that counts the writes of each key."""

    writes: dict = dataclasses.field(default_factory=dict)

    def put(self, value, key):
        self.writes[key] = self.writes.get(key, 0) + 1
        return super().put(value, key)


def test_a_part_that_occurs_twice_in_one_value_is_written_once():
    """A repeated part is one write per save: on a database a second write of it could wait for
    the first's uncommitted row under a key lock another thread took meanwhile."""
    storage = _CountingValueMemory()
    part = [1, 2, 3]
    key = storage.save({"a": part, "b": part, "c": [part, [part]]})
    assert storage.load(key) == {"a": part, "b": part, "c": [part, [part]]}
    assert storage.writes[digest(part)] == 1
    assert max(storage.writes.values()) == 1
    storage.save([part, part])  # a new save writes the part again (it may have been evicted)
    assert storage.writes[digest(part)] == 2


def test_inline_parts_keeps_small_parts_in_their_container():
    """Parts under ``inline_parts`` bytes stay in the entry of their container; large ones,
    references and parts that are not plain values are still stored apart, under the same keys
    as without it."""
    vm = ValueMemory(storage={}, inline_parts=64)
    big, sample = b"x" * 1000, Sample(1, "a")
    value = {"numbers": list(range(100)), "pair": (1, "a"), "big": big, "sample": sample}
    key = vm.save(value)
    assert key == digest(value) and vm.load(key) == value
    # The list of 100 numbers is over the budget: one entry, its numbers inside it; the
    # dataclass is not a plain value, so an entry of its own, its small fields inside it.
    assert vm.storage.keys() == {key, digest(list(range(100))), digest(big), digest(sample)}
    assert vm.child_digests(digest(list(range(100)))) == set()
    assert vm.child_digests(key) == {digest(list(range(100))), digest(big), digest(sample)}
    shared = vm.save([big, vm.save("y" * 200)])  # a reference stays a reference
    assert vm.child_digests(shared) == {digest(big), digest("y" * 200)}
    everything_apart = ValueMemory(storage={})
    assert everything_apart.save(value) == key and everything_apart.load(key) == value
    assert len(everything_apart.storage) > len(vm.storage)
