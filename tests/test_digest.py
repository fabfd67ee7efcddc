"""Stable content digests: distinctions, stability across processes, extension points."""

import copy
import dataclasses
import datetime
import enum
import functools
import json
import math
import os
import pathlib
import pickle
import subprocess
import sys

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


def test_distinct_values_have_distinct_digests():
    digests = [digest(v) for v in DISTINCT]
    clashes = [
        (DISTINCT[i], DISTINCT[j])
        for i in range(len(digests))
        for j in range(i)
        if digests[i] == digests[j]
    ]
    assert not clashes


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
