"""Stable content digests: distinctions, stability across processes, extension points."""

import copy
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import http
import json
import math
import os
import pathlib
import pickle
import re
import subprocess
import sys
import types
import uuid
import zoneinfo

import attrs
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleche.digest import (
    DIGEST_LENGTH,
    Digest,
    Indigestible,
    code_digest,
    digest,
    register_digest_hook,
)

SRC = str(pathlib.Path(__file__).resolve().parents[1] / "src")


class Color(enum.Enum):
    RED = 1
    BLUE = 2


class Level(enum.IntEnum):
    LOW = 1


@dataclasses.dataclass
class Point:
    x: float
    y: float


@dataclasses.dataclass
class OtherPoint:
    x: float
    y: float


@attrs.define
class AttrsPoint:
    x: float
    y: float


class Custom:
    def __init__(self, v):
        self.v = v

    def __digest__(self):
        return ("custom", self.v)


class Greeter:
    def greet(self, name):
        return f"hi {name}"

    def __digest__(self):
        return "greeter"


def plain(a, b=1):
    return a + b


def test_digest_is_full_hex():
    d = digest("x")
    assert isinstance(d, Digest) and isinstance(d, str)
    assert len(d) == DIGEST_LENGTH and d.is_full
    assert d == d.lower() and int(d, 16) >= 0


def test_digest_validates_text():
    assert Digest("abcd") == "abcd" and not Digest("abcd").is_full
    for bad in ["", "ABCD", "xyz0", "a" * 65, "ab/cd"]:
        with pytest.raises(ValueError, match="not a digest"):
            Digest(bad)
    assert repr(Digest("abcd")) == "Digest('abcd')"
    assert pickle.loads(pickle.dumps(Digest("abcd"))) == Digest("abcd")


DISTINCT = [
    None, False, True, 0, 1, -1, -2, 2**61 - 1, 2**64, -(2**64), 1.0, 0.0, -0.0, math.nan,
    math.inf, -math.inf, 1e-300, 1 + 0j, complex(0, 1), "", "1", "None", b"", b"1", bytearray(b"1"),
    (), [], {}, set(), frozenset(), (1,), [1], {1}, frozenset({1}), {1: 1}, {"1": 1}, ((),), [[]],
    range(3), range(0, 3, 1) if False else range(1, 3), Color.RED, Color.BLUE, Level.LOW,
    datetime.date(2020, 1, 2), datetime.datetime(2020, 1, 2), datetime.time(1, 2),
    datetime.timedelta(days=1), datetime.timedelta(seconds=1),
    datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc),
    pathlib.PurePosixPath("a/b"), pathlib.PureWindowsPath("a/b"), "a/b",
    Point(1.0, 2.0), OtherPoint(1.0, 2.0), Point(2.0, 1.0), AttrsPoint(1.0, 2.0),
    Custom(1), Custom(2), plain, len, Point, OtherPoint, functools.partial(plain, 1),
    functools.partial(plain, 2), Greeter().greet,
    np.int64(1), np.int32(1), np.float64(1.0), np.array([1, 2]), np.array([1, 2], dtype=np.int32),
    np.array([[1, 2]]), np.array([1.0, 2.0]), np.array(["a", "b"]), np.array([1, "a"], dtype=object),
    pd.Series([1, 2]), pd.Series([1, 2], index=[5, 6]), pd.Series([1.0, 2.0]),
    pd.Series([1, 2], name="s"), pd.DataFrame({"a": [1, 2]}), pd.DataFrame({"b": [1, 2]}),
    pd.DataFrame({"a": [1.0, 2.0]}), pd.Index([1, 2]), pd.Index(["a", "b"]),
]


def _clashes(values):
    """Pairs of values that share a digest."""
    digests = [digest(v) for v in values]
    return [
        (values[i], values[j]) for i in range(len(digests)) for j in range(i)
        if digests[i] == digests[j]
    ]


def test_distinct_values_have_distinct_digests():
    assert not _clashes(DISTINCT)


def test_numbers_that_compare_equal_stay_apart():
    assert len({digest(1), digest(1.0), digest(True), digest(np.int64(1))}) == 4
    assert digest(0.0) != digest(-0.0)
    assert hash(-1) == hash(-2) and digest(-1) != digest(-2)
    assert digest(math.nan) == digest(float("nan")) == digest(-math.nan)


def test_containers():
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})
    assert digest({3, 1, 2}) == digest({2, 3, 1})
    assert digest((1, 2)) != digest([1, 2]) != digest([2, 1])
    assert digest([1, [2, 3]]) == digest([1, [2, 3]])
    assert digest({"a": 1}) != digest({"a": 1, "b": None})


def test_digest_stands_in_for_its_value():
    value = {"x": [1, 2.5]}
    d = digest(value)
    assert digest(d) is d
    assert digest([value, 3]) == digest([d, 3])
    assert digest({"k": value}) == digest({"k": d})


def test_numpy():
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert digest(a) == digest(a.copy())
    assert digest(a[:, ::2]) == digest(np.ascontiguousarray(a[:, ::2]))
    assert digest(a) != digest(a.reshape(4, 3))
    assert digest(a) != digest(a.astype(np.float32))
    b = a.copy()
    b[2, 3] += 1e-12
    assert digest(a) != digest(b)
    assert digest(np.array(5)) != digest(np.array([5]))
    assert digest(np.array([np.nan])) == digest(np.array([np.nan]))
    structured = np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])
    assert digest(structured) == digest(structured.copy())
    assert digest(np.array([], dtype=np.int8)) != digest(np.array([], dtype=np.int16))


def test_pandas():
    df = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}, index=["r", "s"])
    assert digest(df) == digest(df.copy())
    assert digest(df) != digest(df.rename(index={"r": "q"}))
    assert digest(df) != digest(df.astype({"a": "float64"}))
    assert digest(df) != digest(df[["b", "a"]])
    assert digest(pd.Series(pd.array([1, None], dtype="Int64"))) == digest(
        pd.Series(pd.array([1, None], dtype="Int64"))
    )
    multi = pd.MultiIndex.from_tuples([(1, "a"), (2, "b")])
    assert digest(pd.Series([1, 2], index=multi)) == digest(pd.Series([1, 2], index=multi.copy()))


def test_dataclass_attrs_and_classes():
    assert digest(Point(1.0, 2.0)) == digest(Point(1.0, 2.0))
    assert digest(Point(1.0, 2.0)) != digest(OtherPoint(1.0, 2.0))
    assert digest(AttrsPoint(1.0, 2.0)) == digest(AttrsPoint(1.0, 2.0))


def test_functions_by_name_and_local_functions_by_code():
    def make(k):
        return lambda x: x * k

    assert digest(plain) == digest(plain)
    assert digest(make(2)) == digest(make(2))
    assert digest(make(2)) != digest(make(3))
    assert digest(lambda x: x) != digest(lambda x: x + 1)
    assert digest(Greeter().greet) == digest(Greeter().greet)


def test_code_digest_follows_the_body_only():
    def f(x):
        """Doc one."""
        return x + 1

    def g(x):
        """Doc two, a different docstring."""
        return x + 1

    def h(x):
        return x + 2

    assert code_digest(f) == code_digest(g)
    assert code_digest(f) != code_digest(h)
    with pytest.raises(Indigestible):
        code_digest(len)


def test_hooks_and_errors():
    class Opaque:
        pass

    with pytest.raises(Indigestible, match="Opaque") as info:
        digest(Opaque())
    assert isinstance(info.value, TypeError)
    with pytest.raises(Indigestible, match="Opaque"):
        digest([1, {"k": Opaque()}])

    class Temperature:
        def __init__(self, kelvin):
            self.kelvin = kelvin

    register_digest_hook(Temperature, lambda t: t.kelvin)
    assert digest(Temperature(3.0)) == digest(Temperature(3.0))
    assert digest(Temperature(3.0)) != digest(Temperature(4.0))
    assert digest(Temperature(3.0)) != digest(3.0)
    with pytest.raises(TypeError):
        register_digest_hook("not a type", str)


def test_builtin_subclasses_carry_their_class():
    from collections import OrderedDict, namedtuple

    Pair = namedtuple("Pair", "a b")
    assert digest(Pair(1, 2)) != digest((1, 2))
    assert digest(Pair(1, 2)) == digest(Pair(1, 2))
    assert digest(OrderedDict(a=1)) != digest({"a": 1})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4)
    | st.tuples(children, children)
    | st.frozensets(st.integers() | st.text(max_size=3), max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_equal_values_give_equal_digests(value):
    assert digest(value) == digest(copy.deepcopy(value))
    assert digest(value) == digest(pickle.loads(pickle.dumps(value)))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=4), st.integers(), max_size=6))
def test_dict_digest_ignores_insertion_order(d):
    assert digest(d) == digest(dict(reversed(list(d.items()))))


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_different_values_differ(a, b):
    # Digests are injective on content: equal digests only for values that print the same
    # (pickle gives a canonical form here, and distinguishes 1 / 1.0 / True and -0.0 / 0.0).
    if digest(a) == digest(b):
        assert _canonical(a) == _canonical(b)


def _canonical(v):
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else v.hex())
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [_canonical(x) for x in v])
    if isinstance(v, dict):
        return ("dict", sorted((repr(k), _canonical(x)) for k, x in v.items()))
    if isinstance(v, frozenset):
        return ("frozenset", sorted(repr(_canonical(x)) for x in v))
    return (type(v).__name__, v)


STABILITY_SCRIPT = """
import json, math
from fleche.digest import digest
values = [
    {"b": {1, 2, 3, "x", "y", (4, 5)}, "a": [1.5, -0.0, math.nan, math.inf], "c": frozenset("abc")},
    {frozenset({"p", "q"}), frozenset({"r"})},
    {str(i): {i, str(i), float(i)} for i in range(20)},
]
print(json.dumps([digest(v) for v in values]))
"""


def test_same_digest_in_every_process_and_hash_seed():
    results = set()
    for seed in ["0", "1", "12345", "random"]:
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=SRC)
        out = subprocess.run(
            [sys.executable, "-c", STABILITY_SCRIPT], env=env, capture_output=True, text=True,
            check=True,
        )
        results.add(out.stdout.strip())
    assert len(results) == 1
    # And they match this process.
    namespace: dict = {}
    exec(STABILITY_SCRIPT.replace("print(", "result = ("), namespace)
    assert json.loads(results.pop()) == json.loads(namespace["result"])


KNOWN = [
    (None, "c8db7394b512b6c8274efc42dd03ff59b9fcb2cbaed8a135c9d8b71c0690a967"),
    (1, "059740a3ca0c2f19bbcef11ca54e8a85fddd5e7415070b5aa6d2dd2e77e5ee29"),
    (1.0, "ec9e4dc01f037288216e14401c3cbda474f6c2582a97707637b02593ffbfd4c5"),
    ("fleche", "60cd385d45b88a455f362983ed85176eb7305cd16d05f7368fb34de812b69875"),
    ((1, [2.5, "x"]), "41ed90ee4f510ebb0db88becf015baf52641e4972b7d8dd4a042f9d3b034296d"),
    ({"a": {1, 2}}, "284726d226a5ad10b7ae17096ab9d09ee9ab1e5fa37e74dd5448d76cc323ed5e"),
]


@pytest.mark.parametrize(("value", "expected"), KNOWN)
def test_known_vectors_do_not_drift(value, expected):
    """Stored caches are keyed by these: a change here orphans every existing entry."""
    assert digest(value) == expected


# -- what a function's digest covers ------------------------------------------------------------


def _lambda_reading(global_value, source="lambda: K"):
    """A lambda whose code reads the global ``K``, in a module of its own."""
    return eval(source, {"__name__": "lab.globals", "K": global_value})


def _closure_over(value):
    return lambda: value


def test_functions_differing_only_in_what_decides_their_result_differ():
    assert digest(lambda k=1: k) != digest(lambda k=2: k)
    assert digest(lambda *, k=1: k) != digest(lambda *, k=2: k)
    assert digest(lambda k=1: k) != digest(lambda *, k=1: k)
    assert digest(_closure_over(1)) != digest(_closure_over(2))
    assert digest(_lambda_reading(1)) != digest(_lambda_reading(2))
    assert digest(_lambda_reading(_closure_over(1))) != digest(_lambda_reading(_closure_over(2)))
    # Equal in every respect: equal digests.
    assert digest(lambda k=1: k) == digest(lambda k=1: k)
    assert digest(_lambda_reading(1)) == digest(_lambda_reading(1))


def test_function_digests_follow_their_globals_and_cells_as_they_change():
    namespace = {"__name__": "lab.mutable", "SCALE": 2}
    scaled = eval("lambda x: SCALE * x", namespace)
    before = digest(scaled)
    namespace["SCALE"] = 3
    assert digest(scaled) != before
    namespace["SCALE"] = 2
    assert digest(scaled) == before


def test_modules_and_named_functions_are_read_by_reference():
    namespace = {"__name__": "lab.refs", "math": math, "plain": plain}
    uses = eval("lambda x: plain(math.floor(x))", namespace)
    before = digest(uses)
    namespace["math"] = math  # the same module again: nothing changed
    assert digest(uses) == before
    assert digest(math) == digest(math) != digest(os)


def test_recursive_local_functions_digest():
    def make(step):
        def count(n):
            return 0 if n <= 0 else 1 + count(n - step)

        return count

    assert digest(make(1)) == digest(make(1))
    assert digest(make(1)) != digest(make(2))
    namespace = {"__name__": "lab.recursion"}
    exec("fact = lambda n: 1 if n <= 1 else n * fact(n - 1)", namespace)
    assert digest(namespace["fact"]) == digest(namespace["fact"])


def test_a_function_capturing_an_indigestible_value_names_it():
    import threading

    lock = threading.Lock()
    with pytest.raises(Indigestible, match="lock"):
        digest(lambda: lock.locked())


def _function_pairs():
    """Pairs of functions built alike from two values, differing in one thing that decides what
    they return: a default, a keyword-only default, a captured value, a global, a constant."""
    kinds = {
        "default": lambda v: (lambda k=v: k),
        "kwonly": lambda v: (lambda *, k=v: k),
        "closure": _closure_over,
        "global": _lambda_reading,
        "global function": lambda v: _lambda_reading(_closure_over(v), "lambda: K()"),
        "nested closure": lambda v: (lambda: _closure_over(v)()),
    }
    return st.sampled_from(sorted(kinds)).map(kinds.__getitem__)


@settings(max_examples=300, deadline=None)
@given(_function_pairs(), json_values, json_values)
def test_functions_that_can_return_different_results_never_share_a_digest(build, a, b):
    f, g = build(a), build(b)
    if digest(f) == digest(g):
        assert _canonical(f()) == _canonical(g())
    assert digest(f) == digest(build(copy.deepcopy(a)))


@settings(max_examples=100, deadline=None)
@given(st.integers(), st.integers())
def test_functions_differing_in_a_constant_of_their_code_differ(a, b):
    f, g = eval(f"lambda x: x * {a}"), eval(f"lambda x: x * {b}")
    assert (digest(f) == digest(g)) == (a == b)


# -- values that cannot be digested: cycles, depth, hooks that fail ------------------------------


@dataclasses.dataclass
class Node:
    value: int
    next: object = None


class BrokenDigest:
    def __digest__(self):
        raise RuntimeError("no content today")


class SelfDigest:
    def __digest__(self):
        return [self]


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def test_reference_cycles_raise_indigestible_naming_the_cycle():
    looped = [1]
    looped.append(looped)
    mapping = {"a": []}
    mapping["a"].append(mapping)
    node = Node(1)
    node.next = Node(2, node)
    for value, shape in [
        (looped, "list -> list"), (mapping, "dict -> list -> dict"), (node, "Node -> Node -> Node"),
        (SelfDigest(), "SelfDigest"),
    ]:
        with pytest.raises(Indigestible, match="cycle") as info:
            digest(value)
        assert shape in str(info.value)
    assert digest([[1], [1]]) == digest([[1], [1]])  # shared, not cyclic


def test_values_too_deep_to_digest_raise_indigestible():
    with pytest.raises(Indigestible, match="too deep"):
        digest(_nested(100_000))
    assert digest(_nested(50)) == digest(_nested(50))


def test_digest_hooks_that_raise_give_indigestible_naming_the_cause():
    with pytest.raises(Indigestible, match="BrokenDigest.*__digest__.*RuntimeError: no content") as info:
        digest([BrokenDigest()])
    assert isinstance(info.value.__cause__, RuntimeError)

    class Sensor:
        pass

    def refuse(sensor):
        raise ValueError("sensor offline")

    register_digest_hook(Sensor, refuse)
    with pytest.raises(Indigestible, match="Sensor.*refuse.*ValueError: sensor offline"):
        digest({"s": Sensor()})


# -- more types ---------------------------------------------------------------------------------


class Perm(enum.IntFlag):
    R = 1
    W = 2


PARIS = zoneinfo.ZoneInfo("Europe/Paris")
PLUS_ONE = datetime.timezone(datetime.timedelta(hours=1))

MORE_TYPES = [
    uuid.UUID(int=1), uuid.UUID(int=2), decimal.Decimal("1"), decimal.Decimal("1.0"),
    decimal.Decimal("1.00"), decimal.Decimal("-0"), decimal.Decimal("0"), decimal.Decimal("NaN"),
    decimal.Decimal("sNaN"), decimal.Decimal("Infinity"), decimal.Decimal("-Infinity"),
    decimal.Decimal("1E+2"), decimal.Decimal("100"), fractions.Fraction(1), fractions.Fraction(1, 2),
    fractions.Fraction(-1, 2), slice(1), slice(1, 2), slice(None, 1, 2), slice(1, None), slice(1, 2, 1),
    slice(1.0), slice("a"),
    datetime.datetime(2020, 1, 2, 3, tzinfo=PARIS), datetime.datetime(2020, 1, 2, 3, tzinfo=PLUS_ONE),
    datetime.datetime(2020, 1, 2, 3, tzinfo=datetime.timezone(datetime.timedelta(hours=1), "CET")),
    datetime.datetime(2020, 1, 2, 3, tzinfo=zoneinfo.ZoneInfo("UTC")),
    datetime.datetime(2020, 1, 2, 3, tzinfo=datetime.timezone.utc),
    datetime.datetime(2020, 1, 2, 3), datetime.datetime(2020, 1, 2, 2, tzinfo=datetime.timezone.utc),
    datetime.datetime(2021, 10, 31, 2, 30, tzinfo=PARIS),
    datetime.datetime(2021, 10, 31, 2, 30, fold=1, tzinfo=PARIS),
    datetime.time(1, 2, tzinfo=PARIS), datetime.time(1, 2, tzinfo=PLUS_ONE), datetime.time(1, 2, fold=1),
    datetime.timezone.utc, PLUS_ONE, datetime.timezone(datetime.timedelta(hours=-1)),
    datetime.timezone(datetime.timedelta(hours=1), "CET"), PARIS, zoneinfo.ZoneInfo("UTC"),
    zoneinfo.ZoneInfo("America/New_York"),
    pathlib.PurePosixPath("/data/x"), pathlib.Path("/data/x"), pathlib.PureWindowsPath("c:/data/x"),
    "/data/x", Perm.R, Perm.W, Perm.R | Perm.W, Perm(0), Perm(4), Perm(8), os, math,
]


def test_more_types_digest_distinctly():
    assert not _clashes(MORE_TYPES + DISTINCT)
    one = [decimal.Decimal("1"), fractions.Fraction(1), 1, 1.0]
    assert len({digest(v) for v in one}) == 4


def test_more_types_digest_equal_for_equal_values():
    for value in MORE_TYPES:
        if isinstance(value, types.ModuleType):
            continue
        assert digest(value) == digest(copy.deepcopy(value)) == digest(pickle.loads(pickle.dumps(value)))
    assert digest(fractions.Fraction(2, 4)) == digest(fractions.Fraction(1, 2))
    u = uuid.uuid4()
    assert digest(uuid.UUID(str(u))) == digest(uuid.UUID(bytes=u.bytes)) == digest(u)
    assert digest(zoneinfo.ZoneInfo.no_cache("Europe/Paris")) == digest(PARIS)
    assert digest(datetime.timezone(datetime.timedelta(hours=1))) == digest(PLUS_ONE)
    # Decimals keep their exponent: 1.0 and 1.00 are equal numbers that compute and print
    # differently (1.0 * 3 is 3.0, 1.00 * 3 is 3.00), so they digest apart.
    one, one_point_oh = decimal.Decimal("1.0"), decimal.Decimal("1.00")
    assert one == one_point_oh and str(one * 3) != str(one_point_oh * 3)
    assert digest(one) != digest(one_point_oh)


def test_timezones_without_a_name_are_refused():
    class Local(datetime.tzinfo):
        def utcoffset(self, dt):
            return datetime.timedelta(hours=2)

    with pytest.raises(Indigestible, match="Local"):
        digest(datetime.datetime(2020, 1, 1, tzinfo=Local()))


MORE_KNOWN = [
    (uuid.UUID(int=1), "600b06ea49e20b8d412565405001a6e1594ad5271ec82263add7fd743220d1c8"),
    (decimal.Decimal("1.50"), "f42057c76e119919143bf6d79f5d8ab38754e44dedb4f3165cd26b0fc1746b50"),
    (fractions.Fraction(1, 3), "b542c843ed53801984c43ab036ee8d7cbe681bb6f30f6de94952c24ef917900f"),
    (slice(1, None, 2), "c2480f446e0eb95348f17128d16369ae062d22268389f3ea520f4c6a157ccc10"),
    (
        datetime.datetime(2020, 1, 2, 3, tzinfo=PARIS),
        "91706cda1b87451077c905a008544c80f7429722d432d5f244ba29f26f4b5230",
    ),
    (
        datetime.time(1, 2, tzinfo=PLUS_ONE),
        "6093cd4c7c6d264e2effc970a98d9611c624af1b5114fe6f3ddb100a3d4fb7fe",
    ),
    (PLUS_ONE, "207277fd6385665bcf960830e2f9dde0cf0a5ad9a7c254d4ac3acf1321c0bfd1"),
    (PARIS, "cf4cdeba297a788354ebf5ad3c964abc9c4325032718f0b4f12fd6f4a2c66ccb"),
    (http.HTTPStatus.OK, "d00a76fadaeafa96c30edc572e7e1f6f403d532074114a97e69815aa7c991536"),
    (re.RegexFlag.IGNORECASE, "477943a4dd0337a27439d5e1aa91bbdd26aeca590f5e266284a7f15b6df64b59"),
    (re.RegexFlag(0), "a8340eea1c863529de3432656e857cddc7f3cff63a369e6f9f94952b3d31daab"),
    (math, "db757498fc88a33b5df6c36b3917e348eb88349d5e78cab6c3ffcfbd8dc971ff"),
    # These digested before this list was pinned and must keep their values.
    (datetime.date(2020, 1, 2), "ce20281f642a72e38731be320ea5f53e3c7078f28cefd55a7fb8bc3bb0c91914"),
    (
        datetime.datetime(2020, 1, 2, 3, 4, 5, 6),
        "15779ab7aeb51712109bb99cc33ba264faf61a3abab0b8e96d7ba7f4dc91e38f",
    ),
    (
        datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "4f8d25b029da67b5af9e92b15deb1b6d058b7c9934e8c57b341c763e0f01ef5d",
    ),
    (datetime.time(1, 2, 3), "1ad961e7b804b5d63f7bb343af200c3da4d0d196b163b69d42ce5cee5eb3b858"),
    (
        datetime.timedelta(days=1, seconds=2, microseconds=3),
        "319cab8f272ea0c54e1a2e85d0e13158f22b228c0fb1fbcfe50d7002fabc165b",
    ),
    (
        pathlib.PurePosixPath("a/b"),
        "cd5b9e79efe6bdc1bbdbaead558b3b3d38963ab733323eb86864a3eb7b403853",
    ),
    (pathlib.Path("/tmp/x"), "7d6d567fd07907826d218d6d47bea82b7c6a8b8426fae72aa0a175860aee8948"),
    (
        pathlib.PureWindowsPath("c:/a/b"),
        "1079128d97e6e1474fbd3d77474d8aa4b3f457232153d796cd457283adee1817",
    ),
    (range(1, 10, 2), "bae86021a7e935a4114b7fe3c294717bb07091f4784c5acd2f40c47396e07cd4"),
    (1 + 2j, "f560737697dc8add9eff16922b03fc8189ccb06b07c18888a914f8bf140c50c3"),
    (bytearray(b"ab"), "f63e21e6e20393e10cab5b06581851d135bbf2e3ddd0518dc1952d18585e5b16"),
    (
        [(), {}, frozenset({"a"})],
        "e7ba728b365b8bec4459a2d3f7a93e1e7773b89b1809ac65a80318a45494b7fa",
    ),
    (2**100, "1f86074c708872e628266acdd2610a297f5ea46661bd0b1e40c4f40a915a4798"),
    (math.nan, "480ff7a4db680854fd7c332e900ceb7c09fad8e2ebec5db9e3447fcbd9495495"),
]


@pytest.mark.parametrize(("value", "expected"), MORE_KNOWN)
def test_more_known_vectors_do_not_drift(value, expected):
    assert digest(value) == expected


# -- digest hooks from installed distributions --------------------------------------------------

HOOK_MODULES = {
    "hooktest_types.py": """
class Celsius:
    def __init__(self, degrees):
        self.degrees = degrees
""",
    "hooktest_hooks.py": """
from hooktest_types import Celsius

CALLS = []


def register(register_digest_hook):
    CALLS.append(1)
    register_digest_hook(Celsius, lambda c: c.degrees)


def refuse(register_digest_hook):
    raise RuntimeError("this hook is broken")
""",
}

HOOK_ENTRY_POINTS = """[fleche.digest_hooks]
hooktest = hooktest_hooks:register
missing = hooktest_missing:register
raising = hooktest_hooks:refuse
"""


def _build_wheel(directory):
    """A real wheel of the distribution ``fleche-hooktest``: two modules and three entry points
    in the group ``fleche.digest_hooks`` (built by hand: no build backend needed)."""
    import base64
    import hashlib
    import zipfile

    info = "fleche_hooktest-0.1.dist-info"
    files = {
        **HOOK_MODULES,
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: fleche-hooktest\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: fleche-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{info}/entry_points.txt": HOOK_ENTRY_POINTS,
    }
    record = []
    path = directory / "fleche_hooktest-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            data = text.encode()
            wheel.writestr(name, data)
            hashed = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={hashed},{len(data)}")
        record.append(f"{info}/RECORD,,")
        wheel.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


HOOK_SCRIPT = """
import json, sys, warnings
from fleche.digest import digest
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    digest([1, "a", {"b": 2.0}])
    loaded_early = "hooktest_hooks" in sys.modules
    import hooktest_types
    a, b = digest(hooktest_types.Celsius(3)), digest(hooktest_types.Celsius(4))
    again = digest(hooktest_types.Celsius(3))
    import hooktest_hooks
print(json.dumps({
    "loaded_early": loaded_early, "a": a, "b": b, "again": again, "calls": len(hooktest_hooks.CALLS),
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
}))
"""


def test_entry_point_hooks_of_an_installed_distribution(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--target", str(target), str(_build_wheel(tmp_path))],
        check=True, capture_output=True, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
        cwd=tmp_path,
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), SRC]))
    out = subprocess.run(
        [sys.executable, "-c", HOOK_SCRIPT], env=env, capture_output=True, text=True, check=True,
        cwd=tmp_path,
    )
    result = json.loads(out.stdout)
    assert not result["loaded_early"]  # nothing loaded while only built-in types were digested
    assert result["a"] == result["again"] != result["b"]
    assert result["calls"] == 1  # loaded once
    problems = [w for w in result["warnings"] if w.startswith("FlecheWarning")]
    assert len(problems) == 2, result["warnings"]
    assert any("'missing'" in w and "hooktest_missing" in w for w in problems)
    assert any("'raising'" in w and "this hook is broken" in w for w in problems)
