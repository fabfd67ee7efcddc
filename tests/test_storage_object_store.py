"""Object storages on fsspec filesystems: the shared contracts on fsspec's memory filesystem, a
local directory and a real S3 API server (moto's, started here), and what is particular to
objects: the layout and bytes of pickle files, whole objects, errors, signing, compute-once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fsspec", reason="the object storages need the s3 extra (fsspec)")



import fleche  # noqa: E402
from fleche.caches import Cache  # noqa: E402
from fleche.call import Call  # noqa: E402
from fleche.digest import digest  # noqa: E402
from fleche.errors import (  # noqa: E402
    FlecheWarning,
    ObjectStoreError,
    SaveError,
    SignatureError,
    WriteError,
)
from fleche.storage import CallObjectStore, CallPickleFile, ValueObjectStore, ValuePickleFile  # noqa: E402
from fleche.storage.pickle_file import SECRET_KEY_ENV  # noqa: E402
from fleche.testing import (  # noqa: E402
    CacheTests,
    CallStorageTests,
    ValueStorageTests,
    assert_corrupt_entry_is_reported_and_evictable,
    flip_a_byte_of_object,
)

SRC = str(Path(fleche.__file__).parent.parent)

# The contracts take locked sections on object stores on purpose: not what this module checks.
pytestmark = pytest.mark.filterwarnings("ignore:locks of the object store:fleche.errors.FlecheWarning")


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch):
    monkeypatch.setenv(SECRET_KEY_ENV, "none")


def memory_url(what: str) -> str:
    """A fresh place on fsspec's in-memory filesystem (shared by this process's tests)."""
    return f"memory://fleche-tests/{uuid.uuid4().hex}/{what}"


# -- the contracts ------------------------------------------------------------------------------


class TestValueObjectStoreInMemory(ValueStorageTests):
    def make_storage(self, tmp_path):
        return ValueObjectStore(memory_url("values"))


class TestCallObjectStoreInMemory(CallStorageTests):
    def make_storage(self, tmp_path):
        return CallObjectStore(memory_url("calls"))


class TestSignedValueObjectStore(ValueStorageTests):
    def make_storage(self, tmp_path):
        return ValueObjectStore(memory_url("values"), secret_key=[b"new key", "old key"])


class TestValueObjectStoreOnLocalFiles(ValueStorageTests):
    shared_between_processes = True
    locks_between_processes = False

    def make_storage(self, tmp_path):
        return ValueObjectStore(f"file://{tmp_path}/values", serializer="cloudpickle")


class S3Contract:
    """Runs a contract against a fresh bucket of the local S3 server."""

    shared_between_processes = True
    locks_between_processes = False

    @pytest.fixture(autouse=True)
    def _bucket(self, bucket):
        self.bucket = bucket


class TestValueObjectStoreOnS3(S3Contract, ValueStorageTests):
    def make_storage(self, tmp_path):
        return ValueObjectStore(f"s3://{self.bucket}/sweep/values")


class TestCallObjectStoreOnS3(S3Contract, CallStorageTests):
    def make_storage(self, tmp_path):
        return CallObjectStore(f"s3://{self.bucket}/sweep/calls")


class TestObjectStoreCache(CacheTests):
    """The cache contract over an object store (fsspec's memory filesystem)."""

    def make_store(self, tmp_path):
        base = memory_url("store")
        return Cache(ValueObjectStore(f"{base}/values"), CallObjectStore(f"{base}/calls"))

    def wrap(self, store):
        return store



# -- layout and format --------------------------------------------------------------------------


def test_a_directory_store_uploaded_file_by_file_is_an_s3_store(tmp_path, s3, bucket):
    """Objects have the layout and the bytes of pickle files: `aws s3 sync DIR s3://...` of a
    store in the file layout (the index layout's calls are rows: `fleche copy` moves those)."""
    local = fleche.open(f"{tmp_path / 'store'}?layout=files")
    results = [["r" * 3000, t] if t % 2 else "s" * 3000 + str(t) for t in range(3)]  # not inline
    keys = [local.save(Call("simulate", {"t": t}, result=results[t])) for t in range(3)]
    client = s3.client()
    for path in (tmp_path / "store").rglob("*"):
        relative = path.relative_to(tmp_path / "store")
        if path.is_file() and ".locks" not in relative.parts:
            client.upload_file(str(path), bucket, f"copy/{relative}")
    remote = fleche.open(f"s3://{bucket}/copy")
    assert sorted(remote.list()) == sorted(keys)
    assert [remote.load_result(k) for k in keys] == results
    assert remote.values.list() and set(remote.values.list()) == set(local.values.list())


def test_entry_layout_and_listing_ignores_other_objects(s3, bucket):
    values = ValueObjectStore(f"s3://{bucket}/p/values")
    key = values.save("x")
    client = s3.client()
    assert client.get_object(Bucket=bucket, Key=f"p/values/{key[:2]}/{key}")["Body"].read()
    other = digest("other")
    for stray in (f"p/values/{other}", f"p/values/ff/{other}", f"p/values/{other[:2]}/{other.upper()}",
                  f"p/values/{other[:2]}/.{other}.0123456789ab.tmp", "p/values/notes.txt",
                  f"p/valuesX/{other[:2]}/{other}", f"p/values/{other[:2]}/{other}0"):
        client.put_object(Bucket=bucket, Key=stray, Body=b"not an entry")
    assert list(values.list()) == [key]
    assert values.load(key) == "x" and not values.contains(other)


def test_resaving_replaces_in_place(s3, bucket):
    values = ValueObjectStore(f"s3://{bucket}/p")
    key = digest("k")
    values.save("first", key)
    values.save("second", key)
    assert values.load(key) == "second" and list(values.list()) == [key]


def test_contains_many_lists_once_for_many_keys(s3, bucket):
    calls = CallObjectStore(f"s3://{bucket}/calls")
    keys = [calls.save(Call("f", {"i": i}, result=i)) for i in range(20)]
    missing = [digest(("missing", i)) for i in range(10)]
    asked = [*keys[:15], *(k[:10] for k in keys[15:]), *missing, "0000ffff"]
    assert calls.contains_many(asked) == set(keys)
    assert calls.contains_many(keys[:3] + missing[:2]) == set(keys[:3])


def test_large_values_round_trip(s3, bucket):
    np = pytest.importorskip("numpy")
    values = ValueObjectStore(f"s3://{bucket}/big")
    array = np.arange(2_000_000, dtype=np.float64)  # 16 MB
    key = values.save(array)
    assert (values.load(key) == array).all()


# -- whole objects ------------------------------------------------------------------------------


def test_readers_never_see_a_partial_object_on_local_files(tmp_path):
    """A reader racing rewrites of one key always loads one whole value (temporary file and
    rename): never a torn entry."""
    values = ValueObjectStore(f"file://{tmp_path}/values")
    key = digest("raced")
    versions = [b"a" * 4_000_000, b"b" * 4_000_000]
    values.save(versions[0], key)
    stop = threading.Event()
    seen, errors = set(), []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(values.load(key)[:1])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            values.save(versions[i % 2], key)
    finally:
        stop.set()
        reader.join()
    assert errors == [] and seen <= {b"a", b"b"}
    assert [p.name for p in (tmp_path / "values" / key[:2]).iterdir()] == [key]  # no temporaries


def test_sweep_removes_only_stale_temporary_files(tmp_path):
    values = ValueObjectStore(f"file://{tmp_path}/values")
    key = values.save("kept")
    directory = tmp_path / "values" / key[:2]
    stale, fresh = directory / f".{key}.0123456789ab.tmp", directory / f".{key}.ba9876543210.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(stale, (1, 1))
    assert values.sweep(dry_run=True) == [str(stale)] and stale.exists()
    assert values.sweep() == [str(stale)]
    assert not stale.exists() and fresh.exists() and values.load(key) == "kept"
    assert ValueObjectStore(memory_url("values")).sweep() == []  # objects leave nothing behind


# -- damage and signatures ----------------------------------------------------------------------


@pytest.mark.parametrize("damage, reason", [
    (lambda data: data[: len(data) // 2], "torn"),
    (lambda data: data[:-4] + bytes([data[-4] ^ 1]) + data[-3:], "checksum"),
    (lambda data: b"XXXX" + data[4:], "magic"),
])
def test_a_damaged_object_is_reported_and_evictable(s3, bucket, damage, reason):
    values = ValueObjectStore(f"s3://{bucket}/p")
    key = values.save({"payload": list(range(100))})
    fs, path = values._object_path(key)
    fs.pipe_file(path, damage(fs.cat_file(path)))
    assert_corrupt_entry_is_reported_and_evictable(
        values, key, f"s3://{bucket}/p/{key[:2]}/{key}", reason
    )


def test_signed_objects_refuse_unsigned_moved_and_tampered_entries(s3, bucket):
    url = f"s3://{bucket}/signed"
    signed, unsigned = ValueObjectStore(url, secret_key="ours"), ValueObjectStore(url)
    plain = unsigned.save("planted by someone without the key")
    with pytest.raises(SignatureError, match="unsigned"):
        signed.load(plain)
    key, other = signed.save("mine"), digest("elsewhere")
    fs, path = signed._object_path(key)
    fs.pipe_file(signed._object_path(other)[1], fs.cat_file(path))  # moved to another key
    with pytest.raises(SignatureError, match="none of"):
        signed.load(other)
    with pytest.raises(SignatureError, match="none of"):
        ValueObjectStore(url, secret_key="theirs").load(key)
    assert signed.load(key) == "mine"
    assert "ours" not in repr(signed)


def test_a_damaged_call_record_is_recomputed_and_repaired_through_the_decorator(s3, bucket):
    store = fleche.open(f"s3://{bucket}/run")
    runs = []

    @fleche.fleche(cache=store)
    def square(x):
        runs.append(x)
        return {"x": x, "square": x * x}

    assert square(3) == {"x": 3, "square": 9}
    flip_a_byte_of_object(store.calls, square.digest(3))
    with pytest.warns(FlecheWarning, match="corrupt"):
        assert square(3) == {"x": 3, "square": 9}
    assert square(3) == {"x": 3, "square": 9} and runs == [3, 3]


# -- errors -------------------------------------------------------------------------------------


def test_a_missing_bucket_is_named_on_save_and_reads_as_empty(s3):
    values = ValueObjectStore("s3://fleche-no-such-bucket/p")
    with pytest.raises(WriteError, match="bucket or container does not exist") as info:
        values.save("x")
    assert info.value.path.startswith("s3://fleche-no-such-bucket/p/")
    assert isinstance(info.value, SaveError) and isinstance(info.value, OSError)
    assert list(values.list()) == [] and not values.contains(digest("x"))
    with pytest.raises(KeyError):
        values.load(digest("x"))


def test_an_unreachable_endpoint_raises_errors_naming_the_store_and_never_fails_a_call(s3):
    down = {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}}
    base = "s3://fleche-down/p"
    values = ValueObjectStore(f"{base}/values", down)
    with pytest.raises(ObjectStoreError, match="s3://fleche-down/p/values.*onnect") as info:
        values.load(digest("x"))
    assert isinstance(info.value, OSError)
    with pytest.raises(WriteError, match="onnect"):
        values.save("x")
    store = Cache(values, CallObjectStore(f"{base}/calls", down))

    @fleche.fleche(cache=store)
    def double(x):
        return 2 * x

    with pytest.warns(FlecheWarning, match="ObjectStoreError"):
        assert double(21) == 42


def test_a_bad_filesystem_option_is_named(s3):
    values = ValueObjectStore("s3://fleche-any/p", {"endpoint_ur": "http://127.0.0.1:9"})
    with pytest.raises(ObjectStoreError, match="endpoint_ur"):
        values.load(digest("x"))


@pytest.mark.parametrize("kwargs, match", [
    ({"url": "/not/a/url"}, "fsspec URL"),
    ({"url": "memory://x", "serializer": "json"}, "serializer"),
    ({"url": "memory://x", "lock_timeout": -1}, "lock_timeout"),
    ({"url": "memory://x", "secret_key": b""}, "empty"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ValueObjectStore(**kwargs)


def test_a_cache_refuses_values_and_calls_at_one_location():
    with pytest.raises(ValueError, match="same object store location.*URL/values"):
        Cache(ValueObjectStore("s3://b/p"), CallObjectStore("s3://b/p/"))
    Cache(ValueObjectStore("s3://b/p/values"), CallObjectStore("s3://b/p/calls"))


def test_settings_equality_pickling_and_repr_without_credentials():
    import pickle

    a = ValueObjectStore("s3://b/p/", {"secret": "s3cr3t", "client_kwargs": {"region_name": "x"}})
    b = ValueObjectStore("s3://b/p", {"client_kwargs": {"region_name": "x"}, "secret": "s3cr3t"})
    assert a == b and hash(a) == hash(b) and a.url == "s3://b/p"
    assert a != ValueObjectStore("s3://b/p") and a != ValueObjectStore("s3://b/p", b.storage_options,
                                                                        serializer="cloudpickle")
    assert pickle.loads(pickle.dumps(a)) == a
    assert "s3cr3t" not in repr(a) and "s3cr3t" not in repr(Cache(a, CallObjectStore("s3://b/c")))


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_importing_fleche_does_not_import_fsspec():
    done = _run(
        "import sys, fleche, fleche.storage, fleche.spec, fleche.cli\n"
        "fleche.open('s3://bucket/prefix'); fleche.open('fsspec+memory://x')\n"
        "assert not {'fsspec', 's3fs', 'botocore'} & set(sys.modules), sys.modules.keys()\n"
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("missing, needs", [("s3fs", "s3fs"), ("fsspec", "fsspec")])
def test_a_missing_extra_fails_with_one_line_naming_it(missing, needs):
    done = _run(
        f"import sys; sys.modules[{missing!r}] = None\n"
        "import fleche\n"
        "from fleche.digest import digest\n"
        "try:\n"
        "    fleche.open('s3://bucket/prefix').load_result(digest(1))\n"
        "except ModuleNotFoundError as e:\n"
        "    print(e)\n"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and needs in lines[0] and "pip install 'fleche[s3]'" in lines[0], lines


# -- compute-once -------------------------------------------------------------------------------


def test_compute_once_on_an_object_store_warns_once_that_it_holds_at_least_once():
    base = memory_url("store")
    store = fleche.open(f"fsspec+{base}")
    runs = []

    @fleche.fleche(cache=store, compute_once=True)
    def square(x):
        runs.append(x)
        return x * x

    with pytest.warns(FlecheWarning, match="at least once") as caught:
        assert square(2) == 4
    assert len([w for w in caught if "at least once" in str(w.message)]) == 1
    assert base in str(caught[0].message) and "postgresql://" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert square(3) == 9 and square(2) == 4  # once per process and store
    assert runs == [2, 3]


def test_compute_once_with_database_calls_and_object_values_does_not_warn(tmp_path):
    pytest.importorskip("sqlalchemy")
    store = fleche.open(f"sqlite:///{tmp_path}/calls.db?values=fsspec%2B{memory_url('values')}")
    assert isinstance(store.values, ValueObjectStore)

    @fleche.fleche(cache=store, compute_once=True)
    def big(x):
        return "r" * 5000 + str(x)  # stored in the object store, not inline

    with warnings.catch_warnings():
        warnings.simplefilter("error", FlecheWarning)
        assert big(1).endswith("1") and big(1).endswith("1")
    assert len(list(store.values.list())) == 1


def test_object_stores_are_shared_by_processes_on_s3_without_a_shared_directory(s3, bucket, tmp_path):
    """Two pickled copies of one store in spawned processes see each other's calls."""
    import multiprocessing

    store = fleche.open(f"s3://{bucket}/shared")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        keys = pool.starmap(_save_a_call, [(store, i) for i in range(4)])
    assert sorted(store.list()) == sorted(keys)
    assert [store.load_result(k) for k in keys] == [i * i for i in range(4)]


def _save_a_call(store, i):
    return store.save(Call("square", {"x": i}, result=i * i))


def test_pickle_file_and_object_stores_hold_the_same_bytes(tmp_path):
    """The envelope of pickle files, byte for byte (the same key, value and serializer)."""
    files = ValuePickleFile(tmp_path / "files")
    objects = ValueObjectStore(f"file://{tmp_path}/objects")
    key = files.save("a value" * 10)
    assert objects.save("a value" * 10) == key
    assert (tmp_path / "files" / key[:2] / key).read_bytes() == (
        tmp_path / "objects" / key[:2] / key).read_bytes()
    records = CallPickleFile(tmp_path / "calls")
    assert CallObjectStore(f"file://{tmp_path}/calls").load(records.save(Call("f", {}, result=1)))
