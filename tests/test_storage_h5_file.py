"""HDF5 storages: the shared contract, round trips, plain-h5py access, refusals, corruption,
several processes on one directory."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

h5py = pytest.importorskip("h5py")
pytest.importorskip("bagofholding")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402
from hypothesis.extra import pandas as hpd  # noqa: E402

from fleche.call import Call, DigestedCall  # noqa: E402
from fleche.digest import Digest, digest  # noqa: E402
from fleche.errors import CorruptEntryError, SaveError, SignatureError  # noqa: E402
from fleche.storage import (  # noqa: E402
    BagOfHoldingH5FileBackend,
    CallBagOfHoldingH5File,
    FileStorage,
    ValueBagOfHoldingH5File,
)
from fleche.storage.envelope import SECRET_KEY_ENV  # noqa: E402
from fleche.storage.h5_file import USER_BLOCK  # noqa: E402
from fleche.testing import (  # noqa: E402
    FULL_SIZE as FULL,  # FLECHE_STRESS=full
    UNSORTED_DICTS,
    CallStorageTests,
    ValueStorageTests,
    assert_corrupt_entry_is_reported_and_evictable,
    key_orders,
)

SRC = Path(__file__).resolve().parents[1] / "src"


class TestValueBagOfHoldingH5File(ValueStorageTests):
    shared_between_processes = True

    def make_storage(self, tmp_path):
        return ValueBagOfHoldingH5File(tmp_path / "values")


class TestCallBagOfHoldingH5File(CallStorageTests):
    shared_between_processes = True

    def make_storage(self, tmp_path):
        return CallBagOfHoldingH5File(str(tmp_path / "calls"))


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts]


def _entry(root: Path, key: str) -> Path:
    return root / key[:2] / f"{key}.h5"


# -- composition and layout -------------------------------------------------------------------


def test_composition():
    from fleche.storage.locks import InterProcessLockMixin
    from fleche.storage.pickle_file import CallPickleFile, ValuePickleFile

    assert issubclass(BagOfHoldingH5FileBackend, FileStorage)
    # The same mixins, in the same order, as the pickle storages; only the backend differs.
    assert ValueBagOfHoldingH5File.__bases__[:-1] == ValuePickleFile.__bases__[:-1]
    assert CallBagOfHoldingH5File.__bases__[:-1] == CallPickleFile.__bases__[:-1]
    assert InterProcessLockMixin in ValueBagOfHoldingH5File.__bases__
    for cls in (ValueBagOfHoldingH5File, CallBagOfHoldingH5File):
        assert cls.__dataclass_params__.frozen


def test_import_needs_no_h5py(tmp_path):
    """``import fleche.storage`` loads neither h5py nor bagofholding; first access does."""
    code = (
        "import sys, fleche.storage as s\n"
        "assert 'h5py' not in sys.modules and 'bagofholding' not in sys.modules\n"
        "assert 'ValueBagOfHoldingH5File' in dir(s)\n"
        "s.ValueBagOfHoldingH5File\n"
        "assert 'bagofholding' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)


def test_entry_is_key_dot_h5_and_list_ignores_strays(tmp_path):
    values = ValueBagOfHoldingH5File(tmp_path)
    key = values.save(np.arange(4))
    assert _entry(tmp_path, key).is_file()
    keys = set(values.list())
    assert keys == {key}
    other = digest("other")
    (tmp_path / key[:2] / f".{key}.abc.tmp").write_bytes(b"partial")
    (tmp_path / other[:2]).mkdir(exist_ok=True)
    (tmp_path / other[:2] / other).write_bytes(b"")  # no suffix
    (tmp_path / other[:2] / f"{other}.h5.bak").write_bytes(b"")
    (tmp_path / other[:2] / f"{other[:-1]}.h5").write_bytes(b"")  # too short
    (tmp_path / other[:2] / f"{other.upper()}.h5").write_bytes(b"")
    (tmp_path / "ff").mkdir(exist_ok=True)
    (tmp_path / "ff" / f"{other}.h5").write_bytes(b"")  # wrong fan-out directory
    assert set(values.list()) == keys
    assert not values.contains(other)


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="version_validator"):
        ValueBagOfHoldingH5File(tmp_path, version_validator="loose")
    with pytest.raises(ValueError, match="lock_timeout"):
        ValueBagOfHoldingH5File(tmp_path, lock_timeout=-1)


def test_pickles_with_its_settings(tmp_path):
    values = ValueBagOfHoldingH5File(
        tmp_path, lock_timeout=5, remaining_depth=2, version_validator="semantic-major"
    )
    key = values.save({"a": np.ones(3)}, digest("k"))
    copy = pickle.loads(pickle.dumps(values))
    assert copy == values and copy.version_validator == "semantic-major"
    assert copy.remaining_depth == 2
    assert_same(copy.load(key), {"a": np.ones(3)})
    calls = CallBagOfHoldingH5File(tmp_path / "calls", durable=True)
    assert pickle.loads(pickle.dumps(calls)) == calls


# -- round trips ------------------------------------------------------------------------------


def assert_same(loaded: Any, expected: Any) -> None:
    """Equal content, same types, and for arrays the same dtype, shape and bytes."""
    assert type(loaded) is type(expected), (type(loaded), type(expected))
    if isinstance(expected, np.ndarray):
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        assert loaded.tobytes() == expected.tobytes()  # bitwise: NaN, NaT and -0.0 included
    elif isinstance(expected, pd.DataFrame):
        pd.testing.assert_frame_equal(loaded, expected, check_exact=True)
    elif isinstance(expected, pd.Series):
        pd.testing.assert_series_equal(loaded, expected, check_exact=True)
    elif isinstance(expected, (list, tuple)):
        assert len(loaded) == len(expected)
        for a, b in zip(loaded, expected):
            assert_same(a, b)
    elif isinstance(expected, dict):
        assert list(loaded) == list(expected)
        for k in expected:
            assert_same(loaded[k], expected[k])
    elif isinstance(expected, float) and expected != expected:
        assert loaded != loaded
    else:
        assert loaded == expected


_DTYPES = [
    "bool", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", ">f8", "<i4",
    "c8", "c16", "U3", "S4", "M8[s]", "m8[ms]",
]



def _arrays(min_dims: int) -> st.SearchStrategy:
    return st.sampled_from(_DTYPES).flatmap(
        lambda dt: hnp.arrays(
            np.dtype(dt), hnp.array_shapes(min_dims=min_dims, max_dims=3, max_side=4)
        )
    )


arrays = _arrays(0)
# h5py cannot store a str with a NUL character (a SaveError, tested below), nor bagofholding a
# dict key "." inside a file; both are left out of the round trips.
texts = st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=8)
keys = texts.filter(lambda k: k != ".").map(lambda k: k[:4]) | st.integers()
series = hpd.series(dtype=float, index=hpd.range_indexes(max_size=8)) | hpd.series(
    elements=st.integers(-(2**40), 2**40), dtype=np.int64, index=hpd.range_indexes(max_size=8)
)
frames = hpd.data_frames(
    [
        hpd.column("x", dtype=float),
        hpd.column("n", dtype=np.int32),
        hpd.column("flag", dtype=bool),
        hpd.column("label", elements=texts, dtype=object),
    ],
    index=hpd.range_indexes(max_size=6),
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.complex_numbers(allow_nan=False)
    | texts
    | st.binary(max_size=8)
)


def _nested(leaves: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4),
        max_leaves=10,
    )


nested = _nested(scalars | arrays)
# bagofholding loads a 0-d array as a numpy scalar; the storage restores the type only where the
# array is a file's root, which it always is unless remaining_depth inlines it into a container.
nested_inlinable = _nested(scalars | _arrays(1))

_ROUND_TRIP = settings(
    max_examples=25 if not FULL else 300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_ROUND_TRIP
@given(value=arrays)
@example(value=np.array(0.0, dtype=">f8"))  # 0-d: loaded as a scalar by bagofholding, restored
@example(value=np.array("ab", dtype="U5"))
def test_arrays_round_trip(tmp_path, value):
    values = ValueBagOfHoldingH5File(tmp_path)
    assert_same(values.load(values.save(value)), value)


@_ROUND_TRIP
@given(value=series | frames)
def test_pandas_round_trip(tmp_path, value):
    values = ValueBagOfHoldingH5File(tmp_path)
    assert_same(values.load(values.save(value)), value)


@_ROUND_TRIP
@given(value=nested)
def test_nested_containers_round_trip(tmp_path, value):
    values = ValueBagOfHoldingH5File(tmp_path)
    key = values.save(value)
    assert key == digest(value)
    assert_same(values.load(key), value)


@_ROUND_TRIP
@given(value=nested_inlinable)
@example(value=(np.array([False, False]),))  # a tuple starting with an array: no tag test by ==
@example(value={"00": None, "0": None})  # HDF5 lists a group's members by name: "0" first
def test_inlined_containers_round_trip(tmp_path, value):
    """With ``remaining_depth`` low sub-trees are kept inside their parent's file."""
    values = ValueBagOfHoldingH5File(tmp_path, remaining_depth=2)
    key = values.save(value, digest("top"))  # an explicit key: see the report on depth > 0
    assert_same(values.load(key), value)


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_dicts_keep_their_key_order(tmp_path, depth):
    """A dict comes back with its keys in the order it was saved in, whether it is stored as
    parts, inlined into its parent's file, or inside an object stored whole."""
    values = ValueBagOfHoldingH5File(tmp_path, remaining_depth=depth)
    for i, value in enumerate(UNSORTED_DICTS):
        loaded = values.load(values.save(value, digest(("unsorted", i))))
        assert key_orders(loaded) == key_orders(value), (depth, value)


def test_dicts_written_before_order_was_kept_load_as_they_did(tmp_path, no_env_key):
    """An entry bagofholding wrote without creation order loads, keys in name order."""
    from bagofholding import H5Bag

    key = digest("written by an earlier fleche")
    _entry(tmp_path, key).parent.mkdir(parents=True)
    assert not h5py.get_config().track_order
    H5Bag.save({"b": 1, "a": {"d": 1, "c": 2}}, _entry(tmp_path, key))
    loaded = ValueBagOfHoldingH5File(tmp_path).load(key)
    assert key_orders(loaded) == key_orders({"a": {"c": 2, "d": 1}, "b": 1})


@pytest.mark.parametrize("setting", [False, True])
def test_saving_leaves_h5pys_order_setting_as_it_was(tmp_path, setting):
    """Saves from several threads at once each keep their dicts' order, and afterwards h5py's
    process-wide ``track_order`` default is what it was before."""
    config = h5py.get_config()
    config.track_order = setting
    try:
        values = ValueBagOfHoldingH5File(tmp_path, remaining_depth=3)
        start = threading.Barrier(4)

        def save_many(t: int) -> list[bool]:
            start.wait()
            kept = []
            for i in range(5):
                value = {f"k{j}": [t, i] for j in range(6, 0, -1)}
                loaded = values.load(values.save(value, digest(("threads", t, i))))
                kept.append(list(loaded) == list(value))
            return kept

        with ThreadPoolExecutor(4) as pool:
            assert all(all(kept) for kept in pool.map(save_many, range(4)))
        assert config.track_order is setting
    finally:
        config.track_order = False


@dataclass(frozen=True)
class Measurement:
    name: str
    data: Any
    tags: dict


def test_dataclasses_and_odd_values_round_trip(tmp_path):
    values = ValueBagOfHoldingH5File(tmp_path)
    for value in [
        Measurement("m", np.linspace(0, 1, 5), {"unit": "V"}),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.arange(10)[::3],
        np.zeros((0, 3)),
        np.zeros(3, dtype=[("a", "i4"), ("b", "f8")]),
        np.float32(1.5),
        pd.Series(pd.Categorical(["a", "b", "a"])),
        pd.Series([1, None], dtype="Int64"),
        pd.DataFrame({"t": pd.date_range("2020", periods=3), "v": [1.0, 2.0, 3.0]}),
        {1, 2},
        frozenset({"x"}),
        2**100,
        range(3),
    ]:
        loaded = values.load(values.save(value))
        if isinstance(value, Measurement):
            assert loaded.name == value.name and loaded.tags == value.tags
            assert_same(loaded.data, value.data)
        elif isinstance(value, np.ndarray) and value.dtype.names:
            assert loaded.dtype == value.dtype and (loaded == value).all()
        else:
            assert_same(loaded, value)


def test_call_records_keep_digest_types(tmp_path):
    calls = CallBagOfHoldingH5File(tmp_path)
    call = Call.from_call(_f, np.arange(3), y={"k": [1, 2]}).replace(
        result=np.ones(2), metadata={"runtime": {"host": "h", "n": 3, "ok": True, "t": 0.5}}
    )
    key = calls.save(call)
    loaded = calls.load(key)
    assert loaded == call.digest() and type(loaded) is DigestedCall
    assert type(loaded.result) is Digest
    assert all(type(v) is Digest for v in loaded.arguments.values())
    assert loaded.to_lookup_key() == key


def test_call_records_json_cannot_express_still_round_trip(tmp_path):
    calls = CallBagOfHoldingH5File(tmp_path)
    odd = {"m": {"pair": (1, 2), 3: "int key", "nan": float("inf")}}
    call = Call.from_call(_f, 1).replace(result=1, metadata=odd).digest()
    key = calls.save(call)
    assert calls.load(key) == call
    assert calls.load(key).metadata["m"]["pair"] == (1, 2)


def _zyx(z, y, x):
    return z


def test_call_records_json_cannot_express_keep_key_order(tmp_path):
    """bagofholding's structural form of a record keeps arguments and metadata in order."""
    calls = CallBagOfHoldingH5File(tmp_path)
    metadata = {"m": {"pair": (1, 2), "b": 1, "a": 2}, "c": {}}
    call = Call.from_call(_zyx, 1, 2, 3).replace(result=1, metadata=metadata).digest()
    loaded = calls.load(calls.save(call))
    assert list(loaded.arguments) == ["z", "y", "x"]
    assert key_orders(loaded.metadata) == key_orders(metadata)


def test_container_file_lists_its_element_keys(tmp_path):
    values = ValueBagOfHoldingH5File(tmp_path)
    key = values.save({"a": 1, "b": [2]})
    with h5py.File(_entry(tmp_path, key), "r") as f:
        tag, text = (f["object"][name][()].decode() for name in ("i0", "i1"))
    assert tag == "fleche.destructured/1"
    assert json.loads(text) == {"kind": "dict", "items": [["a", digest(1)], ["b", digest([2])]]}
    assert values.child_digests(key) == {digest(1), digest([2])}


def _f(x, y=0):
    return x


# -- other tools see the data -----------------------------------------------------------------


def _datasets(path: Path) -> list[Any]:
    found = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: found.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def test_array_entry_opens_with_plain_h5py(tmp_path):
    values = ValueBagOfHoldingH5File(tmp_path)
    array = np.arange(24, dtype="<f4").reshape(2, 3, 4)
    key = values.save(array)
    with h5py.File(_entry(tmp_path, key), "r") as f:
        dataset = f["object"]
        assert isinstance(dataset, h5py.Dataset)
        assert dataset.dtype == array.dtype and dataset.shape == array.shape
        np.testing.assert_array_equal(dataset[()], array)
        assert dataset.attrs["qualname"] == "ndarray"


def test_dataframe_and_call_entries_show_their_data(tmp_path):
    values = ValueBagOfHoldingH5File(tmp_path)
    frame = pd.DataFrame({"x": [0.5, 1.5, 2.5], "y": [1.0, 2.0, 3.0]})
    shown = _datasets(_entry(tmp_path, values.save(frame)))
    assert any(
        isinstance(d, np.ndarray) and np.array_equal(d, frame.to_numpy().T) for d in shown
    ), shown
    calls = CallBagOfHoldingH5File(tmp_path / "calls")
    call = Call.from_call(_f, 1).replace(result=2)
    (text,) = _datasets(_entry(tmp_path / "calls", calls.save(call)))
    record = json.loads(text)
    assert record["name"] == "_f" and record["result"] == digest(2)
    assert record["arguments"] == {"x": digest(1), "y": digest(0)}


# -- what cannot be stored --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, type_name",
    [
        (lambda: (lambda x: x), "builtins.function"),
        (lambda: threading.Lock(), "_thread.lock"),
        (lambda: (i for i in range(3)), "builtins.generator"),
        (lambda: _local_instance(), "_local_instance.<locals>.Local"),
        (lambda: "nul\x00inside", "builtins.str"),
    ],
    ids=["lambda", "lock", "generator", "local class", "NUL in str"],
)
def test_unstorable_value_raises_save_error_and_leaves_nothing(tmp_path, make, type_name):
    values = ValueBagOfHoldingH5File(tmp_path)
    key = digest("unstorable")
    with pytest.raises(SaveError, match=type_name.replace(".", r"\.")) as info:
        values.save(make(), key)
    assert key in str(info.value) and "bagofholding" in str(info.value)
    assert _leftovers(tmp_path) == []
    assert list(values.list()) == [] and not values.contains(key)


def _local_instance():
    class Local:
        pass

    return Local()


def test_unstorable_element_leaves_no_container_and_no_temporary_file(tmp_path):
    values = ValueBagOfHoldingH5File(tmp_path)
    value = [1, lambda x: x]
    with pytest.raises(SaveError, match="function"):
        values.save(value, digest("list"))
    # The stored sibling is a whole entry of its own; no temporary file, no container.
    assert set(values.list()) == {digest(1)}
    assert all(p.suffix == ".h5" for p in _leftovers(tmp_path))
    assert not values.contains(digest("list"))


def test_failed_resave_keeps_the_old_entry(tmp_path):
    values = ValueBagOfHoldingH5File(tmp_path)
    key = values.save(np.arange(3), digest("slot"))
    with pytest.raises(SaveError):
        values.save(lambda: None, key)
    assert_same(values.load(key), np.arange(3))


# -- corruption -------------------------------------------------------------------------------


def _damage_cases() -> dict[str, Any]:
    def plain_h5py(path: Path) -> None:
        path.unlink()
        with h5py.File(path, "w") as f:
            f["object"] = np.arange(3)  # an HDF5 file, but not a bag

    def write(transform):
        return lambda path: path.write_bytes(transform(path.read_bytes()))

    return {
        "empty": (write(lambda d: b""), "truncated"),
        "garbage": (write(lambda d: os.urandom(len(d))), "magic"),
        "truncated": (write(lambda d: d[: len(d) // 2]), "torn"),
        "text file": (write(lambda d: b"hello\n"), "truncated"),
        "plain h5py": (plain_h5py, "damaged or not a fleche entry"),
    }


@pytest.mark.parametrize("case", sorted(_damage_cases()))
def test_corrupt_file_is_a_clear_error_and_evictable(tmp_path, case):
    values = ValueBagOfHoldingH5File(tmp_path)
    payload = {"payload": np.arange(100)}
    key = values.save(payload, digest("entry"))
    path = _entry(tmp_path, key)
    damage, reason = _damage_cases()[case]
    damage(path)
    assert_corrupt_entry_is_reported_and_evictable(values, key, path, reason)
    assert not path.exists()
    assert values.save(payload, key) == key
    assert_same(values.load(key), payload)


def test_entry_of_a_vanished_class_is_a_clear_error(tmp_path):
    """An intact entry whose class cannot be imported here names the problem."""
    values = ValueBagOfHoldingH5File(tmp_path)
    key = digest("gone")
    module = tmp_path / "vanishing_mod.py"
    module.write_text("class Gone:\n    def __eq__(self, other):\n        return True\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import vanishing_mod\n"
        "from fleche.storage import ValueBagOfHoldingH5File as V\n"
        "V(sys.argv[2]).save(vanishing_mod.Gone(), sys.argv[3])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(tmp_path / "s"), key], check=True, env=env
    )
    values = ValueBagOfHoldingH5File(tmp_path / "s")
    with pytest.raises(CorruptEntryError, match="cannot be loaded here.*vanishing_mod"):
        values.load(key)
    values.evict(key)


def test_corrupt_call_record(tmp_path):
    calls = CallBagOfHoldingH5File(tmp_path)
    key = calls.save(Call.from_call(_f, 1).replace(result=1))
    _entry(tmp_path, key).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(CorruptEntryError, match=key):
        calls.load(key)
    calls.evict(key)
    assert list(calls.list()) == []


# -- integrity: checksum and signature in the user block -------------------------------------


@pytest.fixture
def no_env_key(monkeypatch):
    monkeypatch.delenv(SECRET_KEY_ENV, raising=False)


def test_entries_carry_a_checked_header_in_the_user_block(tmp_path, no_env_key):
    values = ValueBagOfHoldingH5File(tmp_path)
    key = values.save(np.arange(5))
    path = _entry(tmp_path, key)
    data = path.read_bytes()
    assert data[:4] == b"FLCH" and data[USER_BLOCK:USER_BLOCK + 8] == b"\x89HDF\r\n\x1a\n"
    with h5py.File(path, "r") as f:  # still a plain HDF5 file to every HDF5 tool
        assert f.userblock_size == USER_BLOCK
        np.testing.assert_array_equal(f["object"][()], np.arange(5))
    flipped = bytearray(data)
    flipped[-40] ^= 0x01  # a bit in the HDF5 data, which HDF5 itself might not notice
    path.write_bytes(bytes(flipped))
    assert_corrupt_entry_is_reported_and_evictable(values, key, path, "checksum")


def test_secret_key_from_the_environment_signs_hdf5_entries(tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET_KEY_ENV, "alpha")
    signed = ValueBagOfHoldingH5File(tmp_path)
    key = signed.save({"a": np.ones(3)}, digest("signed"))
    assert_same(signed.load(key), {"a": np.ones(3)})
    monkeypatch.setenv(SECRET_KEY_ENV, "beta")
    with pytest.raises(SignatureError, match="none of"):
        ValueBagOfHoldingH5File(tmp_path).load(key)
    monkeypatch.delenv(SECRET_KEY_ENV)
    assert_same(ValueBagOfHoldingH5File(tmp_path).load(key), {"a": np.ones(3)})  # unchecked


def test_signed_hdf5_storage_refuses_unsigned_moved_and_tampered_entries(tmp_path, no_env_key):
    unsigned = ValueBagOfHoldingH5File(tmp_path)
    signed = ValueBagOfHoldingH5File(tmp_path, secret_key=("new", "old"))
    plain = unsigned.save(np.arange(3))
    with pytest.raises(SignatureError, match="unsigned"):
        signed.load(plain)
    k1, k2 = signed.save(np.arange(4)), signed.save(np.arange(6))
    _entry(tmp_path, k2).write_bytes(_entry(tmp_path, k1).read_bytes())  # moved to another key
    with pytest.raises(SignatureError, match="moved"):
        signed.load(k2)
    # An attacker who rewrites the HDF5 data and recomputes the checksum cannot forge the HMAC.
    from fleche.storage.envelope import _checksum

    data = bytearray(_entry(tmp_path, k1).read_bytes())
    data[-40] ^= 0x01
    payload = bytes(data[USER_BLOCK:])
    data[16:32] = _checksum(bytes(data[:16]), bytes(data[32:64]), payload)
    _entry(tmp_path, k1).write_bytes(bytes(data))
    with pytest.raises(SignatureError, match="none of"):
        signed.load(k1)
    # Key rotation: entries signed with the old key still load where it is accepted.
    rotated = ValueBagOfHoldingH5File(tmp_path, secret_key="old").save(np.arange(2))
    assert_same(signed.load(rotated), np.arange(2))


def test_entries_written_before_the_header_still_load_without_a_key(tmp_path, no_env_key):
    """A store written by an earlier fleche (plain HDF5 files, no user block) keeps working."""
    from bagofholding import H5Bag

    values = ValueBagOfHoldingH5File(tmp_path)
    key = digest(np.arange(7))
    _entry(tmp_path, key).parent.mkdir(parents=True)
    H5Bag.save(np.arange(7), _entry(tmp_path, key))
    assert_same(values.load(key), np.arange(7))
    with pytest.raises(SignatureError, match="unsigned"):
        ValueBagOfHoldingH5File(tmp_path, secret_key="k").load(key)
    assert_same(values.load(key), np.arange(7))


def test_a_value_where_a_call_record_belongs_is_a_corrupt_entry(tmp_path, no_env_key):
    values, calls = ValueBagOfHoldingH5File(tmp_path), CallBagOfHoldingH5File(tmp_path)
    key = values.save(np.arange(3))
    assert_corrupt_entry_is_reported_and_evictable(
        calls, key, _entry(tmp_path, key), "holds a numpy.ndarray, not a call record"
    )


class TestSignedValueBagOfHoldingH5File(ValueStorageTests):
    shared_between_processes = True

    def make_storage(self, tmp_path):
        return ValueBagOfHoldingH5File(tmp_path / "values", secret_key="contract")


# -- several processes ------------------------------------------------------------------------


def _value(i: int) -> Any:
    return {"i": i, "data": np.full((8, 8), i, dtype="f8"), "labels": np.array([str(i)] * 4)}


def _call(i: int, writer: int) -> Call:
    return Call.from_call(_f, i).replace(result=i, metadata={"run": {"writer": writer}})


def _hammer(values, calls, writer: int, rounds: int, start, errors) -> None:
    """Save and load overlapping keys; report anything wrong through ``errors``."""
    try:
        start.wait(timeout=60)
        for r in range(rounds):
            for i in range(3 * writer, 3 * writer + 6):  # neighbours share 3 of their 6 keys
                n = i % 12
                key = values.save(_value(n))
                assert_same(values.load(key), _value(n))
                ckey = calls.save(_call(n, writer))
                record = calls.load(ckey)
                assert record.to_lookup_key() == ckey and record.metadata["run"]["writer"] in range(4)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"writer {writer}: {type(e).__name__}: {e}")


@pytest.mark.slow
def test_processes_write_and_read_overlapping_keys(tmp_path):
    """4 spawned processes write and read overlapping keys at once; no file is torn."""
    ctx = multiprocessing.get_context("spawn")
    values = ValueBagOfHoldingH5File(tmp_path / "values")
    calls = CallBagOfHoldingH5File(tmp_path / "calls")
    start, errors = ctx.Barrier(4), ctx.Queue()
    rounds = 10 if FULL else 2
    procs = [
        ctx.Process(target=_hammer, args=(values, calls, w, rounds, start, errors))
        for w in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    assert reported == [] and [p.exitcode for p in procs] == [0] * 4, reported
    for n in range(12):
        assert_same(values.load(digest(_value(n))), _value(n))
        assert calls.load(_call(n, 0).to_lookup_key()).result == digest(n)
    leftovers = _leftovers(tmp_path)
    assert leftovers and all(p.name.endswith(".h5") and not p.name.startswith(".") for p in leftovers)
    for root, storage in ((tmp_path / "values", values), (tmp_path / "calls", calls)):
        for key in storage.list():
            storage.load(key)  # every file on disk is whole


def test_a_plain_tuple_that_looks_like_a_reference_stand_in_round_trips(tmp_path):
    """Kept whole (remaining_depth >= 1), a tuple starting with the stand-in's tag is still
    the user's tuple when loaded."""
    values = ValueBagOfHoldingH5File(tmp_path, remaining_depth=1)
    looks_alike = ("fleche.destructured/1", '{"kind": "list", "items": []}')
    assert values.load(values.save(looks_alike)) == looks_alike
    plain = (1, "a", 2.5)
    key = values.save(plain)
    assert values.load(key) == plain and values.child_digests(key) == set()
