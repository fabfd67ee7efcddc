"""Store specs: fleche.open, spec_of, FLECHE_CACHE, and the plugins that take specs."""

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import fleche
from fleche import decorator
from fleche.caches import Cache
from fleche.errors import SpecError
from fleche.spec import CACHE_ENV, DEFAULT_INLINE_PARTS, mask, parse, spec_of
from fleche.call import Call
from fleche.storage import CallMemory, CallPickleFile, ValueMemory, ValuePickleFile
from fleche.storage.directory_index import CallDirectoryIndex

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent


def pickle_values(root, **settings):
    """A ``ValuePickleFile`` as a spec opens it (small parts inline, ``inline_parts``)."""
    return ValuePickleFile(root, inline_parts=DEFAULT_INLINE_PARTS, **settings)


def subprocess_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != CACHE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS)])
    return {**env, **extra}


def test_a_directory_is_pickle_files_in_values_and_an_index(tmp_path, monkeypatch):
    cache = fleche.open(str(tmp_path))
    assert cache == Cache(pickle_values(tmp_path / "values"), CallDirectoryIndex(tmp_path))
    assert fleche.open(f"file://{tmp_path}") == cache
    monkeypatch.chdir(tmp_path)
    assert fleche.open("store") == fleche.open(str(tmp_path / "store"))  # absolute at once
    assert fleche.open(tmp_path) == cache  # a Path works too


def test_the_layout_option(tmp_path):
    files = Cache(pickle_values(tmp_path / "values"), CallPickleFile(tmp_path / "calls"))
    assert fleche.open(f"{tmp_path}?layout=files") == files
    assert fleche.open(f"{tmp_path}?layout=index") == fleche.open(str(tmp_path))
    with pytest.raises(SpecError, match="layout must be one of index, files"):
        fleche.open(f"{tmp_path}?layout=rows")
    with pytest.raises(SpecError, match="'layout' does not apply"):
        fleche.open(f"sqlite:///{tmp_path}/c.db?layout=files")


def test_a_directory_keeps_the_layout_it_holds(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    fleche.open(f"{old}?layout=files").save(Call("f", {}, result=1))
    fleche.open(f"{new}?layout=index").save(Call("f", {}, result=1))
    assert isinstance(fleche.open(str(old)).calls, CallPickleFile)
    assert isinstance(fleche.open(str(new)).calls, CallDirectoryIndex)
    assert fleche.open(f"{old}?layout=index").calls == CallDirectoryIndex(old)  # forced
    assert spec_of(fleche.open(str(old))) == str(old)  # its files imply the layout
    assert spec_of(fleche.open(f"{old}?layout=index")) == f"{old}?layout=index"


def test_options_reach_the_storages(tmp_path):
    cache = fleche.open(f"{tmp_path}?format=cloudpickle&lock_timeout=5&durable=true")
    assert cache.values.serializer == "cloudpickle" and cache.calls.serializer == "pickle"
    assert cache.values.lock_timeout == cache.calls.lock_timeout == 5.0
    assert cache.values.durable and cache.calls.durable
    assert fleche.open(f"{tmp_path}?lock_timeout=none").values.lock_timeout is None


def test_small_parts_stay_in_their_container(tmp_path):
    """A list of numbers is one value file by default, one per element with inline_parts=0;
    large parts are stored apart either way, and each store reads the other's."""
    numbers, big = list(range(1000)), bytes(10_000)
    default, apart = fleche.open(str(tmp_path)), fleche.open(f"{tmp_path}?inline_parts=0")
    assert default.values.inline_parts == DEFAULT_INLINE_PARTS and apart.values.inline_parts == 0
    key = default.values.save([numbers, big])
    assert len(list(default.values.list())) == 3  # the list, the numbers whole, the bytes
    assert default.values.child_digests(default.values.save(numbers)) == set()
    assert apart.values.load(key) == [numbers, big]
    other = apart.values.save(list(range(1000, 1010)))
    assert len(list(apart.values.list())) == 3 + 1 + 10
    assert default.values.load(other) == list(range(1000, 1010))
    assert parse(f"{tmp_path}?format=h5").resolved_inline_parts() == 0  # HDF5 keeps parts apart
    if importlib.util.find_spec("sqlalchemy") is not None:
        database = fleche.open(f"sqlite:///{tmp_path}/calls.db")  # values in the database
        assert database.values.load(database.values.save(numbers)) == numbers
        assert len(list(database.values.list())) == 1  # one row
    assert parse(f"{tmp_path}?inline_parts=2048") == parse(str(tmp_path))  # the default


def test_serializer_and_compression_options(tmp_path):
    cache = fleche.open(f"{tmp_path}?format=dill&compression=zlib")
    assert cache.values.serializer == "dill" and cache.values.compression == "zlib"
    assert cache.calls.serializer == "pickle" and cache.calls.compression is None
    key = cache.values.save("x" * 5000)
    assert fleche.open(str(tmp_path)).values.load(key) == "x" * 5000  # any reader decodes it
    sql = fleche.open(f"sqlite:///{tmp_path}/calls.db?format=dill&compression=lzma")
    assert sql.values.serializer == "dill" and sql.values.compression == "lzma"


def test_h5_spec():
    pytest.importorskip("bagofholding")
    from fleche.storage import CallBagOfHoldingH5File, ValueBagOfHoldingH5File

    cache = fleche.open("/data/run?format=h5")
    assert isinstance(cache.values, ValueBagOfHoldingH5File)
    assert isinstance(cache.calls, CallDirectoryIndex)
    cache = fleche.open("/data/run?format=h5&layout=files")
    assert isinstance(cache.calls, CallBagOfHoldingH5File)
    assert cache.calls.root == Path("/data/run/calls")


def test_sql_specs(tmp_path):
    pytest.importorskip("sqlalchemy")
    from fleche.storage import SqlValues

    cache = fleche.open(f"sqlite:///{tmp_path}/calls.db")
    assert cache.calls.url == f"{tmp_path}/calls.db"
    assert isinstance(cache.values, SqlValues) and cache.values.sql is cache.calls
    assert spec_of(cache) == f"sqlite:///{tmp_path}/calls.db"
    (tmp_path / "calls.db-values").mkdir()  # a store made before values lived in the database
    cache = fleche.open(f"sqlite:///{tmp_path}/calls.db")
    assert cache.values.root == Path(f"{tmp_path}/calls.db-values")  # next to it, like -wal
    assert spec_of(cache) == f"sqlite:///{tmp_path}/calls.db"
    cache = fleche.open(f"sqlite:///{tmp_path}/new.db?values={tmp_path}/new.db-values")
    assert spec_of(cache) == f"sqlite:///{tmp_path}/new.db?values={tmp_path}/new.db-values"
    cache = fleche.open(f"sqlite:///{tmp_path}/calls.db?values={tmp_path}/v&format=cloudpickle")
    assert cache.values.root == tmp_path / "v" and cache.values.serializer == "cloudpickle"
    cache = fleche.open("postgresql://me:pw@db-host/fleche?values=/shared/v&sslmode=require")
    assert cache.calls.url == "postgresql+psycopg://me:pw@db-host/fleche?sslmode=require"
    assert fleche.open("mysql://me@db/fleche?values=/v").calls.url == "mysql+pymysql://me@db/fleche"
    alone = fleche.open("postgresql://me:s3cret@db-host/fleche?format=cloudpickle&compression=zlib")
    assert isinstance(alone.values, SqlValues) and alone.values.sql is alone.calls
    assert alone.values.serializer == "cloudpickle" and alone.values.compression == "zlib"
    assert spec_of(alone) == (
        "postgresql+psycopg://me:***@db-host/fleche?format=cloudpickle&compression=zlib"
    )
    assert "s3cret" not in repr(alone) and "s3cret" not in repr(parse("postgresql://me:s3cret@h/f"))
    assert spec_of(alone, reveal=True).startswith("postgresql+psycopg://me:s3cret@")
    assert isinstance(fleche.open("mysql://me@db/fleche").values, SqlValues)
    assert fleche.open("mariadb+pymysql://db/f?values=/v").calls.url == "mariadb+pymysql://db/f"


def test_memory_is_one_cache_per_spec_and_process():
    assert fleche.open("memory://") is fleche.open("memory://")
    assert fleche.open("memory://a") is not fleche.open("memory://b")
    assert isinstance(fleche.open("memory://").values, ValueMemory)


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("ftp://host/x", "unknown scheme 'ftp://'"),
        ("postgres://db/x?values=/v", "write postgresql://"),
        ("postgresql://me:s3cret@db/x?format=h5", "format=h5 keeps values as HDF5 files"),
        ("/data?valeus=/v", "unknown option 'valeus'"),
        ("sqlite:///x.db?vaules=/v", "did you mean 'values'"),
        ("/data?values=/v", "'values' does not apply"),
        ("/data?format=json", "format must be one of pickle, cloudpickle, dill, h5"),
        ("/data?compression=gzip", "compression must be one of zlib, lzma, bz2"),
        ("/data?format=h5&compression=zlib", "compression applies to the pickle formats"),
        ("/data?lock_timeout=soon", "lock_timeout must be a number"),
        ("/data?lock_timeout=-1", "lock_timeout must be a number"),
        ("/data?durable=maybe", "durable must be true or false"),
        ("/data?format=h5&format=pickle", "given twice"),
        ("/data?secret_key=abc", "FLECHE_SECRET_KEY"),
        ("sqlite://", "in-memory SQLite"),
        ("sqlite:///x.db?values=", "values= needs a directory"),
        ("memory://?format=h5", "takes no options"),
        ("file://", "no directory"),
        ("/data?inline_parts=-1", "inline_parts must be a number of bytes >= 0"),
        ("/data?inline_parts=2k", "inline_parts must be a number of bytes >= 0"),
        ("sqlite:///x.db?values=s3://b/p&inline_parts=0", "an object store keeps each value whole"),
        ("s3://bucket/p?inline_parts=0", "'inline_parts' does not apply"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, reason):
    with pytest.raises(SpecError, match=reason) as info:
        parse(spec)
    assert isinstance(info.value, ValueError)
    assert "s3cret" not in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).reason == info.value.reason


def test_a_spec_is_a_string():
    with pytest.raises(TypeError, match="store spec is a str"):
        fleche.open(42)


@pytest.mark.parametrize(
    "form",
    [
        "{tmp}/store",
        "{tmp}/store?format=cloudpickle&lock_timeout=2.5&durable=true",
        "{tmp}/store?format=h5",
        "{tmp}/store?layout=files",
        "{tmp}/store?format=h5&layout=files",
        "{tmp}/store?layout=index",
        "{tmp}/store?inline_parts=0",
        "{tmp}/store?format=h5&inline_parts=512",
        "sqlite:///{tmp}/calls.db?inline_parts=100000",
        "sqlite:///{tmp}/calls.db",
        "sqlite:///{tmp}/calls.db?values={tmp}/v&format=cloudpickle",
        "{tmp}/store?format=dill&compression=lzma",
        "sqlite:///{tmp}/calls.db?format=dill&compression=zlib",
        "postgresql+psycopg://u:pw@h:5432/db?sslmode=require&values=/shared/v",
        "memory://",
        "memory://other",
    ],
)
def test_spec_of_round_trips(form, tmp_path):
    if "h5" in form:
        pytest.importorskip("bagofholding")
    if "sql" in form:
        pytest.importorskip("sqlalchemy")
    cache = fleche.open(form.format(tmp=tmp_path))
    spec = spec_of(cache, reveal=True)  # with the password, which spec_of masks by default
    assert spec is not None and fleche.open(spec) == cache
    copy = pickle.loads(pickle.dumps(cache))
    assert spec_of(copy, reveal=True) == spec or spec.startswith("memory")
    assert parse(spec).reveal() == spec  # canonical
    assert str(parse(spec)) == spec_of(cache) == mask(spec)


def test_spec_of_caches_no_spec_can_name(tmp_path):
    assert spec_of(Cache(ValueMemory(), CallMemory())) is None
    assert spec_of(Cache(pickle_values(tmp_path / "a"), CallPickleFile(tmp_path / "b"))) is None
    signed = Cache(pickle_values(tmp_path / "values", secret_key="k"), CallPickleFile(tmp_path / "calls"))
    assert spec_of(signed) is None
    plain = Cache(pickle_values(tmp_path / "values"), CallPickleFile(tmp_path / "calls"))
    assert spec_of(plain) == f"{tmp_path}?layout=files"  # not what a new store would be
    indexed = Cache(pickle_values(tmp_path / "values"), CallDirectoryIndex(tmp_path))
    assert spec_of(indexed) == str(tmp_path)
    every_part_apart = Cache(ValuePickleFile(tmp_path / "values"), CallDirectoryIndex(tmp_path))
    assert spec_of(every_part_apart) == f"{tmp_path}?inline_parts=0"  # the class's default
    assert spec_of(Cache(pickle_values(tmp_path / "v"), CallDirectoryIndex(tmp_path))) is None


def test_passwords_are_masked():
    spec = "postgresql+psycopg://me:s3cret@db-host:5432/fleche?values=/v"
    assert mask(spec) == "postgresql+psycopg://me:***@db-host:5432/fleche?values=/v"
    assert mask("/data/store?format=h5") == "/data/store?format=h5"
    assert mask("postgresql://db-host:5432/fleche") == "postgresql://db-host:5432/fleche"


def test_fleche_cache_is_the_default_of_a_new_process(tmp_path):
    code = "import cli_tasks; print(cli_tasks.square(7))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(FLECHE_CACHE=str(tmp_path)),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    import cli_tasks

    cache = fleche.open(str(tmp_path))
    assert cache.load_result(cli_tasks.square.digest(7)) == 49


def test_a_bad_fleche_cache_fails_loudly():
    code = "import cli_tasks; cli_tasks.square(7)"
    done = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(FLECHE_CACHE="ftp://nowhere"),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "SpecError" in done.stderr and "FLECHE_CACHE" in done.stderr


def test_resolution_order_with_fleche_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    monkeypatch.setattr(decorator, "_from_env", None)  # as in a new process
    assert decorator.get_default_cache() == fleche.open(str(tmp_path / "env"))
    assert fleche.active_cache() is decorator.get_default_cache()  # opened once
    explicit = fleche.open("memory://explicit")
    fleche.set_default_cache(explicit)
    try:
        assert fleche.active_cache() is explicit
        active = fleche.open("memory://active")
        with fleche.cache(active):
            assert fleche.active_cache() is active
    finally:
        fleche.set_default_cache(None)
    assert fleche.active_cache() == fleche.open(str(tmp_path / "env"))
    monkeypatch.delenv(CACHE_ENV)
    assert decorator.get_default_cache() is not None  # read once per process
    monkeypatch.setattr(decorator, "_from_env", None)
    assert decorator.get_default_cache() is None


def test_dask_plugin_takes_a_spec(tmp_path):
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    import cli_tasks
    from fleche.dask import FlecheCache

    plugin = FlecheCache(str(tmp_path))
    assert plugin.name == FlecheCache(f"file://{tmp_path}").name
    assert plugin.name != FlecheCache(str(tmp_path / "other")).name
    assert len(pickle.dumps(plugin)) < 1000
    with pytest.raises(SpecError, match="unknown scheme"):
        FlecheCache("ftp://x")
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
        worker_dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        client.register_plugin(plugin)
        assert client.submit(cli_tasks.square, 12).result() == 144
    assert fleche.open(str(tmp_path)).load_result(cli_tasks.square.digest(12)) == 144


def test_ray_setup_hook_takes_a_spec(tmp_path):
    pytest.importorskip("ray")
    from fleche.ray import install_store

    hook = install_store(str(tmp_path))
    with pytest.raises(SpecError):
        install_store("/x?format=json")
    hook()  # what a Ray worker runs before its first task
    try:
        assert decorator.get_default_cache() == fleche.open(str(tmp_path))
    finally:
        fleche.set_default_cache(None)
