"""Pickle file storages: the shared contract, the entry format, signing, corruption, layout."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pytest

from fleche.call import Call
from fleche.digest import digest
from fleche.errors import CorruptEntryError, SaveError, SignatureError
from fleche.storage import CallPickleFile, FileStorage, PickleFileBackend, ValuePickleFile
from fleche.storage.pickle_file import SECRET_KEY_ENV
from fleche.testing import (
    CallStorageTests,
    ValueStorageTests,
    assert_corrupt_entry_is_reported_and_evictable,
)


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.setenv(SECRET_KEY_ENV, "none")  # no key, on purpose: no UnsignedStoreWarning


@pytest.mark.parametrize("serializer", ["pickle", "cloudpickle", "dill"])
class TestValuePickleFile(ValueStorageTests):
    shared_between_processes = True

    @pytest.fixture(autouse=True)
    def _serializer(self, serializer):
        self.serializer = serializer

    def make_storage(self, tmp_path):
        return ValuePickleFile(tmp_path / "values", serializer=self.serializer)


@pytest.mark.parametrize("serializer", ["pickle", "cloudpickle"])
class TestCallPickleFile(CallStorageTests):
    shared_between_processes = True

    @pytest.fixture(autouse=True)
    def _serializer(self, serializer):
        self.serializer = serializer

    def make_storage(self, tmp_path):
        return CallPickleFile(str(tmp_path / "calls"), serializer=self.serializer)


class TestSignedValuePickleFile(ValueStorageTests):
    shared_between_processes = True

    def make_storage(self, tmp_path):
        return ValuePickleFile(tmp_path / "values", secret_key=[b"new key", "old key"])


@pytest.mark.parametrize("compression", ["zlib", "lzma", "bz2"])
class TestCompressedValuePickleFile(ValueStorageTests):
    shared_between_processes = True

    @pytest.fixture(autouse=True)
    def _compression(self, compression):
        self.compression = compression

    def make_storage(self, tmp_path):
        return ValuePickleFile(tmp_path / "values", serializer="dill", compression=self.compression)


class TestCompressedCallPickleFile(CallStorageTests):
    shared_between_processes = True

    def make_storage(self, tmp_path):
        return CallPickleFile(tmp_path / "calls", compression="zlib")


# -- construction and layout ------------------------------------------------------------------


def test_root_is_expanded_and_created_on_first_write(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    values = ValuePickleFile("~/cache/values")
    assert values.root == tmp_path / "cache" / "values"
    assert not values.root.exists()
    assert list(values.list()) == [] and not values.contains(digest(1))
    with pytest.raises(KeyError):
        values.load(digest(1))
    key = values.save(1)
    assert values.root.is_dir() and values.load(key) == 1


def test_entry_layout(tmp_path):
    values = ValuePickleFile(tmp_path)
    key = values.save("x")
    assert (tmp_path / key[:2] / key).is_file()
    assert values.save("x") == key  # re-saving replaces in place


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"serializer": "json"}, "serializer"),
        ({"lock_timeout": -1}, "lock_timeout"),
        ({"secret_key": b""}, "empty"),
    ],
)
def test_bad_settings(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ValuePickleFile(tmp_path, **kwargs)


def test_root_must_be_a_path(tmp_path):
    with pytest.raises(TypeError, match="root"):
        ValuePickleFile(42)


def test_equality_by_settings(tmp_path):
    a = ValuePickleFile(tmp_path)
    assert a == ValuePickleFile(str(tmp_path)) and hash(a) == hash(ValuePickleFile(str(tmp_path)))
    assert a != ValuePickleFile(tmp_path, serializer="cloudpickle")
    assert a != ValuePickleFile(tmp_path / "other")
    assert "secret" not in repr(ValuePickleFile(tmp_path, secret_key="secret"))


def test_list_ignores_temporary_lock_and_stray_files(tmp_path):
    values = ValuePickleFile(tmp_path)
    key = values.save([1, 2])
    keys = set(values.list())
    with values.locked(key):
        pass
    other = digest("other")
    (tmp_path / key[:2] / f".{key}.abc.tmp").write_bytes(b"partial")
    (tmp_path / other[:2]).mkdir(exist_ok=True)
    (tmp_path / other[:2] / (other[:-1] + "x")).write_bytes(b"")  # not hex
    (tmp_path / "zz").mkdir()
    (tmp_path / "zz" / other).write_bytes(b"")  # wrong fan-out directory name
    (tmp_path / "ff").mkdir(exist_ok=True)
    (tmp_path / "ff" / other).write_bytes(b"")  # in the wrong fan-out directory
    (tmp_path / other[:2] / other.upper()).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / other[:2] / (other + "0")).mkdir()
    assert (tmp_path / ".locks").is_dir() and any((tmp_path / ".locks").iterdir())
    assert set(values.list()) == keys
    assert values.load(key) == [1, 2]


# -- what cannot be stored --------------------------------------------------------------------


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts]


def test_unpicklable_value_raises_save_error_and_leaves_nothing(tmp_path):
    values = ValuePickleFile(tmp_path)
    lock = threading.Lock()
    with pytest.raises(SaveError, match=r"_thread\.lock.*cloudpickle"):
        values.save(lock, digest("a lock"))
    assert _leftovers(tmp_path) == []
    assert list(values.list()) == []


def test_lambda_needs_cloudpickle(tmp_path):
    plain = ValuePickleFile(tmp_path, remaining_depth=1)
    with pytest.raises(SaveError, match="function"):
        plain.save(lambda x: x + 1, digest("f"))
    cloud = ValuePickleFile(tmp_path, serializer="cloudpickle")
    offset = 41
    key = cloud.save(lambda x: x + offset, digest("f"))
    assert plain.load(key)(1) == 42  # any storage loads a cloudpickle entry


def test_cloudpickle_of_a_local_class(tmp_path):
    class Point:
        def __init__(self, x):
            self.x = x

    with pytest.raises(SaveError, match="Point"):
        ValuePickleFile(tmp_path).save(Point(5), digest("p"))
    values = ValuePickleFile(tmp_path, serializer="cloudpickle")
    assert values.load(values.save(Point(5), digest("p"))).x == 5


# -- corruption -------------------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path):
    values = ValuePickleFile(tmp_path)
    key = values.save({"payload": list(range(100))}, digest("entry"))
    return values, key, tmp_path / key[:2] / key


def _damage_cases():
    def truncate(data):
        return data[: len(data) // 2]

    def header_only(data):
        return data[:10]

    def flip_payload(data):
        b = bytearray(data)
        b[-5] ^= 0x01
        return bytes(b)

    def flip_header(data):
        b = bytearray(data)
        b[20] ^= 0x80  # in the checksum
        return bytes(b)

    def flip_flags(data):
        b = bytearray(data)
        b[5] ^= 0x04  # an unused flag bit
        return bytes(b)

    def wrong_magic(data):
        return b"XXXX" + data[4:]

    def future_version(data):
        return data[:4] + bytes([99]) + data[5:]

    def garbage(data):
        return os.urandom(len(data))

    def plain_pickle(data):
        return pickle.dumps({"payload": "not ours"})

    def empty(data):
        return b""

    def appended(data):
        return data + b"\0"

    return {
        "truncated": (truncate, "torn"),
        "header only": (header_only, "truncated"),
        "payload bit": (flip_payload, "checksum"),
        "checksum bit": (flip_header, "checksum"),
        "flag bit": (flip_flags, "checksum"),
        "wrong magic": (wrong_magic, "magic"),
        "future version": (future_version, "version 99"),
        "garbage": (garbage, "magic"),
        "plain pickle": (plain_pickle, "magic"),
        "empty": (empty, "truncated"),
        "appended": (appended, "torn"),
    }


@pytest.mark.parametrize("case", sorted(_damage_cases()))
def test_damaged_entry_is_detected_and_evictable(stored, case):
    values, key, path = stored
    damage, reason = _damage_cases()[case]
    path.write_bytes(damage(path.read_bytes()))
    assert_corrupt_entry_is_reported_and_evictable(values, key, path, reason)
    assert values.save({"payload": list(range(100))}, key) == key
    assert values.load(key) == {"payload": list(range(100))}


def test_corrupt_entry_does_not_affect_others(stored):
    values, key, path = stored
    other = values.save("fine")
    path.write_bytes(b"junk")
    assert values.load(other) == "fine"
    assert set(values.list()) >= {key, other}


def test_intact_entry_of_a_vanished_class_names_key_and_file(tmp_path, monkeypatch):
    values = ValuePickleFile(tmp_path)
    key = digest("gone")
    values.save(_Vanishing(), key)
    monkeypatch.delitem(globals(), "_Vanishing")  # the class no longer exists under its name
    with pytest.raises(CorruptEntryError, match="cannot be unpickled.*_Vanishing") as info:
        values.load(key)
    assert info.value.key == key and key[:2] in info.value.location


class _Vanishing:
    pass


# -- signing ----------------------------------------------------------------------------------


def test_signed_storage_refuses_unsigned_entries(tmp_path):
    key = ValuePickleFile(tmp_path).save("unsigned")
    signed = ValuePickleFile(tmp_path, secret_key="k1")
    with pytest.raises(SignatureError, match="unsigned"):
        signed.load(key)
    # An unsigned storage still reads signed entries (it does not check them).
    key2 = signed.save("signed")
    assert ValuePickleFile(tmp_path).load(key2) == "signed"


def test_signed_storage_refuses_other_keys_and_tampering(tmp_path):
    a = ValuePickleFile(tmp_path, secret_key="alpha")
    b = ValuePickleFile(tmp_path, secret_key="beta")
    key = a.save({"x": 1}, digest("signed"))
    assert a.load(key) == {"x": 1}
    with pytest.raises(SignatureError, match="none of"):
        b.load(key)


def test_signature_binds_the_key(tmp_path):
    signed = ValuePickleFile(tmp_path, secret_key="alpha")
    k1, k2 = signed.save("one"), signed.save("two")
    p1, p2 = (tmp_path / k[:2] / k for k in (k1, k2))
    p2.write_bytes(p1.read_bytes())  # a validly signed entry moved to another key
    with pytest.raises(SignatureError, match="moved"):
        signed.load(k2)


def test_tampered_payload_with_fixed_checksum_is_refused(tmp_path):
    """An attacker who recomputes the checksum still cannot forge the signature."""
    from fleche.storage import pickle_file as pf

    signed = ValuePickleFile(tmp_path, secret_key="alpha")
    key = signed.save("harmless", digest("k"))
    path = tmp_path / key[:2] / key
    data = path.read_bytes()
    evil = pickle.dumps("evil", protocol=5)
    prefix = data[:4] + data[4:8] + len(evil).to_bytes(8, "big")
    mac = data[32:64]
    path.write_bytes(prefix + pf._checksum(prefix, mac, evil) + mac + evil)
    with pytest.raises(SignatureError):
        signed.load(key)
    assert ValuePickleFile(tmp_path).load(key) == "evil"  # what an unsigned reader would run


def test_key_rotation(tmp_path):
    old = ValuePickleFile(tmp_path, secret_key="old")
    key = old.save("written with the old key")
    rotated = ValuePickleFile(tmp_path, secret_key=("new", "old"))
    assert rotated.load(key) == "written with the old key"
    key2 = rotated.save("written with the new key")
    assert ValuePickleFile(tmp_path, secret_key="new").load(key2) == "written with the new key"
    with pytest.raises(SignatureError):
        old.load(key2)


def test_secret_key_from_environment(tmp_path, monkeypatch):
    unsigned_key = ValuePickleFile(tmp_path).save("unsigned")
    monkeypatch.setenv(SECRET_KEY_ENV, "first, second")
    env = ValuePickleFile(tmp_path)
    with pytest.raises(SignatureError):
        env.load(unsigned_key)
    key = env.save("signed by env")
    assert ValuePickleFile(tmp_path, secret_key="first").load(key) == "signed by env"
    monkeypatch.setenv(SECRET_KEY_ENV, "third,second")
    assert ValuePickleFile(tmp_path, secret_key="second").save("x")
    # The explicit field wins over the environment.
    with pytest.raises(SignatureError):
        ValuePickleFile(tmp_path, secret_key="other").load(key)
    # The environment's key does not travel inside pickles.
    assert b"second" not in pickle.dumps(env)


# -- durability and keys ----------------------------------------------------------------------


def test_durable_mode_round_trip(tmp_path):
    values = ValuePickleFile(tmp_path, durable=True)
    key = values.save([1, 2, 3])
    assert values.load(key) == [1, 2, 3]
    values.evict(key)
    assert not values.contains(key)
    assert {p.name for p in _leftovers(tmp_path)} == {values.save(i) for i in (1, 2, 3)}


@pytest.mark.parametrize("bad", ["", "..", "../" + "a" * 61, "ab/cd", "ABCD", "zzzz", "a" * 65])
def test_bad_keys_never_touch_the_disk(tmp_path, bad):
    values = ValuePickleFile(tmp_path / "store")
    for op in (values.load, values.evict, values.contains):
        with pytest.raises(ValueError):
            op(bad)
    with pytest.raises(ValueError):
        with values.locked(bad):
            pass
    with pytest.raises(ValueError):
        values.save(1, bad)
    assert not (tmp_path / "store").exists()


def test_file_storage_is_a_backend_with_hooks(tmp_path):
    assert issubclass(PickleFileBackend, FileStorage)
    with pytest.raises(NotImplementedError):
        FileStorage(tmp_path).put(1, digest(1))
    assert _leftovers(tmp_path) == []


def test_resave_never_leaves_a_gap(tmp_path):
    """A reader polling a call record while it is re-saved never misses it."""
    calls = CallPickleFile(tmp_path)
    call = Call.from_call(_f, 1).replace(result=1)
    key = calls.save(call)
    stop = threading.Event()
    misses: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                calls.load(key)
            except KeyError:
                misses.append(1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for n in range(300):
            calls.save(call.replace(metadata={"run": {"n": n}}))
    finally:
        stop.set()
        t.join()
    assert misses == []
    assert calls.load(key).metadata == {"run": {"n": 299}}


def _f(x):
    return x


def test_sweep_removes_only_stale_temporary_files(tmp_path):
    import time as _time

    from fleche.caches import Cache

    values, calls = ValuePickleFile(tmp_path / "v"), CallPickleFile(tmp_path / "c")
    cache = Cache(values, calls, inline_bytes=0)
    key = cache.save(Call("f", {"x": [1, 2]}, result="r"))
    directory = Path(calls._path(key)).parent
    stale, fresh = directory / f".{key}.dead.tmp", directory / f".{key}.live.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"writing")
    old = _time.time() - 7200
    os.utime(stale, (old, old))
    assert calls.sweep(dry_run=True) == [str(stale)] and stale.exists()
    cache.gc()
    assert not stale.exists() and fresh.exists()
    assert cache.load_result(key) == "r" and set(calls.list()) == {key}


# -- serializers and compression ------------------------------------------------------------


class _Guarded:
    """An object holding a lock: neither pickle nor cloudpickle stores it, dill does."""

    def __init__(self, n):
        self.n = n
        self.lock = threading.Lock()

    def __digest__(self):
        return digest(("guarded", self.n))


def test_dill_stores_what_pickle_and_cloudpickle_cannot(tmp_path):
    for serializer in ("pickle", "cloudpickle"):
        with pytest.raises(SaveError, match="lock"):
            ValuePickleFile(tmp_path / serializer, serializer=serializer).save(_Guarded(1))
    dilled = ValuePickleFile(tmp_path / "values", serializer="dill")
    key = dilled.save(_Guarded(2))
    for reader in (dilled, ValuePickleFile(tmp_path / "values")):  # any setting reads it
        loaded = reader.load(key)
        assert loaded.n == 2 and loaded.lock.acquire(blocking=False)
    with open(dilled._path(key), "rb") as f:
        assert f.read(6)[5] & 0x04  # the envelope flag says dill wrote it


def test_an_unknown_serializer_or_compression_is_refused(tmp_path):
    with pytest.raises(ValueError, match="serializer must be one of 'pickle', 'cloudpickle', 'dill'"):
        ValuePickleFile(tmp_path, serializer="json")
    with pytest.raises(ValueError, match="compression must be None or one of 'zlib', 'lzma', 'bz2'"):
        ValuePickleFile(tmp_path, compression="gzip")


@pytest.mark.parametrize("compression", ["zlib", "lzma", "bz2"])
def test_compressed_entries_are_smaller_and_read_by_any_storage(tmp_path, compression):
    text = "the same line again\n" * 5000
    plain = ValuePickleFile(tmp_path / "plain")
    packed = ValuePickleFile(tmp_path / "packed", compression=compression)
    key = packed.save(text)
    assert plain.save(text) == key
    assert os.path.getsize(packed._path(key)) * 10 < os.path.getsize(plain._path(key))
    for reader in (ValuePickleFile(tmp_path / "packed"),
                   ValuePickleFile(tmp_path / "packed", serializer="dill", compression="lzma")):
        assert reader.load(key) == text
    unpacked = ValuePickleFile(tmp_path / "packed").save([1, 2])
    assert packed.load(unpacked) == [1, 2]  # and it reads uncompressed ones


def test_a_payload_that_does_not_shrink_is_stored_as_it_is(tmp_path):
    values = ValuePickleFile(tmp_path, compression="zlib")
    noise = os.urandom(4096)
    key = values.save(noise)
    with open(values._path(key), "rb") as f:
        assert f.read(6)[5] & 0x30 == 0
    assert values.load(key) == noise


def test_a_compressed_entry_is_checked_before_it_is_decompressed(tmp_path):
    from fleche.storage.pickle_file import ENVELOPE
    from fleche.testing import flip_a_byte

    values = ValuePickleFile(tmp_path, compression="zlib")
    key = values.save("x" * 10000)
    flip_a_byte(values._path(key))
    assert_corrupt_entry_is_reported_and_evictable(
        values, key, values._path(key), "checksum mismatch"
    )
    # Intact and claiming zlib, but not zlib data: a clear error, not a crash.
    forged = ENVELOPE.header(b"not zlib at all", digest("f"), flags=0x10) + b"not zlib at all"
    path = values._path(digest("f"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(forged)
    assert_corrupt_entry_is_reported_and_evictable(
        values, digest("f"), path, "zlib data cannot be decompressed"
    )


def test_a_dill_entry_where_dill_is_missing_says_what_to_install(tmp_path, monkeypatch):
    """Not corrupt, only unreadable here: the error names the extra and nothing is removed."""
    import sys

    values = ValuePickleFile(tmp_path, serializer="dill")
    key = values.save(_Guarded(3))
    monkeypatch.setitem(sys.modules, "dill", None)  # as if dill were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fleche\[dill\]'"):
        ValuePickleFile(tmp_path).load(key)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fleche\[dill\]'"):
        ValuePickleFile(tmp_path, serializer="dill")
    assert values.contains(key)
    monkeypatch.delitem(sys.modules, "dill")
    assert ValuePickleFile(tmp_path).load(key).n == 3
